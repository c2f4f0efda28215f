"""Volume-to-volume fusion end to end: load and check both series, refuse mismatched
patients, register, gate, and write every output with its hash.

Outputs in ``out_dir`` (by verdict):

* always: ``qa_axial.png``, ``qa_coronal.png``, ``qa_sagittal.png`` and ``fusion.json``
  (``FusionResult.to_json()``; it is not listed among its own outputs);
* accepted or needs_review: ``registration.dcm`` (Spatial Registration), ``derived/``
  (the moving series resampled onto the fixed grid, a DICOM derived series),
  ``moving_in_fixed.nrrd`` and ``moving_in_fixed.nii.gz``, ``fixed.nrrd``.
  A rejected registration writes no DICOM or research volume: nothing wrong can be
  forwarded or opened as if it were right.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from fusion.derived_series import resample_moving, write_derived_series, write_research_volume
from fusion.errors import FusionError, InputError, PatientMismatchError
from fusion.gates import VolumeGateThresholds
from fusion.qa_volume import write_qa_pictures
from fusion.records import FusionOutput, FusionResult
from fusion.reg_object import refs_of_volume, write_spatial_registration
from fusion.register_volume import (
    VolumeRegistrationParameters,
    evaluate_gate,
    parameters_dict,
    register_volumes,
)
from fusion.versions import software_versions
from fusion.volume import Volume, load_series

log = logging.getLogger(__name__)

METHOD = "volume-rigid-mattes-mi"


def _load(paths: Sequence[Path], role: str) -> Volume:
    entries = [Path(p) for p in paths]
    if not entries:
        raise InputError(f"{role} input: no path given")
    try:
        return load_series(entries if len(entries) > 1 else entries[0])
    except FusionError as exc:
        names = ", ".join(str(p) for p in entries)
        raise type(exc)(f"{role} input {names}: {exc}") from exc


def check_same_patient(fixed: Volume, moving: Volume) -> None:
    """Refuse inputs of different patients: patient ID + issuer, and the birth date/sex
    hash when both inputs carry it.

    Raises
    ------
    PatientMismatchError
        Naming both series (and the patient IDs, never names or birth dates).
    """
    if (fixed.patient_id, fixed.issuer_of_patient_id) != (moving.patient_id, moving.issuer_of_patient_id):
        raise PatientMismatchError(
            f"fixed series {fixed.series_instance_uid} belongs to patient ID "
            f"{fixed.patient_id!r} (issuer {fixed.issuer_of_patient_id!r}) but moving series "
            f"{moving.series_instance_uid} to {moving.patient_id!r} (issuer {moving.issuer_of_patient_id!r}); "
            "fusion refused: check that the right series were selected")
    if not fixed.patient_id:
        raise PatientMismatchError(
            f"series {fixed.series_instance_uid} and {moving.series_instance_uid} carry no Patient ID; "
            "patient identity cannot be confirmed, fusion refused")
    if fixed.demographics_sha256 and moving.demographics_sha256 and fixed.demographics_sha256 != moving.demographics_sha256:
        raise PatientMismatchError(
            f"series {fixed.series_instance_uid} and {moving.series_instance_uid} share patient ID "
            f"{fixed.patient_id!r} but their birth date/sex differ; fusion refused: reconcile the patient records")


def fuse_volumes(
    fixed_paths: Sequence[Path],
    moving_paths: Sequence[Path],
    out_dir: Path,
    *,
    gate: VolumeGateThresholds = VolumeGateThresholds(),
    seed: int = 0,
    purpose: str = "fusion",
    operator: str = "",
    fusion_id: str | None = None,
    progress: Callable[[str, float], None] | None = None,
    params: VolumeRegistrationParameters = VolumeRegistrationParameters(),
) -> FusionResult:
    """Fuse a moving volume series onto a fixed one and write every output into ``out_dir``.

    Parameters
    ----------
    fixed_paths, moving_paths
        Folders and/or files of one series each; the fixed one defines the frame.
    out_dir
        Output folder (created); see the module docstring for its content.
    gate
        Quality-gate thresholds (configuration ``fusion.volume_gate``).
    seed
        Seeds metric sampling; same inputs and seed give the same transform.
    purpose
        ``"fusion"`` or ``"subtraction"`` (recorded for billing).
    progress
        Optional ``callback(stage, fraction_done)`` with fraction in [0, 1].

    Returns
    -------
    FusionResult
        Also written to ``out_dir/fusion.json``.

    Raises
    ------
    InputError, GeometryError
        An input cannot be read or is not a consistent volume (message names the input).
    PatientMismatchError
        The inputs belong to different patients.
    RegistrationError
        Registration could not run at all.
    """
    say = progress or (lambda stage, frac: None)
    if purpose not in ("fusion", "subtraction"):
        raise ValueError(f"purpose must be 'fusion' or 'subtraction', not {purpose!r}")
    fusion_id = fusion_id or uuid.uuid4().hex
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc)

    say("loading fixed series", 0.0)
    fixed = _load(fixed_paths, "fixed")
    say("loading moving series", 0.05)
    moving = _load(moving_paths, "moving")
    timings["load"] = time.perf_counter() - t0
    check_same_patient(fixed, moving)
    if fixed.content_sha256 == moving.content_sha256:
        raise InputError(f"fixed series {fixed.series_instance_uid} and moving series {moving.series_instance_uid} "
                         "have identical voxel content (a re-sent copy of one acquisition); fuse two "
                         "distinct acquisitions")
    if fixed.frame_of_reference_uid == moving.frame_of_reference_uid:
        log.info("fusion %s: both series share frame %s; registering anyway to verify",
                 fusion_id, fixed.frame_of_reference_uid)

    def sub(stage: str, frac: float) -> None:
        say(stage, 0.1 + 0.6 * frac)

    t1 = time.perf_counter()
    reg = register_volumes(fixed, moving, params=params, seed=seed, progress=sub)
    timings["register"] = time.perf_counter() - t1
    for k, v in reg.timings_s.items():
        timings[f"register_{k}"] = v
    verdict, reasons, checks = evaluate_gate(reg, gate)
    log.info("fusion %s: verdict %s (%s)", fusion_id, verdict, "; ".join(reasons))
    versions = software_versions()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[FusionOutput] = []
    M = reg.matrix_moving_to_fixed
    t2 = time.perf_counter()
    say("resampling", 0.72)
    resampled = resample_moving(fixed, moving, M)
    res_arr = sitk.GetArrayFromImage(resampled)
    centre = reg.overlap_box_fixed.mean(axis=0) if reg.overlap_box_fixed is not None else None
    say("QA pictures", 0.78)
    outputs += write_qa_pictures(out_dir, fixed, res_arr, centre_lps=centre,
                                 title=f"{verdict} | fusion {fusion_id[:12]} | {moving.modality}->{fixed.modality}")
    timings["qa"] = time.perf_counter() - t2
    if verdict != "rejected":
        t3 = time.perf_counter()
        say("writing registration object", 0.82)
        reg_out = write_spatial_registration(
            out_dir / "registration.dcm",
            matrix_moving_to_fixed=M,
            fixed_frame_uid=fixed.frame_of_reference_uid,
            moving_frame_uid=moving.frame_of_reference_uid,
            fixed_refs=refs_of_volume(fixed),
            moving_refs=refs_of_volume(moving),
            patient_source=fixed.header,
            series_description=f"dentfuse {moving.modality}->{fixed.modality} rigid"[:64],
            content_creator_name=operator,
            transformation_comment=f"dentfuse {METHOD}; fusion {fusion_id}; verdict {verdict}",
            software_versions=versions,
        ) if fixed.frame_of_reference_uid != moving.frame_of_reference_uid else None
        if reg_out is not None:
            outputs.append(reg_out)
        say("writing derived series", 0.87)
        derivation = (f"{moving.modality} series {moving.series_instance_uid} rigidly registered ({METHOD}, "
                      f"Mattes MI, seed {seed}) and resampled (linear) onto the grid of {fixed.modality} series "
                      f"{fixed.series_instance_uid}; fusion {fusion_id}; verdict {verdict}"
                      + (f"; REG {reg_out.sop_instance_uids[0]}" if reg_out else ""))
        outputs.append(write_derived_series(out_dir / "derived", resampled, fixed=fixed, moving=moving,
                                            matrix_moving_to_fixed=M, derivation_description=derivation,
                                            software_versions=versions))
        say("writing research volumes", 0.95)
        res_cast = (sitk.Cast(sitk.Round(resampled), sitk.sitkInt16)
                    if moving.voxels.dtype == np.int16 else resampled)
        outputs.append(write_research_volume(out_dir / "moving_in_fixed.nrrd", res_cast, "volume_nrrd"))
        outputs.append(write_research_volume(out_dir / "moving_in_fixed.nii.gz", res_cast, "volume_nifti"))
        from fusion.volume import volume_to_sitk

        outputs.append(write_research_volume(out_dir / "fixed.nrrd", volume_to_sitk(fixed), "volume_nrrd"))
        timings["outputs"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0

    # JSON has no NaN/Infinity: a figure that could not be measured is left out (its
    # quality check, if any, records it as failed with value 1e9)
    metrics = {k: float(v) for k, v in reg.metrics.items() if math.isfinite(float(v))}
    metrics["optimizer_converged"] = 1.0 if reg.converged else 0.0
    parameters = {
        "registration": parameters_dict(params),
        "gate": {k: getattr(gate, k) for k in gate.__dataclass_fields__},
        "stop_condition": reg.stop_condition,
        "interpolator": "linear",
        "fixed_spacing_mm": list(fixed.spacing),
        "moving_spacing_mm": list(moving.spacing),
    }
    result = FusionResult(
        fusion_id=fusion_id,
        patient_key=fixed.to_fusion_input("fixed").patient_key,
        method=METHOD,
        purpose=purpose,  # type: ignore[arg-type]
        inputs=(fixed.to_fusion_input("fixed"), moving.to_fusion_input("moving")),
        transform_moving_to_fixed=M.tolist(),
        fixed_frame_of_reference_uid=fixed.frame_of_reference_uid,
        moving_frame_of_reference_uid=moving.frame_of_reference_uid,
        verdict=verdict,
        reasons=reasons,
        metrics=metrics,
        quality_checks=checks,
        software_versions=versions,
        parameters=parameters,
        seed=seed,
        outputs=tuple(outputs),
        timings_s={k: round(v, 4) for k, v in timings.items()},
        created_at=created.isoformat(timespec="seconds"),
        operator=operator,
    )
    (out_dir / "fusion.json").write_text(result.to_json())
    say("done", 1.0)
    return result
