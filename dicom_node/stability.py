"""Series stability: a series is announced after a quiet period (Orthanc's StableAge).

The index bumps a series' ``generation`` whenever its content changes (a new instance,
a keep_newest replacement, a removal). :meth:`StabilityMonitor.check` finds series whose
last instance arrived at least ``quiet_period_s`` ago and whose current generation has
not been announced yet, and writes a :class:`~dicom_node.records.SeriesStable` event for
each, in one SQLite transaction with the "announced generation" mark. A late instance
bumps the generation again, so the series is announced again after another quiet period:
consumers must be idempotent.

Events are persisted in the node's SQLite file and stay pending until a consumer calls
:meth:`StabilityMonitor.ack`: after a crash or restart, every unacknowledged event is
delivered again (at least once). Time comes from an injectable clock.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from dicom_node.index import _SCHEMA as _INDEX_SCHEMA
from dicom_node.index import Clock, connect, iso_utc
from dicom_node.records import SeriesStable
from dicom_node.settings import StabilitySettings

LOG = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stability_marks (
    series_instance_uid TEXT PRIMARY KEY,
    announced_generation INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stability_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    patient_key TEXT NOT NULL,
    modality TEXT NOT NULL,
    kind TEXT NOT NULL,
    instance_count INTEGER NOT NULL,
    generation INTEGER NOT NULL,
    stable_at TEXT NOT NULL,
    acked_at TEXT
);
CREATE INDEX IF NOT EXISTS stability_pending ON stability_events(acked_at);
"""

Listener = Callable[[SeriesStable], None]


class StabilityMonitor:
    """Turns quiet series into persisted, acknowledgeable :class:`SeriesStable` events.

    Parameters
    ----------
    db_path:
        The node's SQLite file (``data_dir/index.sqlite``; the index's tables must exist).
    settings:
        ``quiet_period_s`` and ``check_interval_s``.
    clock:
        Seconds since the epoch; the same clock the index stamps arrivals with.
    """

    def __init__(self, db_path: Path, settings: StabilitySettings | None = None,
                 clock: Clock = time.time) -> None:
        self.settings = settings or StabilitySettings()
        self.clock = clock
        self._lock = threading.RLock()
        self._conn = connect(Path(db_path))
        with self._lock:
            self._conn.executescript(_INDEX_SCHEMA)
            self._conn.executescript(_SCHEMA)
        self._listeners: list[Listener] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- core --------------------------------------------------------------------------
    def check(self) -> list[SeriesStable]:
        """Announce every series that has been quiet long enough; return the new events."""
        now = self.clock()
        cutoff = now - self.settings.quiet_period_s
        new: list[SeriesStable] = []
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                rows = c.execute(
                    "SELECT s.* FROM series s LEFT JOIN stability_marks m "
                    "ON m.series_instance_uid=s.series_instance_uid "
                    "WHERE s.last_received_s <= ? AND s.instance_count > 0 "
                    "AND (m.announced_generation IS NULL OR m.announced_generation < s.generation) "
                    "ORDER BY s.last_received_s",
                    (cutoff,),
                ).fetchall()
                for r in rows:
                    stable_at = iso_utc(now)
                    cur = c.execute(
                        "INSERT INTO stability_events(study_instance_uid,series_instance_uid,patient_key,"
                        "modality,kind,instance_count,generation,stable_at) VALUES (?,?,?,?,?,?,?,?)",
                        (r["study_instance_uid"], r["series_instance_uid"], r["patient_key"],
                         r["modality"], r["kind"], r["instance_count"], r["generation"], stable_at),
                    )
                    c.execute(
                        "INSERT INTO stability_marks VALUES (?,?) ON CONFLICT(series_instance_uid) "
                        "DO UPDATE SET announced_generation=excluded.announced_generation",
                        (r["series_instance_uid"], r["generation"]),
                    )
                    new.append(SeriesStable(
                        event_id=int(cur.lastrowid), study_instance_uid=r["study_instance_uid"],
                        series_instance_uid=r["series_instance_uid"], patient_key=r["patient_key"],
                        modality=r["modality"], kind=r["kind"], instance_count=r["instance_count"],
                        stable_at=stable_at,
                    ))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        for ev in new:
            LOG.info("series %s is stable (%d instances, event %d)", ev.series_instance_uid,
                     ev.instance_count, ev.event_id)
        if new:
            self._notify(new)
        return new

    def pending_events(self, limit: int = 1000) -> list[SeriesStable]:
        """Events not yet acknowledged, oldest first (delivered again after a restart)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM stability_events WHERE acked_at IS NULL ORDER BY event_id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            SeriesStable(event_id=r["event_id"], study_instance_uid=r["study_instance_uid"],
                         series_instance_uid=r["series_instance_uid"], patient_key=r["patient_key"],
                         modality=r["modality"], kind=r["kind"], instance_count=r["instance_count"],
                         stable_at=r["stable_at"])
            for r in rows
        ]

    def ack(self, event_id: int) -> bool:
        """Mark an event as handled; returns False when it was unknown or already acked."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE stability_events SET acked_at=? WHERE event_id=? AND acked_at IS NULL",
                (iso_utc(self.clock()), int(event_id)),
            )
        return cur.rowcount == 1

    def is_stable(self, series_instance_uid: str) -> bool:
        """True when the series' current content has been announced."""
        with self._lock:
            r = self._conn.execute(
                "SELECT s.generation AS g, m.announced_generation AS a FROM series s LEFT JOIN "
                "stability_marks m ON m.series_instance_uid=s.series_instance_uid "
                "WHERE s.series_instance_uid=?", (series_instance_uid,),
            ).fetchone()
        return bool(r and r["a"] is not None and r["a"] >= r["g"])

    # -- listeners and background thread -----------------------------------------------
    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for each new event (a hint; use pending/ack for safety).

        A listener's exception is logged and does not affect other listeners.
        """
        self._listeners.append(listener)

    def _notify(self, events: list[SeriesStable]) -> None:
        for ev in events:
            for listener in list(self._listeners):
                try:
                    listener(ev)
                except Exception:  # noqa: BLE001 - isolate each listener
                    LOG.exception("stability listener %r failed on event %d", listener, ev.event_id)

    def start(self) -> None:
        """Run :meth:`check` every ``check_interval_s`` in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dentfuse-stability", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.check()
            except Exception:  # noqa: BLE001 - keep the monitor alive; retried next tick
                LOG.exception("stability check failed; retrying in %.1f s", self.settings.check_interval_s)
            self._wake.wait(self.settings.check_interval_s)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def close(self) -> None:
        self.stop()
        with self._lock:
            self._conn.close()
