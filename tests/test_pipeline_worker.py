"""The worker pool: jobs run in child processes; crashes, errors and restarts."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fusion.records import FusionInput, FusionOutput, FusionResult
from pipeline.jobs import Job, JobSpec, SqliteJobQueue
from pipeline.worker import RESULT_FILE, WorkerPool, owner_alive


def fake_fusion(payload: Mapping[str, Any], out_dir: Path, progress: Callable[..., None]) -> FusionResult:
    """Runs in the worker process (kind "test")."""
    behaviour = payload.get("behaviour", "ok")
    marker = Path(payload["marker_dir"]) / f"{payload['fusion_id']}.{os.getpid()}"
    marker.write_text("ran")
    progress("registering", 0.5)
    if behaviour == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if behaviour == "crash_once" and len(list(Path(payload["marker_dir"]).glob(payload["fusion_id"] + ".*"))) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if behaviour == "input_error":
        from fusion.errors import InputError

        raise InputError(f"series {payload['fixed']['paths']} has one slice; send the whole series")
    if behaviour == "slow":
        time.sleep(float(payload.get("sleep_s", 30)))
    progress("writing outputs", 0.9)
    out = out_dir / "moved.txt"
    out.write_text("output")
    return FusionResult(
        fusion_id=payload["fusion_id"], patient_key="DF-0001", method="test", purpose="fusion",
        inputs=(FusionInput(role="fixed", kind="volume", modality="CT", patient_id="DF-0001"),
                FusionInput(role="moving", kind="volume", modality="CT", patient_id="DF-0001")),
        transform_moving_to_fixed=((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)),
        fixed_frame_of_reference_uid="1.2.3", moving_frame_of_reference_uid="1.2.4",
        verdict=payload.get("verdict", "accepted"), reasons=(), metrics={"x": 1.0},
        outputs=(FusionOutput(kind="derived_series", path=str(out), sha256="0" * 64),),
    )


def job_spec(key: str, tmp_path: Path, **payload: Any) -> JobSpec:
    marker_dir = tmp_path / "markers"
    marker_dir.mkdir(exist_ok=True)
    body = {"kind": "test", "target": "test_pipeline_worker:fake_fusion", "fusion_id": f"F{key.upper()}",
            "fixed": {"paths": ["a"]}, "moving": {"paths": ["b"]}, "marker_dir": str(marker_dir), **payload}
    return JobSpec(key=key, kind="test", patient_key="DF-0001", payload=body)


def runs(tmp_path: Path, fusion_id: str) -> int:
    return len(list((tmp_path / "markers").glob(fusion_id + ".*")))


class Finalizer:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, job: Job, result: FusionResult, stage: Callable[[str], None]) -> str:
        stage("billing")
        self.calls.append(result.fusion_id)
        return "needs_review" if result.verdict == "needs_review" else "done"


def wait_until(pred: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def make_pool(tmp_path: Path, queue: SqliteJobQueue, fin: Finalizer, **kw: Any) -> tuple[WorkerPool, threading.Event]:
    finished = threading.Event()
    pool = WorkerPool(queue, tmp_path / "fusions", fin, workers=kw.pop("workers", 2), heartbeat_s=0.2,
                      poll_s=0.1, on_job_finished=lambda j: finished.set(), **kw)
    return pool, finished


def all_final(q: SqliteJobQueue) -> bool:
    c = q.counts()
    return c["queued"] == 0 and c["running"] == 0


def test_jobs_run_in_children_crash_is_retried_and_errors_stop(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=2)
    fin = Finalizer()
    q.enqueue(job_spec("ok", tmp_path))
    q.enqueue(job_spec("review", tmp_path, verdict="needs_review"))
    q.enqueue(job_spec("crash", tmp_path, behaviour="crash"))
    q.enqueue(job_spec("flaky", tmp_path, behaviour="crash_once"))
    q.enqueue(job_spec("bad", tmp_path, behaviour="input_error"))
    pool, _ = make_pool(tmp_path, q, fin)
    pool.start()
    try:
        wait_until(lambda: all_final(q))
    finally:
        pool.stop()
    by_key = {j.key: j for j in q.list()}
    assert by_key["ok"].state == "done" and by_key["ok"].result["verdict"] == "accepted"
    assert [s for s, _ in by_key["ok"].stages][:2] == ["claimed", "starting"]
    assert "registering" in [s for s, _ in by_key["ok"].stages]
    assert "billing" in [s for s, _ in by_key["ok"].stages]
    assert by_key["review"].state == "needs_review"
    # a process killed twice: stopped with its error, after max attempts
    assert by_key["crash"].state == "failed" and by_key["crash"].attempts == 2
    assert "killed by signal 9" in by_key["crash"].error
    # killed once, then succeeded on the retry
    assert by_key["flaky"].state == "done" and by_key["flaky"].attempts == 2
    # an input error is not retried
    assert by_key["bad"].state == "failed" and by_key["bad"].attempts == 1
    assert "InputError" in by_key["bad"].error and "one slice" in by_key["bad"].error
    assert sorted(fin.calls) == ["FFLAKY", "FOK", "FREVIEW"]  # each finalised exactly once
    # the pool process itself survived every crash
    assert os.getpid() > 0 and pool.busy() == 0


def test_computed_fusion_is_not_recomputed_after_restart(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    fin = Finalizer()
    q.enqueue(job_spec("k1", tmp_path))
    # first life: fusion computed, then the serving process "died" before finalising
    q.claim(f"{socket.gethostname()}:999999999:0", 3600)
    out_dir = tmp_path / "fusions" / "FK1"
    out_dir.mkdir(parents=True)
    (out_dir / "moved.txt").write_text("output")
    result = FusionResult(
        fusion_id="FK1", patient_key="DF-0001", method="test", purpose="fusion", inputs=(),
        transform_moving_to_fixed=((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)),
        fixed_frame_of_reference_uid="1", moving_frame_of_reference_uid="2", verdict="accepted",
        reasons=(), metrics={}, outputs=(FusionOutput(kind="x", path=str(out_dir / "moved.txt"), sha256=""),))
    (out_dir / RESULT_FILE).write_text(result.to_json())
    assert not owner_alive(f"{socket.gethostname()}:999999999:0")
    pool, _ = make_pool(tmp_path, q, fin, workers=1)
    pool.start()  # releases the dead owner's job
    try:
        wait_until(lambda: all_final(q))
    finally:
        pool.stop()
    job = q.get_by_key("k1")
    assert job is not None and job.state == "done" and job.attempts == 2
    assert "stopped (killed or restarted)" in q.errors(job.job_id)[0][1]
    assert runs(tmp_path, "FK1") == 0  # never recomputed
    assert fin.calls == ["FK1"]


def test_stop_kills_running_child_and_job_returns_to_queue(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3)
    fin = Finalizer()
    q.enqueue(job_spec("slow", tmp_path, behaviour="slow", sleep_s=60))
    pool, _ = make_pool(tmp_path, q, fin, workers=1)
    pool.start()
    try:
        wait_until(lambda: (j := q.get_by_key("slow")) is not None and j.stage == "registering")
    finally:
        t0 = time.monotonic()
        pool.stop(timeout_s=0.5)
    assert time.monotonic() - t0 < 15
    job = q.get_by_key("slow")
    assert job is not None and job.state == "queued" and fin.calls == []
    assert job.attempts == 0 and "stopped by shutdown" in job.error  # a shutdown uses no attempt
