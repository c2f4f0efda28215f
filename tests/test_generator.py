"""The synthetic patients are what ground_truth.json says they are.

Most tests read the committed small set (``small_set`` fixture); the determinism tests
regenerate a few cases into tmp_path and compare bytes with the committed files, which also
proves that the committed set is what the current generator writes.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import trimesh
from scipy import ndimage
from scipy.spatial.transform import Rotation

from conftest import REPO_ROOT, require_peer
from test_volumes.generate import CASES, generate_set
from test_volumes.groundtruth import GroundTruth, GroundTruthError

VOLUME_CASES = ["p1_cbct_a", "p1_cbct_b", "p1_mr", "p1_cbct_metal", "p1_cbct_a_resent", "p2_cbct"]
CBCT_CASES = ["p1_cbct_a", "p1_cbct_b", "p1_cbct_metal", "p2_cbct"]


@pytest.fixture(scope="module")
def gt(small_set: Path) -> GroundTruth:
    return GroundTruth.load(small_set)


_volumes: dict = {}


def read_series(gt: GroundTruth, case: str) -> sitk.Image:
    key = (str(gt.root), case)
    if key not in _volumes:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(gt.series_dir(case))))
        _volumes[key] = reader.Execute()
    return _volumes[key]


class Sampler:
    """Trilinear sampling of a SimpleITK image at physical points (LPS mm)."""

    def __init__(self, image: sitk.Image):
        self.array = sitk.GetArrayFromImage(image).astype(np.float32)  # (k, j, i)
        d = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())[None, :]
        self.to_index = np.linalg.inv(d)
        self.origin = np.array(image.GetOrigin())
        self.spacing = np.array(image.GetSpacing())

    def index(self, pts: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(pts) - self.origin) @ self.to_index.T  # (i, j, k)

    def inside(self, pts: np.ndarray, margin: float = 3.0) -> np.ndarray:
        ijk = self.index(pts)
        size = np.array(self.array.shape[::-1])
        return np.all((ijk >= margin) & (ijk <= size - 1 - margin), axis=1)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        ijk = self.index(pts)
        return ndimage.map_coordinates(self.array, ijk[:, ::-1].T, order=1, mode="nearest")

    def ball(self, centre: np.ndarray, radius_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Values and physical points of the voxels within radius of centre."""
        step = float(self.spacing.min()) / 2
        r = np.arange(-radius_mm, radius_mm + 1e-9, step)
        g = np.stack(np.meshgrid(r, r, r, indexing="ij"), axis=-1).reshape(-1, 3)
        g = g[np.linalg.norm(g, axis=1) <= radius_mm] + centre
        return self(g), g


# ---------------------------------------------------------------------------------------
# files and geometry


@pytest.mark.parametrize("case", VOLUME_CASES + ["p1_cbct_a_missing"])
def test_series_load_with_pydicom_and_match_ground_truth(gt: GroundTruth, case: str) -> None:
    info = gt.case(case)
    files = sorted(gt.series_dir(case).glob("*.dcm"))
    assert [f.name for f in files] == sorted(info["files"])
    sops = set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == info["sop_class_uid"] == ds.file_meta.MediaStorageSOPClassUID
        assert ds.Modality == info["modality"]
        assert ds.PatientID == info["patient_id"]
        assert ds.IssuerOfPatientID == info["issuer_of_patient_id"]
        assert ds.StudyInstanceUID == info["uids"]["study_instance_uid"]
        assert ds.SeriesInstanceUID == info["uids"]["series_instance_uid"]
        assert ds.FrameOfReferenceUID == gt.frame_uid(info["frame"])
        for attr in ("PatientName", "PatientBirthDate", "PatientSex", "Manufacturer", "ManufacturerModelName",
                     "AcquisitionDate", "AcquisitionTime", "ImagePositionPatient", "ImageOrientationPatient",
                     "PixelSpacing", "SliceThickness"):
            assert attr in ds and ds[attr].value not in (None, ""), (f, attr)
        if info["modality"] == "CT":
            assert ds.RescaleSlope == info["rescale"]["slope"] and ds.RescaleIntercept == info["rescale"]["intercept"]
        assert ds.pixel_array.shape == (info["geometry"]["size"][1], info["geometry"]["size"][0])
        sops.add(ds.SOPInstanceUID)
    assert sops == set(info["uids"]["sop_instance_uids"])


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_series_load_with_simpleitk_to_stated_geometry(gt: GroundTruth, case: str) -> None:
    geo = gt.case(case)["geometry"]
    image = read_series(gt, case)
    assert list(image.GetSize()) == geo["size"]
    np.testing.assert_allclose(image.GetSpacing(), geo["spacing"], atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), geo["origin"], atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), geo["direction"], atol=1e-6)
    affine = np.array(geo["affine_index_to_frame"])
    corner = np.array(image.GetSize()) - 1
    np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(corner.tolist()),
                               affine[:3, :3] @ corner + affine[:3, 3], atol=1e-3)


