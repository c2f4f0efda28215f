"""Generate the synthetic dental patients (DICOM series, meshes, ground truth).

    python test_volumes/generate.py --out DIR [--size small|large] [--seed N] [--case NAME ...]

or ``from test_volumes.generate import generate_set``.  Deterministic for a seed: the same
seed writes the same bytes, and generating a subset of the cases writes those cases exactly
as the full run would.  See test_volumes/README.md for the cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydicom.uid import generate_uid  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

from test_volumes import _dicomio as dio  # noqa: E402
from test_volumes._anatomy import (  # noqa: E402
    CBCT_MATERIALS,
    MR_MATERIALS,
    Anatomy,
    build_anatomy,
    rng_for,
)
from test_volumes._render import add_metal_streaks, blur, box_corners, grid_around, make_scan, render  # noqa: E402

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's registered root, for synthetic data
FORMAT = "dentfuse-groundtruth/1"

CASES = ("p1_cbct_a", "p1_cbct_b", "p1_mr", "p1_cbct_metal", "p1_scan", "p1_pano",
         "p1_cbct_a_resent", "p1_cbct_a_missing", "p2_cbct")

PATIENTS = {
    "p1": dio.Patient(name="SYNTH^ALEX", patient_id="DF-0001", issuer="DENTFUSE-SIM",
                      birth_date="19780412", sex="F"),
    "p2": dio.Patient(name="SYNTH^BLAKE", patient_id="DF-0002", issuer="DENTFUSE-SIM",
                      birth_date="19650923", sex="M"),
}

SIZES = {
    "small": {"a": 0.5, "b": 0.6, "mr": (0.9, 0.9, 1.2), "metal": 0.5, "p2": 0.6, "scan": 0.55,
              "pano": 0.3, "min_fov": None},
    "large": {"a": 0.25, "b": 0.3, "mr": (0.5, 0.5, 0.6), "metal": 0.3, "p2": 0.3, "scan": 0.27,
              "pano": 0.15, "min_fov": (100.0, 100.0, 75.0)},
}

# rescaled value = stored * slope + intercept; stored = density * gain + offset + noise
CBCT_CHANNELS = {
    "p1_cbct_a": {"gain": 800.0, "offset": 24.0, "noise": 0.05, "slope": 1.0, "intercept": -1000.0},
    "p1_cbct_b": {"gain": 1400.0, "offset": 300.0, "noise": 0.08, "slope": 0.5, "intercept": -1024.0},
    "p1_cbct_metal": {"gain": 800.0, "offset": 24.0, "noise": 0.05, "slope": 1.0, "intercept": -1000.0},
    "p2_cbct": {"gain": 1000.0, "offset": 50.0, "noise": 0.06, "slope": 1.0, "intercept": -1000.0},
}
MR_GAIN = 1200.0
BLUR_SIGMA_VOX = 0.6


def uid(seed: int, *keys: str) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[f"dentfuse-synth-{GENERATOR_VERSION}", str(seed), *keys])


def rigid(rotvec_deg: np.ndarray, translation: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_deg)).as_matrix()
    m[:3, 3] = translation
    return m


def random_rigid(rng: np.random.Generator, max_deg: float, min_deg: float, max_mm: float, min_mm: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(min_deg, max_deg)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return rigid(axis * angle, direction * rng.uniform(min_mm, max_mm))


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:3, :3].T + m[:3, 3]


def dicom_date(d: date) -> str:
    return d.strftime("%Y%m%d")


@dataclass
class Plan:
    """Everything decided before pixels are made: anatomy, poses, grids, UIDs, dates."""

    seed: int
    size: str
    anatomies: dict  # patient key -> Anatomy
    poses: dict  # frame -> 4x4 anatomy -> frame
    frame_patient: dict  # frame -> patient key
    frame_uids: dict  # frame -> Frame of Reference UID
    grids: dict  # case -> Grid
    dates: dict  # case -> date


def _patient_of(case: str) -> str:
    return case.split("_", 1)[0]


def make_plan(seed: int, size: str, patients: set[str]) -> Plan:
    cfg = SIZES[size]
    anatomies = {p: build_anatomy(seed, PATIENTS[p].patient_id) for p in sorted(patients)}
    poses: dict[str, np.ndarray] = {}
    frame_patient: dict[str, str] = {}
    frame_uids: dict[str, str] = {}
    grids: dict = {}
    dates: dict = {}
    rng_d = rng_for(seed, "dates")
    day0 = date(2025, 1, 6) + timedelta(days=int(rng_d.integers(0, 90)))
    dates.update({
        "p1_pano": day0 - timedelta(days=int(rng_d.integers(20, 40))),
        "p1_cbct_a": day0,
        "p1_cbct_a_resent": day0,
        "p1_cbct_a_missing": day0,
        "p1_scan": day0 + timedelta(days=int(rng_d.integers(5, 15))),
        "p1_mr": day0 + timedelta(days=int(rng_d.integers(16, 30))),
        "p1_cbct_b": day0 + timedelta(days=int(rng_d.integers(150, 240))),
        "p2_cbct": day0 + timedelta(days=int(rng_d.integers(1, 60))),
    })
    dates["p1_cbct_metal"] = dates["p1_cbct_b"] + timedelta(days=int(rng_d.integers(30, 60)))
    min_fov = cfg["min_fov"]
    if "p1" in anatomies:
        anat = anatomies["p1"]
        roi = box_corners(*anat.roi())
        rng = rng_for(seed, "p1", "poses")
        # A: the patient as positioned in the CBCT (small tilt, scanner coordinates)
        pose_a = rigid(rng.normal(size=3) * 1.2, np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(30, 90)]))
        motion_b = random_rigid(rng, 15.0, 8.0, 20.0, 8.0)  # A -> B, the "months later" motion
        pose_b = motion_b @ pose_a
        pose_mr = random_rigid(rng, 12.0, 4.0, 40.0, 10.0) @ pose_a
        pose_metal = random_rigid(rng, 6.0, 2.0, 10.0, 3.0) @ pose_a
        pose_up = np.eye(4)
        pose_up[:3, :3] = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
        pose_up[:3, 3] = rng.uniform(-60, 60, 3)
        pose_lo = np.eye(4)
        pose_lo[:3, :3] = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
        pose_lo[:3, 3] = rng.uniform(-60, 60, 3)
        for frame, pose in (("p1_cbct_a", pose_a), ("p1_cbct_a_resent", pose_a), ("p1_cbct_a_missing", pose_a),
                            ("p1_cbct_b", pose_b), ("p1_mr", pose_mr), ("p1_cbct_metal", pose_metal),
                            ("p1_scan_upper", pose_up), ("p1_scan_lower", pose_lo)):
            poses[frame] = pose
            frame_patient[frame] = "p1"
        for frame in ("p1_cbct_a", "p1_cbct_b", "p1_mr", "p1_cbct_metal", "p1_scan_upper", "p1_scan_lower"):
            frame_uids[frame] = uid(seed, frame, "frame-of-reference")
        frame_uids["p1_cbct_a_resent"] = frame_uids["p1_cbct_a"]
        frame_uids["p1_cbct_a_missing"] = frame_uids["p1_cbct_a"]
        eye = np.eye(3)
        a_mm = cfg["a"]
        grids["p1_cbct_a"] = grid_around(roi, pose_a, eye, (a_mm,) * 3, min_fov)
        grids["p1_cbct_a_resent"] = grids["p1_cbct_a"]
        grids["p1_cbct_a_missing"] = grids["p1_cbct_a"]
        mlo, mhi = anat.roi()
        mlo[2] = -13.0  # a maxilla field of view (with the lower crowns): the crown is upper
        grids["p1_cbct_metal"] = grid_around(box_corners(mlo, mhi), pose_metal, eye, (cfg["metal"],) * 3,
                                             None if min_fov is None else (min_fov[0], min_fov[1], min_fov[2] * 0.6))
        grids["p1_cbct_b"] = _partial_grid(anat, pose_b, cfg["b"], rng, min_fov)
        tilt = Rotation.from_rotvec(np.radians([rng.uniform(8, 16), rng.uniform(-4, 4), 0.0])).as_matrix()
        grids["p1_mr"] = grid_around(roi, pose_mr, tilt, cfg["mr"])
    if "p2" in anatomies:
        anat = anatomies["p2"]
        rng = rng_for(seed, "p2", "poses")
        pose = rigid(rng.normal(size=3) * 1.5, np.array([rng.uniform(-8, 8), rng.uniform(-8, 8), rng.uniform(30, 90)]))
        poses["p2_cbct"] = pose
        frame_patient["p2_cbct"] = "p2"
        frame_uids["p2_cbct"] = uid(seed, "p2_cbct", "frame-of-reference")
        grids["p2_cbct"] = grid_around(box_corners(*anat.roi()), pose, np.eye(3), (cfg["p2"],) * 3, min_fov)
    return Plan(seed=seed, size=size, anatomies=anatomies, poses=poses, frame_patient=frame_patient,
                frame_uids=frame_uids, grids=grids, dates=dates)


def _partial_grid(anat: Anatomy, pose: np.ndarray, spacing: float, rng: np.random.Generator,
                  min_fov) -> dio.Grid:
    """A field of view that holds only part of the dentition (about 55-80 % of the crowns)."""
    lo, hi = anat.roi()
    _, kinds, _, pts = anat.landmarks()
    cusps = pts[np.array(kinds) == "cusp"]
    side = 1 if rng.random() < 0.5 else -1
    width = hi[0] - lo[0]
    chosen = None
    for f in np.arange(0.15, 0.6, 0.025):
        blo, bhi = lo.copy(), hi.copy()
        if side > 0:
            blo[0] = lo[0] + f * width
        else:
            bhi[0] = hi[0] - f * width
        blo[2] += 0.12 * (hi[2] - lo[2])  # a shorter cylinder as well
        g = grid_around(box_corners(blo, bhi), pose, np.eye(3), (spacing,) * 3,
                        None if min_fov is None else (min_fov[0] * 0.75, min_fov[1], min_fov[2] * 0.8))
        inside = _inside_grid(g, apply(pose, cusps))
        frac = inside.mean()
        chosen = g
        if frac <= 0.8:
            break
    return chosen


def _inside_grid(g: dio.Grid, pts_frame: np.ndarray, margin_vox: float = 0.0) -> np.ndarray:
    m = np.linalg.inv(g.index_to_frame())
    ijk = apply(m, pts_frame)
    size = np.array(g.size)
    return np.all((ijk >= margin_vox) & (ijk <= size - 1 - margin_vox), axis=1)


# ---------------------------------------------------------------------------------------
# cases


def _study(seed: int, key: str, d: date, description: str, rng: np.random.Generator) -> dict:
    return {"uid": uid(seed, key, "study"), "date": dicom_date(d),
            "time": f"{int(rng.integers(8, 17)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
            "id": f"S{int(rng.integers(1000, 9999))}", "accession": f"ACC{int(rng.integers(100000, 999999))}",
            "description": description}


def _series(seed: int, case: str, study: dict, number: int, description: str, minutes: int = 3) -> dict:
    t = study["time"]
    mm = (int(t[2:4]) + minutes) % 60
    return {"uid": uid(seed, case, "series"), "number": number, "description": description,
            "date": study["date"], "time": f"{t[:2]}{mm:02d}{t[4:]}"}


CBCT_EQUIPMENT = {"manufacturer": "Synthetic Imaging", "model": "SynthCBCT 3D", "serial": "SC3D-10042",
                  "software": "4.2.1", "station": "CBCT01"}
CBCT_B_EQUIPMENT = {"manufacturer": "Synthetic Imaging", "model": "SynthCBCT 3D", "serial": "SC3D-10042",
                    "software": "4.3.0", "station": "CBCT01"}
P2_EQUIPMENT = {"manufacturer": "Other Vendor Dental", "model": "OV-CB 90", "serial": "OV90-771",
                "software": "2.0.7", "station": "CBCT02"}
MR_EQUIPMENT = {"manufacturer": "Synthetic Imaging", "model": "SynthMR 1.5T", "serial": "SMR-5501",
                "software": "VB19", "station": "MR01"}
SCAN_EQUIPMENT = {"manufacturer": "Synthetic Intraoral", "model": "SynthScan IO", "serial": "IO-33017",
                  "software": "1.9.3", "station": "IOS01"}
PANO_EQUIPMENT = {"manufacturer": "Synthetic Imaging", "model": "SynthPan 2D", "serial": "SP2-8812",
                  "software": "3.1.0", "station": "PAN01"}


def _ct_extra(kvp: str, ma: str) -> dict:
    return {"KVP": kvp, "XRayTubeCurrent": ma, "ExposureTime": "14000", "ConvolutionKernel": "STANDARD",
            "RotationDirection": "CW", "ScanOptions": "CBCT", "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}


def _levels(channel: dict, mat) -> dict:
    """Mean rescaled grey level of each tissue (before blur and noise)."""
    out = {}
    for name in ("air", "soft", "bone", "dentin", "enamel", "pulp", "metal"):
        stored = getattr(mat, name) * channel["gain"] + channel["offset"]
        out[name] = round(stored * channel["slope"] + channel["intercept"], 3)
    return out


def _cbct_case(plan: Plan, case: str, out: Path, stored_cache: dict) -> dict:
    seed = plan.seed
    patient_key = _patient_of(case)
    anat = plan.anatomies[patient_key]
    patient = PATIENTS[patient_key]
    source = "p1_cbct_a" if case.startswith("p1_cbct_a") else case
    grid = plan.grids[case]
    ch = CBCT_CHANNELS[source]
    if source not in stored_cache:
        density = render(anat, grid, plan.poses[source], CBCT_MATERIALS, metal=(case == "p1_cbct_metal"))
        density = blur(density, BLUR_SIGMA_VOX)
        rng = rng_for(seed, source, "noise")
        if case == "p1_cbct_metal":
            add_metal_streaks(density, grid, (CBCT_MATERIALS.enamel + CBCT_MATERIALS.metal) / 2, rng)
        density += rng.normal(0.0, ch["noise"], density.shape).astype(np.float32)
        stored = np.clip(np.rint(density * ch["gain"] + ch["offset"]), 0, 65535).astype(np.uint16)
        stored_cache[source] = stored
    stored = stored_cache[source]
    equipment = {"p1_cbct_b": CBCT_B_EQUIPMENT, "p2_cbct": P2_EQUIPMENT}.get(source, CBCT_EQUIPMENT)
    study_key = {"p1_cbct_a_resent": "p1_cbct_a", "p1_cbct_a_missing": "p1_cbct_a"}.get(case, case)
    study = _study(seed, study_key, plan.dates[case], "CBCT maxilla and mandible", rng_for(seed, study_key, "study"))
    number = {"p1_cbct_a": 2, "p1_cbct_a_resent": 102, "p1_cbct_a_missing": 3}.get(case, 2)
    description = {"p1_cbct_a_resent": "CBCT 0.5 (resent)", "p1_cbct_a_missing": "CBCT 0.5 reconstruction 2"}.get(
        case, "CBCT dental volume")
    series = _series(seed, case, study, number, description, minutes=3 + number % 7)
    nz = grid.size[2]
    sop_uids = [uid(seed, case, "sop", str(k)) for k in range(nz)]
    skip: tuple[int, ...] = ()
    if case == "p1_cbct_a_missing":
        skip = (int(rng_for(seed, case, "skip").integers(nz // 3, 2 * nz // 3)),)
    folder = out / case
    files = dio.write_image_series(
        folder, stored, grid, sop_class=dio.CT_IMAGE_STORAGE, modality="CT", patient=patient, study=study,
        series=series, equipment=equipment, sop_uids=sop_uids, frame_of_reference_uid=plan.frame_uids[case],
        rescale=(ch["intercept"], ch["slope"], "HU"),  # labelled HU, not calibrated
        window=(round((CBCT_MATERIALS.bone * ch["gain"] + ch["offset"]) * ch["slope"] + ch["intercept"]),
                round(3.5 * ch["gain"] * ch["slope"])),
        extra=_ct_extra("90" if source != "p2_cbct" else "85", "8" if source != "p2_cbct" else "6"),
        skip_slices=skip)
    info = _image_case_info(plan, case, "CT", dio.CT_IMAGE_STORAGE, patient, study, series, grid, files,
                            [u for k, u in enumerate(sop_uids) if k not in skip])
    info["tissue_levels"] = _levels(ch, CBCT_MATERIALS)
    info["rescale"] = {"slope": ch["slope"], "intercept": ch["intercept"], "type": "HU", "calibrated": False}
    info["noise_sd"] = round(ch["noise"] * ch["gain"] * ch["slope"], 3)
    info["pixel_sha256"] = hashlib.sha256(stored.tobytes()).hexdigest()
    if case == "p1_cbct_metal":
        info["metal_tooth"] = anat.metal_tooth
    if case == "p1_cbct_a_resent":
        info["resent_of"] = "p1_cbct_a"
    if case == "p1_cbct_a_missing":
        info["missing_instance_numbers"] = [skip[0] + 1]
        info["missing_of"] = "p1_cbct_a"
    if case == "p1_cbct_b":
        cusp_idx = [i for i, k in enumerate(anat.landmarks()[1]) if k == "cusp"]
        pts = apply(plan.poses[case], anat.landmarks()[3][cusp_idx])
        info["crowns_in_fov_fraction"] = round(float(_inside_grid(grid, pts).mean()), 3)
    return info


def _image_case_info(plan: Plan, case: str, modality: str, sop_class: str, patient: dio.Patient,
                     study: dict, series: dict, grid: dio.Grid, files: list[str], sop_uids: list[str]) -> dict:
    return {
        "folder": case,
        "patient": _patient_of(case),
        "patient_id": patient.patient_id,
        "issuer_of_patient_id": patient.issuer,
        "modality": modality,
        "sop_class_uid": sop_class,
        "frame": case,
        "frame_of_reference_uid": plan.frame_uids[case],
        "uids": {"study_instance_uid": study["uid"], "series_instance_uid": series["uid"],
                 "frame_of_reference_uid": plan.frame_uids[case], "sop_instance_uids": sop_uids},
        "acquisition_date": series["date"],
        "geometry": grid.to_dict(),
        "voxel_size_mm": list(grid.spacing),
        "files": files,
    }


def _mr_case(plan: Plan, case: str, out: Path) -> dict:
    seed = plan.seed
    anat = plan.anatomies["p1"]
    grid = plan.grids[case]
    v = render(anat, grid, plan.poses[case], MR_MATERIALS)
    v = blur(v, BLUR_SIGMA_VOX)
    nz, ny, nx = v.shape
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, nz), np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    rng = rng_for(seed, case, "noise")
    gx, gy, gz = rng.uniform(-0.2, 0.2, 3)
    bias = (1.0 + gx * xx + gy * yy + gz * zz - 0.12 * (xx**2 + yy**2)).astype(np.float32)
    sigma = 0.03
    re = v * bias + rng.normal(0, sigma, v.shape).astype(np.float32)
    im = rng.normal(0, sigma, v.shape).astype(np.float32)
    mag = np.sqrt(re * re + im * im)
    stored = np.clip(np.rint(mag * MR_GAIN), 0, 65535).astype(np.uint16)
    study = _study(seed, case, plan.dates[case], "MR TMJ and jaws", rng_for(seed, case, "study"))
    series = _series(seed, case, study, 5, "T1 SE 3D jaws")
    sop_uids = [uid(seed, case, "sop", str(k)) for k in range(nz)]
    extra = {"ImageType": ["ORIGINAL", "PRIMARY", "OTHER"], "ScanningSequence": "SE", "SequenceVariant": "NONE",
             "ScanOptions": "", "MRAcquisitionType": "3D", "RepetitionTime": "520", "EchoTime": "12",
             "EchoTrainLength": "1", "MagneticFieldStrength": "1.5", "ImagedNucleus": "1H",
             "ImagingFrequency": "63.87", "NumberOfAverages": "1", "FlipAngle": "90",
             "SpacingBetweenSlices": f"{grid.spacing[2]:g}", "SequenceName": "se3d1"}
    files = dio.write_image_series(out / case, stored, grid, sop_class=dio.MR_IMAGE_STORAGE, modality="MR",
                                   patient=PATIENTS["p1"], study=study, series=series, equipment=MR_EQUIPMENT,
                                   sop_uids=sop_uids, frame_of_reference_uid=plan.frame_uids[case], rescale=None,
                                   window=(700, 1400), extra=extra)
    info = _image_case_info(plan, case, "MR", dio.MR_IMAGE_STORAGE, PATIENTS["p1"], study, series, grid, files, sop_uids)
    info["tissue_levels"] = {k: round(getattr(MR_MATERIALS, k) * MR_GAIN, 3)
                             for k in ("air", "soft", "bone", "dentin", "enamel", "pulp")}
    info["bias_field"] = "multiplicative, linear + quadratic over the grid, up to about +-30 %"
    info["pixel_sha256"] = hashlib.sha256(stored.tobytes()).hexdigest()
    return info


def _scan_case(plan: Plan, case: str, out: Path) -> dict:
    import trimesh  # local: only this case needs it

    seed = plan.seed
    anat = plan.anatomies["p1"]
    folder = out / case
    folder.mkdir(parents=True, exist_ok=True)
    study = _study(seed, case, plan.dates[case], "Intraoral scan", rng_for(seed, case, "study"))
    meshes = {}
    files = {}
    for arch in ("upper", "lower"):
        frame = f"p1_scan_{arch}"
        mesh = make_scan(anat, arch, SIZES[plan.size]["scan"], rng_for(seed, case, arch))
        mesh.apply_transform(plan.poses[frame])
        stl = trimesh.exchange.stl.export_stl(mesh)
        (folder / f"{arch}.stl").write_bytes(stl)
        files[f"{arch}_stl"] = f"{arch}.stl"
        info = {"frame": frame, "faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)),
                "watertight": bool(mesh.is_watertight), "noise_mm": 0.03, "holes": 4,
                "stl_sha256": hashlib.sha256(stl).hexdigest()}
        if arch == "upper":
            ply = trimesh.exchange.ply.export_ply(mesh, encoding="binary", include_attributes=False)
            (folder / "upper.ply").write_bytes(ply)
            files["upper_ply"] = "upper.ply"
            series = _series(seed, case, study, 1, "Intraoral scan upper jaw")
            sop = uid(seed, case, "upper", "sop")
            dio.write_encapsulated_stl(folder / "upper.dcm", stl, patient=PATIENTS["p1"], study=study,
                                       series=series, equipment=SCAN_EQUIPMENT, sop_uid=sop,
                                       frame_of_reference_uid=plan.frame_uids[frame], title="Upper jaw scan")
            files["upper_dcm"] = "upper.dcm"
            info["dicom"] = {"sop_class_uid": dio.ENCAPSULATED_STL_STORAGE, "sop_instance_uid": sop,
                             "series_instance_uid": series["uid"], "study_instance_uid": study["uid"],
                             "frame_of_reference_uid": plan.frame_uids[frame]}
        meshes[arch] = info
    return {
        "folder": case,
        "patient": "p1",
        "patient_id": PATIENTS["p1"].patient_id,
        "issuer_of_patient_id": PATIENTS["p1"].issuer,
        "modality": "M3D",
        "sop_class_uid": dio.ENCAPSULATED_STL_STORAGE,
        "frame": "p1_scan_upper",
        "frames": {"upper": "p1_scan_upper", "lower": "p1_scan_lower"},
        "frame_of_reference_uid": plan.frame_uids["p1_scan_upper"],
        "uids": {"study_instance_uid": study["uid"], **{k: v for k, v in meshes["upper"]["dicom"].items()
                                                        if k != "study_instance_uid"}},
        "acquisition_date": study["date"],
        "files": files,
        "meshes": meshes,
        "units": "mm",
    }


def _pano_case(plan: Plan, case: str, out: Path) -> dict:
    seed = plan.seed
    anat = plan.anatomies["p1"]
    px = SIZES[plan.size]["pano"]
    curve = anat.arches["upper"]
    s = np.arange(curve.s[0] + 3.0, curve.s[-1] - 3.0, px)
    z = np.arange(anat.z_extent[1] + 3.0, anat.z_extent[0] - 3.0, -px)
    t = np.arange(-11.0, 11.0, 0.8)
    xy = np.stack([np.interp(s, curve.s, curve.points[:, 0]), np.interp(s, curve.s, curve.points[:, 1])], axis=1)
    tang = np.gradient(xy, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)
    normal = np.stack([tang[:, 1], -tang[:, 0]], axis=1)
    image = np.zeros((len(z), len(s)))
    for ti in t:
        p_xy = xy + ti * normal
        p = np.concatenate([np.column_stack([p_xy, np.full(len(s), zz)]) for zz in z])
        image += anat.paint(p, 0.8, CBCT_MATERIALS).reshape(len(z), len(s)) * 0.8
    rng = rng_for(seed, case, "noise")
    image = image / image.max() * 3600.0 + 150.0 + rng.normal(0, 12.0, image.shape)
    stored = np.clip(np.rint(image), 0, 4095).astype(np.uint16)
    study = _study(seed, case, plan.dates[case], "Panoramic radiograph", rng_for(seed, case, "study"))
    series = _series(seed, case, study, 1, "PAN adult")
    sop = uid(seed, case, "sop")
    dio.write_dx(out / case / "pano.dcm", stored, px, patient=PATIENTS["p1"], study=study, series=series,
                 equipment=PANO_EQUIPMENT, sop_uid=sop)
    return {
        "folder": case, "patient": "p1", "patient_id": PATIENTS["p1"].patient_id,
        "issuer_of_patient_id": PATIENTS["p1"].issuer, "modality": "DX",
        "sop_class_uid": dio.DX_PRESENTATION_STORAGE, "frame": None, "frame_of_reference_uid": None,
        "uids": {"study_instance_uid": study["uid"], "series_instance_uid": series["uid"],
                 "sop_instance_uids": [sop]},
        "acquisition_date": series["date"], "files": ["pano.dcm"],
        "geometry": {"rows": int(stored.shape[0]), "columns": int(stored.shape[1]), "pixel_spacing": [px, px],
                     "dimensions": 2},
        "pixel_sha256": hashlib.sha256(stored.tobytes()).hexdigest(),
    }


# ---------------------------------------------------------------------------------------
# ground truth


def _r(m: np.ndarray) -> list:
    return np.round(np.asarray(m, dtype=float), 9).tolist()


def ground_truth(plan: Plan, cases: dict) -> dict:
    frames = {}
    landmarks_frames = {}
    names = kinds = teeth = None
    for frame, pose in plan.poses.items():
        pk = plan.frame_patient[frame]
        anat = plan.anatomies[pk]
        n, k, t, pts = anat.landmarks()
        names, kinds, teeth = n, k, t
        frames[frame] = {"frame_of_reference_uid": plan.frame_uids[frame], "patient": pk,
                         "patient_id": PATIENTS[pk].patient_id,
                         "anatomy_to_frame": _r(pose)}
        landmarks_frames[frame] = np.round(apply(pose, pts), 6).tolist()
    transforms = []
    for f_from in plan.poses:
        for f_to in plan.poses:
            if f_from == f_to or plan.frame_patient[f_from] != plan.frame_patient[f_to]:
                continue
            m = plan.poses[f_to] @ np.linalg.inv(plan.poses[f_from])
            transforms.append({"from": f_from, "to": f_to, "matrix": _r(m),
                               "maps": f"a point in {f_from} (LPS mm) to {f_to} (LPS mm)"})
    patients = {pk: {"patient_id": PATIENTS[pk].patient_id, "issuer_of_patient_id": PATIENTS[pk].issuer,
                     "birth_date": PATIENTS[pk].birth_date, "sex": PATIENTS[pk].sex,
                     "metal_tooth": plan.anatomies[pk].metal_tooth}
                for pk in plan.anatomies}
    return {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "seed": plan.seed,
        "size": plan.size,
        "units": "mm, DICOM patient coordinates (LPS)",
        "transform_convention": "matrix (4x4 row-major) maps a point in 'from' to 'to': p_to = M @ [p_from, 1]",
        "patients": patients,
        "frames": frames,
        "transforms": transforms,
        "landmarks": {"names": names, "kinds": kinds, "teeth": teeth, "frames": landmarks_frames},
        "cases": cases,
    }


def generate_set(out: Path, size: str = "small", seed: int = 7, cases: list[str] | None = None) -> Path:
    """Write the synthetic cases (all, or the named ones) and ground_truth.json into out.

    Returns out.  Raises ValueError for an unknown size or case name.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; use one of {sorted(SIZES)}")
    wanted = list(CASES) if cases is None else list(cases)
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known cases: {list(CASES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(seed, size, {_patient_of(c) for c in wanted})
    stored_cache: dict = {}
    info: dict = {}
    for case in CASES:
        if case not in wanted:
            continue
        t0 = time.perf_counter()
        if case == "p1_mr":
            info[case] = _mr_case(plan, case, out)
        elif case == "p1_scan":
            info[case] = _scan_case(plan, case, out)
        elif case == "p1_pano":
            info[case] = _pano_case(plan, case, out)
        else:
            info[case] = _cbct_case(plan, case, out, stored_cache)
        log.info("generated %s in %.1f s", case, time.perf_counter() - t0)
    gt = ground_truth(plan, info)
    (out / "ground_truth.json").write_text(json.dumps(gt, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--case", action="append", dest="cases", choices=CASES,
                        help="generate only this case (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    generate_set(args.out, size=args.size, seed=args.seed, cases=args.cases)
    print(f"wrote {args.out} ({args.size}, seed {args.seed}) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
