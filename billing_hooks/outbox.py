"""Delivery outbox: claim exports delivered at least once to a drop directory and/or an
HTTP endpoint.

Rows live in the ledger's SQLite database and are inserted in the same transaction as
the decision that made the claim (``status = exported``), so a claim is never decided
without its deliveries queued, nor queued without its decision. Each row carries an
idempotency key (one per claim line, derived from the input set and the code, so it is
the same across retries, restarts and re-exports); HTTP deliveries send it as the
``Idempotency-Key`` header and drop-directory files are named by it.

Retries back off exponentially (``backoff_s * 2**(attempt-1)``, capped at
``backoff_max_s``); after ``max_attempts`` failed attempts, or a permanent refusal
(HTTP 4xx other than 408/409/425/429), the row is dead-lettered with the reason.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from billing_hooks.ledger import Ledger, iso, parse_iso
from billing_hooks.policy import DeliverySettings

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    fusion_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    artifact TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    media_type TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    delivered_at TEXT NOT NULL DEFAULT '',
    UNIQUE (idempotency_key, destination, artifact)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
"""
RETRYABLE_HTTP = frozenset({408, 409, 425, 429})


@dataclass(frozen=True)
class OutboxRow:
    id: int
    fusion_id: str
    destination: str  # "drop" or "http"
    artifact: str  # "fhir" or "x12"
    path: str
    sha256: str
    media_type: str
    idempotency_key: str
    state: str  # pending, delivered, dead
    attempts: int
    next_attempt_at: str
    last_error: str
    created_at: str
    delivered_at: str


class PermanentDeliveryError(Exception):
    """The receiver refused the delivery for good (do not retry)."""


