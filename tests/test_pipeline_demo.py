"""``dentfuse demo`` as a user runs it, then ``status``, ``events`` and ``ledger verify`` on
what it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENTFUSE_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=600)


def test_demo_then_status_events_and_ledger_verify(tmp_path: Path, small_set: Path) -> None:
    data = tmp_path / "demo-data"
    r = run("demo", "--data-dir", str(data), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    print(f"\ndemo timings: {out['timings_s']}")
    assert "waiting 2 s of quiet" in r.stderr  # the demo's quiet period is announced

    received = {(s["modality"], s["instances"]): s for s in out["received"]}
    assert len(out["received"]) == 5
    assert received[("DX", 1)]["planner"].startswith("2D image")
    planners = sorted(s["planner"][:12] for s in out["received"] if s["modality"] == "CT")
    assert planners == ["duplicate of", "input", "input"]
    assert received[("M3D", 1)]["planner"] == "input"

    fusions = {f["rule"]: f for f in out["fusions"]}
    assert set(fusions) == {"cbct_cbct", "cbct_scan"}
    for f in fusions.values():
        assert f["verdict"] == "accepted" and f["code"] == "D0395" and f["status"] == "exported", f
        assert f["rationale"].startswith("DEMO ONLY")
        assert f["report_id"] == f["fusion_id"] + "-R2"
        assert f["quality"] and all(q["passed"] for q in f["quality"])
    assert "D0801" in fusions["cbct_scan"]["companions"]

    paths = out["paths"]
    assert Path(paths["data_dir"]) == data
    assert len(paths["reports"]) == 8  # R1 and R2, PDF and HTML, for each fusion
    assert all(Path(p).is_file() for p in paths["reports"])
    assert sorted(Path(p).name for p in paths["claims"]) == ["claim.837", "claim.837", "claim.fhir.json",
                                                             "claim.fhir.json"]
    delivered = [Path(p) for p in paths["delivered"]]
    assert len(delivered) == 4 and {p.suffix for p in delivered} == {".json", ".837"}

    st = run("status", "--data-dir", str(data), "--json", cwd=tmp_path)
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["jobs"]["counts"]["done"] == 2 and status["outbox"] == {"delivered": 4}
    assert {f["status"] for f in status["fusions"]} == {"exported"}
    human = run("status", "--data-dir", str(data), cwd=tmp_path)
    assert human.returncode == 0 and "fusion jobs" in human.stdout

    ev = run("events", "--data-dir", str(data), "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    kinds = [e["kind"] for e in json.loads(ev.stdout)]
    assert kinds.count("fusion_recorded") == 2 and kinds.count("exported") == 2 and "documentation" in kinds

    vf = run("ledger", "verify", "--data-dir", str(data), cwd=tmp_path)
    assert vf.returncode == 0, vf.stdout + vf.stderr

    # a second demo into the same (now used) directory is refused rather than mixed in
    again = run("demo", "--data-dir", str(data), cwd=tmp_path)
    assert again.returncode != 0 and "not empty" in again.stderr
