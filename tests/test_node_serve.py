"""``dentfuse serve`` as a process: start, answer C-ECHO, stop cleanly on SIGTERM; and the
crash test: kill -9 while storescu sends a series, restart, check what was acknowledged."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE

from conftest import REPO_ROOT, free_port
from dicom_node.index import InstanceIndex
import numpy as np
from pydicom.uid import generate_uid

from node_support import (
    UID_ROOT,
    ct_dataset,
    dataset_body,
    dataset_sha256,
    dcmtk,
    dcmtk_env,
    make_ct_series,
    sop_uid_of,
    stall_store,
    stored_files,
    temp_files,
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENTFUSE_") or k == "DENTFUSE_REQUIRE_PEERS"}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _start_serve(data_dir: Path, port: int, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
         "--ae-title", "DFTEST", "-v", *extra],
        stdout=subprocess.PIPE, stderr=open(log, "ab"), env=_env(), cwd=str(REPO_ROOT),
    )


def _echo(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 2
    assoc = ae.associate("127.0.0.1", port, ae_title="DFTEST")
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0
    finally:
        assoc.release()


def _wait_for_echo(proc: subprocess.Popen, port: int, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"dentfuse serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if _echo(port):
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"dentfuse serve did not answer C-ECHO within {timeout} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen, timeout: float = 20) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("dentfuse serve did not stop within 20 s of SIGTERM")
        raise


def test_serve_answers_echo_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    proc = _start_serve(tmp_path / "data", port, log, "--json")
    try:
        _wait_for_echo(proc, port, log)
        (p,) = make_ct_series(tmp_path / "one", 1, seed=71)
        ae = AE(ae_title="CBCT1")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", port, ae_title="DFTEST")
        assert assoc.is_established
        assert assoc.send_c_store(p).Status == 0
        assoc.release()
    finally:
        code = _stop(proc)
    out = proc.stdout.read().decode()
    assert code == 0, log.read_text()[-2000:]
    assert '"event": "listening"' in out and f'"port": {port}' in out
    assert "Traceback" not in log.read_text()
    with socket.socket() as s:  # nobody listens there any more (TIME_WAIT is fine)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
    index = InstanceIndex(tmp_path / "data" / "index.sqlite")
    assert index.get(sop_uid_of(p)) is not None


def test_kill_9_mid_series_loses_no_acknowledged_instance(tmp_path):
    storescu = dcmtk("storescu")
    src = make_ct_series(tmp_path / "series", 80, seed=81, rows=256, cols=256)
    by_uid = {sop_uid_of(p): p for p in src}
    data = tmp_path / "data"
    log = tmp_path / "serve.log"
    port = free_port()
    proc = _start_serve(data, port, log)
    staller = None
    try:
        _wait_for_echo(proc, port, log)
        # a second sender is stuck inside an instance: its partial file exists at the kill
        big = ct_dataset(np.random.default_rng(82), "DF-CRASH", generate_uid(UID_ROOT),
                         generate_uid(UID_ROOT), 0, rows=256, cols=256)
        staller = stall_store(port, mid_pdu=False, sop_uid=str(big.SOPInstanceUID),
                              body=dataset_body(big), called="DFTEST")
        deadline = time.monotonic() + 10
        while not temp_files(data) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert temp_files(data), "the stalled sender's partial file should be in .incoming"
        sender = subprocess.Popen(
            [storescu, "-v", "-aec", "DFTEST", "+sd", "127.0.0.1", str(port), str(tmp_path / "series")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())
        deadline = time.monotonic() + 60
        while len(stored_files(data)) < 20 and time.monotonic() < deadline and sender.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # mid-series
        proc.wait(timeout=10)
        sender_out, _ = sender.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if staller is not None:
            staller.abort()
    # which files did storescu see acknowledged?
    acked: list[Path] = []
    current: Path | None = None
    for line in sender_out.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = Path(m.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    assert 0 < len(acked) < len(src), f"kill did not land mid-series ({len(acked)} acked)"
    partial_before_restart = len(temp_files(data))
    assert partial_before_restart >= 1
    # restart: start-up cleans temporary files and reconciles the index with the disk
    port2 = free_port()
    proc2 = _start_serve(data, port2, log)
    try:
        _wait_for_echo(proc2, port2, log)
        index = InstanceIndex(data / "index.sqlite")
        for p in acked:
            rec = index.get(sop_uid_of(p))
            assert rec is not None, f"acknowledged {p.name} is not indexed after the crash"
            assert dataset_sha256(Path(rec.path)) == dataset_sha256(p) == rec.sha256
        files = stored_files(data)
        assert len(files) >= len(acked)
        for f in files:  # every visible file is complete, intact and indexed
            uid = f.name[:-4]
            rec = index.get(uid)
            assert rec is not None and rec.path == str(f)
            assert dataset_sha256(f) == dataset_sha256(by_uid[uid])
        assert index.count() == len(files)
        assert temp_files(data) == []
        assert index.get(str(big.SOPInstanceUID)) is None
        # the sender can simply re-send the series: the rest arrives, duplicates are no-ops
        r = subprocess.run([storescu, "-aec", "DFTEST", "+sd", "127.0.0.1", str(port2), str(tmp_path / "series")],
                           capture_output=True, text=True, timeout=120, env=dcmtk_env())
        assert r.returncode == 0, r.stderr
        assert index.count() == len(src)
        assert index.series()[0].instance_count == len(src)
    finally:
        code = _stop(proc2)
    assert code == 0
    print(f"crash test: {len(acked)} acknowledged before kill -9, {partial_before_restart} partial "
          f"temporary file(s) left by the crash and removed at restart")


def test_serve_reports_a_busy_port_cleanly(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import main

    for k in list(os.environ):
        if k.startswith("DENTFUSE_") and k != "DENTFUSE_REQUIRE_PEERS":
            monkeypatch.delenv(k)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "Traceback" not in result.output
