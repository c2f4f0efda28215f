"""The hash-chained ledger: `dentfuse ledger verify` on a fresh ledger and after each kind
of tampering; `dentfuse events`; `dentfuse document`; append-only at the database level."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from billing_hooks.ledger import Ledger, canonical_json, entry_hash
from billing_hooks.service import ledger_path
from billing_helpers import FakeClock, attach_pdf, cbct, make_hook, result, scan
from pipeline.cli import main


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DENTFUSE_CONFIG", "DENTFUSE_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    """A data directory with an exported claim (F1) and a not-eligible fusion (F2)."""
    data = tmp_path / "data"
    clock = FakeClock()
    hook = make_hook(data, clock=clock)
    hook.record_fusion(result(data, "F1", (cbct("a"), scan())))
    attach_pdf(hook, data, "F1", "RPT-F1-1")
    clock.advance(days=2)
    hook.document("F1", rationale="Implant planning at 36.", clinician="Dr. A. Molar")
    r2 = result(data, "F2", (cbct("x", patient="DF-0002"),))
    hook.record_fusion(r2)
    hook.record_fusion(r2)  # delivered twice
    assert hook.require_decision("F1").status == "exported"
    hook.close()
    return data


def verify(data: Path, *extra: str):
    return CliRunner().invoke(main, ["ledger", "verify", "--data-dir", str(data), *extra])


def _db(data: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(ledger_path(data), isolation_level=None)
    conn.execute("DROP TRIGGER ledger_no_update")
    conn.execute("DROP TRIGGER ledger_no_delete")
    return conn


def _row(conn: sqlite3.Connection, seq: int) -> tuple:
    return conn.execute("SELECT kind, fusion_id, patient_key, recorded_at, entry, hash FROM ledger WHERE seq=?",
                        (seq,)).fetchone()


def test_empty_ledger_verifies(tmp_path: Path) -> None:
    make_hook(tmp_path / "data").close()
    res = verify(tmp_path / "data")
    assert res.exit_code == 0 and "ledger OK: 0 entries" in res.output


def test_fresh_ledger_verifies(data_dir: Path) -> None:
    res = verify(data_dir)
    assert res.exit_code == 0, res.output
    assert "ledger OK" in res.output and "files verified" in res.output
    res = verify(data_dir, "--json")
    out = json.loads(res.output)
    assert out["ok"] and out["entries"] >= 10 and out["files_checked"] >= 5 and out["first_broken"] is None


def _kind_seq(data: Path, kind: str, fusion_id: str = "F1") -> int:
    led = Ledger(ledger_path(data))
    try:
        return led.entries(fusion_id=fusion_id, kind=kind)[0].seq
    finally:
        led.close()


def tamper_edit(data: Path) -> int:
    seq = _kind_seq(data, "exported")
    conn = _db(data)
    entry = _row(conn, seq)[4]
    conn.execute("UPDATE ledger SET entry=? WHERE seq=?", (entry.replace('"fee":350.0', '"fee":35.0'), seq))
    return seq


def tamper_delete(data: Path) -> int:
    _db(data).execute("DELETE FROM ledger WHERE seq=3")
    return 3


def tamper_reorder(data: Path) -> int:
    conn = _db(data)
    a, b = _row(conn, 3), _row(conn, 4)
    for seq, r in ((3, b), (4, a)):
        conn.execute("UPDATE ledger SET kind=?, fusion_id=?, patient_key=?, recorded_at=?, entry=?, hash=? "
                     "WHERE seq=?", (*r, seq))
    return 3


def tamper_insert(data: Path) -> int:
    conn = _db(data)
    last = conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0]
    for seq in range(last, 3, -1):  # make room at 4
        conn.execute("UPDATE ledger SET seq=? WHERE seq=?", (seq + 1, seq))
    prev = _row(conn, 3)[5]
    body = {"seq": 4, "kind": "documentation", "at": "2026-11-26T09:00:00.000000Z", "fusion_id": "F1",
            "patient_key": "DF-0001", "event": {"rationale": "forged", "clinician": "nobody"}, "prev": prev}
    text = canonical_json(body)
    conn.execute("INSERT INTO ledger VALUES (4, 'documentation', 'F1', 'DF-0001', ?, ?, ?)",
                 (body["at"], text, entry_hash(text)))
    return 5  # the forged entry chains correctly; the one after it no longer does


def tamper_truncate(data: Path) -> int:
    conn = _db(data)
    last = conn.execute("SELECT MAX(seq) FROM ledger").fetchone()[0]
    conn.execute("DELETE FROM ledger WHERE seq=?", (last,))
    return last


def tamper_output_file(data: Path) -> int:
    (data / "fusions" / "F1" / "reg.dcm").write_bytes(b"something else")
    return _kind_seq(data, "fusion_recorded")


def tamper_export_file(data: Path) -> int:
    p = data / "exports" / "F1" / "claim.837"
    p.write_text(p.read_text().replace("SV3*AD:D0395*350", "SV3*AD:D0395*950"))
    return _kind_seq(data, "exported")


def tamper_report_deleted(data: Path) -> int:
    (data / "F1-report.pdf").unlink()
    return _kind_seq(data, "report_attached")


TAMPERING = [tamper_edit, tamper_delete, tamper_reorder, tamper_insert, tamper_truncate, tamper_output_file,
             tamper_export_file, tamper_report_deleted]


@pytest.mark.parametrize("tamper", TAMPERING, ids=[t.__name__ for t in TAMPERING])
def test_verify_names_first_broken_entry(data_dir: Path, tamper) -> None:
    expected = tamper(data_dir)
    res = verify(data_dir)
    assert res.exit_code == 1, res.output
    assert f"ledger BROKEN at entry {expected}:" in res.output
    out = json.loads(verify(data_dir, "--json").output)
    assert out["ok"] is False and out["first_broken"]["seq"] == expected


def test_database_refuses_update_and_delete(data_dir: Path) -> None:
    conn = sqlite3.connect(ledger_path(data_dir))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE ledger SET kind='x' WHERE seq=1")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM ledger WHERE seq=1")
    assert not any(hasattr(Ledger, name) for name in ("update", "delete", "remove", "edit"))


def test_entries_are_canonical_json_with_chain(data_dir: Path) -> None:
    conn = sqlite3.connect(ledger_path(data_dir))
    prev = "0" * 64
    for seq, text, h in conn.execute("SELECT seq, entry, hash FROM ledger ORDER BY seq"):
        e = json.loads(text)
        assert json.dumps(e, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == text
        assert e["prev"] == prev and e["seq"] == seq and entry_hash(text) == h
        prev = h


def test_events_command_filters(data_dir: Path) -> None:
    run = CliRunner().invoke
    res = run(main, ["events", "--data-dir", str(data_dir), "--json", "--fusion-id", "F2"])
    assert res.exit_code == 0, res.output
    kinds = [e["kind"] for e in json.loads(res.output)]
    assert kinds == ["fusion_recorded", "decision", "duplicate_delivery"]
    res = run(main, ["events", "--data-dir", str(data_dir), "--json", "--kind", "decision", "--patient", "DF-0001"])
    decisions = json.loads(res.output)
    assert [d["event"]["status"] for d in decisions][-1] == "exported"
    assert all(d["patient_key"] == "DF-0001" for d in decisions)
    res = run(main, ["events", "--data-dir", str(data_dir), "--json", "--since", "2026-11-27"])
    later = json.loads(res.output)
    assert later and all(e["at"] >= "2026-11-27" for e in later)
    kinds = [(e["kind"], e["fusion_id"]) for e in later]
    assert ("documentation", "F1") in kinds and ("fusion_recorded", "F1") not in kinds
    res = run(main, ["events", "--data-dir", str(data_dir)])
    assert res.exit_code == 0 and "duplicate_delivery" in res.output and "exported" in res.output
    res = run(main, ["ledger", "show", "1", "--data-dir", str(data_dir)])
    assert json.loads(res.output)["kind"] == "fusion_recorded"


def test_document_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    hook = make_hook(data)
    r = result(data, "F1", (cbct("a"), scan()))
    hook.record_fusion(r)
    hook.close()
    (data / "fusions" / "F1" / "result.json").write_text(r.to_json(), encoding="utf-8")
    run = CliRunner().invoke
    res = run(main, ["document", "nope", "--rationale", "x", "--clinician", "y", "--data-dir", str(data)])
    assert res.exit_code != 0 and "not in the ledger" in res.output
    res = run(main, ["document", "F1", "--rationale", "Implant planning at 36.", "--clinician", "Dr. A. Molar",
                     "--data-dir", str(data), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["rationale"] == "Implant planning at 36." and d["status"] in ("ready_to_bill", "exported")
    doc = json.loads(run(main, ["events", "--data-dir", str(data), "--json", "--kind", "documentation"]).output)
    assert doc[0]["event"] == {"clinician": "Dr. A. Molar", "rationale": "Implant planning at 36."}
    assert verify(data).exit_code == 0


def test_verify_without_ledger_is_a_clear_error(tmp_path: Path) -> None:
    res = verify(tmp_path / "empty")
    assert res.exit_code != 0 and "no ledger" in res.output


def test_directory_outputs_hash_like_a_sha256sums_manifest(tmp_path: Path) -> None:
    """A derived series folder is hashed as fusion does: sha256 of its SHA256SUMS lines."""
    import hashlib

    from billing_hooks.ledger import sha256_file

    series = tmp_path / "derived"
    series.mkdir()
    lines = ""
    for k in (2, 1, 3):
        (series / f"IM{k:04d}.dcm").write_bytes(bytes([k]) * 100)
    for k in (1, 2, 3):
        lines += f"{hashlib.sha256(bytes([k]) * 100).hexdigest()}  IM{k:04d}.dcm\n"
    (series / "SHA256SUMS").write_text(lines)
    assert sha256_file(series) == hashlib.sha256(lines.encode()).hexdigest()
    (series / "IM0002.dcm").write_bytes(b"changed")
    assert sha256_file(series) != hashlib.sha256(lines.encode()).hexdigest()


def test_document_command_without_fusion_folder_records_documentation(tmp_path: Path) -> None:
    data = tmp_path / "data"
    hook = make_hook(data)
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), scan())))
    hook.close()
    res = CliRunner().invoke(main, ["document", "F1", "--rationale", "Implant planning at 36.",
                                    "--clinician", "Dr. A. Molar", "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    assert "ready to bill D0395" in res.output


# -- group commit -------------------------------------------------------------------------
def _wait_for(cond, what: str, timeout: float = 10.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _open_block(led: Ledger, kind: str, *, release, fail: bool = False):
    """A thread that appends ``kind`` inside its own transaction and holds the block open
    until ``release`` is set; returns (thread, started event, outcome dict)."""
    import threading
    started, outcome = threading.Event(), {}

    def run() -> None:
        try:
            with led.transaction():
                led.append(kind, {"k": kind}, fusion_id=kind)
                started.set()
                release.wait(10)
                if fail:
                    raise RuntimeError(f"block {kind} failed")
            outcome["ok"] = len([r for r in led.query("SELECT kind FROM ledger") if r[0] == kind])
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, started, outcome


def test_concurrent_writers_share_commits_and_each_returns_committed(tmp_path: Path) -> None:
    import threading
    led = Ledger(tmp_path / "ledger.sqlite")
    release_a, release_b = threading.Event(), threading.Event()
    a, a_started, a_out = _open_block(led, "A", release=release_a)
    assert a_started.wait(10)
    b, b_started, b_out = _open_block(led, "B", release=release_b)
    _wait_for(lambda: led._waiting == 1, "B to queue behind A")
    epoch = led._epoch
    # A's entry is written but not committed: other threads do not see it.
    assert len(led) == 0
    release_a.set()              # A finishes its block with B waiting: A does not commit...
    assert b_started.wait(10)    # ...B runs in the same SQLite transaction,
    assert a.is_alive()          # and A has not returned: its entry is not committed yet.
    assert len(led) == 0
    release_b.set()
    a.join(10), b.join(10)
    assert a_out == {"ok": 1} and b_out == {"ok": 1}
    assert led._epoch == epoch + 1, "A and B must have shared one commit"
    assert [e.kind for e in led.entries()] == ["A", "B"]
    assert led.verify().ok
    assert led.head_path.read_text().split()[0] == f"{2:020d}"
    led.close()


def test_a_failing_block_in_a_group_rolls_back_only_itself(tmp_path: Path) -> None:
    import threading
    led = Ledger(tmp_path / "ledger.sqlite")
    led.append("first", {}, fusion_id="0")
    release_a, release_b = threading.Event(), threading.Event()
    a, a_started, a_out = _open_block(led, "A", release=release_a)
    assert a_started.wait(10)
    b, b_started, b_out = _open_block(led, "B", release=release_b, fail=True)
    _wait_for(lambda: led._waiting == 1, "B to queue behind A")
    release_a.set()
    assert b_started.wait(10)
    release_b.set()
    a.join(10), b.join(10)
    assert a_out == {"ok": 1}
    assert isinstance(b_out.get("error"), RuntimeError)
    assert [e.kind for e in led.entries()] == ["first", "A"]
    assert led.verify().ok
    led.append("after", {}, fusion_id="2")  # the chain continues from A, not from B's rolled-back entry
    assert [e.seq for e in led.entries()] == [1, 2, 3] and led.verify().ok
    led.close()


class _FailingCommit:
    """Wraps the ledger's sqlite connection; COMMIT raises like a full disk would."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str):
        return getattr(self.conn, name)


