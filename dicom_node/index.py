"""The instance index: patients, studies, series and instances in SQLite (WAL).

``data_dir/index.sqlite`` holds one row per SOP Instance UID (primary key: never two
rows for one UID), the series with their kind, modality, counts, sizes and first/last
received times, and a record of every conflicting duplicate. Each change of a series'
content bumps its ``generation``; the stability monitor (:mod:`dicom_node.stability`)
uses that to (re)announce a series after its quiet period.

Durability: the instance *file* is fsync'd (and its directory) before the row is
committed, and the row is committed before the node answers 0x0000. The database runs in
WAL mode with ``synchronous=NORMAL``: a committed row survives any process crash (kill -9);
after a power loss the last rows may be missing, and :func:`dicom_node.ingest.reconcile_store`
(run at every start) re-indexes every durable file that has no row. The file on disk is
the source of truth; this saves one fsync per instance. Thread-safe: one connection
guarded by a lock (SQLite serialises writers anyway).
"""

from __future__ import annotations

import datetime as _dt
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from dicom_node.errors import NodeIndexError
from dicom_node.records import ReceivedInstance

LOG = logging.getLogger(__name__)

Clock = Callable[[], float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_key TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    issuer_of_patient_id TEXT NOT NULL DEFAULT '',
    first_received_s REAL NOT NULL,
    last_received_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_instance_uid TEXT PRIMARY KEY,
    patient_key TEXT NOT NULL,
    first_received_s REAL NOT NULL,
    last_received_s REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    modality TEXT NOT NULL,
    kind TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    first_received_s REAL NOT NULL,
    last_received_s REAL NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    modality TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    received_at TEXT NOT NULL,
    received_s REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_instance_uid);
