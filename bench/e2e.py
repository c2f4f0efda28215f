"""End-to-end benchmark: wall time and peak memory from the first byte sent to the billing
decisions, through ``dentfuse serve`` (a separate process with its fusion worker processes).

For each case: a fresh data directory and configuration, ``dentfuse serve`` started, dcmtk
``storescu`` sends CBCT A, CBCT B and the intraoral scan (Encapsulated STL); the clock
starts just before storescu and stops when every planned fusion has its D0395 decision
(``needs_documentation``: technically eligible, waiting for the clinician's rationale), then
a second figure after the bench documents a rationale (labelled as the bench's) until the
claims are ``exported`` (ready to bill, exported and queued for delivery). Peak memory is
the largest sum of RSS over the serve process and all its children, sampled every 50 ms.

Cases: ``small`` (the bundled test_volumes/small) and ``large`` (generated once into
bench/data/large: CBCT 400^3 at 0.25 mm, a second CBCT, a 150k-face scan).
Target for large: under 60 s, under 4 GB.

Usage: python bench/e2e.py [--case small|large|both] [--quiet-period 1.0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEND = (("p1_cbct_a", "dir"), ("p1_cbct_b", "dir"), ("p1_scan/upper.dcm", "file"))


def dcmtk_storescu() -> str:
    for cand in [shutil.which("storescu"), "/usr/bin/storescu"]:
        if cand and os.access(cand, os.X_OK):
            out = subprocess.run([cand, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return cand
    raise SystemExit("dcmtk's storescu is needed (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def case_source(case: str) -> Path:
    if case == "small":
        return REPO / "test_volumes" / "small"
    out = REPO / "bench" / "data" / "large"
    if not (out / "ground_truth.json").is_file():
        from test_volumes.generate import generate_set

        print(f"generating the large case into {out} (once) ...", flush=True)
        t = time.monotonic()
        generate_set(out, size="large", cases=["p1_cbct_a", "p1_cbct_b", "p1_scan"])
        print(f"  generated in {time.monotonic() - t:.0f} s", flush=True)
    return out


class PeakRSS:
    """Samples the RSS of a process tree in a thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval_s)

    def start(self) -> "PeakRSS":
        self._t.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def status(cfg_path: Path) -> dict:
    from pipeline.cli_jobs import collect_status
    from pipeline.config import load_config

    return collect_status(load_config(cfg_path, environ={}), limit=100)


