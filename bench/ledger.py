"""Ledger throughput: append N events (each its own committed transaction) and verify.

    python bench/ledger.py [--events 100000] [--synchronous FULL|NORMAL] [--dir DIR]

Targets: >= 5,000 durable appends/s and >= 50,000 verified events/s.

Durability: the ledger runs in WAL mode. ``FULL`` (the default, configuration key
``billing.delivery.ledger_synchronous``) fsyncs the WAL at every commit: a committed
entry survives power loss, and the rate is bounded by the disk's fsync latency.
``NORMAL`` survives a process crash but may lose the newest commits on power loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from billing_hooks.ledger import Ledger  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL"])
    ap.add_argument("--dir", type=Path, default=None, help="directory for the database (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ledger = Ledger(Path(tmp) / "ledger.sqlite", synchronous=args.synchronous)
        event = {
            "inputs": [{"series_instance_uid": "1.2.826.0.1.3680043.8.498.1", "content_sha256": "a" * 64},
                       {"series_instance_uid": "1.2.826.0.1.3680043.8.498.2", "content_sha256": "b" * 64}],
            "method": "volume-rigid-mattes-mi", "metrics": {"final_metric": -0.52, "overlap": 0.8},
        }
        t0 = time.perf_counter()
        for i in range(args.events):
            ledger.append("fusion_recorded", {**event, "n": i}, fusion_id=f"F{i:07d}", patient_key="DF-0001")
        t_append = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = ledger.verify()
        t_verify = time.perf_counter() - t0
        if not report.ok or report.entries != args.events:
            print(f"verify FAILED: {report.first_broken}", file=sys.stderr)
            return 1
        ledger.close()
        load = os.getloadavg()
        print(f"synchronous={args.synchronous} journal=WAL events={args.events} "
              f"(load average {load[0]:.1f} on {os.cpu_count()} CPUs)")
        print(f"append (one committed transaction each): {args.events / t_append:,.0f} events/s ({t_append:.2f} s)")
        print(f"verify (full chain): {args.events / t_verify:,.0f} events/s ({t_verify:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
