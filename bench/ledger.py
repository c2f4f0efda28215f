"""Ledger throughput: append N events (each in its own committed transaction) and verify.

    python bench/ledger.py [--events 100000] [--writers 1,16] [--synchronous FULL|NORMAL] [--dir DIR]

Targets: >= 5,000 durable appends/s and >= 50,000 verified events/s.

Durability: the ledger runs in WAL mode. ``FULL`` (the default, configuration key
``billing.delivery.ledger_synchronous``) fsyncs the WAL at every commit: a committed
entry survives power loss. ``NORMAL`` survives a process crash but may lose the newest
commits on power loss. Every ``append`` returns only once its entry is committed.

For each writer count W the same N events are appended by W threads (N / W each) into a
fresh ledger. With one writer every append is its own commit, so the rate is bounded by the
disk's fsync rate (printed for reference: raw ``fdatasync`` of a 4 KB rewrite). With several
writers, appends that arrive while a commit is being prepared share it (group commit):
each still returns only after the fsync that covers it. The commits column says how many
fsync'd commits the run needed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billing_hooks.ledger import Ledger  # noqa: E402

EVENT = {
    "inputs": [{"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "content_sha256": "a" * 64},
               {"series_instance_uid": "1.2.826.0.1.3680043.8.498.2", "content_sha256": "b" * 64}],
    "method": "volume-rigid-mattes-mi", "metrics": {"final_metric": -0.52, "overlap": 0.8},
}


def fsync_rate(directory: Path, seconds: float = 2.0) -> float:
    """Raw fdatasync calls per second on a 4 KB rewrite in ``directory`` (the disk's ceiling
    for one-commit-per-event durability)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        block = os.urandom(4096)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()


def run(directory: Path, events: int, writers: int, synchronous: str) -> tuple[float, float, int, int]:
    """Append ``events`` with ``writers`` threads; returns (append s, verify s, commits, entries)."""
    ledger = Ledger(directory / f"ledger-{writers}.sqlite", synchronous=synchronous)
    per = [events // writers + (1 if w < events % writers else 0) for w in range(writers)]
    errors: list[BaseException] = []
    go = threading.Event()

    def work(w: int) -> None:
        go.wait()
        try:
            for i in range(per[w]):
                ledger.append("fusion_recorded", {**EVENT, "n": i, "writer": w},
                              fusion_id=f"F{w:02d}{i:07d}", patient_key="DF-0001")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    epoch0 = ledger._epoch
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join()
    t_append = time.perf_counter() - t0
    commits = ledger._epoch - epoch0
    if errors:
        raise SystemExit(f"append failed: {errors[0]!r}")
    t0 = time.perf_counter()
    report = ledger.verify()
    t_verify = time.perf_counter() - t0
    ledger.close()
    if not report.ok or report.entries != events:
        raise SystemExit(f"verify FAILED: {report.first_broken} ({report.entries} entries)")
    return t_append, t_verify, commits, report.entries


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--writers", default="1,16", help="comma-separated writer-thread counts (default 1,16)")
    ap.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    ap.add_argument("--dir", type=Path, default=None, help="directory for the database (default: a temp dir)")
    args = ap.parse_args()
    writer_counts = [int(w) for w in args.writers.split(",") if w.strip()]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp_path = Path(tmp)
        load = os.getloadavg()
        print(f"synchronous={args.synchronous} journal=WAL events={args.events} "
              f"(load average {load[0]:.1f} on {os.cpu_count()} CPUs)")
        print(f"disk: raw fdatasync {fsync_rate(tmp_path):,.0f}/s in {tmp_path}")
        print(f"{'writers':>7}  {'appends/s':>10}  {'append s':>8}  {'commits':>8}  {'per commit':>10}  "
              f"{'verify/s':>9}  {'verify s':>8}")
        for writers in writer_counts:
            t_append, t_verify, commits, n = run(tmp_path, args.events, writers, args.synchronous)
            print(f"{writers:>7}  {n / t_append:>10,.0f}  {t_append:>8.2f}  {commits:>8,}  "
                  f"{n / max(commits, 1):>10.1f}  {n / t_verify:>9,.0f}  {t_verify:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