def run_case(case: str, quiet_period_s: float, workers: int, keep: bool) -> dict:
    source = case_source(case)
    work = Path(tempfile.mkdtemp(prefix=f"dentfuse-bench-{case}-"))
    port = free_port()
    cfg_path = work / "dentfuse.toml"
    cfg_path.write_text("\n".join([
        f'data_dir = "{work / "data"}"',
        "[node]", f"port = {port}", 'bind_address = "127.0.0.1"',
        "[stability]", f"quiet_period_s = {quiet_period_s}", "check_interval_s = 0.1",
        "[fusion]", f"workers = {workers}",
        "[billing.policy]", 'fee_schedule = ["D0395=350.00"]',
    ]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DENTFUSE_")}
    env["PYTHONPATH"] = str(REPO)
    log = open(work / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--config", str(cfg_path)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work))
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"serve did not start; see {work / 'serve.log'}")
            time.sleep(0.1)
        mem = PeakRSS(proc.pid).start()
        paths = [str(source / rel) for rel, _ in SEND]
        size = sum(f.stat().st_size for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*")))
        t0 = time.monotonic()
        wall0 = time.time()
        r = subprocess.run([dcmtk_storescu(), "-aec", "DENTFUSE", "-aet", "BENCH", "+sd", "-R", "127.0.0.1",
                            str(port), *paths], capture_output=True, text=True,
                           env={**os.environ, "TCP_NODELAY": "1"})  # dcmtk: no Nagle delay on loopback
        t_sent = time.monotonic() - t0
        if r.returncode != 0:
            raise SystemExit(f"storescu failed: {r.stderr[-2000:]}")
        decided = None
        while time.monotonic() - t0 < 900:
            st = status(cfg_path)
            c = st["jobs"]["counts"]
            if c and sum(c.values()) >= 2 and c["queued"] == 0 and c["running"] == 0 and \
                    len(st["fusions"]) >= sum(c.values()) - c["failed"]:
                decided = time.monotonic() - t0
                break
            time.sleep(0.1)
        if decided is None:
            raise SystemExit(f"no decisions after 900 s; see {work}")
        # the bench documents a rationale (as a clinician would) and waits for the exports
        fids = [f["fusion_id"] for f in st["fusions"] if f["status"] == "needs_documentation"]
        t_doc = time.monotonic()
        for fid in fids:
            subprocess.run([sys.executable, "-m", "pipeline.cli", "document", fid, "--config", str(cfg_path),
                            "--rationale", "BENCH ONLY: synthetic patient, not a clinical record",
                            "--clinician", "dentfuse bench"], env=env, capture_output=True, check=True)
        while True:
            st = status(cfg_path)
            if all(f["status"] == "exported" for f in st["fusions"] if f["fusion_id"] in fids):
                break
            time.sleep(0.1)
        t_exported = time.monotonic() - t0
        peak = mem.stop()
        jobs = st["jobs"]["recent"]
        # where the time went, per job, in seconds after the first byte sent
        from pipeline.bootstrap import open_job_queue
        from pipeline.config import load_config

        q = open_job_queue(load_config(cfg_path, environ={}))
        timeline = {}
        for j in q.list(limit=100):
            marks = {"planned": j.created_at}
            for stage, t in j.stages:
                if stage == "claimed":
                    marks["started"] = t
                if stage in ("billing decision", "fusion already computed"):
                    marks["fusion_done"] = t
            marks["finalized"] = j.finished_at
            timeline[j.payload.get("rule")] = {k: round(v - wall0, 2) for k, v in marks.items() if v}
        q.close()
        fusion_times = {}
        for j in jobs:
            res = work / "data" / "fusions" / j["fusion_id"] / "result.json"
            if res.is_file():
                fusion_times[j["rule"]] = round(json.loads(res.read_text())["timings_s"].get("total", 0.0), 2)
        out = {
            "case": case, "bytes_sent": size, "quiet_period_s": quiet_period_s, "workers": workers,
            "send_s": round(t_sent, 2), "to_decisions_s": round(decided, 2),
            "documentation_to_export_s": round(t_exported - (t_doc - t0), 2), "to_exported_s": round(t_exported, 2),
            "peak_rss_mb": round(peak / 2**20), "fusion_s": fusion_times, "timeline_s": timeline,
            "jobs": [(j["rule"], j["state"], j["verdict"]) for j in jobs],
            "decisions": [(f["fusion_id"], f["code"], f["status"]) for f in st["fusions"]],
            "load_average": os.getloadavg(), "work_dir": str(work),
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=("small", "large", "both"), default="small")
    ap.add_argument("--quiet-period", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the data directories")
    args = ap.parse_args()
    cases = ("small", "large") if args.case == "both" else (args.case,)
    for case in cases:
        r = run_case(case, args.quiet_period, args.workers, args.keep)
        print(f"\n== {case}: {r['bytes_sent'] / 2**20:.0f} MB sent in {r['send_s']} s; "
              f"decisions {r['to_decisions_s']} s after the first byte (quiet period {r['quiet_period_s']} s "
              f"included); exported {r['documentation_to_export_s']} s after documentation; "
              f"peak RSS of serve + workers {r['peak_rss_mb']} MB")
        print(f"   fusion compute: {r['fusion_s']}; load average {tuple(round(x, 1) for x in r['load_average'])}")
        for rule, marks in r["timeline_s"].items():
            print(f"   {rule}: " + ", ".join(f"{k} {v} s" for k, v in marks.items()))
        if case == "large":
            ok = r["to_decisions_s"] < 60 and r["peak_rss_mb"] < 4096
            print(f"   target (< 60 s, < 4096 MB): {'met' if ok else 'NOT met'}")
        print(json.dumps(r, default=str))


if __name__ == "__main__":
    main()