def test_acquisitions_differ_as_described(gt: GroundTruth) -> None:
    a, b, mr = gt.case("p1_cbct_a"), gt.case("p1_cbct_b"), gt.case("p1_mr")
    assert 0.4 <= a["voxel_size_mm"][0] <= 0.5
    assert b["voxel_size_mm"][0] > a["voxel_size_mm"][0]
    assert b["rescale"] != a["rescale"] and b["noise_sd"] != a["noise_sd"]
    assert b["acquisition_date"] > a["acquisition_date"]  # months later
    assert int(b["acquisition_date"][4:6]) != int(a["acquisition_date"][4:6])
    assert mr["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.4" and mr["modality"] == "MR"
    assert mr["tissue_levels"]["bone"] < 0.3 * mr["tissue_levels"]["soft"]  # bone dark
    frames = {gt.frame_uid(f) for f in ("p1_cbct_a", "p1_cbct_b", "p1_mr", "p1_cbct_metal",
                                         "p1_scan_upper", "p1_scan_lower", "p2_cbct")}
    assert len(frames) == 7
    # the MR is oblique: not every grid axis is a patient axis
    assert not np.allclose(np.abs(np.array(mr["geometry"]["direction"])), np.eye(3).ravel(), atol=1e-3)


def test_b_moved_by_a_bounded_rigid_motion_and_covers_part_of_the_teeth(gt: GroundTruth) -> None:
    m = gt.transform("p1_cbct_a", "p1_cbct_b")
    angle = np.degrees(np.linalg.norm(Rotation.from_matrix(m[:3, :3]).as_rotvec()))
    assert 5.0 <= angle <= 15.0
    assert 5.0 <= np.linalg.norm(m[:3, 3]) <= 20.0
    cusps = np.array(gt.landmark_kinds) == "cusp"
    sampler = Sampler(read_series(gt, "p1_cbct_b"))
    frac = sampler.inside(gt.landmarks("p1_cbct_b")[cusps], margin=0.0).mean()
    assert 0.55 <= frac <= 0.85
    assert frac == pytest.approx(gt.case("p1_cbct_b")["crowns_in_fov_fraction"], abs=0.04)


def test_resent_has_identical_pixels_and_new_uids(gt: GroundTruth) -> None:
    a, r = gt.case("p1_cbct_a"), gt.case("p1_cbct_a_resent")
    assert r["uids"]["series_instance_uid"] != a["uids"]["series_instance_uid"]
    assert not set(r["uids"]["sop_instance_uids"]) & set(a["uids"]["sop_instance_uids"])
    assert r["frame_of_reference_uid"] == a["frame_of_reference_uid"]
    for fa, fr in zip(sorted(gt.series_dir("p1_cbct_a").glob("*.dcm")), sorted(gt.series_dir("p1_cbct_a_resent").glob("*.dcm"))):
        da, dr = pydicom.dcmread(fa), pydicom.dcmread(fr)
        assert da.PixelData == dr.PixelData
        assert da.ImagePositionPatient == dr.ImagePositionPatient
        assert da.SOPInstanceUID != dr.SOPInstanceUID


def test_missing_series_lacks_one_interior_slice(gt: GroundTruth) -> None:
    a, m = gt.case("p1_cbct_a"), gt.case("p1_cbct_a_missing")
    assert len(m["files"]) == len(a["files"]) - 1
    assert m["uids"]["series_instance_uid"] != a["uids"]["series_instance_uid"]
    files = sorted(gt.series_dir("p1_cbct_a_missing").glob("*.dcm"))
    numbers = sorted(int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files)
    missing = sorted(set(range(1, len(a["files"]) + 1)) - set(numbers))
    assert missing == m["missing_instance_numbers"] and 1 < missing[0] < len(a["files"])
    z = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files)
    gaps = np.diff(z)
    step = a["voxel_size_mm"][2]
    assert np.sum(np.isclose(gaps, 2 * step, atol=1e-3)) == 1 and np.sum(np.isclose(gaps, step, atol=1e-3)) == len(gaps) - 1