CREATE INDEX IF NOT EXISTS series_by_study ON series(study_instance_uid);
CREATE INDEX IF NOT EXISTS studies_by_patient ON studies(patient_key);
CREATE INDEX IF NOT EXISTS series_by_last_received ON series(last_received_s);
CREATE TABLE IF NOT EXISTS duplicates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid TEXT NOT NULL,
    kept_sha256 TEXT NOT NULL,
    other_sha256 TEXT NOT NULL,
    policy TEXT NOT NULL,
    action TEXT NOT NULL,
    calling_ae_title TEXT NOT NULL,
    at TEXT NOT NULL
);
"""


def iso_utc(epoch_s: float) -> str:
    return _dt.datetime.fromtimestamp(epoch_s, _dt.timezone.utc).isoformat(timespec="microseconds")


def connect(db_path: Path, synchronous: str = "NORMAL") -> sqlite3.Connection:
    """Open the node's SQLite file in WAL mode (``synchronous`` NORMAL or FULL)."""
    if synchronous not in ("NORMAL", "FULL"):
        raise ValueError("synchronous must be NORMAL or FULL")
    try:
        conn = sqlite3.connect(str(db_path), timeout=30.0, check_same_thread=False,
                               isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.row_factory = sqlite3.Row
    except sqlite3.Error as exc:
        raise NodeIndexError(
            f"cannot open the index {db_path}: {exc}; check the data directory and free space"
        ) from exc
    return conn


@dataclass(frozen=True)
class SeriesSummary:
    series_instance_uid: str
    study_instance_uid: str
    patient_key: str
    modality: str
    kind: str
    instance_count: int
    size_bytes: int
    first_received_at: str
    last_received_at: str
    generation: int


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    patient_key: str
    series_count: int
    instance_count: int
    size_bytes: int
    first_received_at: str
    last_received_at: str


@dataclass(frozen=True)
class PatientSummary:
    patient_key: str
    patient_id: str
    issuer_of_patient_id: str
    study_count: int
    instance_count: int
    first_received_at: str
    last_received_at: str


@dataclass(frozen=True)
class DuplicateRecord:
    sop_instance_uid: str
    kept_sha256: str
    other_sha256: str
    policy: str
    action: str  # "kept_first" or "replaced"
    calling_ae_title: str
    at: str


class InstanceIndex:
    """SQLite index of received instances.

    Parameters
    ----------
    db_path:
        The SQLite file (``data_dir/index.sqlite``).
    clock:
        Seconds since the epoch (default :func:`time.time`); tests inject a fake.
    """

    def __init__(self, db_path: Path, clock: Clock = time.time) -> None:
        self.db_path = Path(db_path)
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = connect(self.db_path)
        with self._lock:
            self._conn.executescript(_SCHEMA)
        self._uid_locks = [threading.Lock() for _ in range(64)]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            else:
                self._conn.execute("COMMIT")

    @contextmanager
    def uid_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Serialise the check-store-index sequence of one SOP Instance UID."""
        lock = self._uid_locks[hash(sop_instance_uid) % len(self._uid_locks)]
        with lock:
            yield

    # -- writes ------------------------------------------------------------------------
    def add(self, rec: ReceivedInstance, patient_id: str, issuer_of_patient_id: str = "",
            received_s: float | None = None) -> None:
        """Insert a new instance and update its patient, study and series.

        Raises
        ------
        NodeIndexError
            A row for ``rec.sop_instance_uid`` exists (use :meth:`replace`) or SQLite fails.
        """
        now = self.clock() if received_s is None else received_s
        try:
            with self._tx() as c:
                c.execute(
                    "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.sop_instance_uid, rec.sop_class_uid, rec.series_instance_uid,
                     rec.study_instance_uid, rec.patient_key, rec.modality, rec.kind, rec.path,
                     rec.sha256, rec.size_bytes, rec.transfer_syntax_uid, rec.calling_ae_title,
                     rec.received_at, now),
                )
                self._touch(c, rec, patient_id, issuer_of_patient_id, now, added=True)
        except sqlite3.IntegrityError as exc:
            raise NodeIndexError(
                f"instance {rec.sop_instance_uid} is already indexed; use replace()"
            ) from exc
        except sqlite3.Error as exc:
            raise NodeIndexError(f"cannot index {rec.sop_instance_uid}: {exc}") from exc

    def replace(self, rec: ReceivedInstance, old: ReceivedInstance, patient_id: str,
                issuer_of_patient_id: str = "", policy: str = "keep_newest") -> None:
        """Replace an instance's row (keep_newest) and record the duplicate, atomically."""
        now = self.clock()
        try:
            with self._tx() as c:
                c.execute("DELETE FROM instances WHERE sop_instance_uid=?", (old.sop_instance_uid,))
                c.execute(
                    "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (rec.sop_instance_uid, rec.sop_class_uid, rec.series_instance_uid,
                     rec.study_instance_uid, rec.patient_key, rec.modality, rec.kind, rec.path,
                     rec.sha256, rec.size_bytes, rec.transfer_syntax_uid, rec.calling_ae_title,
                     rec.received_at, now),
                )
                if old.series_instance_uid != rec.series_instance_uid:
                    self._recount(c, old.series_instance_uid, bump=True)
                self._touch(c, rec, patient_id, issuer_of_patient_id, now)
                c.execute(
                    "INSERT INTO duplicates(sop_instance_uid,kept_sha256,other_sha256,policy,action,"
                    "calling_ae_title,at) VALUES (?,?,?,?,?,?,?)",
                    (rec.sop_instance_uid, rec.sha256, old.sha256, policy, "replaced",
                     rec.calling_ae_title, iso_utc(now)),
                )
        except sqlite3.Error as exc:
            raise NodeIndexError(f"cannot replace {rec.sop_instance_uid}: {exc}") from exc

    def record_duplicate(self, sop_instance_uid: str, kept_sha256: str, other_sha256: str,
                         policy: str, action: str, calling_ae_title: str) -> None:
        """Record a conflicting duplicate that did not change the stored instance."""
        with self._tx() as c:
            c.execute(
                "INSERT INTO duplicates(sop_instance_uid,kept_sha256,other_sha256,policy,action,"
                "calling_ae_title,at) VALUES (?,?,?,?,?,?,?)",
                (sop_instance_uid, kept_sha256, other_sha256, policy, action, calling_ae_title,
                 iso_utc(self.clock())),
            )

    def remove(self, sop_instance_uid: str) -> bool:
        """Delete an instance row (e.g. its file is missing); updates the series counts."""
        with self._tx() as c:
            row = c.execute("SELECT series_instance_uid FROM instances WHERE sop_instance_uid=?",
                            (sop_instance_uid,)).fetchone()
            if row is None:
                return False
            c.execute("DELETE FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
            self._recount(c, row["series_instance_uid"], bump=True)
            return True

    def _touch(self, c: sqlite3.Connection, rec: ReceivedInstance, patient_id: str,
               issuer: str, now: float, added: bool = False) -> None:
        """Upsert the patient, study and series of ``rec`` and bump the series' generation.

        ``added``: ``rec`` is a row just inserted (not a replacement), so the series'
        count and size grow by exactly this instance; updated in the same statement
        instead of re-counting the whole series (which made each insert O(series size)).
        """
        c.execute(
            "INSERT INTO patients VALUES (?,?,?,?,?) ON CONFLICT(patient_key) DO UPDATE SET "
            "last_received_s=max(last_received_s, excluded.last_received_s)",
            (rec.patient_key, patient_id, issuer, now, now),
        )
        c.execute(
            "INSERT INTO studies VALUES (?,?,?,?) ON CONFLICT(study_instance_uid) DO UPDATE SET "
            "last_received_s=max(last_received_s, excluded.last_received_s)",
            (rec.study_instance_uid, rec.patient_key, now, now),
        )
        if added:
            c.execute(
                "INSERT INTO series(series_instance_uid,study_instance_uid,patient_key,modality,kind,"
                "instance_count,size_bytes,first_received_s,last_received_s,generation) "
                "VALUES (?,?,?,?,?,1,?,?,?,1) "
                "ON CONFLICT(series_instance_uid) DO UPDATE SET "
                "last_received_s=max(last_received_s, excluded.last_received_s), "
                "instance_count=instance_count+1, size_bytes=size_bytes+excluded.size_bytes, "
                "generation=generation+1",
                (rec.series_instance_uid, rec.study_instance_uid, rec.patient_key, rec.modality,
                 rec.kind, rec.size_bytes, now, now),
            )
            return
        c.execute(
            "INSERT INTO series(series_instance_uid,study_instance_uid,patient_key,modality,kind,"
            "first_received_s,last_received_s) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(series_instance_uid) DO UPDATE SET "
            "last_received_s=max(last_received_s, excluded.last_received_s)",
            (rec.series_instance_uid, rec.study_instance_uid, rec.patient_key, rec.modality,
             rec.kind, now, now),
        )
        self._recount(c, rec.series_instance_uid, bump=True)

    @staticmethod
    def _recount(c: sqlite3.Connection, series_uid: str, bump: bool) -> None:
        c.execute(
            "UPDATE series SET instance_count=(SELECT COUNT(*) FROM instances WHERE "
            "series_instance_uid=?), size_bytes=(SELECT COALESCE(SUM(size_bytes),0) FROM instances "
            "WHERE series_instance_uid=?), generation=generation+? WHERE series_instance_uid=?",
            (series_uid, series_uid, 1 if bump else 0, series_uid),
        )

    # -- reads -------------------------------------------------------------------------
    def get(self, sop_instance_uid: str) -> ReceivedInstance | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM instances WHERE sop_instance_uid=?",
                                     (sop_instance_uid,)).fetchone()
        return _instance(row) if row else None

    def instances(self, series_instance_uid: str | None = None,
                  study_instance_uid: str | None = None) -> list[ReceivedInstance]:
        """Instances of a series or study (all when neither is given), by received order."""
        sql, args = _where_first("SELECT * FROM instances", ("series_instance_uid", series_instance_uid),
                                 ("study_instance_uid", study_instance_uid))
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY received_s, sop_instance_uid", args).fetchall()
        return [_instance(r) for r in rows]

    def all_paths(self) -> dict[str, str]:
        """{path: sop_instance_uid} of every indexed instance."""
        with self._lock:
            rows = self._conn.execute("SELECT path, sop_instance_uid FROM instances").fetchall()
        return {r["path"]: r["sop_instance_uid"] for r in rows}

    def series(self, series_instance_uid: str | None = None, study_instance_uid: str | None = None,
               patient_key: str | None = None) -> list[SeriesSummary]:
        sql, args = _where_first("SELECT * FROM series", ("series_instance_uid", series_instance_uid),
                                 ("study_instance_uid", study_instance_uid), ("patient_key", patient_key))
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY first_received_s", args).fetchall()
        return [
            SeriesSummary(r["series_instance_uid"], r["study_instance_uid"], r["patient_key"],
                          r["modality"], r["kind"], r["instance_count"], r["size_bytes"],
                          iso_utc(r["first_received_s"]), iso_utc(r["last_received_s"]),
                          r["generation"])
            for r in rows
        ]

    def studies(self, patient_key: str | None = None) -> list[StudySummary]:
        sql, args = _where_first(
            "SELECT st.study_instance_uid, st.patient_key, st.first_received_s, st.last_received_s, "
            "COUNT(se.series_instance_uid) AS n_series, COALESCE(SUM(se.instance_count),0) AS n, "
            "COALESCE(SUM(se.size_bytes),0) AS size FROM studies st LEFT JOIN series se "
            "ON se.study_instance_uid=st.study_instance_uid",
            ("st.patient_key", patient_key),
        )
        with self._lock:
            rows = self._conn.execute(sql + " GROUP BY st.study_instance_uid ORDER BY st.first_received_s",
                                      args).fetchall()
        return [
            StudySummary(r["study_instance_uid"], r["patient_key"], r["n_series"], r["n"], r["size"],
                         iso_utc(r["first_received_s"]), iso_utc(r["last_received_s"]))
            for r in rows
        ]

    def patients(self) -> list[PatientSummary]:
        sql = (
            "SELECT p.*, (SELECT COUNT(*) FROM studies s WHERE s.patient_key=p.patient_key) AS n_studies, "
            "(SELECT COUNT(*) FROM instances i WHERE i.patient_key=p.patient_key) AS n "
            "FROM patients p ORDER BY p.first_received_s"
        )
        with self._lock:
            rows = self._conn.execute(sql).fetchall()
        return [
            PatientSummary(r["patient_key"], r["patient_id"], r["issuer_of_patient_id"], r["n_studies"],
                           r["n"], iso_utc(r["first_received_s"]), iso_utc(r["last_received_s"]))
            for r in rows
        ]

    def duplicates(self, sop_instance_uid: str | None = None) -> list[DuplicateRecord]:
        sql, args = _where_first("SELECT * FROM duplicates", ("sop_instance_uid", sop_instance_uid))
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [
            DuplicateRecord(r["sop_instance_uid"], r["kept_sha256"], r["other_sha256"], r["policy"],
                            r["action"], r["calling_ae_title"], r["at"])
            for r in rows
        ]

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


def _where_first(sql: str, *filters: tuple[str, str | None]) -> tuple[str, tuple[str, ...]]:
    """``sql`` narrowed to the rows whose column equals the value of the first filter that
    is given (not None), and its arguments; ``sql`` unchanged when none is given.

    Filters are ``(column, value)``; columns are names written in this module, never input.
    """
    for column, value in filters:
        if value is not None:
            return f"{sql} WHERE {column}=?", (value,)
    return sql, ()


def _instance(r: sqlite3.Row) -> ReceivedInstance:
    return ReceivedInstance(
        sop_class_uid=r["sop_class_uid"], sop_instance_uid=r["sop_instance_uid"],
        series_instance_uid=r["series_instance_uid"], study_instance_uid=r["study_instance_uid"],
        patient_key=r["patient_key"], modality=r["modality"], kind=r["kind"], path=r["path"],
        sha256=r["sha256"], size_bytes=r["size_bytes"], transfer_syntax_uid=r["transfer_syntax_uid"],
        calling_ae_title=r["calling_ae_title"], received_at=r["received_at"],
    )
