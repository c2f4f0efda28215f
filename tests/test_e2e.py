"""End to end with real peers: ``dentfuse serve`` as a process, dcmtk ``storescu`` sends the
synthetic patient, an Orthanc on loopback receives the forwarded outputs.

The tests wait for events by polling the data directory (status, ledger) with timeouts,
never with fixed sleeps. They check the fusions against the ground truth, the D0395
decisions, the ledger's verification, the FHIR bundle, the report and the forwarding; and
that a serve process killed (SIGKILL) during a fusion resumes it after a restart exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import psutil
import pytest

from conftest import REPO_ROOT, free_port
from node_support import dcmtk

pytestmark = [pytest.mark.peers, pytest.mark.slow]

FORWARDED_KINDS = ("derived_series", "registration", "encapsulated_stl", "segmentation")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENTFUSE_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_config(tmp_path: Path, port: int, *, workers: int = 2, orthanc: Any = None) -> Path:
    lines = [
        f'data_dir = "{tmp_path / "data"}"',
        "[node]", f"port = {port}", 'bind_address = "127.0.0.1"', 'ae_title = "DENTFUSE"',
        "[stability]", "quiet_period_s = 1.5", "check_interval_s = 0.2",
        "[fusion]", f"workers = {workers}", "job_max_attempts = 3",
        "[billing.policy]", 'fee_schedule = ["D0395=350.00"]',
        "[billing.delivery]", f'drop_dir = "{tmp_path / "drop"}"', "backoff_s = 0.5",
    ]
    if orthanc is not None:
        lines += ["[pacs]", "forward_backoff_s = 0.5",
                  f'destinations = [{{name = "orthanc", ae_title = "{orthanc.ae_title}", host = "127.0.0.1", '
                  f"port = {orthanc.dicom_port}}}]"]
    path = tmp_path / "dentfuse.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_serve(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--config", str(config), "-v"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(), cwd=str(config.parent))


def wait_for(what: str, pred: Callable[[], Any], timeout: float, proc: subprocess.Popen | None = None,
             log: Path | None = None, poll: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"dentfuse serve exited ({proc.returncode}) while waiting for {what}:\n"
                        + (log.read_text()[-3000:] if log else ""))
        value = pred()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n" + (log.read_text()[-3000:] if log else ""))


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def storescu(port: int, paths: list[Path]) -> None:
    prog = dcmtk("storescu")
    r = subprocess.run([prog, "-aet", "E2E_SCANNER", "-aec", "DENTFUSE", "+sd", "-R",
                        "127.0.0.1", str(port), *map(str, paths)],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "TCP_NODELAY": "1"})  # dcmtk reads it: no Nagle delay
    assert r.returncode == 0, f"storescu failed: {r.stdout[-2000:]} {r.stderr[-2000:]}"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env=_env(), timeout=120)


def status(config: Path) -> dict[str, Any]:
    from pipeline.cli_jobs import collect_status
    from pipeline.config import load_config

    return collect_status(load_config(config, environ={}), limit=100)


def jobs_final(st: dict[str, Any], n: int) -> bool:
    c = st["jobs"]["counts"]
    return bool(c) and sum(c.values()) >= n and c["queued"] == 0 and c["running"] == 0


def final_status(config: Path, n: int) -> dict[str, Any] | None:
    """The status once at least ``n`` jobs exist and none is queued or running."""
    st = status(config)
    return st if jobs_final(st, n) else None


def tre_mm(transform: list[list[float]], gt: Any, moving_frame: str, fixed_frame: str) -> tuple[float, float]:
    pts = gt.landmarks(moving_frame)
    homo = np.c_[pts, np.ones(len(pts))]
    est = (np.asarray(transform) @ homo.T).T[:, :3]
    true = (gt.transform(moving_frame, fixed_frame) @ homo.T).T[:, :3]
    err = np.linalg.norm(est - true, axis=1)
    return float(err.mean()), float(err.max())


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"dentfuse serve did not stop within {timeout} s of SIGTERM")
        raise


def test_serve_end_to_end_with_storescu_and_orthanc(tmp_path: Path, small_set: Path) -> None:
    from orthanc import OrthancServer
    from test_volumes.groundtruth import GroundTruth

    dcmtk("storescu")
    gt = GroundTruth.load(small_set)
    orthanc = OrthancServer(tmp_path / "orthanc").start()
    port = free_port()
    config = write_config(tmp_path, port, orthanc=orthanc)
    log = tmp_path / "serve.log"
    proc = start_serve(config, log)
    try:
        wait_for("the listener", lambda: listening(port), 60, proc, log)
        t0 = time.monotonic()
        storescu(port, [gt.series_dir("p1_cbct_a"), gt.series_dir("p1_cbct_b"),
                        small_set / "p1_scan" / "upper.dcm", gt.series_dir("p1_pano"),
                        gt.series_dir("p1_cbct_a_resent"), gt.series_dir("p2_cbct")])
        st = wait_for("two fusions finished", lambda: final_status(config, 2),
                      300, proc, log)
        print(f"\nfusions finished {time.monotonic() - t0:.1f} s after storescu started")
        jobs = {j["rule"]: j for j in st["jobs"]["recent"]}
        assert set(jobs) == {"cbct_cbct", "cbct_scan"}, st["jobs"]
        for j in jobs.values():
            assert j["state"] == "done" and j["verdict"] == "accepted", j
            assert j["patient_key"] == "DF-0001^DENTFUSE-SIM"
        data = tmp_path / "data"

        # accuracy against the ground truth (transform of the fused result)
        fused = {rule: json.loads((data / "fusions" / j["fusion_id"] / "result.json").read_text())
                 for rule, j in jobs.items()}
        mean, mx = tre_mm(fused["cbct_cbct"]["transform_moving_to_fixed"], gt, "p1_cbct_b", "p1_cbct_a")
        print(f"CBCT B -> CBCT A landmark TRE mean {mean:.3f} mm, max {mx:.3f} mm")
        assert mean < 0.25 and mx < 0.5
        fixed_for_scan = [i for i in fused["cbct_scan"]["inputs"] if i["role"] == "fixed"][0]
        scan_fixed_frame = "p1_cbct_a" if fixed_for_scan["series_instance_uid"] == gt.case("p1_cbct_a")["uids"]["series_instance_uid"] \
            else "p1_cbct_b"
        mean, mx = tre_mm(fused["cbct_scan"]["transform_moving_to_fixed"], gt, "p1_scan_upper", scan_fixed_frame)
        print(f"scan -> {scan_fixed_frame} landmark TRE mean {mean:.3f} mm, max {mx:.3f} mm")
        assert mean < 0.1 and mx < 0.25

        # the planner left out the 2D image, the re-sent copy; the other patient has nothing to fuse
        rows = {s["series_instance_uid"]: s for s in st["series"]}
        assert len(rows) == 6 and all(s["stable"] for s in rows.values())
        uid = {c: gt.case(c)["uids"]["series_instance_uid"] for c in ("p1_pano", "p1_cbct_a_resent", "p2_cbct")}
        assert rows[uid["p1_pano"]]["planner"].startswith("2D image")
        assert rows[uid["p1_cbct_a_resent"]]["planner"].startswith("duplicate of series")
        assert rows[uid["p2_cbct"]]["planner"] == "input"  # an input, but alone: nothing to fuse it with
        assert all(j["patient_key"] != "DF-0002^DENTFUSE-SIM" for j in st["jobs"]["recent"])

        # decisions: technically eligible, waiting for the rationale
        decisions = {f["fusion_id"]: f for f in st["fusions"]}
        for j in jobs.values():
            d = decisions[j["fusion_id"]]
            assert d["code"] == "D0395" and d["status"] == "needs_documentation", d
            assert d["report_id"] == j["fusion_id"] + "-R1"

        # the clinician documents one fusion: new report version, export, delivery
        fid = jobs["cbct_cbct"]["fusion_id"]
        r = cli("document", fid, "--rationale", "Bone graft follow-up at 26: compare with the baseline CBCT.",
                "--clinician", "Dr. E2E", "--config", str(config))
        assert r.returncode == 0, r.stdout + r.stderr
        drop = tmp_path / "drop"
        delivered = wait_for("claim delivered to the drop directory",
                             lambda: sorted(p for p in drop.rglob("*") if p.is_file()) if drop.is_dir() else [],
                             60, proc, log)
        assert any(p.suffix == ".json" or "fhir" in p.name for p in delivered), delivered

        bundle_path = data / "exports" / fid / "claim.fhir.json"
        bundle = json.loads(bundle_path.read_text())
        from fhir.resources.R4B.bundle import Bundle

        Bundle.model_validate(bundle) if hasattr(Bundle, "model_validate") else Bundle.parse_obj(bundle)
        by_type = Counter(e["resource"]["resourceType"] for e in bundle["entry"])
        assert by_type["Claim"] == 1 and by_type["Provenance"] >= 1 and by_type["DocumentReference"] == 1
        claim = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Claim")
        codes = [(c["system"], c["code"]) for it in claim["item"] for c in it["productOrService"]["coding"]]
        assert ("http://www.ada.org/cdt", "D0395") in codes
        docref = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DocumentReference")
        assert any(i.get("value") == f"{fid}-R2" for i in docref.get("identifier", [])), docref.get("identifier")
        x12 = (data / "exports" / fid / "claim.837").read_text()
        assert "SV3*AD:D0395" in x12 and "PWK*" in x12 and f"{fid}-R2" in x12

        # the report with the rationale is the claim attachment; its hash is in the ledger
        pdf = data / "reports" / fid / f"{fid}-R2.pdf"
        html = (data / "reports" / fid / f"{fid}-R2.html").read_text()
        assert "Bone graft follow-up at 26" in html and "Dr. E2E" in html and "1.2" in html
        digest = hashlib.sha256(pdf.read_bytes()).hexdigest()
        r = cli("events", "--config", str(config), "--json")
        assert r.returncode == 0, r.stderr
        assert digest in r.stdout
        r = cli("ledger", "verify", "--config", str(config))
        assert r.returncode == 0, r.stdout + r.stderr

        # Orthanc received every forwarded output of both fusions
        expected: set[str] = set()
        for res in fused.values():
            for o in res["outputs"]:
                if o["kind"] in FORWARDED_KINDS:
                    expected.update(o["sop_instance_uids"])
        assert expected
        wait_for("outputs in Orthanc", lambda: expected <= orthanc.sop_instance_uids(), 120, proc, log, poll=1.0)
        assert status(config)["forward"]["done"] >= len(expected)
    finally:
        code = stop(proc)
        orthanc.stop()
    assert code == 0, log.read_text()[-3000:]
    assert "Traceback" not in log.read_text()
    # the transfers to the PACS are in the node's audit trail (PS3.15 A.5-style, no names)
    from dicom_node.audit import AuditTrail

    trail = AuditTrail(tmp_path / "data" / "index.sqlite")
    try:
        sent = trail.events("instances_sent")
    finally:
        trail.close()
    assert sum(e.instance_count for e in sent) >= len(expected)
    assert {e.peer_ae_title for e in sent} == {orthanc.ae_title}


def test_serve_killed_during_fusion_resumes_it_once(tmp_path: Path, small_set: Path) -> None:
    from test_volumes.groundtruth import GroundTruth

    dcmtk("storescu")
    gt = GroundTruth.load(small_set)
    port = free_port()
    config = write_config(tmp_path, port, workers=1)
    log = tmp_path / "serve.log"
    proc = start_serve(config, log)
    try:
        wait_for("the listener", lambda: listening(port), 60, proc, log)
        # one CBCT and the scan: one (surface) fusion job, the quickest to kill and redo
        storescu(port, [gt.series_dir("p1_cbct_a"), small_set / "p1_scan" / "upper.dcm"])

        def registering() -> Any:
            st = status(config)
            running = [j for j in st["jobs"]["recent"] if j["state"] == "running"]
            return running[0] if running and running[0]["stage"] not in ("claimed", "starting") else None

        job = wait_for("a fusion in progress", registering, 120, proc, log, poll=0.1)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()  # SIGKILL: no clean-up at all
        proc.wait(timeout=10)
    except BaseException:
        proc.kill()
        raise
    # the fusion process dies with the server (no orphan writing into the fusion folder)
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"orphan processes after SIGKILL: {alive}"
    st = status(config)
    j = next(x for x in st["jobs"]["recent"] if x["job_id"] == job["job_id"])
    assert j["state"] == "running"  # nobody finished it

    proc = start_serve(config, log)
    try:
        st = wait_for("the job finished after the restart", lambda: final_status(config, 1),
                      300, proc, log)
    finally:
        code = stop(proc)
    assert code == 0
    assert len(st["jobs"]["recent"]) == 1
    j = st["jobs"]["recent"][0]
    assert j["state"] == "done" and j["attempts"] == 2, j
    fid = j["fusion_id"]
    from billing_hooks.ledger import Ledger

    ledger = Ledger(tmp_path / "data" / "billing" / "ledger.sqlite", base_dir=tmp_path / "data")
    try:
        kinds = Counter(e.kind for e in ledger.entries(fusion_id=fid))
        all_fusions = {e.fusion_id for e in ledger.entries(kind="fusion_recorded")}
    finally:
        ledger.close()
    assert all_fusions == {fid}
    assert kinds["fusion_recorded"] == 1 and kinds["report_attached"] == 1, kinds
    assert kinds["duplicate_delivery"] == 0, kinds
    assert len(list((tmp_path / "data" / "reports" / fid).glob("*.pdf"))) == 1
    r = cli("ledger", "verify", "--config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