def test_a_failed_group_commit_is_reported_to_every_member(tmp_path: Path) -> None:
    import threading
    from billing_hooks.errors import LedgerError
    led = Ledger(tmp_path / "ledger.sqlite")
    real = led.conn
    led.conn = _FailingCommit(real)  # type: ignore[assignment]
    release_a, release_b = threading.Event(), threading.Event()
    a, a_started, a_out = _open_block(led, "A", release=release_a)
    assert a_started.wait(10)
    b, b_started, b_out = _open_block(led, "B", release=release_b)
    _wait_for(lambda: led._waiting == 1, "B to queue behind A")
    release_a.set()
    assert b_started.wait(10)
    release_b.set()
    a.join(10), b.join(10)
    for out in (a_out, b_out):
        assert isinstance(out.get("error"), LedgerError) and "disk is full" in str(out["error"])
    led.conn = real
    assert len(led) == 0
    led.append("after", {}, fusion_id="1")
    assert [e.seq for e in led.entries()] == [1] and led.verify().ok
    led.close()


def test_many_threads_append_one_unbroken_chain(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    led = Ledger(tmp_path / "ledger.sqlite", synchronous="NORMAL")

    def work(t: int) -> list[int]:
        return [led.append("e", {"t": t, "i": i}, fusion_id=f"T{t}").seq for i in range(100)]

    with ThreadPoolExecutor(8) as pool:
        seqs = [s for chunk in pool.map(work, range(8)) for s in chunk]
    assert sorted(seqs) == list(range(1, 801))
    report = led.verify()
    assert report.ok and report.entries == 800
    for t in range(8):  # each thread's entries are in its own call order
        mine = [e.event["i"] for e in led.entries(fusion_id=f"T{t}")]
        assert mine == list(range(100))
    led.close()


def test_a_bad_event_among_concurrent_appends_fails_only_its_caller(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    from billing_hooks.errors import LedgerError
    led = Ledger(tmp_path / "ledger.sqlite", synchronous="NORMAL")

    def work(t: int) -> list[str]:
        outcomes = []
        for i in range(50):
            event = {"t": t, "i": i, "bad": {1, 2}} if (t, i) == (3, 25) else {"t": t, "i": i}
            try:
                led.append("e", event, fusion_id=f"T{t}")
                outcomes.append("ok")
            except LedgerError as exc:
                assert "not JSON-serialisable" in str(exc)
                outcomes.append("refused")
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        outcomes = [o for chunk in pool.map(work, range(8)) for o in chunk]
    assert outcomes.count("refused") == 1 and outcomes.count("ok") == 399
    report = led.verify()
    assert report.ok and report.entries == 399
    assert [e.event["i"] for e in led.entries(fusion_id="T3")] == [i for i in range(50) if i != 25]
    led.close()


_KILL_WRITER = r"""
import sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from billing_hooks.ledger import Ledger
led = Ledger(Path(sys.argv[1]))
out = threading.Lock()
def work(t):
    i = 0
    while True:
        e = led.append("e", {"t": t, "i": i}, fusion_id=f"T{t}")
        with out:
            sys.stdout.write(f"{e.seq} {e.hash}\n"); sys.stdout.flush()
        i += 1
for t in range(8):
    threading.Thread(target=work, args=(t,), daemon=True).start()
threading.Event().wait()
"""


def test_every_returned_append_survives_kill_9_of_concurrent_writers(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    path = tmp_path / "ledger.sqlite"
    repo = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(path), repo], stdout=subprocess.PIPE, text=True)
    acked: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seq, h = line.split()
            acked[int(seq)] = h
            if len(acked) >= 600:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(acked) >= 600
    led = Ledger(path)
    report = led.verify()
    assert report.ok, report.first_broken
    stored = {seq: h for seq, h in led.query("SELECT seq, hash FROM ledger")}
    missing = [s for s in acked if stored.get(s) != acked[s]]
    assert not missing, f"acknowledged appends lost or changed after kill -9: {missing[:5]}"
    led.close()


def test_close_waits_for_an_open_group_without_stealing_its_writers_turn(tmp_path: Path) -> None:
    import threading
    led = Ledger(tmp_path / "ledger.sqlite")
    release_a, a_in = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def block(kind: str, hold: bool) -> None:
        try:
            with led.transaction():
                led.append(kind, {}, fusion_id=kind)
                if hold:
                    a_in.set()
                    release_a.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    a = threading.Thread(target=block, args=("A", True), daemon=True)
    a.start()
    assert a_in.wait(10)
    closer = threading.Thread(target=led.close, daemon=True)
    closer.start()  # queued first for the writer's turn...
    _wait_for(lambda: len(led._turn._waiters) == 1, "close() to wait")
    b = threading.Thread(target=block, args=("B", False), daemon=True)
    b.start()       # ...then B
    _wait_for(lambda: led._waiting == 1 and len(led._turn._waiters) == 2, "B to queue behind close()")
    release_a.set()  # A defers its commit to B; the turn it hands on goes to close() first
    for t in (a, b, closer):
        t.join(10)
        assert not t.is_alive(), "deadlock between close() and a pending group commit"
    assert errors == []
    reopened = Ledger(tmp_path / "ledger.sqlite")
    assert [e.kind for e in reopened.entries()] == ["A", "B"] and reopened.verify().ok
    reopened.close()
