"""Fusion jobs: a small queue interface and its embedded SQLite implementation.

The pipeline talks to jobs only through :class:`JobQueue`, so that a distributed
engine (a real task queue and a worker fleet) can replace the embedded default when a
group of clinics outgrows one machine. The embedded default, :class:`SqliteJobQueue`,
keeps every job in ``<data_dir>/jobs.sqlite3`` (WAL), so job states survive restarts.

States
------
``queued`` -> ``running`` -> ``done`` | ``needs_review`` | ``failed``

* :meth:`JobQueue.enqueue` is idempotent by the job's ``key``: the same key never makes
  a second job (the existing one is returned).
* :meth:`JobQueue.claim` leases a queued job to an owner for ``lease_s`` seconds and counts
  an attempt; :meth:`JobQueue.heartbeat` extends the lease and records the stage.
* A lease that runs out (the worker was killed, the machine rebooted) puts the job back
  to ``queued`` (:meth:`JobQueue.release_expired`) while attempts remain, else ``failed``
  with the reason recorded. :meth:`JobQueue.fail` does the same for an error.
* Work done for a job must be idempotent by job key (same fusion id, same output
  folder), because "at least once" is what a lease can promise.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Protocol, Sequence, runtime_checkable

JobState = Literal["queued", "running", "done", "failed", "needs_review"]
JOB_STATES: tuple[str, ...] = ("queued", "running", "done", "failed", "needs_review")
FINAL_STATES: tuple[str, ...] = ("done", "failed", "needs_review")


class JobError(Exception):
    """Base of the errors the job queue raises on purpose."""


class LeaseLostError(JobError):
    """The caller no longer holds the job's lease (it expired and was re-queued or
    claimed by another worker); its result must not be recorded."""


@dataclass(frozen=True)
class JobSpec:
    """What to do. ``key`` makes enqueueing idempotent (patient + sorted series + content)."""

    key: str
    kind: str  # "volume" or "surface"
    patient_key: str
    payload: Mapping[str, Any]
    priority: int = 0  # larger runs first


@dataclass(frozen=True)
class Job:
    """A job as stored. Times are UNIX seconds (float)."""

    job_id: int
    key: str
    kind: str
    patient_key: str
    payload: Mapping[str, Any]
    state: str
    attempts: int
    max_attempts: int
    owner: str = ""
    lease_until: float = 0.0
    stage: str = ""
    progress: float = 0.0
    stages: tuple[tuple[str, float], ...] = ()  # (stage, time) history of the current attempt
    error: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    priority: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "key": self.key,
            "kind": self.kind,
            "patient_key": self.patient_key,
            "payload": dict(self.payload),
            "state": self.state,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "owner": self.owner,
            "lease_until": self.lease_until,
            "stage": self.stage,
            "progress": self.progress,
            "stages": [list(s) for s in self.stages],
            "error": self.error,
            "result": dict(self.result),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "priority": self.priority,
        }


@runtime_checkable
class JobQueue(Protocol):
    """What the pipeline needs from a job queue. Implementations must be safe to use from
    several threads and processes (the embedded one is; a distributed one would be)."""

    def enqueue(self, spec: JobSpec) -> tuple[Job, bool]:
        """Add a job unless one with ``spec.key`` exists; return (job, created)."""

    def claim(self, owner: str, lease_s: float, kinds: Sequence[str] | None = None) -> Job | None:
        """Lease the next queued job to ``owner`` (attempt counted), or None."""

    def heartbeat(self, job_id: int, owner: str, lease_s: float, stage: str | None = None,
                  progress: float | None = None) -> Job:
        """Extend the lease and record the stage; raises :class:`LeaseLostError`."""

    def complete(self, job_id: int, owner: str, result: Mapping[str, Any],
                 state: str = "done") -> Job:
        """Finish a job (``done`` or ``needs_review``) with its result summary."""

    def fail(self, job_id: int, owner: str, error: str, retry: bool = True) -> Job:
        """Record an error; re-queue while attempts remain and ``retry``, else ``failed``."""

    def release(self, job_id: int, owner: str, reason: str) -> Job:
        """Give a job back to the queue without counting the attempt (e.g. shutdown)."""

    def get(self, job_id: int) -> Job | None: ...

    def get_by_key(self, key: str) -> Job | None: ...

    def list(self, states: Iterable[str] | None = None, limit: int = 100) -> list[Job]: ...

    def counts(self) -> dict[str, int]: ...

    def release_expired(self) -> list[Job]:
        """Re-queue (or fail, when out of attempts) running jobs whose lease ran out."""

    def release_owners(self, owners_alive: Callable[[str], bool]) -> list[Job]:
        """Release running jobs whose owner is known dead (``owners_alive(owner)`` False)."""

    def opener(self) -> Callable[[], "JobQueue"]:
        """A picklable callable that opens this same queue in another process (the worker
        processes report their progress through it)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL CHECK (state IN ('queued','running','done','failed','needs_review')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    progress REAL NOT NULL DEFAULT 0,
    stages TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    finished_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, job_id);
