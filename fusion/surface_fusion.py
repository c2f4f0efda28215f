"""Scan-to-CBCT fusion end to end: load and check the CBCT and the scan, refuse mismatched
patients, extract the CBCT crown surface, register, gate, and write every output with
its hash.

Outputs in ``out_dir`` (by verdict):

* always: ``qa_scan_axial.png``, ``qa_scan_sagittal_a.png``, ``qa_scan_sagittal_b.png``,
  ``qa_scan_coronal.png``, ``qa_scan_distance.png`` and ``fusion.json``
  (``FusionResult.to_json()``; not listed among its own outputs);
* accepted or needs_review: ``scan_in_cbct.stl`` (the scan in the CBCT frame),
  ``scan_in_cbct.dcm`` (Encapsulated STL in the CBCT's frame of reference, referencing its
  sources), ``registration.dcm`` (Spatial Registration scan frame -> CBCT frame),
  ``scan_labels.nii.gz`` (the scan burned into the CBCT grid: 1 = scan surface matching the
  CBCT crowns, 2 = the rest, mostly gingiva), the same labels as a DICOM Segmentation
  ``scan_segmentation.dcm`` on the CBCT's slices (single-frame CBCTs) and, for a bare STL/PLY/OBJ scan,
  ``scan_source.dcm`` (the original scan wrapped as Encapsulated STL in its own new frame,
  so the registration object has a moving instance to reference).
  A rejected registration writes no DICOM, mesh or label volume.

A bare mesh file has no patient: it takes the CBCT's. An Encapsulated STL's patient must
match the CBCT's (ID + issuer, and birth date/sex when both carry them), otherwise
:class:`~fusion.errors.PatientMismatchError`.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from pydicom.uid import generate_uid

from fusion.cbct_surface import extract_teeth_surface
from fusion.dicom_common import InstanceRef
from fusion.errors import FusionError, InputError, PatientMismatchError
from fusion.gates import SurfaceGateThresholds
from fusion.qa_surface import scan_distances, write_contour_pictures, write_distance_map
from fusion.records import FusionInput, FusionOutput, FusionResult
from fusion.reg_object import refs_of_volume, write_spatial_registration
from fusion.register_surface import METHOD, apply, evaluate_gate, prepare_target, register_surface
from fusion.surface import SurfaceScan, load_scan
from fusion.surface_outputs import (
    burn_scan_labels,
    write_encapsulated_stl,
    write_label_volume,
    write_scan_segmentation,
    write_scan_stl,
)
from fusion.versions import software_versions
from fusion.volume import Volume, demographics_sha256, load_series

log = logging.getLogger(__name__)

def scan_frame_uid(scan: SurfaceScan) -> str:
    """The Frame of Reference UID of a scan: its own (DICOM) or one derived from its
    content hash (bare mesh file: the scanner's arbitrary frame, stable across runs)."""
    if scan.frame_of_reference_uid:
        return scan.frame_of_reference_uid
    return generate_uid(entropy_srcs=["dentfuse-scan-frame", scan.content_sha256])


def check_scan_patient(cbct: Volume, scan: SurfaceScan) -> None:
    """Refuse a DICOM scan of another patient than the CBCT's (a bare mesh has none: no check).

    Raises
    ------
    PatientMismatchError
        Naming both inputs by UID/file and the patient IDs (never names or birth dates).
    """
    if scan.patient is None:
        return
    p = scan.patient
    if (p.patient_id, p.issuer_of_patient_id) != (cbct.patient_id, cbct.issuer_of_patient_id):
        raise PatientMismatchError(
            f"scan {scan.path} (SOP Instance {p.sop_instance_uid}) belongs to patient ID {p.patient_id!r} "
            f"(issuer {p.issuer_of_patient_id!r}) but CBCT series {cbct.series_instance_uid} to "
            f"{cbct.patient_id!r} (issuer {cbct.issuer_of_patient_id!r}); fusion refused: check that the right "
            "scan and CBCT were selected")
    demo = demographics_sha256(p.patient_birth_date, p.patient_sex)
    if demo and cbct.demographics_sha256 and demo != cbct.demographics_sha256:
        raise PatientMismatchError(
            f"scan {scan.path} and CBCT series {cbct.series_instance_uid} share patient ID {p.patient_id!r} "
            "but their birth date/sex differ; fusion refused: reconcile the patient records")


def scan_fusion_input(scan: SurfaceScan, cbct: Volume, frame_uid: str) -> FusionInput:
    """Provenance record of the scan as the moving input."""
    p = scan.patient
    return FusionInput(
        role="moving",
        kind="surface",
        modality=(p.modality if p and p.modality else "M3D"),
        patient_id=p.patient_id if p else cbct.patient_id,
        issuer_of_patient_id=p.issuer_of_patient_id if p else cbct.issuer_of_patient_id,
        demographics_sha256=(demographics_sha256(p.patient_birth_date, p.patient_sex) if p else cbct.demographics_sha256),
        study_instance_uid=p.study_instance_uid if p else "",
        series_instance_uid=p.series_instance_uid if p else "",
        sop_instance_uids=(p.sop_instance_uid,) if p and p.sop_instance_uid else (),
        sop_class_uid=p.sop_class_uid if p else "",
        frame_of_reference_uid=frame_uid,
        content_sha256=scan.content_sha256,
        acquisition_date=p.acquisition_date if p else "",
        source_path=scan.path,
        shape=(scan.n_vertices, scan.n_faces),
        spacing_mm=(),
        extent_mm=scan.extent_mm,
    )


def _load_cbct(paths: Sequence[Path]) -> Volume:
    entries = [Path(p) for p in paths]
    if not entries:
        raise InputError("CBCT input: no path given")
    try:
        return load_series(entries if len(entries) > 1 else entries[0])
    except FusionError as exc:
        names = ", ".join(str(p) for p in entries)
        raise type(exc)(f"CBCT input {names}: {exc}") from exc


def fuse_surface(
    cbct_paths: Sequence[Path],
    scan_path: Path,
    out_dir: Path,
    *,
    gate: SurfaceGateThresholds = SurfaceGateThresholds(),
    seed: int = 0,
    operator: str = "",
    fusion_id: str | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> FusionResult:
    """Register an intraoral scan to a CBCT and write every output into ``out_dir``.

    Parameters
    ----------
    cbct_paths
        Folders and/or files of one CBCT series (the fixed input; defines the frame).
    scan_path
        STL (binary/ASCII), PLY, OBJ, or a DICOM Encapsulated STL file.
    out_dir
        Output folder (created); see the module docstring for its content.
    gate
        Quality-gate thresholds (configuration ``fusion.surface_gate``).
    seed
        Seeds the global alignment's sampling; same inputs and seed give the same transform.
    progress
        Optional ``callback(stage, fraction_done)``.

    Returns
    -------
    FusionResult
        ``transform_moving_to_fixed`` maps scan coordinates to the CBCT frame (LPS mm).
        Also written to ``out_dir/fusion.json``.

    Raises
    ------
    InputError
        The CBCT or the scan cannot be read or fails its checks (message names the input),
        or the CBCT shows no teeth crowns.
    PatientMismatchError
        An Encapsulated STL of another patient than the CBCT's.
    RegistrationError
        Registration could not run at all.
    """
    say = progress or (lambda stage, frac: None)
    fusion_id = fusion_id or uuid.uuid4().hex
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    created = _dt.datetime.now(_dt.timezone.utc)

    say("loading CBCT", 0.0)
    cbct = _load_cbct(cbct_paths)
    say("loading scan", 0.1)
    t1 = time.perf_counter()
    scan = load_scan(Path(scan_path), max_faces=gate.max_scan_faces)
    timings["load"] = time.perf_counter() - t0
    check_scan_patient(cbct, scan)
    frame_uid = scan_frame_uid(scan)
    if frame_uid == cbct.frame_of_reference_uid:
        log.info("fusion %s: scan already claims the CBCT frame %s; registering anyway to verify", fusion_id, frame_uid)

    say("extracting CBCT crown surface", 0.2)
    t1 = time.perf_counter()
    try:
        surface = extract_teeth_surface(cbct.voxels, cbct.affine, frame_of_reference_uid=cbct.frame_of_reference_uid,
                                        max_step_mm=gate.cbct_surface_step_mm or None)
    except InputError as exc:
        raise type(exc)(f"CBCT series {cbct.series_instance_uid}: {exc}") from exc
    target = prepare_target(surface)
    timings["cbct_surface"] = time.perf_counter() - t1

    say("registering", 0.35)
    t1 = time.perf_counter()
    reg = register_surface(scan.vertices, scan.faces, target, gate=gate, seed=seed,
                           progress=lambda s, f: say(s, 0.35 + 0.35 * f))
    timings["register"] = time.perf_counter() - t1
    for k, v in reg.timings_s.items():
        if not k.startswith("n_"):
            timings[f"register_{k}"] = v
    verdict, reasons, checks = evaluate_gate(reg, gate)
    if scan.patient is None:
        reasons = reasons + ("scan file carries no patient identity: the CBCT's patient was assigned",)
    log.info("fusion %s: verdict %s (%s)", fusion_id, verdict, "; ".join(reasons))
    versions = software_versions()
    M = reg.matrix

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[FusionOutput] = []
    t2 = time.perf_counter()
    say("QA pictures", 0.75)
    v_cbct = apply(M, scan.vertices)
    title = f"{verdict} | fusion {fusion_id[:12]} | scan->CBCT"
    outputs += write_contour_pictures(out_dir, cbct.voxels, cbct.affine, v_cbct, scan.faces,
                                      window=(surface.levels.air, surface.levels.enamel + 0.2 * (surface.levels.enamel - surface.levels.air)),
                                      title=title)
    dist = scan_distances(target.full.tree, target.full.points, target.full.normals, v_cbct)
    outputs.append(write_distance_map(out_dir / "qa_scan_distance.png", v_cbct, scan.faces, dist, title=title))
    timings["qa"] = time.perf_counter() - t2

    if verdict != "rejected":
        t3 = time.perf_counter()
        say("writing outputs", 0.85)
        cbct_refs = refs_of_volume(cbct)
        moving_refs: list[InstanceRef] = []
        if scan.patient is not None and scan.patient.sop_instance_uid:
            p = scan.patient
            moving_refs.append(InstanceRef(p.sop_class_uid, p.sop_instance_uid, p.series_instance_uid, p.study_instance_uid))
        else:
            # wrap the original scan (its own frame) so the REG has a moving instance to reference
            src = write_encapsulated_stl(
                scan, out_dir / "scan_source.dcm", frame_of_reference_uid=frame_uid, patient_source=cbct.header,
                series_description=f"intraoral scan {Path(scan_path).name}"[:64],
                document_title=f"Intraoral scan {Path(scan_path).name} (scanner frame)"[:64],
                software_versions=versions, series_number=9903,
                sop_instance_uid=generate_uid(entropy_srcs=["dentfuse-scan-source", fusion_id]),
            )
            outputs.append(src)
            moving_refs.append(InstanceRef("1.2.840.10008.5.1.4.1.1.104.3", src.sop_instance_uids[0],
                                           src.series_instance_uid, str(cbct.header.StudyInstanceUID)))
        v_cbct_mesh = (v_cbct, np.asarray(scan.faces))
        outputs.append(write_scan_stl(v_cbct_mesh, out_dir / "scan_in_cbct.stl",
                                      header=f"dentfuse scan in CBCT frame {cbct.frame_of_reference_uid}"[:80]))
        outputs.append(write_encapsulated_stl(
            v_cbct_mesh, out_dir / "scan_in_cbct.dcm", frame_of_reference_uid=cbct.frame_of_reference_uid,
            patient_source=cbct.header, series_description="dentfuse intraoral scan in CBCT frame",
            document_title=f"Intraoral scan registered to CBCT ({verdict})",
            source_refs=list(cbct_refs) + moving_refs, software_versions=versions,
            sop_instance_uid=generate_uid(entropy_srcs=["dentfuse-scan-in-cbct", fusion_id]),
        ))
        if frame_uid != cbct.frame_of_reference_uid:
            outputs.append(write_spatial_registration(
                out_dir / "registration.dcm",
                matrix_moving_to_fixed=M,
                fixed_frame_uid=cbct.frame_of_reference_uid,
                moving_frame_uid=frame_uid,
                fixed_refs=cbct_refs,
                moving_refs=moving_refs,
                patient_source=cbct.header,
                series_description="dentfuse scan->CBCT rigid",
                content_creator_name=operator,
                transformation_comment=f"dentfuse {METHOD}; fusion {fusion_id}; verdict {verdict}",
                software_versions=versions,
            ))
        # label volume: 1 = scan surface on the CBCT crowns, 2 = the rest (gingiva)
        on_crown = dist <= gate.inlier_distance_mm
        face_labels = np.where(on_crown[scan.faces].sum(axis=1) >= 2, 1, 2)
        timings["outputs_dicom_mesh"] = time.perf_counter() - t3
        t4 = time.perf_counter()
        labels = burn_scan_labels(cbct.voxels.shape, cbct.affine, v_cbct, scan.faces, face_labels)
        outputs.append(write_label_volume(labels, cbct.affine, out_dir / "scan_labels.nii.gz"))
        timings["outputs_label_volume"] = time.perf_counter() - t4
        t4 = time.perf_counter()
        if len(cbct.sop_instance_uids) == cbct.voxels.shape[0]:
            outputs.append(write_scan_segmentation(
                labels, cbct, out_dir / "scan_segmentation.dcm", software_versions=versions,
                sop_instance_uid=generate_uid(entropy_srcs=["dentfuse-scan-seg", fusion_id]),
                series_description="dentfuse intraoral scan over CBCT"))
        else:
            log.info("fusion %s: CBCT %s is multi-frame; the scan is written as a label volume only",
                     fusion_id, cbct.series_instance_uid)
        timings["outputs_segmentation"] = time.perf_counter() - t4
        timings["outputs"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0

    metrics = {k: float(v) for k, v in reg.metrics.items()}
    metrics.update({
        "cbct_surface_vertices": float(surface.n_vertices),
        "cbct_surface_near_metal_vertices": float(np.count_nonzero(surface.near_metal)),
        "cbct_metal_voxels": float(surface.levels.metal_voxels),
        "cbct_air_level": float(surface.levels.air),
        "cbct_enamel_level": float(surface.levels.enamel),
        "cbct_surface_iso_level": float(surface.levels.iso),
        "scan_vertices": float(scan.n_vertices),
        "scan_faces": float(scan.n_faces),
    })
    parameters = {
        "registration": dict(reg.parameters),
        "gate": {k: getattr(gate, k) for k in gate.__dataclass_fields__},
        "scan_format": scan.file_format,
        "scan_notes": list(scan.notes),
        "patient_from": "scan" if scan.patient is not None else "cbct",
        "cbct_spacing_mm": list(cbct.spacing),
    }
    result = FusionResult(
        fusion_id=fusion_id,
        patient_key=cbct.to_fusion_input("fixed").patient_key,
        method=METHOD,
        purpose="fusion",
        inputs=(cbct.to_fusion_input("fixed"), scan_fusion_input(scan, cbct, frame_uid)),
        transform_moving_to_fixed=M.tolist(),
        fixed_frame_of_reference_uid=cbct.frame_of_reference_uid,
        moving_frame_of_reference_uid=frame_uid,
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
