"""``dentfuse fuse FIXED MOVING --out DIR`` on folders of DICOM files: verdicts and exit
codes, configuration of the gate, errors naming the input, surface dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.cli_fuse import EXIT_ACCEPTED, EXIT_INPUT_ERROR, EXIT_NEEDS_REVIEW, is_surface_input
from test_volumes.groundtruth import GroundTruth


@pytest.fixture()
def runner(monkeypatch, tmp_path) -> CliRunner:
    for k in list(__import__("os").environ):
        if k.startswith("DENTFUSE_"):
            monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("DENTFUSE_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


def test_fuse_mr_onto_cbct_accepted_json(small_set, runner, tmp_path):
    gt = GroundTruth.load(small_set)
    out = tmp_path / "out"
    res = runner.invoke(main, ["fuse", str(gt.series_dir("p1_cbct_a")), str(gt.series_dir("p1_mr")),
                               "--out", str(out), "--json", "--operator", "tech1"])
    assert res.exit_code == EXIT_ACCEPTED, res.output
    doc = json.loads((out / "fusion.json").read_text())
    printed = json.loads(res.stdout)
    assert printed["fusion_id"] == doc["fusion_id"] and doc["verdict"] == "accepted"
    assert doc["operator"] == "tech1" and doc["reasons"] and doc["metrics"]["final_metric"] < 0
    M = np.array(doc["transform_moving_to_fixed"])
    truth = gt.transform("p1_mr", "p1_cbct_a")
    pts = gt.landmarks("p1_mr")
    err = np.linalg.norm(pts @ M[:3, :3].T + M[:3, 3] - (pts @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert err.max() < 0.375  # 0.75 voxel of the 0.5 mm fixed grid
    assert (out / "registration.dcm").is_file() and (out / "derived").is_dir()


def test_fuse_review_threshold_from_config_exit_code(small_set, runner, tmp_path):
    gt = GroundTruth.load(small_set)
    cfg = tmp_path / "dentfuse.toml"
    # a review threshold nobody can meet: consistency is never exactly 0 mm
    cfg.write_text("[fusion]\nseed = 3\n[fusion.volume_gate]\nmax_consistency_mm = 0.0\n")
    out = tmp_path / "out"
    res = runner.invoke(main, ["fuse", str(gt.series_dir("p1_cbct_a")), str(gt.series_dir("p1_cbct_b")),
                               "--out", str(out), "--config", str(cfg)])
    assert res.exit_code == EXIT_NEEDS_REVIEW, res.output
    assert "NEEDS_REVIEW" in res.stdout and "consistency_mm_review" in res.stdout
    doc = json.loads((out / "fusion.json").read_text())
    assert doc["verdict"] == "needs_review" and doc["seed"] == 3
    assert doc["parameters"]["gate"]["max_consistency_mm"] == 0.0
    assert any("consistency_mm_review" in r for r in doc["reasons"])


@pytest.mark.parametrize("case,pattern", [
    ("p1_pano", r"moving input .*p1_pano.*2D image"),
    ("p2_cbct", r"PatientMismatchError.*DF-0002"),
])
def test_fuse_refuses_bad_moving_input(small_set, runner, tmp_path, case, pattern):
    import re

    gt = GroundTruth.load(small_set)
    res = runner.invoke(main, ["fuse", str(gt.series_dir("p1_cbct_a")), str(gt.series_dir(case)),
                               "--out", str(tmp_path / "out")])
    assert res.exit_code == EXIT_INPUT_ERROR, res.output
    assert re.search(pattern, " ".join(res.output.split()), re.S), res.output
    assert not (tmp_path / "out" / "fusion.json").exists()


def test_fuse_missing_slice_names_fixed_input(small_set, runner, tmp_path):
    gt = GroundTruth.load(small_set)
    res = runner.invoke(main, ["fuse", str(gt.series_dir("p1_cbct_a_missing")), str(gt.series_dir("p1_cbct_b")),
                               "--out", str(tmp_path / "out"), "--json"])
    assert res.exit_code == EXIT_INPUT_ERROR
    doc = json.loads(res.stdout)
    assert doc["error"] == "GeometryError"
    assert "fixed input" in doc["message"] and "p1_cbct_a_missing" in doc["message"] and "missing slice" in doc["message"]


def test_fuse_missing_path_is_usage_error(runner, tmp_path):
    res = runner.invoke(main, ["fuse", str(tmp_path / "nope"), str(tmp_path / "nope2"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_surface_inputs_are_recognised(small_set, tmp_path):
    gt = GroundTruth.load(small_set)
    scan = gt.series_dir("p1_scan")
    assert is_surface_input(scan / "upper.stl") and is_surface_input(scan / "upper.ply")
    assert is_surface_input(scan / "upper.dcm")  # Encapsulated STL
    assert not is_surface_input(gt.series_dir("p1_mr"))
    assert not is_surface_input(next(gt.series_dir("p1_mr").glob("*.dcm")))


def test_fuse_dispatches_scans_to_surface_fusion(small_set, runner, tmp_path, monkeypatch):
    """A scan goes to fusion.surface_fusion.fuse_surface with the configured surface gate."""
    import fusion.surface_fusion as sf
    from fusion.records import FusionResult

    calls = {}

    def fake_fuse_surface(cbct_paths, scan_path, out_dir, *, gate, seed, operator, fusion_id, progress):
        calls.update(cbct=cbct_paths, scan=scan_path, gate=gate, seed=seed)
        return FusionResult(fusion_id="f", patient_key="DF-0001", method="surface-rigid-icp", purpose="fusion",
                            inputs=(), transform_moving_to_fixed=np.eye(4).tolist(), fixed_frame_of_reference_uid="1",
                            moving_frame_of_reference_uid="2", verdict="accepted", reasons=("ok",), metrics={})

    monkeypatch.setattr(sf, "fuse_surface", fake_fuse_surface)
    gt = GroundTruth.load(small_set)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[fusion.surface_gate]\nmin_inlier_fraction = 0.21\n")
    res = runner.invoke(main, ["fuse", str(gt.series_dir("p1_cbct_a")), str(gt.series_dir("p1_scan") / "upper.stl"),
                               "--out", str(tmp_path / "o"), "--json", "--seed", "5", "--config", str(cfg)])
    assert res.exit_code == EXIT_ACCEPTED, res.output
    assert calls["scan"] == gt.series_dir("p1_scan") / "upper.stl"
    assert calls["gate"].min_inlier_fraction == 0.21 and calls["seed"] == 5
    assert [Path(p) for p in calls["cbct"]] == [gt.series_dir("p1_cbct_a")]
