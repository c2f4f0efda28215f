"""Transfer audit trail in the spirit of DICOM PS3.15 A.5 (no patient names).

One row per event in the node's SQLite file (table ``audit_events``):

* ``instances_received`` / ``instances_sent`` ("DICOM Instances Transferred", PS3.15
  A.5.3.12): local and peer AE titles, peer address, study UID, number of instances,
  outcome (``success`` or ``minor_failure`` when some instances failed) - one row per
  study per association, written when the association ends;
* ``store_failed``: one failed instance (status, reason, SOP Instance UID), written at once;
* ``association_rejected`` (PS3.15 A.5.3.14 "Security Alert"-like): who tried and why;
* ``node_started`` / ``node_stopped`` ("Application Activity", A.5.3.1).

Patient identity is limited to the patient key (ID and issuer) where a study needs it;
names and birth dates never enter the trail.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dicom_node.index import Clock, connect, iso_utc

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    event_type TEXT NOT NULL,
    outcome TEXT NOT NULL,
    local_ae_title TEXT NOT NULL DEFAULT '',
    peer_ae_title TEXT NOT NULL DEFAULT '',
    peer_address TEXT NOT NULL DEFAULT '',
    study_instance_uid TEXT NOT NULL DEFAULT '',
    patient_key TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_by_type ON audit_events(event_type);
"""

OUTCOMES = ("success", "minor_failure", "serious_failure", "major_failure")


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: str
    event_type: str
    outcome: str
    local_ae_title: str
    peer_ae_title: str
    peer_address: str
    study_instance_uid: str
    patient_key: str
    instance_count: int
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class AuditTrail:
    """Append-only audit rows in ``db_path`` (the node's ``index.sqlite``)."""

    def __init__(self, db_path: Path, clock: Clock = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._conn = connect(Path(db_path))
        with self._lock:
            self._conn.executescript(_SCHEMA)

    def record(self, event_type: str, outcome: str = "success", *, local_ae_title: str = "",
               peer_ae_title: str = "", peer_address: str = "", study_instance_uid: str = "",
               patient_key: str = "", instance_count: int = 0,
               detail: dict[str, Any] | None = None) -> int:
        """Append one event; returns its id."""
        if outcome not in OUTCOMES:
            raise ValueError(f"audit outcome {outcome!r} must be one of {OUTCOMES}")
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO audit_events(at,event_type,outcome,local_ae_title,peer_ae_title,"
                "peer_address,study_instance_uid,patient_key,instance_count,detail) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)",
                (iso_utc(self.clock()), event_type, outcome, local_ae_title, peer_ae_title,
                 peer_address, study_instance_uid, patient_key, int(instance_count),
                 json.dumps(detail or {}, sort_keys=True, default=str)),
            )
            return int(cur.lastrowid)

    def record_transfer(self, direction: str, *, local_ae_title: str, peer_ae_title: str,
                        peer_address: str, study_instance_uid: str, patient_key: str,
                        succeeded: int, failed: int = 0,
                        failures: Iterable[dict[str, Any]] = ()) -> int:
        """A PS3.15 A.5.3.12-style "instances transferred" row (``direction`` = received/sent)."""
        if direction not in ("received", "sent"):
            raise ValueError("direction must be 'received' or 'sent'")
        outcome = "success" if failed == 0 else ("minor_failure" if succeeded else "serious_failure")
        return self.record(
            f"instances_{direction}", outcome, local_ae_title=local_ae_title,
            peer_ae_title=peer_ae_title, peer_address=peer_address,
            study_instance_uid=study_instance_uid, patient_key=patient_key,
            instance_count=succeeded,
            detail={"failed": failed, "failures": list(failures)[:100]},
        )

    def events(self, event_type: str | None = None, since_id: int = 0) -> list[AuditEvent]:
        sql, args = "SELECT * FROM audit_events WHERE id > ?", [since_id]
        if event_type is not None:
            sql += " AND event_type=?"
            args.append(event_type)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [
            AuditEvent(r["id"], r["at"], r["event_type"], r["outcome"], r["local_ae_title"],
                       r["peer_ae_title"], r["peer_address"], r["study_instance_uid"],
                       r["patient_key"], r["instance_count"], json.loads(r["detail"]))
            for r in rows
        ]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class AssociationTally:
    """Counts one association's stores per study; flushed to the trail when it ends."""

    def __init__(self, local_ae_title: str, peer_ae_title: str, peer_address: str) -> None:
        self.local_ae_title = local_ae_title
        self.peer_ae_title = peer_ae_title
        self.peer_address = peer_address
        self._lock = threading.Lock()
        self._studies: dict[str, dict[str, Any]] = {}
        self.flushed = False

    def ok(self, study_instance_uid: str, patient_key: str) -> None:
        with self._lock:
            s = self._studies.setdefault(study_instance_uid, {"patient_key": patient_key, "ok": 0,
                                                               "failed": 0, "failures": []})
            s["ok"] += 1

    def failed(self, study_instance_uid: str, failure: dict[str, Any]) -> None:
        with self._lock:
            s = self._studies.setdefault(study_instance_uid, {"patient_key": "", "ok": 0,
                                                               "failed": 0, "failures": []})
            s["failed"] += 1
            if len(s["failures"]) < 100:
                s["failures"].append(failure)

    def flush(self, trail: AuditTrail) -> None:
        with self._lock:
            if self.flushed:
                return
            self.flushed = True
            studies = dict(self._studies)
        for study, s in studies.items():
            trail.record_transfer(
                "received", local_ae_title=self.local_ae_title, peer_ae_title=self.peer_ae_title,
                peer_address=self.peer_address, study_instance_uid=study,
                patient_key=s["patient_key"], succeeded=s["ok"], failed=s["failed"],
                failures=s["failures"],
            )
