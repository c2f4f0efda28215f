"""Delivery outbox: a loopback HTTP receiver that fails, times out and recovers; retries
with backoff on a fake clock; the same idempotency key across retries and restarts;
dead letters; drop-directory delivery; outbox rows in the decision's transaction."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from billing_hooks.ledger import parse_iso
from billing_hooks.policy import DeliverySettings
from billing_helpers import FakeClock, attach_pdf, cbct, make_hook, result, scan
from conftest import free_port


class Receiver:
    """A claim endpoint on 127.0.0.1 that answers each POST per the next scripted mode."""

    def __init__(self, modes: list[str]) -> None:
        self.modes = list(modes)
        self.requests: list[tuple[str, str, str]] = []  # (mode, idempotency key, body sha256)
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                mode = receiver.modes.pop(0) if receiver.modes else "ok"
                receiver.requests.append((mode, self.headers.get("Idempotency-Key", ""),
                                          hashlib.sha256(body).hexdigest()))
                if mode == "timeout":
                    receiver.release.wait(1.0)  # longer than the client's timeout_s
                    return
                code = {"ok": 201, "500": 500, "400": 400}[mode]
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}" if code < 300 else b"no")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/claims"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def _exported(data: Path, clock: FakeClock, delivery: DeliverySettings):
    hook = make_hook(data, clock=clock, delivery=delivery)
    hook.record_fusion(result(data, "F1", (cbct("a"), scan())))
    attach_pdf(hook, data, "F1")
    assert hook.document("F1", rationale="Implant planning at 36.", clinician="Dr A").status == "exported"
    return hook


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


def test_receiver_fails_times_out_then_recovers_across_restart(tmp_path: Path, clock: FakeClock) -> None:
    data = tmp_path / "data"
    with Receiver(["500", "timeout"]) as rx:
        settings = DeliverySettings(http_url=rx.url, max_attempts=5, backoff_s=10, backoff_max_s=60, timeout_s=0.2)
        hook = _exported(data, clock, settings)
        rows = hook.outbox.rows()
        assert sorted((r.destination, r.artifact) for r in rows) == [("drop", "fhir"), ("drop", "x12"), ("http", "fhir")]
        key = rows[0].idempotency_key
        assert {r.idempotency_key for r in rows} == {key}
        fhir_sha = next(r.sha256 for r in rows if r.artifact == "fhir")

        assert hook.deliver_pending() == {"delivered": 2, "retry": 1, "dead": 0, "waiting": 0}  # 500
        (http,) = hook.outbox.rows(state="pending")
        assert http.attempts == 1 and "HTTP 500" in http.last_error
        assert parse_iso(http.next_attempt_at) == clock.now + timedelta(seconds=10)
        assert hook.deliver_pending() == {"delivered": 0, "retry": 0, "dead": 0, "waiting": 1}  # backing off

        clock.advance(seconds=10)
        assert hook.deliver_pending()["retry"] == 1  # timeout
        (http,) = hook.outbox.rows(state="pending")
        assert http.attempts == 2 and "timed out" in http.last_error
        assert parse_iso(http.next_attempt_at) == clock.now + timedelta(seconds=20)
        hook.close()

        clock.advance(seconds=20)
        restarted = make_hook(data, clock=clock, delivery=settings)  # a restart resumes the outbox
        assert restarted.deliver_pending() == {"delivered": 1, "retry": 0, "dead": 0, "waiting": 0}
        assert restarted.deliver_pending() == {"delivered": 0, "retry": 0, "dead": 0, "waiting": 0}

    assert [m for m, _, _ in rx.requests] == ["500", "timeout", "ok"]
    assert {k for _, k, _ in rx.requests} == {key}
    assert {b for _, _, b in rx.requests} == {fhir_sha}
    http_log = [(e.kind, e.event["attempt"]) for e in restarted.ledger.entries(fusion_id="F1")
                if e.kind in ("delivered", "delivery_failed", "dead_letter") and e.event["destination"] == "http"]
    assert http_log == [("delivery_failed", 1), ("delivery_failed", 2), ("delivered", 3)]
    assert len(restarted.ledger.entries(fusion_id="F1", kind="delivered")) == 3
    drop = data / "outbox" / "drop"
    assert sorted(p.name for p in drop.iterdir()) == [f"{key}.837", f"{key}.fhir.json"]
    assert (drop / f"{key}.fhir.json").read_bytes() == (data / "exports" / "F1" / "claim.fhir.json").read_bytes()
    assert restarted.ledger.verify().ok


def test_dead_letter_after_retry_budget(tmp_path: Path, clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{free_port()}/claims"  # nothing listens there
    settings = DeliverySettings(http_url=url, max_attempts=3, backoff_s=1, backoff_max_s=2, timeout_s=0.5)
    hook = _exported(tmp_path / "data", clock, settings)
    outcomes = []
    for _ in range(3):
        outcomes.append(hook.deliver_pending())
        clock.advance(seconds=5)
    assert [o["retry"] for o in outcomes] == [1, 1, 0] and outcomes[-1]["dead"] == 1
    (dead,) = hook.outbox.rows(state="dead")
    assert dead.attempts == 3 and "cannot reach endpoint" in dead.last_error
    (letter,) = hook.ledger.entries(kind="dead_letter")
    assert letter.event["reason"] == dead.last_error and letter.event["attempt"] == 3
    assert hook.deliver_pending() == {"delivered": 0, "retry": 0, "dead": 0, "waiting": 0}


def test_permanent_refusal_is_dead_lettered_at_once(tmp_path: Path, clock: FakeClock) -> None:
    with Receiver(["400"]) as rx:
        settings = DeliverySettings(http_url=rx.url, max_attempts=5, timeout_s=2)
        hook = _exported(tmp_path / "data", clock, settings)
        assert hook.deliver_pending()["dead"] == 1
    (dead,) = hook.outbox.rows(state="dead")
    assert "HTTP 400" in dead.last_error and "refused" in dead.last_error and dead.attempts == 1


def test_at_least_once_resends_with_the_same_key_after_a_crash(tmp_path: Path, clock: FakeClock,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with Receiver([]) as rx:
        settings = DeliverySettings(http_url=rx.url, timeout_s=2)
        hook = _exported(tmp_path / "data", clock, settings)
        real_append = hook.ledger.append

        def crash_on_delivered(kind, event, **kw):
            if kind == "delivered" and event["destination"] == "http":
                raise RuntimeError("power cut")  # POST succeeded, the process died before recording it
            return real_append(kind, event, **kw)

        monkeypatch.setattr(hook.ledger, "append", crash_on_delivered)
        with pytest.raises(RuntimeError, match="power cut"):
            hook.deliver_pending()
        monkeypatch.undo()
        assert [r.destination for r in hook.outbox.rows(state="pending")].count("http") == 1
        hook.deliver_pending()
        assert hook.outbox.rows(state="pending") == []
    assert len(rx.requests) == 2 and len({k for _, k, _ in rx.requests}) == 1


def test_outbox_rows_commit_with_the_decision(tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    hook2 = make_hook(tmp_path / "data2", clock=clock)
    hook2.record_fusion(result(tmp_path, "F2", (cbct("b"), scan("other.stl"))))
    attach_pdf(hook2, tmp_path, "F2", "RPT-F2")

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(hook2.outbox, "enqueue", boom)
    with pytest.raises(OSError, match="disk full"):
        hook2.document("F2", rationale="Implant planning at 46.", clinician="Dr A")
    # the documentation committed on its own; the export transaction (exported entry,
    # exported decision, outbox rows) rolled back as a whole
    assert hook2.require_decision("F2").status == "ready_to_bill"
    assert [e.kind for e in hook2.ledger.entries(fusion_id="F2")][-2:] == ["documentation", "decision"]
    assert hook2.ledger.entries(kind="exported") == [] and hook2.outbox.rows() == []
    assert hook2.ledger.verify().ok
