"""The embedded job queue: idempotent enqueue, leases, retries, persistence."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from pipeline.jobs import JobQueue, JobSpec, LeaseLostError, SqliteJobQueue


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def spec(key: str = "DF-0001|1.2.3|1.2.4", kind: str = "volume") -> JobSpec:
    return JobSpec(key=key, kind=kind, patient_key="DF-0001", payload={"fixed": "1.2.3", "moving": "1.2.4"})


def test_queue_satisfies_interface(tmp_path: Path) -> None:
    assert isinstance(SqliteJobQueue(tmp_path / "jobs.sqlite3"), JobQueue)


def test_enqueue_is_idempotent_by_key(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3")
    a, created_a = q.enqueue(spec())
    b, created_b = q.enqueue(spec())
    assert created_a and not created_b
    assert a.job_id == b.job_id
    assert q.counts()["queued"] == 1
    c, created_c = q.enqueue(spec(key="DF-0001|1.2.3|1.2.5"))
    assert created_c and c.job_id != a.job_id
    assert q.counts()["queued"] == 2


def test_claim_heartbeat_complete_records_stages(tmp_path: Path) -> None:
    clock = FakeClock()
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", clock=clock)
    job, _ = q.enqueue(spec())
    claimed = q.claim("w1", lease_s=30)
    assert claimed is not None and claimed.job_id == job.job_id
    assert claimed.state == "running" and claimed.attempts == 1 and claimed.owner == "w1"
    assert q.claim("w2", lease_s=30) is None  # nothing else queued
    clock.t += 5
    hb = q.heartbeat(job.job_id, "w1", 30, stage="registering", progress=0.4)
    assert hb.stage == "registering" and hb.progress == pytest.approx(0.4)
    assert hb.lease_until == pytest.approx(clock.t + 30)
    with pytest.raises(LeaseLostError, match="not held by w2"):
        q.heartbeat(job.job_id, "w2", 30, stage="x")
    done = q.complete(job.job_id, "w1", {"fusion_id": "F1"}, state="needs_review")
    assert done.state == "needs_review" and done.result == {"fusion_id": "F1"}
    assert [s for s, _ in done.stages] == ["claimed", "registering", "needs_review"]
    with pytest.raises(LeaseLostError):
        q.complete(job.job_id, "w1", {})


def test_failing_job_stops_after_max_attempts_and_others_go_on(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=2)
    bad, _ = q.enqueue(JobSpec("bad", "volume", "DF-0001", {}, priority=1))
    good, _ = q.enqueue(JobSpec("good", "volume", "DF-0001", {}))
    j = q.claim("w", 30)
    assert j is not None and j.key == "bad"
    assert q.fail(j.job_id, "w", "RegistrationError: boom").state == "queued"
    j = q.claim("w", 30)
    assert j is not None and j.key == "bad" and j.attempts == 2
    failed = q.fail(j.job_id, "w", "RegistrationError: boom again")
    assert failed.state == "failed"
    assert "boom again" in failed.error and "gave up after 2" in failed.error
    assert [a for a, _, _ in q.errors(bad.job_id)] == [1, 2]
    j = q.claim("w", 30)
    assert j is not None and j.key == "good"
    q.complete(j.job_id, "w", {})
    assert q.counts() == {"queued": 0, "running": 0, "done": 1, "failed": 1, "needs_review": 0}


def test_permanent_error_fails_without_retry(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=3)
    q.enqueue(spec())
    j = q.claim("w", 30)
    assert j is not None
    out = q.fail(j.job_id, "w", "PatientMismatchError: two patients", retry=False)
    assert out.state == "failed" and out.attempts == 1 and "two patients" in out.error


def test_expired_lease_is_requeued_and_old_owner_loses_it(tmp_path: Path) -> None:
    clock = FakeClock()
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", clock=clock)
    job, _ = q.enqueue(spec())
    q.claim("w1", lease_s=10)
    clock.t += 5
    assert q.release_expired() == []
    clock.t += 10
    released = q.release_expired()
    assert [j.job_id for j in released] == [job.job_id]
    assert released[0].state == "queued" and "lease of w1 expired" in released[0].error
    again = q.claim("w2", lease_s=10)
    assert again is not None and again.attempts == 2
    with pytest.raises(LeaseLostError):
        q.complete(job.job_id, "w1", {})
    q.complete(job.job_id, "w2", {"ok": True})


def test_dead_owner_released_and_state_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    q = SqliteJobQueue(path)
    q.enqueue(spec("a"))
    q.enqueue(spec("b"))
    q.claim("host:1:0", 3600)
    q.claim("host:2:0", 3600)
    q.close()
    q2 = SqliteJobQueue(path)  # a restart
    assert q2.counts()["running"] == 2
    released = q2.release_owners(lambda owner: owner == "host:2:0")
    assert [j.key for j in released] == ["a"]
    assert q2.get_by_key("a").state == "queued"  # type: ignore[union-attr]
    assert q2.get_by_key("b").state == "running"  # type: ignore[union-attr]


def _claim_in_child(path: str, out: "multiprocessing.Queue[int]") -> None:
    q = SqliteJobQueue(Path(path))
    got = []
    while True:
        j = q.claim(f"child-{multiprocessing.current_process().pid}", 60)
        if j is None:
            break
        got.append(j.job_id)
    for g in got:
        out.put(g)
    out.put(-1)


def test_concurrent_claims_from_processes_never_share_a_job(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    q = SqliteJobQueue(path)
    for i in range(40):
        q.enqueue(spec(f"k{i}"))
    ctx = multiprocessing.get_context("spawn")
    out: "multiprocessing.Queue[int]" = ctx.Queue()
    procs = [ctx.Process(target=_claim_in_child, args=(str(path), out)) for _ in range(3)]
    for p in procs:
        p.start()
    ids: list[int] = []
    finished = 0
    while finished < 3:
        v = out.get(timeout=60)
        if v == -1:
            finished += 1
        else:
            ids.append(v)
    for p in procs:
        p.join(timeout=30)
    assert sorted(ids) == sorted(j.job_id for j in q.list(limit=100))
    assert len(set(ids)) == 40


def test_release_gives_the_job_back_without_using_an_attempt(tmp_path: Path) -> None:
    q = SqliteJobQueue(tmp_path / "jobs.sqlite3", max_attempts=1)
    q.enqueue(spec())
    j = q.claim("w", 30)
    assert j is not None and j.attempts == 1
    back = q.release(j.job_id, "w", "shutdown")
    assert back.state == "queued" and back.attempts == 0 and back.error == "shutdown"
    again = q.claim("w", 30)
    assert again is not None and again.attempts == 1  # still allowed its one attempt