CREATE TABLE IF NOT EXISTS job_errors (
    job_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL
);
"""

_COLUMNS = (
    "job_id, key, kind, patient_key, payload, state, attempts, max_attempts, owner, lease_until, "
    "stage, progress, stages, error, result, created_at, updated_at, started_at, finished_at, priority"
)


class SqliteJobQueue:
    """The embedded job queue: one SQLite file (WAL) shared by the coordinator and the
    worker processes (each opens its own connection).

    Parameters
    ----------
    path:
        The database file (e.g. ``<data_dir>/jobs.sqlite3``); its folder is created.
    max_attempts:
        Attempts before a job stops as ``failed`` (``fusion.job_max_attempts``).
    clock:
        Returns UNIX seconds; tests pass a fake clock.
    """

    def __init__(self, path: Path, max_attempts: int = 3, clock: Callable[[], float] = time.time) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._clock = clock
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    # -- connection handling -------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def __enter__(self) -> sqlite3.Connection:
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")

    def _tx(self) -> "SqliteJobQueue._Tx":
        return SqliteJobQueue._Tx(self._conn())

    def opener(self) -> Callable[[], "SqliteJobQueue"]:
        return functools.partial(SqliteJobQueue, self.path, self.max_attempts)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _row(row: Sequence[Any]) -> Job:
        (job_id, key, kind, patient_key, payload, state, attempts, max_attempts, owner, lease_until,
         stage, progress, stages, error, result, created_at, updated_at, started_at, finished_at,
         priority) = row
        return Job(
            job_id=job_id, key=key, kind=kind, patient_key=patient_key, payload=json.loads(payload),
            state=state, attempts=attempts, max_attempts=max_attempts, owner=owner,
            lease_until=lease_until, stage=stage, progress=progress,
            stages=tuple((str(s), float(t)) for s, t in json.loads(stages)), error=error,
            result=json.loads(result), created_at=created_at, updated_at=updated_at,
            started_at=started_at, finished_at=finished_at, priority=priority,
        )

    def _get(self, db: sqlite3.Connection, job_id: int) -> Job | None:
        row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else self._row(row)

    def _held(self, db: sqlite3.Connection, job_id: int, owner: str) -> Job:
        job = self._get(db, job_id)
        if job is None:
            raise JobError(f"job {job_id} does not exist")
        if job.state != "running" or job.owner != owner:
            raise LeaseLostError(
                f"job {job_id} is {job.state} (owner {job.owner or '-'}), not held by {owner}; "
                "its lease expired or another worker took it over"
            )
        return job

    # -- the interface ------------------------------------------------------------------------
    def enqueue(self, spec: JobSpec) -> tuple[Job, bool]:
        now = self._clock()
        payload = json.dumps(dict(spec.payload), sort_keys=True, default=str)
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE key = ?", (spec.key,)).fetchone()
            if row is not None:
                return self._row(row), False
            cur = db.execute(
                "INSERT INTO jobs (key, kind, patient_key, payload, priority, state, attempts, max_attempts,"
                " stage, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'queued', 0, ?, 'queued', ?, ?)",
                (spec.key, spec.kind, spec.patient_key, payload, spec.priority, self.max_attempts, now, now),
            )
            job = self._get(db, int(cur.lastrowid))  # type: ignore[arg-type]
        assert job is not None
        return job, True

    def claim(self, owner: str, lease_s: float, kinds: Sequence[str] | None = None) -> Job | None:
        if not owner:
            raise ValueError("claim needs a non-empty owner")
        now = self._clock()
        with self._tx() as db:
            sql = "SELECT job_id FROM jobs WHERE state = 'queued'"
            args: list[Any] = []
            if kinds:
                sql += f" AND kind IN ({','.join('?' * len(kinds))})"
                args.extend(kinds)
            sql += " ORDER BY priority DESC, job_id LIMIT 1"
            row = db.execute(sql, args).fetchone()
            if row is None:
                return None
            job_id = row[0]
            db.execute(
                "UPDATE jobs SET state='running', owner=?, lease_until=?, attempts=attempts+1, stage='claimed',"
                " progress=0, stages=?, started_at=?, updated_at=? WHERE job_id=?",
                (owner, now + lease_s, json.dumps([["claimed", now]]), now, now, job_id),
            )
            return self._get(db, job_id)

    def heartbeat(self, job_id: int, owner: str, lease_s: float, stage: str | None = None,
                  progress: float | None = None) -> Job:
        now = self._clock()
        with self._tx() as db:
            job = self._held(db, job_id, owner)
            stages = [list(s) for s in job.stages]
            new_stage = job.stage
            if stage is not None and stage != job.stage:
                stages.append([stage, now])
                new_stage = stage
            db.execute(
                "UPDATE jobs SET lease_until=?, stage=?, progress=?, stages=?, updated_at=? WHERE job_id=?",
                (now + lease_s, new_stage, job.progress if progress is None else float(progress),
                 json.dumps(stages), now, job_id),
            )
            out = self._get(db, job_id)
        assert out is not None
        return out

    def complete(self, job_id: int, owner: str, result: Mapping[str, Any], state: str = "done") -> Job:
        if state not in ("done", "needs_review"):
            raise ValueError(f"complete() takes state done or needs_review, not {state!r}")
        now = self._clock()
        with self._tx() as db:
            job = self._held(db, job_id, owner)
            stages = [list(s) for s in job.stages] + [[state, now]]
            db.execute(
                "UPDATE jobs SET state=?, owner='', lease_until=0, stage=?, progress=1, stages=?, error='',"
                " result=?, finished_at=?, updated_at=? WHERE job_id=?",
                (state, state, json.dumps(stages), json.dumps(dict(result), sort_keys=True, default=str),
                 now, now, job_id),
            )
            out = self._get(db, job_id)
        assert out is not None
        return out

    def fail(self, job_id: int, owner: str, error: str, retry: bool = True) -> Job:
        now = self._clock()
        with self._tx() as db:
            job = self._held(db, job_id, owner)
            self._record_failure(db, job, error, retry, now)
            out = self._get(db, job_id)
        assert out is not None
        return out

    def _record_failure(self, db: sqlite3.Connection, job: Job, error: str, retry: bool, now: float) -> None:
        db.execute("INSERT INTO job_errors (job_id, attempt, error, at) VALUES (?, ?, ?, ?)",
                   (job.job_id, job.attempts, error, now))
        if retry and job.attempts < job.max_attempts:
            state, stage, finished = "queued", "queued (retry)", 0.0
        else:
            state, stage, finished = "failed", "failed", now
            if retry:
                error = f"{error} (gave up after {job.attempts} attempt(s))"
        stages = [list(s) for s in job.stages] + [[stage, now]]
        db.execute(
            "UPDATE jobs SET state=?, owner='', lease_until=0, stage=?, stages=?, error=?, finished_at=?,"
            " updated_at=? WHERE job_id=?",
            (state, stage, json.dumps(stages), error, finished, now, job.job_id),
        )

    def release(self, job_id: int, owner: str, reason: str) -> Job:
        now = self._clock()
        with self._tx() as db:
            job = self._held(db, job_id, owner)
            stages = [list(x) for x in job.stages] + [["queued (released)", now]]
            db.execute(
                "UPDATE jobs SET state='queued', owner='', lease_until=0, attempts=MAX(attempts-1, 0),"
                " stage='queued (released)', stages=?, error=?, updated_at=? WHERE job_id=?",
                (json.dumps(stages), reason, now, job_id),
            )
            out = self._get(db, job_id)
        assert out is not None
        return out

    def errors(self, job_id: int) -> list[tuple[int, str, float]]:
        """Every recorded error of a job: (attempt, error, time)."""
        rows = self._conn().execute(
            "SELECT attempt, error, at FROM job_errors WHERE job_id=? ORDER BY rowid", (job_id,)).fetchall()
        return [(int(a), str(e), float(t)) for a, e, t in rows]

    def get(self, job_id: int) -> Job | None:
        return self._get(self._conn(), job_id)

    def get_by_key(self, key: str) -> Job | None:
        row = self._conn().execute(f"SELECT {_COLUMNS} FROM jobs WHERE key = ?", (key,)).fetchone()
        return None if row is None else self._row(row)

    def list(self, states: Iterable[str] | None = None, limit: int = 100) -> list[Job]:
        sql = f"SELECT {_COLUMNS} FROM jobs"
        args: list[Any] = []
        st = list(states or [])
        if st:
            sql += f" WHERE state IN ({','.join('?' * len(st))})"
            args.extend(st)
        sql += " ORDER BY job_id DESC LIMIT ?"
        args.append(int(limit))
        return [self._row(r) for r in self._conn().execute(sql, args).fetchall()]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in JOB_STATES}
        for state, n in self._conn().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            out[state] = int(n)
        return out

    def release_expired(self) -> list[Job]:
        now = self._clock()
        released: list[Job] = []
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state='running' AND lease_until < ?", (now,)).fetchall()
            for row in rows:
                job = self._row(row)
                self._record_failure(db, job, f"lease of {job.owner} expired during stage {job.stage!r}",
                                     True, now)
                released.append(self._get(db, job.job_id))  # type: ignore[arg-type]
        return released

    def release_owners(self, owners_alive: Callable[[str], bool]) -> list[Job]:
        now = self._clock()
        released: list[Job] = []
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state='running'").fetchall()
            for row in rows:
                job = self._row(row)
                if owners_alive(job.owner):
                    continue
                self._record_failure(
                    db, job, f"worker {job.owner} stopped (killed or restarted) during stage {job.stage!r}",
                    True, now)
                released.append(self._get(db, job.job_id))  # type: ignore[arg-type]
        return released