class Outbox:
    """Queue and deliver claim exports. Shares the ledger's connection and transactions."""

    def __init__(self, ledger: Ledger, settings: DeliverySettings, data_dir: Path) -> None:
        self.ledger = ledger
        self.settings = settings
        self.data_dir = Path(data_dir)
        self.drop_dir = Path(settings.drop_dir) if settings.drop_dir else self.data_dir / "outbox" / "drop"
        self._deliver_lock = threading.Lock()  # one delivery pass at a time in this process
        with ledger.transaction() as conn:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)

    def destinations(self) -> list[str]:
        out = ["drop"]
        if self.settings.http_url:
            out.append("http")
        return out

    def enqueue(self, conn: sqlite3.Connection, *, fusion_id: str, artifact: str, path: str, sha256: str,
                media_type: str, idempotency_key: str, now: datetime, destinations: list[str] | None = None) -> int:
        """Insert rows inside the caller's transaction; an existing (key, destination, artifact)
        row is kept (same key, never a second one). Returns the number of new rows."""
        n = 0
        for dest in destinations or self.destinations():
            if dest == "http" and artifact != "fhir":
                continue  # the HTTP endpoint takes the FHIR bundle; X12 goes to the drop directory
            cur = conn.execute(
                "INSERT OR IGNORE INTO outbox(fusion_id, destination, artifact, path, sha256, media_type, "
                "idempotency_key, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (fusion_id, dest, artifact, path, sha256, media_type, idempotency_key, iso(now), iso(now)))
            n += cur.rowcount
        return n

    def rows(self, *, fusion_id: str | None = None, state: str | None = None) -> list[OutboxRow]:
        sql, args = "SELECT * FROM outbox", []
        where = []
        if fusion_id is not None:
            where.append("fusion_id = ?"); args.append(fusion_id)
        if state is not None:
            where.append("state = ?"); args.append(state)
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [OutboxRow(*r) for r in self.ledger.query(sql + " ORDER BY id", args)]

    def deliver_pending(self, now: datetime) -> dict[str, int]:
        """Attempt every due row once. Returns counts: delivered, retry, dead, waiting."""
        with self._deliver_lock:
            return self._deliver_due(now)

    def _deliver_due(self, now: datetime) -> dict[str, int]:
        counts = {"delivered": 0, "retry": 0, "dead": 0, "waiting": 0}
        for row in self.rows(state="pending"):
            if parse_iso(row.next_attempt_at) > now:
                counts["waiting"] += 1
                continue
            try:
                self._deliver(row)
            except PermanentDeliveryError as exc:
                self._fail(row, now, str(exc), permanent=True)
                counts["dead"] += 1
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and retried
                dead = self._fail(row, now, _describe(exc, self.settings.timeout_s), permanent=False)
                counts["dead" if dead else "retry"] += 1
            else:
                with self.ledger.transaction() as conn:
                    conn.execute("UPDATE outbox SET state='delivered', attempts=attempts+1, delivered_at=?, "
                                 "last_error='' WHERE id=?", (iso(now), row.id))
                    self.ledger.append("delivered", {
                        "outbox_id": row.id, "destination": row.destination, "artifact": row.artifact,
                        "idempotency_key": row.idempotency_key, "sha256": row.sha256, "attempt": row.attempts + 1,
                        "target": self._target(row)}, fusion_id=row.fusion_id, at=now)
                counts["delivered"] += 1
                log.info("delivered %s %s of fusion %s (key %s)", row.artifact, row.destination, row.fusion_id,
                         row.idempotency_key)
        return counts

    def _target(self, row: OutboxRow) -> str:
        return self.settings.http_url if row.destination == "http" else str(self._drop_path(row))

    def _fail(self, row: OutboxRow, now: datetime, reason: str, *, permanent: bool) -> bool:
        attempts = row.attempts + 1
        dead = permanent or attempts >= self.settings.max_attempts
        delay = min(self.settings.backoff_max_s, self.settings.backoff_s * (2 ** (attempts - 1)))
        with self.ledger.transaction() as conn:
            conn.execute("UPDATE outbox SET attempts=?, state=?, last_error=?, next_attempt_at=? WHERE id=?",
                         (attempts, "dead" if dead else "pending", reason,
                          iso(now + timedelta(seconds=delay)), row.id))
            self.ledger.append("dead_letter" if dead else "delivery_failed", {
                "outbox_id": row.id, "destination": row.destination, "artifact": row.artifact,
                "idempotency_key": row.idempotency_key, "attempt": attempts, "reason": reason,
                "retry_in_s": None if dead else delay}, fusion_id=row.fusion_id, at=now)
        log.warning("delivery of %s to %s for fusion %s failed (attempt %d/%d): %s%s", row.artifact,
                    row.destination, row.fusion_id, attempts, self.settings.max_attempts, reason,
                    "; dead-lettered" if dead else "")
        return dead

    def _source(self, row: OutboxRow) -> Path:
        p = Path(row.path)
        return p if p.is_absolute() else self.data_dir / p

    def _drop_path(self, row: OutboxRow) -> Path:
        suffix = ".fhir.json" if row.artifact == "fhir" else ".837"
        return self.drop_dir / f"{row.idempotency_key}{suffix}"

    def _deliver(self, row: OutboxRow) -> None:
        data = self._source(row).read_bytes()
        if row.destination == "drop":
            _atomic_write(self._drop_path(row), data)
        elif row.destination == "http":
            if not self.settings.http_url:
                raise PermanentDeliveryError("no HTTP endpoint is configured (billing.delivery.http_url)")
            req = urllib.request.Request(self.settings.http_url, data=data, method="POST", headers={
                "Content-Type": row.media_type, "Idempotency-Key": row.idempotency_key,
                "X-Content-SHA256": row.sha256})
            try:
                with urllib.request.urlopen(req, timeout=self.settings.timeout_s) as resp:
                    resp.read()
            except urllib.error.HTTPError as exc:
                body = exc.read(300).decode("utf-8", "replace").strip()
                msg = f"HTTP {exc.code} {exc.reason} from {self.settings.http_url}" + (f": {body}" if body else "")
                if 400 <= exc.code < 500 and exc.code not in RETRYABLE_HTTP:
                    raise PermanentDeliveryError(msg + " (refused; fix the claim or the endpoint)") from exc
                raise OSError(msg) from exc
        else:
            raise PermanentDeliveryError(f"unknown destination {row.destination!r}")


def _describe(exc: BaseException, timeout_s: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s waiting for the endpoint"
    if isinstance(exc, urllib.error.URLError):
        return f"cannot reach endpoint: {exc.reason}"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) or exc.errno else str(exc)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write a file so that readers see either nothing or the whole content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
