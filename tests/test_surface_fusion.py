"""fuse_surface end to end: outputs, their DICOM validity, the transform they carry,
patients, and the rejected path; plus the ``dentfuse fuse`` CLI with a scan."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import trimesh

from conftest import require_peer
from fusion.errors import PatientMismatchError, InputError
from fusion.records import FusionResult
from fusion.reg_object import read_spatial_registration
from fusion.surface import load_scan
from fusion.surface_fusion import fuse_surface
from fusion.surface_outputs import sha256_file, write_encapsulated_stl
from test_volumes.groundtruth import GroundTruth


def apply(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ m[:3, :3].T + m[:3, 3]


def cusp_tre(gt: GroundTruth, matrix: np.ndarray, scan_frame: str = "p1_scan_upper", case: str = "p1_cbct_a") -> np.ndarray:
    mask = np.array([k == "cusp" and n.startswith("U") for n, k in zip(gt.landmark_names, gt.landmark_kinds)])
    return np.linalg.norm(apply(matrix, gt.landmarks(scan_frame)[mask]) - gt.landmarks(case)[mask], axis=1)


@pytest.fixture(scope="module")
def gt(small_set: Path) -> GroundTruth:
    return GroundTruth.load(small_set)


@pytest.fixture(scope="module")
def dicom_scan_result(small_set: Path, tmp_path_factory) -> FusionResult:
    out = tmp_path_factory.mktemp("fuse_dcm")
    stages: list[tuple[str, float]] = []
    res = fuse_surface([small_set / "p1_cbct_a"], small_set / "p1_scan" / "upper.dcm", out, seed=3,
                       operator="tester", fusion_id="surface-test-1", progress=lambda s, f: stages.append((s, f)))
    assert stages[-1] == ("done", 1.0) and all(0.0 <= f <= 1.0 for _, f in stages)
    return res


def test_encapsulated_stl_scan_accepted_with_accurate_transform(dicom_scan_result: FusionResult, gt: GroundTruth,
                                                              small_set: Path) -> None:
    res = dicom_scan_result
    assert res.verdict == "accepted", res.reasons
    assert res.method.startswith("surface-rigid")
    m = np.array(res.transform_moving_to_fixed)
    tre = cusp_tre(gt, m)
    assert tre.mean() < 0.05 and tre.max() < 0.1
    assert res.fixed_frame_of_reference_uid == gt.frame_uid("p1_cbct_a")
    assert res.moving_frame_of_reference_uid == gt.frame_uid("p1_scan_upper")
    fixed, moving = res.inputs
    assert (fixed.kind, moving.kind) == ("volume", "surface")
    assert moving.patient_id == fixed.patient_id == "DF-0001"
    assert moving.content_sha256 == load_scan(small_set / "p1_scan" / "upper.stl").content_sha256
    assert moving.sop_instance_uids and moving.sop_class_uid == "1.2.840.10008.5.1.4.1.1.104.3"
    assert {q.name for q in res.quality_checks} >= {"inlier_fraction", "inlier_rms_mm", "hypothesis_margin"}
    assert res.metrics["inlier_fraction"] >= 0.38 and res.metrics["inlier_rms_mm"] <= 0.12
    assert "numpy" in res.software_versions and res.parameters["gate"]["inlier_distance_mm"] == 0.3
    assert res.operator == "tester" and res.fusion_id == "surface-test-1"


def test_outputs_exist_hash_and_round_trip(dicom_scan_result: FusionResult, gt: GroundTruth, small_set: Path) -> None:
    res = dicom_scan_result
    kinds = sorted(o.kind for o in res.outputs)
    assert kinds.count("qa_png") == 5
    for kind in ("scan_stl", "encapsulated_stl", "registration", "label_volume", "segmentation"):
        assert kind in kinds
    for o in res.outputs:
        assert Path(o.path).is_file() and sha256_file(Path(o.path)) == o.sha256, o.path
    out_dir = Path(res.outputs[0].path).parent
    back = FusionResult.from_json((out_dir / "fusion.json").read_text())
    assert back == res
    m = np.array(res.transform_moving_to_fixed)
    # the REG carries the same matrix, from the scan's frame to the CBCT's
    reg = read_spatial_registration(out_dir / "registration.dcm")
    assert reg.source_frame_uid == gt.frame_uid("p1_scan_upper")
    assert reg.target_frame_uid == gt.frame_uid("p1_cbct_a")
    assert np.allclose(np.array(reg.matrix), m, atol=1e-5)
    # the scan in the CBCT frame: STL and Encapsulated STL agree with the transform
    scan = load_scan(small_set / "p1_scan" / "upper.dcm")
    moved = load_scan(out_dir / "scan_in_cbct.stl")
    assert moved.content_sha256 == load_scan(out_dir / "scan_in_cbct.dcm").content_sha256
    assert np.allclose(np.sort(moved.vertices, axis=0), np.sort(apply(m, scan.vertices), axis=0), atol=1e-3)
    ds = pydicom.dcmread(out_dir / "scan_in_cbct.dcm")
    assert ds.FrameOfReferenceUID == gt.frame_uid("p1_cbct_a")
    assert ds.PatientID == "DF-0001" and ds.Modality == "M3D"
    src = {str(i.ReferencedSOPInstanceUID) for i in ds.SourceInstanceSequence}
    assert res.inputs[1].sop_instance_uids[0] in src and res.inputs[0].sop_instance_uids[0] in src
    # label volume on the CBCT grid; crown labels next to the upper cusps
    lab = sitk.ReadImage(str(out_dir / "scan_labels.nii.gz"))
    arr = sitk.GetArrayFromImage(lab)
    assert set(np.unique(arr)) == {0, 1, 2}
    mask = np.array([k == "cusp" and n.startswith("U") for n, k in zip(gt.landmark_names, gt.landmark_kinds)])
    hits = 0
    for p in gt.landmarks("p1_cbct_a")[mask]:
        idx = np.array(lab.TransformPhysicalPointToIndex(tuple(float(v) for v in p)))
        win = arr[max(idx[2] - 2, 0): idx[2] + 3, max(idx[1] - 2, 0): idx[1] + 3, max(idx[0] - 2, 0): idx[0] + 3]
        hits += bool((win == 1).any())
    assert hits == mask.sum()
    # the same labels as a DICOM Segmentation on the CBCT's slices
    import highdicom as hd

    seg = hd.seg.segread(out_dir / "scan_segmentation.dcm")
    assert [d.segment_label for d in seg.SegmentSequence] == ["scan on CBCT crowns", "scan elsewhere (gingiva)"]
    assert str(seg.FrameOfReferenceUID) == gt.frame_uid("p1_cbct_a")
    assert seg.PatientID == "DF-0001"


def test_dicom_outputs_pass_dciodvfy(dicom_scan_result: FusionResult) -> None:
    peers = require_peer("dciodvfy")
    for o in dicom_scan_result.outputs:
        if o.kind in ("encapsulated_stl", "registration", "segmentation"):
            proc = subprocess.run([peers["dciodvfy"], o.path], capture_output=True, text=True)
            errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
            assert errors == [], (o.path, errors)


def test_bare_stl_takes_the_cbct_patient(small_set: Path, tmp_path: Path, gt: GroundTruth) -> None:
    res = fuse_surface([small_set / "p1_cbct_a"], small_set / "p1_scan" / "upper.stl", tmp_path, seed=1)
    assert res.verdict == "accepted"
    assert res.inputs[1].patient_id == "DF-0001" and res.parameters["patient_from"] == "cbct"
    assert any("no patient identity" in r for r in res.reasons)
    assert cusp_tre(gt, np.array(res.transform_moving_to_fixed)).max() < 0.1
    # the original scan wrapped in its own (content-derived, stable) frame, referenced by the REG
    source = load_scan(tmp_path / "scan_source.dcm")
    assert source.frame_of_reference_uid == res.moving_frame_of_reference_uid
    reg = read_spatial_registration(tmp_path / "registration.dcm")
    assert reg.source_frame_uid == res.moving_frame_of_reference_uid
    again = fuse_surface([small_set / "p1_cbct_a"], small_set / "p1_scan" / "upper.ply", tmp_path / "ply", seed=1)
    assert again.moving_frame_of_reference_uid == res.moving_frame_of_reference_uid  # same content, same frame
    assert np.allclose(again.transform_moving_to_fixed, res.transform_moving_to_fixed, atol=1e-3)


def test_scan_of_another_patient_is_refused(small_set: Path, tmp_path: Path) -> None:
    scan = load_scan(small_set / "p1_scan" / "upper.stl")
    write_encapsulated_stl(scan, tmp_path / "other.dcm", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.1",
                           patient_ids={"PatientID": "DF-0002", "IssuerOfPatientID": "DENTFUSE-SIM"})
    with pytest.raises(PatientMismatchError, match=r"other.dcm.*DF-0002.*DF-0001"):
        fuse_surface([small_set / "p1_cbct_a"], tmp_path / "other.dcm", tmp_path / "out")
    assert not (tmp_path / "out" / "fusion.json").exists()


def test_rejected_fusion_writes_no_dicom(small_set: Path, tmp_path: Path) -> None:
    blob = trimesh.creation.icosphere(subdivisions=4, radius=18.0)
    blob.vertices = blob.vertices * (1.5, 1.0, 0.4)
    blob.export(tmp_path / "blob.stl")
    res = fuse_surface([small_set / "p1_cbct_a"], tmp_path / "blob.stl", tmp_path / "out")
    assert res.verdict == "rejected"
    assert {o.kind for o in res.outputs} == {"qa_png"}
    assert not list((tmp_path / "out").glob("*.dcm")) and not list((tmp_path / "out").glob("*.stl"))
    assert json.loads((tmp_path / "out" / "fusion.json").read_text())["verdict"] == "rejected"


def test_volume_without_teeth_is_an_input_error(small_set: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="p1_pano|2D|volume|projection"):
        fuse_surface([small_set / "p1_pano"], small_set / "p1_scan" / "upper.stl", tmp_path)


# ---------------------------------------------------------------------------------------
# dentfuse fuse CBCT_FOLDER SCAN_FILE --out DIR


@pytest.fixture()
def cli(monkeypatch, tmp_path):
    from click.testing import CliRunner

    for k in list(__import__("os").environ):
        if k.startswith("DENTFUSE_"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DENTFUSE_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def test_cli_fuse_scan_accepted_json(small_set: Path, gt: GroundTruth, cli, tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.cli_fuse import EXIT_ACCEPTED

    out = tmp_path / "out"
    res = cli.invoke(main, ["fuse", str(small_set / "p1_cbct_a"), str(small_set / "p1_scan" / "upper.ply"),
                            "--out", str(out), "--json", "--operator", "tech2"])
    assert res.exit_code == EXIT_ACCEPTED, res.output
    doc = json.loads((out / "fusion.json").read_text())
    assert json.loads(res.stdout)["fusion_id"] == doc["fusion_id"]
    assert doc["verdict"] == "accepted" and doc["operator"] == "tech2" and doc["method"].startswith("surface")
    assert cusp_tre(gt, np.array(doc["transform_moving_to_fixed"])).max() < 0.1
    assert (out / "scan_in_cbct.dcm").is_file() and (out / "registration.dcm").is_file()


def test_cli_fuse_scan_gate_from_config_and_exit_codes(small_set: Path, cli, tmp_path: Path) -> None:
    from pipeline.cli import main
    from pipeline.cli_fuse import EXIT_INPUT_ERROR, EXIT_NEEDS_REVIEW, EXIT_REJECTED

    cfg = tmp_path / "dentfuse.toml"
    # a review threshold no scan with gingiva can meet
    cfg.write_text("[fusion.surface_gate]\nreview_inlier_fraction = 0.99\n")
    res = cli.invoke(main, ["fuse", str(small_set / "p1_cbct_a"), str(small_set / "p1_scan" / "upper.dcm"),
                            "--out", str(tmp_path / "review"), "--config", str(cfg)])
    assert res.exit_code == EXIT_NEEDS_REVIEW, res.output
    doc = json.loads((tmp_path / "review" / "fusion.json").read_text())
    assert doc["parameters"]["gate"]["review_inlier_fraction"] == 0.99
    assert any("inlier_fraction_review" in r for r in doc["reasons"])
    # not teeth -> rejected, exit 3
    box = trimesh.creation.box(extents=(50.0, 40.0, 15.0)).subdivide().subdivide()
    box.export(tmp_path / "box.stl")
    res = cli.invoke(main, ["fuse", str(small_set / "p1_cbct_a"), str(tmp_path / "box.stl"),
                            "--out", str(tmp_path / "rej"), "--json"])
    assert res.exit_code == EXIT_REJECTED, res.output
    assert json.loads((tmp_path / "rej" / "fusion.json").read_text())["verdict"] == "rejected"
    # a scan in metres -> input error naming the file
    m = trimesh.load_mesh(small_set / "p1_scan" / "upper.stl")
    m.apply_scale(0.001)
    m.export(tmp_path / "metres.stl")
    res = cli.invoke(main, ["fuse", str(small_set / "p1_cbct_a"), str(tmp_path / "metres.stl"),
                            "--out", str(tmp_path / "bad")])
    assert res.exit_code == EXIT_INPUT_ERROR
    assert "metres.stl" in res.output and "ScanUnitsError" in res.output
