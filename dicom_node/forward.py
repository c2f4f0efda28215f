"""A persistent queue that forwards chosen instances to PACS destinations by C-STORE.

Jobs live in SQLite (``data_dir/forward.sqlite``, WAL), one row per (SOP instance,
destination): enqueueing the same instance for the same destination twice returns the same
job. A job is ``pending`` until it is delivered (``done``) or has failed
``forward_max_attempts`` times (``dead``, with its last error); nothing is ever deleted, so a
PACS that is down loses nothing and ``retry_dead`` puts dead jobs back in line once it is
fixed. Failed attempts wait ``forward_backoff_s * 2**(attempts-1)`` seconds, capped at
``forward_backoff_max_s``.

Delivery is at least once: a job is leased while it is being sent; a process that dies
mid-send leaves a lease that expires (``lease_s``), and the instance may then be sent
again, which a PACS treats as a duplicate of the same SOP instance. Several processes may
share the database (the serve command's background thread and a ``dentfuse node forward``
run); leases keep them from sending the same job at once.

Times are seconds since the epoch; every method that depends on time takes ``now`` so tests
drive the queue with a fake clock instead of sleeping.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from dicom_node.errors import DicomNodeError
from dicom_node.scu import (
    FileIdentity,
    FileUnusableError,
    PacsError,
    PeerRefusedError,
    Timeouts,
    close,
    describe,
    open_association,
    read_identity,
    send_file,
    status_category,
    storage_contexts,
)
from dicom_node.settings import PacsDestination, PacsSettings

log = logging.getLogger(__name__)

DB_NAME = "forward.sqlite"
STATES = ("pending", "done", "dead")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS forward_jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_key TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_until REAL,
    lease_owner TEXT,
    last_status INTEGER,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    delivered_at TEXT,
    UNIQUE (sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS forward_jobs_due ON forward_jobs (state, next_attempt_at);
"""


class ForwardError(DicomNodeError):
    """A job cannot be queued (unknown destination, unusable file)."""


@dataclass(frozen=True)
class ForwardJob:
    """One (instance, destination) delivery, as stored in the queue."""

    id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    path: str
    sha256: str
    size_bytes: int
    state: str
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_error: str | None
    created_at: str
    updated_at: str
    delivered_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class RunReport:
    """What one :meth:`ForwardQueue.run_once` did."""

    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0

    def __add__(self, other: "RunReport") -> "RunReport":
        return RunReport(self.attempted + other.attempted, self.delivered + other.delivered,
                         self.retrying + other.retrying, self.dead + other.dead)


@dataclass(frozen=True)
class SentBatch:
    """What one association did for one study at one destination (for the transfer audit)."""

    destination: PacsDestination
    calling_ae_title: str
    study_instance_uid: str
    patient_key: str
    sent: tuple[str, ...]  # SOP Instance UIDs delivered
    failures: tuple[dict[str, str], ...]  # {"sop_instance_uid", "error"}


SentCallback = Callable[[SentBatch], None]