def test_pano_is_a_single_2d_image(gt: GroundTruth) -> None:
    info = gt.case("p1_pano")
    files = list(gt.series_dir("p1_pano").glob("*.dcm"))
    assert len(files) == 1
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
    assert ds.get("NumberOfFrames", 1) == 1 and "FrameOfReferenceUID" not in ds
    assert ds.pixel_array.shape == (info["geometry"]["rows"], info["geometry"]["columns"])
    assert ds.PatientID == "DF-0001" and info["frame"] is None
    # teeth (bright) in the middle rows, not a flat image
    px = ds.pixel_array.astype(float)
    assert px.std() > 100


def test_other_patient_is_another_person(gt: GroundTruth) -> None:
    p2 = gt.case("p2_cbct")
    assert p2["patient_id"] == "DF-0002" != gt.case("p1_cbct_a")["patient_id"]
    assert gt.data["patients"]["p2"]["birth_date"] != gt.data["patients"]["p1"]["birth_date"]
    with pytest.raises(GroundTruthError, match="different patients"):
        gt.transform("p2_cbct", "p1_cbct_a")
    # a different anatomy: inter-molar and arch distances differ
    names = gt.landmark_names
    i, j = names.index("UR6_cusp"), names.index("UL6_cusp")
    d1 = np.linalg.norm(np.diff(gt.landmarks("p1_cbct_a")[[i, j]], axis=0))
    d2 = np.linalg.norm(np.diff(gt.landmarks("p2_cbct")[[i, j]], axis=0))
    assert abs(d1 - d2) > 0.3


# ---------------------------------------------------------------------------------------
# transforms and landmarks


def test_transforms_are_rigid_and_consistent(gt: GroundTruth) -> None:
    frames = [f for f in gt.frames if gt.data["frames"][f]["patient"] == "p1"]
    assert len(gt.landmark_names) >= 20 and set(gt.landmark_kinds) == {"cusp", "apex"}
    for t in gt.data["transforms"]:
        m = np.array(t["matrix"])
        np.testing.assert_allclose(m[:3, :3].T @ m[:3, :3], np.eye(3), atol=1e-8)
        assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0, abs=1e-8)
        np.testing.assert_allclose(m[3], [0, 0, 0, 1])
        assert t["from"] in t["maps"] and t["to"] in t["maps"]
    for f in frames:
        for g in frames:
            np.testing.assert_allclose(gt.transform(g, f) @ gt.transform(f, g), np.eye(4), atol=1e-7)
            np.testing.assert_allclose(gt.map_points(gt.landmarks(f), f, g), gt.landmarks(g), atol=1e-4)
    ab, bm = gt.transform("p1_cbct_a", "p1_cbct_b"), gt.transform("p1_cbct_b", "p1_mr")
    np.testing.assert_allclose(bm @ ab, gt.transform("p1_cbct_a", "p1_mr"), atol=1e-7)
    np.testing.assert_allclose(gt.transform("p1_cbct_a", "p1_cbct_a_resent"), np.eye(4), atol=1e-12)