def audit_sent_to(trail: Any) -> SentCallback:
    """A :data:`SentCallback` writing PS3.15 A.5.3.12 ``instances_sent`` rows to an
    :class:`dicom_node.audit.AuditTrail`."""

    def record(batch: SentBatch) -> None:
        d = batch.destination
        trail.record_transfer(
            "sent", local_ae_title=batch.calling_ae_title, peer_ae_title=d.ae_title,
            peer_address=f"{d.host}:{d.port}", study_instance_uid=batch.study_instance_uid,
            patient_key=batch.patient_key, succeeded=len(batch.sent), failed=len(batch.failures),
            failures=batch.failures,
        )

    return record


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ForwardQueue:
    """Persistent C-STORE forwarding queue.

    Parameters
    ----------
    data_dir:
        The node's data directory; the queue keeps ``forward.sqlite`` there.
    settings:
        Destinations, attempt budget and backoff.
    calling_ae_title:
        Our AE title when we call the PACS.
    timeouts, tls:
        Network timeouts; TLS client context for destinations with ``tls = true``.
    on_sent:
        Called after each association with what was sent or failed, per study (the
        transfer audit); its exceptions are logged, never raised.
    lease_s:
        How long a job being sent is hidden from other runners; after a crash it is
        retried once the lease expires.
    batch_size:
        Jobs claimed per :meth:`run_once`.
    """

    def __init__(
        self,
        data_dir: Path | str,
        settings: PacsSettings,
        calling_ae_title: str,
        *,
        timeouts: Timeouts = Timeouts(),
        tls: ssl.SSLContext | None = None,
        on_sent: SentCallback | None = None,
        lease_s: float = 600.0,
        batch_size: int = 200,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / DB_NAME
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ForwardError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self.settings = settings
        self.calling_ae_title = calling_ae_title
        self.timeouts = timeouts
        self.tls = tls
        self.on_sent = on_sent
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.clock = clock
        self._owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._db_lock = threading.Lock()
        self._run_lock = threading.Lock()
        try:
            self._conn = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            with self._db_lock:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
                self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ForwardError(
                f"cannot open the forwarding queue {self.db_path}: {exc}; check that the data directory "
                "is writable and not full"
            ) from exc
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # -- configuration ---------------------------------------------------------------
    def destination(self, name: str) -> PacsDestination:
        for d in self.settings.destinations:
            if d.name == name:
                return d
        known = ", ".join(d.name for d in self.settings.destinations) or "none configured"
        raise ForwardError(
            f"unknown PACS destination {name!r} (configured: {known}); add it to [pacs] destinations"
        )

    def backoff_s(self, attempts: int) -> float:
        """Delay before the next try after ``attempts`` failed attempts."""
        base = max(0.0, self.settings.forward_backoff_s)
        return min(self.settings.forward_backoff_max_s, base * (2 ** max(0, attempts - 1)))

    # -- enqueue ------------------------------------------------------------------------
    def enqueue(self, path: Path | str, destination_name: str, *, now: float | None = None) -> int:
        """Queue ``path`` for ``destination_name``; return the job id.

        Idempotent per (SOP instance, destination): the same instance returns its existing
        job. A delivered job is queued again only if the file's bytes changed; a pending or
        dead job takes the new path.

        Raises
        ------
        ForwardError
            Unknown destination, or the file is not a sendable DICOM file.
        """
        self.destination(destination_name)
        p = Path(path).resolve()
        try:
            ident = read_identity(p)
        except FileUnusableError as exc:
            raise ForwardError(str(exc)) from None
        digest = _sha256(p)
        t = self.clock() if now is None else now
        stamp = _iso(t)
        with self._db_lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                row = cur.execute(
                    "SELECT id, state, sha256 FROM forward_jobs WHERE sop_instance_uid=? AND destination=?",
                    (ident.sop_instance_uid, destination_name),
                ).fetchone()
                if row is None:
                    cur.execute(
                        "INSERT INTO forward_jobs (destination, sop_instance_uid, sop_class_uid, transfer_syntax_uid,"
                        " study_instance_uid, series_instance_uid, patient_key, path, sha256, size_bytes, state,"
                        " attempts, next_attempt_at, created_at, updated_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?,'pending',0,?,?,?)",
                        (destination_name, ident.sop_instance_uid, ident.sop_class_uid, ident.transfer_syntax_uid,
                         ident.study_instance_uid, ident.series_instance_uid, ident.patient_key, str(p), digest,
                         ident.size_bytes,
                         t, stamp, stamp),
                    )
                    job_id = int(cur.lastrowid or 0)
                    log.info("queued %s for %s (job %d)", ident.sop_instance_uid, destination_name, job_id)
                else:
                    job_id = int(row["id"])
                    if row["state"] != "done" or row["sha256"] != digest:
                        reopen = row["state"] == "done"
                        cur.execute(
                            "UPDATE forward_jobs SET path=?, sha256=?, size_bytes=?, sop_class_uid=?,"
                            " transfer_syntax_uid=?, updated_at=?"
                            + (", state='pending', attempts=0, next_attempt_at=?, delivered_at=NULL" if reopen else "")
                            + " WHERE id=?",
                            (str(p), digest, ident.size_bytes, ident.sop_class_uid, ident.transfer_syntax_uid, stamp)
                            + ((t,) if reopen else ()) + (job_id,),
                        )
                        if reopen:
                            log.info("re-queued %s for %s: its bytes changed since delivery (job %d)",
                                     ident.sop_instance_uid, destination_name, job_id)
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        self._wake.set()
        return job_id

    def enqueue_many(self, paths: Iterable[Path | str], destination_name: str, *, now: float | None = None) -> list[int]:
        return [self.enqueue(p, destination_name, now=now) for p in paths]

    # -- inspection ---------------------------------------------------------------------
    def counts(self, destination: str | None = None, *, now: float | None = None) -> dict[str, int]:
        """Jobs per state (``pending``, ``done``, ``dead``) plus ``due`` (pending and due now)
        and ``total``; for one destination or all."""
        where, args = ("WHERE destination=?", (destination,)) if destination else ("", ())
        with self._db_lock:
            rows = self._conn.execute(
                f"SELECT state, count(*) AS n FROM forward_jobs {where} GROUP BY state", args
            ).fetchall()
            due = self._conn.execute(
                "SELECT count(*) FROM forward_jobs WHERE state='pending' AND next_attempt_at<=?"
                + (" AND destination=?" if destination else ""),
                (self.clock() if now is None else now,) + args,
            ).fetchone()[0]
        out = {s: 0 for s in STATES}
        for r in rows:
            out[r["state"]] = int(r["n"])
        out["due"] = int(due)
        out["total"] = sum(out[s] for s in STATES)
        return out

    def jobs(self, state: str | None = None, destination: str | None = None, limit: int = 1000) -> list[ForwardJob]:
        clauses, args = [], []
        if state:
            clauses.append("state=?")
            args.append(state)
        if destination:
            clauses.append("destination=?")
            args.append(destination)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._db_lock:
            rows = self._conn.execute(
                f"SELECT * FROM forward_jobs {where} ORDER BY id LIMIT ?", (*args, limit)
            ).fetchall()
        return [self._job(r) for r in rows]

    def job(self, job_id: int) -> ForwardJob:
        with self._db_lock:
            row = self._conn.execute("SELECT * FROM forward_jobs WHERE id=?", (job_id,)).fetchone()
        if row is None:
            raise ForwardError(f"no forwarding job {job_id}")
        return self._job(row)

    def next_due_at(self) -> float | None:
        """When the earliest pending job becomes due (None when nothing is pending)."""
        with self._db_lock:
            row = self._conn.execute(
                "SELECT min(max(next_attempt_at, coalesce(lease_until, 0))) FROM forward_jobs WHERE state='pending'"
            ).fetchone()
        return None if row[0] is None else float(row[0])

    def retry_dead(self, destination: str | None = None, *, now: float | None = None) -> int:
        """Give dead jobs a fresh attempt budget; return how many."""
        t = self.clock() if now is None else now
        with self._db_lock:
            cur = self._conn.execute(
                "UPDATE forward_jobs SET state='pending', attempts=0, next_attempt_at=?, updated_at=?"
                " WHERE state='dead'" + (" AND destination=?" if destination else ""),
                (t, _iso(t)) + ((destination,) if destination else ()),
            )
            n = cur.rowcount
        if n:
            self._wake.set()
        return n

    @staticmethod
    def _job(r: sqlite3.Row) -> ForwardJob:
        return ForwardJob(
            id=r["id"], destination=r["destination"], sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"], transfer_syntax_uid=r["transfer_syntax_uid"],
            study_instance_uid=r["study_instance_uid"], series_instance_uid=r["series_instance_uid"],
            patient_key=r["patient_key"], path=r["path"], sha256=r["sha256"], size_bytes=r["size_bytes"], state=r["state"],
            attempts=r["attempts"], next_attempt_at=r["next_attempt_at"], last_status=r["last_status"],
            last_error=r["last_error"], created_at=r["created_at"], updated_at=r["updated_at"],
            delivered_at=r["delivered_at"],
        )

    # -- delivery -------------------------------------------------------------------------
    def _claim(self, now: float) -> list[ForwardJob]:
        with self._db_lock:
            cur = self._conn.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                rows = cur.execute(
                    "SELECT * FROM forward_jobs WHERE state='pending' AND next_attempt_at<=?"
                    " AND (lease_until IS NULL OR lease_until<=?) ORDER BY next_attempt_at, id LIMIT ?",
                    (now, now, self.batch_size),
                ).fetchall()
                if rows:
                    ids = [r["id"] for r in rows]
                    cur.execute(
                        f"UPDATE forward_jobs SET lease_until=?, lease_owner=? WHERE id IN ({','.join('?' * len(ids))})",
                        (now + self.lease_s, self._owner, *ids),
                    )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return [self._job(r) for r in rows]

    def _record(self, job: ForwardJob, now: float, *, ok: bool, status: int | None, error: str | None,
                permanent: bool = False) -> str:
        """Store one outcome; return the job's new state."""
        stamp = _iso(now)
        with self._db_lock:
            if ok:
                self._conn.execute(
                    "UPDATE forward_jobs SET state='done', attempts=attempts+1, last_status=?, last_error=?,"
                    " delivered_at=?, updated_at=?, lease_until=NULL, lease_owner=NULL WHERE id=? AND lease_owner=?",
                    (status, error, stamp, stamp, job.id, self._owner),
                )
                return "done"
            attempts = job.attempts + 1
            dead = permanent or attempts >= self.settings.forward_max_attempts
            state = "dead" if dead else "pending"
            self._conn.execute(
                "UPDATE forward_jobs SET state=?, attempts=?, next_attempt_at=?, last_status=?, last_error=?,"
                " updated_at=?, lease_until=NULL, lease_owner=NULL WHERE id=? AND lease_owner=?",
                (state, attempts, now + (0.0 if dead else self.backoff_s(attempts)), status, error, stamp,
                 job.id, self._owner),
            )
        if dead:
            log.error("forwarding job %d (%s to %s) is dead after %d attempt(s): %s",
                      job.id, job.sop_instance_uid, job.destination, attempts, error)
        else:
            log.warning("forwarding job %d (%s to %s) failed (attempt %d of %d), retry in %.0f s: %s",
                        job.id, job.sop_instance_uid, job.destination, attempts,
                        self.settings.forward_max_attempts, self.backoff_s(attempts), error)
        return state

    def run_once(self, now: float | None = None) -> RunReport:
        """Deliver every job due at ``now`` (default: the clock); return what happened.

        Jobs are grouped by destination, one association per destination (and per 128
        presentation contexts). A destination that cannot be reached costs each of its due
        jobs one attempt; the other destinations are unaffected.
        """
        with self._run_lock:
            t = self.clock() if now is None else now
            jobs = self._claim(t)
            report = RunReport()
            by_dest: dict[str, list[ForwardJob]] = {}
            for j in jobs:
                by_dest.setdefault(j.destination, []).append(j)
            for name, dest_jobs in by_dest.items():
                report = report + self._deliver(name, dest_jobs, t)
            return report

    def _deliver(self, name: str, jobs: list[ForwardJob], now: float) -> RunReport:
        counts = {"done": 0, "pending": 0, "dead": 0}
        try:
            dest = self.destination(name)
        except ForwardError as exc:
            for j in jobs:
                counts[self._record(j, now, ok=False, status=None, error=str(exc))] += 1
            return RunReport(len(jobs), counts["done"], counts["pending"], counts["dead"])

        sendable: list[tuple[ForwardJob, FileIdentity]] = []
        for j in jobs:
            if not Path(j.path).is_file():
                err = f"{j.path}: file no longer exists; re-create the output and queue it again"
                counts[self._record(j, now, ok=False, status=None, error=err, permanent=True)] += 1
                continue
            sendable.append((j, FileIdentity(
                path=j.path, sop_class_uid=j.sop_class_uid, sop_instance_uid=j.sop_instance_uid,
                transfer_syntax_uid=j.transfer_syntax_uid, study_instance_uid=j.study_instance_uid,
                series_instance_uid=j.series_instance_uid, patient_key=j.patient_key, size_bytes=j.size_bytes,
            )))

        for chunk in _context_chunks(sendable):
            self._send_chunk(dest, chunk, now, counts)
        return RunReport(len(jobs), counts["done"], counts["pending"], counts["dead"])

    def _send_chunk(self, dest: PacsDestination, chunk: Sequence[tuple[ForwardJob, FileIdentity]],
                    now: float, counts: dict[str, int]) -> None:
        tally: dict[str, tuple[str, list[str], list[dict[str, str]]]] = {}

        def outcome(j: ForwardJob, ok: bool, status: int | None, error: str | None, permanent: bool = False) -> None:
            counts[self._record(j, now, ok=ok, status=status, error=error, permanent=permanent)] += 1
            entry = tally.setdefault(j.study_instance_uid, (j.patient_key, [], []))
            if ok:
                entry[1].append(j.sop_instance_uid)
            else:
                entry[2].append({"sop_instance_uid": j.sop_instance_uid, "error": error or ""})

        try:
            assoc = open_association(self.calling_ae_title, dest, storage_contexts([i for _, i in chunk]),
                                     timeouts=self.timeouts, tls=self.tls)
        except PacsError as exc:
            for j, _ in chunk:
                outcome(j, False, None, str(exc))
            self._audit(dest, tally)
            return
        try:
            for msg_id, (j, ident) in enumerate(chunk, start=1):
                if not assoc.is_established:
                    outcome(j, False, None, f"association with {describe(dest)} was lost before this instance was sent")
                    continue
                try:
                    status = send_file(assoc, ident, msg_id=msg_id & 0xFFFF or 1)
                except PeerRefusedError as exc:
                    outcome(j, False, None, str(exc), permanent=True)
                    continue
                except (OSError, ValueError, AttributeError, RuntimeError) as exc:
                    outcome(j, False, None, f"{ident.path}: sending to {describe(dest)} failed: {exc}")
                    continue
                category = status_category(status) if status >= 0 else "failure"
                if category in ("success", "warning"):
                    warn = None if category == "success" else f"delivered with warning status 0x{status:04X}"
                    outcome(j, True, status, warn)
                elif status >= 0:
                    outcome(j, False, status, f"{describe(dest)} answered C-STORE with status 0x{status:04X}")
                else:
                    outcome(j, False, None, f"{describe(dest)} did not answer the C-STORE in time")
        finally:
            close(assoc)
            self._audit(dest, tally)

    def _audit(self, dest: PacsDestination, tally: dict[str, tuple[str, list[str], list[dict[str, str]]]]) -> None:
        if self.on_sent is None:
            return
        for study, (patient_key, sent, failures) in tally.items():
            batch = SentBatch(dest, self.calling_ae_title, study, patient_key, tuple(sent), tuple(failures))
            try:
                self.on_sent(batch)
            except Exception:  # the audit must never stop delivery
                log.exception("audit callback failed for study %s to %s", study, dest.name)

    # -- background thread ----------------------------------------------------------------
    def start(self, poll_interval_s: float = 5.0) -> None:
        """Deliver in a background thread until :meth:`stop` (wakes early on enqueue)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(poll_interval_s,),
                                        name="dentfuse-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self, poll_interval_s: float) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_once()
            except Exception:  # keep the thread alive: a locked database, a full disk...
                log.exception("forwarding run failed; retrying in %.0f s", poll_interval_s)
            nxt = self.next_due_at()
            wait = poll_interval_s if nxt is None else min(poll_interval_s, max(0.0, nxt - self.clock()))
            self._wake.wait(max(wait, 0.05))

    def close(self) -> None:
        self.stop()
        with self._db_lock:
            self._conn.close()

    def __enter__(self) -> "ForwardQueue":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _context_chunks(items: Sequence[tuple[ForwardJob, FileIdentity]], limit: int = 128
                    ) -> list[list[tuple[ForwardJob, FileIdentity]]]:
    """Split items so that each chunk needs at most ``limit`` presentation contexts."""
    chunks: list[list[tuple[ForwardJob, FileIdentity]]] = []
    current: list[tuple[ForwardJob, FileIdentity]] = []
    keys: set[tuple[str, str]] = set()
    for item in items:
        key = (item[1].sop_class_uid, item[1].transfer_syntax_uid)
        if key not in keys and len(keys) >= limit:
            chunks.append(current)
            current, keys = [], set()
        keys.add(key)
        current.append(item)
    if current:
        chunks.append(current)
    return chunks


def queue_counts(data_dir: Path | str, now: float | None = None) -> dict[str, int]:
    """Job counts per state of the queue in ``data_dir`` without configuring a queue
    (for ``dentfuse status``); all zero when nothing was ever queued."""
    db = Path(data_dir) / DB_NAME
    out = {s: 0 for s in STATES}
    out["due"] = 0
    if db.is_file():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0)
        try:
            for state, n in conn.execute("SELECT state, count(*) FROM forward_jobs GROUP BY state"):
                out[state] = int(n)
            out["due"] = int(conn.execute(
                "SELECT count(*) FROM forward_jobs WHERE state='pending' AND next_attempt_at<=?",
                (time.time() if now is None else now,)).fetchone()[0])
        except sqlite3.OperationalError:  # the table was never created
            pass
        finally:
            conn.close()
    out["total"] = sum(out[s] for s in STATES)
    return out