def _cusp_profiles(gt: GroundTruth, case: str, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each cusp inside the field of view: the peak value in a 1 mm ball, and the values
    0.8 mm inside the crown, at the tip, and 0.8 mm outside, along the tooth axis (apex -> cusp)."""
    sampler = Sampler(read_series(gt, case))
    names = gt.landmark_names
    peaks, profiles = [], []
    for k, name in enumerate(names):
        if not name.endswith("_cusp"):
            continue
        c = landmarks[k]
        if not sampler.inside(c[None])[0]:
            continue
        apex = landmarks[names.index(name.replace("_cusp", "_apex"))]
        out = (c - apex) / np.linalg.norm(c - apex)
        peaks.append(sampler.ball(c, 1.0)[0].max())
        profiles.append(sampler(np.array([c - 0.8 * out, c, c + 0.8 * out])))
    return np.array(peaks), np.array(profiles)


def _tip_ok(prof: np.ndarray, lv: dict) -> np.ndarray:
    """Enamel 0.8 mm inside, air 0.8 mm outside, about half-way at the landmark."""
    span = lv["enamel"] - lv["air"]
    inside, at, outside = prof.T
    frac = (at - lv["air"]) / span
    return (inside > lv["air"] + 0.7 * span) & (outside < lv["air"] + 0.2 * span) & (frac > 0.2) & (frac < 0.8)


@pytest.mark.parametrize("case", CBCT_CASES)
def test_cusp_landmarks_sit_on_the_enamel_peak(gt: GroundTruth, case: str) -> None:
    lv = gt.case(case)["tissue_levels"]
    frame = gt.case(case)["frame"]
    peaks, prof = _cusp_profiles(gt, case, gt.landmarks(frame))
    assert len(peaks) >= 15
    span = lv["enamel"] - lv["air"]
    # the brightest voxel within 1 mm of each cusp tip is enamel (or metal) ...
    assert np.all(peaks > lv["air"] + 0.8 * span), peaks
    enamel = peaks < (lv["enamel"] + lv["metal"]) / 2  # the metal crown has its own levels
    assert np.sum(~enamel) == (1 if case == "p1_cbct_metal" else 0)
    # ... and the landmark is the tip: enamel just inside, air just outside, half-way on it
    assert np.all(_tip_ok(prof[enamel], lv))
    at_fraction = (prof[enamel, 1] - lv["air"]) / span
    assert abs(np.median(at_fraction) - 0.5) < 0.12
    # the same check fails when the landmarks are put in the wrong place (the test can fail)
    if case != "p1_cbct_a":
        _, wrong = _cusp_profiles(gt, case, gt.landmarks("p1_cbct_a"))
        assert np.mean(_tip_ok(wrong, lv)) < 0.3


def test_apex_landmarks_are_root_tips_in_bone(gt: GroundTruth) -> None:
    lv = gt.case("p1_cbct_a")["tissue_levels"]
    sampler = Sampler(read_series(gt, "p1_cbct_a"))
    lm = gt.landmarks("p1_cbct_a")
    names = gt.landmark_names
    inside_root, beyond = [], []
    for k, name in enumerate(names):
        if not name.endswith("_apex"):
            continue
        apex = lm[k]
        cusp = lm[names.index(name.replace("_apex", "_cusp"))]
        axis = (apex - cusp) / np.linalg.norm(apex - cusp)
        inside_root.append(sampler(apex - 1.5 * axis)[0])
        beyond.append(sampler(apex + 1.5 * axis)[0])
    inside_root, beyond = np.array(inside_root), np.array(beyond)
    bone_lo = lv["soft"] + 0.5 * (lv["bone"] - lv["soft"])
    bone_hi = (lv["bone"] + lv["dentin"]) / 2
    assert np.mean((beyond > bone_lo) & (beyond < bone_hi)) > 0.9  # bone beyond the apex
    assert np.mean(inside_root > beyond) > 0.8  # root (dentin) above it
    assert np.median(inside_root - beyond) > 0.25 * (lv["dentin"] - lv["bone"])


def test_mr_cusps_are_dark_in_bright_soft_tissue(gt: GroundTruth) -> None:
    lv = gt.case("p1_mr")["tissue_levels"]
    sampler = Sampler(read_series(gt, "p1_mr"))
    lm = gt.landmarks("p1_mr")
    cusps = lm[np.array(gt.landmark_kinds) == "cusp"]
    cusps = cusps[sampler.inside(cusps)]
    lows = np.array([sampler.ball(c, 1.0)[0].min() for c in cusps])
    assert len(lows) >= 20 and np.all(lows < 0.2 * lv["soft"])
    assert np.percentile(sampler.array, 90) > 0.6 * lv["soft"]  # bright soft tissue exists


def test_metal_crown_is_where_the_ground_truth_says(gt: GroundTruth) -> None:
    info = gt.case("p1_cbct_metal")
    lv = info["tissue_levels"]
    sampler = Sampler(read_series(gt, "p1_cbct_metal"))
    k = gt.landmark_names.index(info["metal_tooth"] + "_cusp")
    v, _ = sampler.ball(gt.landmarks("p1_cbct_metal")[k], 1.5)
    assert v.max() > (lv["enamel"] + lv["metal"]) / 2
    # A has no metal anywhere
    assert Sampler(read_series(gt, "p1_cbct_a")).array.max() < (gt.case("p1_cbct_a")["tissue_levels"]["enamel"]
                                                                + lv["metal"]) / 2
    # streaks: in the slices through the crown, the air of the mouth is disturbed far more than in A
    assert sampler.array.max() > lv["metal"] * 0.8


# ---------------------------------------------------------------------------------------
# intraoral scan


@pytest.fixture(scope="module")
def upper_scan(gt: GroundTruth) -> trimesh.Trimesh:
    return trimesh.load_mesh(gt.series_dir("p1_scan") / "upper.stl")


def test_scan_files_load_and_agree(gt: GroundTruth, upper_scan: trimesh.Trimesh) -> None:
    info = gt.case("p1_scan")
    folder = gt.series_dir("p1_scan")
    ply = trimesh.load_mesh(folder / "upper.ply")
    lower = trimesh.load_mesh(folder / "lower.stl")
    assert 30_000 <= len(upper_scan.faces) <= 60_000 and 30_000 <= len(lower.faces) <= 60_000
    assert len(upper_scan.faces) == info["meshes"]["upper"]["faces"] == len(ply.faces)
    np.testing.assert_allclose(np.sort(ply.vertices, axis=0), np.sort(upper_scan.vertices, axis=0), atol=1e-4)
    assert not upper_scan.is_watertight and not info["meshes"]["upper"]["watertight"]
    for mesh in (upper_scan, lower):
        loops = sorted((len(e.points) for e in mesh.outline().entities), reverse=True)
        assert loops[0] > 200  # open where the scanned strip of gingiva ends
        assert len(loops) >= 4 and max(loops[1:]) < 60  # and a few small holes
        assert mesh.body_count == 1
    ds = pydicom.dcmread(folder / "upper.dcm")
    stl = (folder / "upper.stl").read_bytes()
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.3" and ds.Modality == "M3D"
    assert ds.MIMETypeOfEncapsulatedDocument == "model/stl"
    assert bytes(ds.EncapsulatedDocument)[: int(ds.EncapsulatedDocumentLength)] == stl
    assert ds.FrameOfReferenceUID == gt.frame_uid("p1_scan_upper") != gt.frame_uid("p1_cbct_a")
    assert ds.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    assert ds.PatientID == "DF-0001"
    assert hashlib.sha256(stl).hexdigest() == info["meshes"]["upper"]["stl_sha256"]


def _crown_offsets(gt: GroundTruth, mesh: trimesh.Trimesh, to_a: np.ndarray) -> np.ndarray:
    """Signed distance (mm, along the scan normal) from each crown vertex to the CBCT A
    iso-surface half-way between air and enamel."""
    lv = gt.case("p1_cbct_a")["tissue_levels"]
    half = (lv["air"] + lv["enamel"]) / 2
    sampler = Sampler(read_series(gt, "p1_cbct_a"))
    v = mesh.vertices @ to_a[:3, :3].T + to_a[:3, 3]
    n = mesh.vertex_normals @ to_a[:3, :3].T
    ts = np.linspace(-1.2, 1.2, 49)
    prof = np.stack([sampler(v + t * n) for t in ts], axis=1)
    crown = (prof[:, 0] > lv["air"] + 0.85 * (lv["enamel"] - lv["air"])) & \
            (prof[:, -1] < lv["air"] + 0.1 * (lv["enamel"] - lv["air"]))
    offsets = []
    for pr in prof[crown]:
        i = np.nonzero((pr[:-1] >= half) & (pr[1:] < half))[0]
        if len(i) == 0:
            continue
        i = i[np.argmin(np.abs(ts[i]))]
        offsets.append(ts[i] + (pr[i] - half) / (pr[i] - pr[i + 1]) * (ts[1] - ts[0]))
    return np.array(offsets)


def test_scan_crowns_lie_on_the_cbct_enamel_surface(gt: GroundTruth, upper_scan: trimesh.Trimesh) -> None:
    to_a = gt.transform("p1_scan_upper", "p1_cbct_a")
    offsets = _crown_offsets(gt, upper_scan, to_a)
    assert len(offsets) > 0.25 * len(upper_scan.vertices)  # crowns are a large part of the scan
    assert abs(np.median(offsets)) < 0.05
    assert np.percentile(np.abs(offsets), 90) < 0.12
    # the check sees a 0.3 mm error in the transform
    shifted = gt.transform("p1_cbct_a", "p1_cbct_a").copy()
    shifted[:3, 3] = [0.3, 0.0, 0.0]
    bad = _crown_offsets(gt, upper_scan, shifted @ to_a)
    assert np.percentile(np.abs(bad), 90) > 0.15


def test_lower_scan_lies_on_the_lower_crowns(gt: GroundTruth) -> None:
    lower = trimesh.load_mesh(gt.series_dir("p1_scan") / "lower.stl")
    offsets = _crown_offsets(gt, lower, gt.transform("p1_scan_lower", "p1_cbct_a"))
    assert len(offsets) > 0.2 * len(lower.vertices)
    assert abs(np.median(offsets)) < 0.05 and np.percentile(np.abs(offsets), 90) < 0.12


def test_encapsulated_stl_passes_dciodvfy(gt: GroundTruth) -> None:
    peers = require_peer("dciodvfy")
    files = [gt.series_dir("p1_scan") / "upper.dcm", gt.series_dir("p1_pano") / "pano.dcm",
             gt.series_dir("p1_cbct_a") / gt.case("p1_cbct_a")["files"][10],
             gt.series_dir("p1_mr") / gt.case("p1_mr")["files"][10]]
    for f in files:
        run = subprocess.run([peers["dciodvfy"], str(f)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        errors = [ln for ln in lines if ln.startswith("Error")]
        assert not errors, (f, errors)
        assert any(ln.strip() in ("EncapsulatedSTL", "DXImageForPresentation", "CTImage", "MRImage") for ln in lines)


# ---------------------------------------------------------------------------------------
# generation: determinism, subsets, CLI


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "ground_truth.json"}


def _same_dicom(a: Path, b: Path) -> None:
    """Same header, pixels within one stored unit (float rounding may differ between
    numpy/scipy builds; within one environment the bytes are identical, see below)."""
    da, db = pydicom.dcmread(a), pydicom.dcmread(b)
    pa, pb = da.pop("PixelData", None), db.pop("PixelData", None)
    assert da == db, a.name
    if pa is not None:
        va = np.frombuffer(pa.value, dtype="<u2").astype(int)
        vb = np.frombuffer(pb.value, dtype="<u2").astype(int)
        assert np.abs(va - vb).max() <= 1 and np.mean(va != vb) < 1e-3, a.name


def test_same_seed_same_bytes_and_the_committed_set_is_current(small_set: Path, tmp_path: Path) -> None:
    cases = ["p1_mr", "p1_scan"]
    # once through the command line ...
    cli = tmp_path / "cli"
    run = subprocess.run([sys.executable, str(REPO_ROOT / "test_volumes" / "generate.py"), "--out", str(cli),
                          "--seed", "7"] + [arg for c in cases for arg in ("--case", c)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # ... and once through the API: identical bytes
    api = generate_set(tmp_path / "api", size="small", seed=7, cases=cases)
    got = _tree_digest(cli)
    assert got == _tree_digest(api)
    assert (cli / "ground_truth.json").read_bytes() == (api / "ground_truth.json").read_bytes()
    full = GroundTruth.load(small_set)
    assert set(got) == {f"p1_mr/{f}" for f in full.case("p1_mr")["files"]} | \
        {"p1_scan/upper.stl", "p1_scan/upper.ply", "p1_scan/upper.dcm", "p1_scan/lower.stl"}
    # a subset is the same as those cases of the full (committed) set
    for name in got:
        if name.endswith(".dcm"):
            _same_dicom(cli / name, small_set / name)
        else:
            m1, m2 = trimesh.load_mesh(cli / name), trimesh.load_mesh(small_set / name)
            assert len(m1.faces) == len(m2.faces)
            np.testing.assert_allclose(m1.vertices, m2.vertices, atol=1e-4)
    sub = GroundTruth.load(cli)
    assert sub.cases == cases
    np.testing.assert_allclose(sub.transform("p1_scan_upper", "p1_mr"), full.transform("p1_scan_upper", "p1_mr"))
    np.testing.assert_allclose(sub.landmarks("p1_cbct_b"), full.landmarks("p1_cbct_b"))
    assert sub.case("p1_mr")["uids"] == full.case("p1_mr")["uids"]
    assert sub.case("p1_mr")["geometry"] == full.case("p1_mr")["geometry"]


def test_another_seed_gives_another_anatomy(small_set: Path, tmp_path: Path) -> None:
    out = generate_set(tmp_path / "s8", size="small", seed=8, cases=["p1_mr"])
    g8, g7 = GroundTruth.load(out), GroundTruth.load(small_set)
    assert g8.data["seed"] == 8
    names = g7.landmark_names
    i, j = names.index("UR6_cusp"), names.index("UL6_cusp")
    w7 = np.linalg.norm(np.diff(g7.landmarks("p1_mr")[[i, j]], axis=0))
    w8 = np.linalg.norm(np.diff(g8.landmarks("p1_mr")[[i, j]], axis=0))
    assert abs(w7 - w8) > 0.1
    assert g8.case("p1_mr")["pixel_sha256"] != g7.case("p1_mr")["pixel_sha256"]
    assert g8.case("p1_mr")["uids"]["series_instance_uid"] != g7.case("p1_mr")["uids"]["series_instance_uid"]


def test_unknown_case_or_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown case"):
        generate_set(tmp_path, cases=["p1_cbct_c"])
    with pytest.raises(ValueError, match="unknown size"):
        generate_set(tmp_path, size="huge")
    assert set(CASES) >= {"p1_cbct_a", "p1_scan", "p2_cbct"}
    with pytest.raises(GroundTruthError, match="generate.py"):
        GroundTruth.load(tmp_path / "nothing")
