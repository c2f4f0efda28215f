#!/usr/bin/env python3
"""Ingest benchmark: the same large CBCT series sent by dcmtk ``storescu`` to our listener
(:class:`dicom_node.server.DicomNode` with its defaults, in its own process: its own data
phase (dicom_node.fastpath), each instance fdatasync'd, renamed, its directory fsync'd
and indexed before each 0x0000), to dcmtk ``storescp`` (which does not fsync) and, with
``--orthanc``, to Orthanc; in one run, repeated, medians printed. ``--receivers`` adds the
whole ``dentfuse serve`` application (``serve``) and diagnosis variants.

    python bench/ingest.py                    # 400 slices of 512 x 512 int16 (~210 MB)
    python bench/ingest.py --large            # also 576 slices of 768 x 768 (~680 MB)
    python bench/ingest.py --orthanc --repeat 5

Series are generated once (seeded) and cached in ``bench/data/`` (git-ignored). Each
receiver gets an empty directory under ``--work-dir`` for each send (same file system
for all), removed right after the send; every send starts after a ``sync``. Throughput is the
series' file bytes (MB = 10^6 bytes) over the wall time of the ``storescu`` run
(association to release). Peak memory is the highest RSS of the receiver's process tree,
polled every 10 ms with psutil during the send. The ratio to storescp is printed from the
medians and round by round (each run against the storescp run of its round: on a VM whose
disk speed drifts, the pairs share the machine's state).

Nagle's algorithm: dcmtk reads the environment variable ``TCP_NODELAY`` (``1`` disables
Nagle on its sockets; this is what makes dcmtk fast on loopback). By default the bench sets
``TCP_NODELAY=1`` for storescu, storescp and Orthanc (a dcmtk-based program); our listener
sets TCP_NODELAY on every accepted socket itself. ``--nagle`` leaves it unset, to see the
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the in-process parts (--timeline, the store-path floor) import dicom_node
    sys.path.insert(0, str(REPO))
DATA = REPO / "bench" / "data"
CT = "1.2.840.10008.5.1.4.1.1.2"


# -- the series -------------------------------------------------------------------------------
def make_series(slices: int, rows: int, cols: int, seed: int = 7) -> Path:
    """Generate (or reuse) a CT series of ``slices`` int16 slices; returns its directory."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = DATA / f"ct_{slices}x{rows}x{cols}_seed{seed}"
    marker = out / ".complete"
    if marker.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    study = generate_uid(entropy_srcs=["bench-study", str(seed), str(slices), str(rows)])
    series = generate_uid(entropy_srcs=["bench-series", str(seed), str(slices), str(rows)])
    frame = generate_uid(entropy_srcs=["bench-frame", str(seed)])
    yy, xx = np.mgrid[0:rows, 0:cols]
    r2 = ((yy - rows / 2) / (rows / 2.2)) ** 2 + ((xx - cols / 2) / (cols / 2.2)) ** 2
    head = np.where(r2 < 1.0, 1000, -1000).astype(np.int16)
    print(f"generating {slices} slices of {rows} x {cols} int16 into {out} ...", flush=True)
    for i in range(slices):
        sop = generate_uid(entropy_srcs=["bench-sop", str(seed), str(slices), str(rows), str(i)])
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CT, sop
        ds.PatientID, ds.PatientName = "BENCH-0001", "Bench^Phantom"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.Modality = "20260101", "120000", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 0.3 * i]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.3, 0.3], 0.3
        ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        noise = rng.integers(-60, 60, (rows, cols), dtype=np.int16)
        ds.PixelData = (head + noise).tobytes()
        ds.save_as(out / f"{i:05d}.dcm", enforce_file_format=True)
    marker.write_text("ok\n")
    return out


# -- helpers ----------------------------------------------------------------------------------
def dcmtk(program: str) -> str:
    """dcmtk's binary (pyenv may shadow it on PATH with pynetdicom's app of the same name)."""
    for cand in (f"/usr/bin/{program}", shutil.which(program)):
        if cand and Path(cand).exists():
            out = subprocess.run([cand, "--version"], capture_output=True, text=True)
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return cand
    sys.exit(f"dcmtk {program} not found (apt-get install dcmtk)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s")


class RssPeak:
    """Polls the RSS of a process and its children; remembers the peak. The list of
    children is refreshed every 0.5 s only: walking /proc for it costs ~2 ms of CPU,
    which polled every 10 ms took ~20% of a core from the receivers on a 2-core machine."""

    def __init__(self, pid: int, interval_s: float = 0.01, children_every_s: float = 0.5) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.children_every_s = children_every_s
        self._procs: list[psutil.Process] = [self.proc]
        self._procs_at = -1e9
        self.peak = 0
        self.baseline = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        total = 0
        now = time.monotonic()
        if now - self._procs_at >= self.children_every_s:
            try:
                self._procs = [self.proc] + self.proc.children(recursive=True)
            except psutil.Error:
                return 0
            self._procs_at = now
        for p in self._procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def stop(proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


# -- receivers --------------------------------------------------------------------------------
class Receiver:
    name = ""
    ae_title = ""

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        raise NotImplementedError

    def count(self, workdir: Path) -> int:
        raise NotImplementedError


_LISTENER = """
import sys
from pathlib import Path
from dicom_node.server import DicomNode, serve_forever
from dicom_node.settings import NodeSettings, StabilitySettings
data_dir, port, ae_title = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# the node's defaults: unlimited PDU, chunked receive, fsync'd and indexed before 0x0000
node = DicomNode(NodeSettings(ae_title=ae_title, bind_address="127.0.0.1", port=port), StabilitySettings(),
                 data_dir)
sys.exit(serve_forever(node))
"""

_NOFSYNC = """
import dicom_node.storage as storage
storage.fsync_file = lambda path: None   # diagnosis only: NOT durable
storage.fsync_dir = lambda path: None
storage.sync_fd = lambda fd: None
""" + _LISTENER

_STOCK = """
import dicom_node.server as server
server.FAST_DATA_PHASE = False   # diagnosis: every PDU through pynetdicom (as before the fast path)
""" + _LISTENER

_FASTLOOP = """
import time
import pynetdicom.association as association
import pynetdicom.dul as dul
# diagnosis only: shorten pynetdicom's two polling sleeps (1 ms each) to 0.1 ms
_init = dul.DULServiceProvider.__init__
def _init_fast(self, *a, **k):
    _init(self, *a, **k)
    self._run_loop_delay = 0.0001
dul.DULServiceProvider.__init__ = _init_fast
class _Time:
    def __getattr__(self, name):
        return getattr(time, name)
    def sleep(self, s):
        time.sleep(min(s, 0.0001))
association.time = _Time()
""" + _LISTENER

_DISCARD = """
import socket, sys
from pynetdicom import AE, evt, _config
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
ae = AE("DISCARD")
ae.maximum_pdu_size = 0
for c in STORAGE_SOP_CLASSES:
    ae.add_supported_context(c, list(TRANSFER_SYNTAXES))
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
"""


class Ours(Receiver):
    """Our listener alone (:class:`dicom_node.server.DicomNode` with its default settings)."""

    name, ae_title = "dentfuse", "DENTFUSE"
    script = _LISTENER

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        port = free_port()
        env = {k: v for k, v in env.items() if not k.startswith("DENTFUSE_")}
        proc = subprocess.Popen([sys.executable, "-c", self.script, str(workdir), str(port), self.ae_title],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        wait_port(port, proc)
        return proc, port

    def count(self, workdir: Path) -> int:
        conn = sqlite3.connect(f"file:{workdir / 'index.sqlite'}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
        finally:
            conn.close()


class Serve(Ours):
    """The whole ``dentfuse serve`` application (listener plus planner, fusion workers,
    billing, outbox, forwarding) receiving the series."""

    name = "serve"

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        port = free_port()
        env = {k: v for k, v in env.items() if not k.startswith("DENTFUSE_")}
        exe = shutil.which("dentfuse")
        cmd = [exe] if exe else [sys.executable, "-m", "pipeline.cli"]
        proc = subprocess.Popen(cmd + ["serve", "--data-dir", str(workdir), "--port", str(port),
                                       "--ae-title", self.ae_title],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
        wait_port(port, proc)
        return proc, port


class OursNoFsync(Ours):
    """Our listener with the two file fsyncs turned off (SQLite still synchronous=FULL):
    for diagnosis only, never a configuration."""

    name = "nofsync"
    script = _NOFSYNC


class OursStock(Ours):
    """Our listener (durable, fsync'd) with the fast data phase off: every PDU and DIMSE
    message through pynetdicom, chunked receive (diagnosis: what the fast path gains)."""

    name = "stock"
    script = _STOCK


class OursFastLoop(Ours):
    """Our listener (durable, fsync'd) with pynetdicom's reactor polling sleeps cut from
    1 ms to 0.1 ms: what the polling latency costs (diagnosis; it burns more CPU when idle)."""

    name = "fastloop"
    script = _FASTLOOP


class PynetdicomDiscard(Receiver):
    """Stock pynetdicom (in-memory receive, unlimited PDU) answering 0x0000 and keeping
    nothing: the ceiling of pynetdicom's receive path."""

    name, ae_title = "discard", "DISCARD"

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", _DISCARD, str(port)], env=env, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port, proc)
        return proc, port

    def count(self, workdir: Path) -> int:
        return -1  # keeps nothing


class StoreScp(Receiver):
    name, ae_title = "storescp", "STORESCP"

    def __init__(self, max_pdu: int) -> None:
        self.max_pdu = max_pdu

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        port = free_port()
        proc = subprocess.Popen([dcmtk("storescp"), "--aetitle", self.ae_title, "--max-pdu", str(self.max_pdu),
                                 "--output-directory", str(workdir), str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(port, proc)
        return proc, port

    def count(self, workdir: Path) -> int:
        return sum(1 for p in workdir.iterdir() if p.is_file())


class Orthanc(Receiver):
    name, ae_title = "orthanc", "ORTHANC"

    def __init__(self) -> None:
        self.http_port = 0

    def start(self, workdir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
        program = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        port, self.http_port = free_port(), free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(workdir / "storage"), "IndexDirectory": str(workdir / "index"),
            "HttpPort": self.http_port, "DicomPort": port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "Plugins": [], "StorageCompression": False, "SaveJobs": False,
            "StableAge": 60,
        }
        cfg = workdir / "orthanc.json"
        workdir.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps(config))
        proc = subprocess.Popen([program, str(cfg)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, cwd=workdir)
        wait_port(port, proc)
        wait_port(self.http_port, proc)
        return proc, port

    def count(self, workdir: Path) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30) as rsp:
            return int(json.loads(rsp.read())["CountInstances"])


# -- one send ---------------------------------------------------------------------------------
@dataclass
class Run:
    receiver: str
    series: str
    seconds: float
    mb_per_s: float
    instances_per_s: float
    peak_rss_mb: float
    baseline_rss_mb: float
    received: int
    round: int = 0  # which repetition (the receivers of one round run back to back)


def settle() -> None:
    """``sync`` before a measurement: it starts with no dirty pages and no journal work
    left from the one before (each run's files are deleted right after it)."""
    os.sync()


def send_once(receiver: Receiver, series_dir: Path, files: list[Path], total_bytes: int, work_root: Path,
              env: dict[str, str]) -> Run:
    workdir = Path(tempfile.mkdtemp(prefix=f"{receiver.name}-", dir=work_root))
    settle()
    proc, port = receiver.start(workdir, env)
    try:
        cmd = [dcmtk("storescu"), "-aet", "BENCHSCU", "-aec", receiver.ae_title, "127.0.0.1", str(port),
               "+sd", "+sp", "*.dcm", str(series_dir), "-xe"]
        with RssPeak(proc.pid) as rss:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"storescu to {receiver.name} failed ({out.returncode}): {out.stderr[-2000:]}")
        received = receiver.count(workdir)
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    return Run(receiver.name, series_dir.name, seconds, total_bytes / 1e6 / seconds, len(files) / seconds,
               rss.peak / 2**20, rss.baseline / 2**20, received)


def store_path_floor(files: list[Path], work_root: Path) -> tuple[float, float, dict[str, float]]:
    """Time our durable store path alone (no network): each file copied into the incoming
    directory (as the chunked receive leaves it), then ``accept_instance`` (checks, sha256,
    fsync file, rename, fsync directory, index commit). Returns (seconds, instances/s, and
    milliseconds per instance spent in fsync_file / fsync_dir / index commit / the rest)."""
    import dicom_node.storage as storage
    from dicom_node.index import InstanceIndex
    from dicom_node.ingest import accept_instance

    spent = {"fsync_file": 0.0, "fsync_dir": 0.0}
    real = {"fsync_file": storage.fsync_file, "fsync_dir": storage.fsync_dir}

    def timed(name: str):
        def run(path: Path) -> None:
            t = time.perf_counter()
            real[name](path)
            spent[name] += time.perf_counter() - t
        return run

    workdir = Path(tempfile.mkdtemp(prefix="floor-", dir=work_root))
    settle()
    storage.fsync_file, storage.fsync_dir = timed("fsync_file"), timed("fsync_dir")
    try:
        store = storage.InstanceStore(workdir)
        index = InstanceIndex(workdir / "index.sqlite")
        add = index.add

        def timed_add(*a, **k):  # the index commit (SQLite WAL, synchronous=FULL: one more fsync)
            t = time.perf_counter()
            try:
                return add(*a, **k)
            finally:
                spent["index_commit"] += time.perf_counter() - t

        spent["index_commit"] = 0.0
        index.add = timed_add  # type: ignore[method-assign]
        total = 0.0
        for f in files:
            tmp, fh = store.new_temp_file()
            with fh:
                fh.write(f.read_bytes())
            t = time.perf_counter()
            accept_instance(tmp, store, index, "BENCH")
            total += time.perf_counter() - t
        index.close()
    finally:
        storage.fsync_file, storage.fsync_dir = real["fsync_file"], real["fsync_dir"]
        shutil.rmtree(workdir, ignore_errors=True)
    n = len(files)
    ms = {k: 1000 * v / n for k, v in spent.items()}
    ms["checks+sha256+rename"] = 1000 * total / n - sum(ms.values())
    return total, n / total, ms


def disk_floor(files: list[Path], work_root: Path) -> tuple[float, dict[str, float]]:
    """The durable-write floor of this disk, no network and no checks: per file, create a
    temporary file, write its bytes, fdatasync, rename into a directory, fsync the
    directory (what every acknowledged instance costs at least). Returns (seconds, ms per
    instance by step)."""
    workdir = Path(tempfile.mkdtemp(prefix="floor-disk-", dir=work_root))
    settle()
    spent = {"create": 0.0, "write": 0.0, "fdatasync": 0.0, "rename+dir fsync": 0.0}
    try:
        final_dir = workdir / "final"
        final_dir.mkdir()
        dfd = os.open(final_dir, os.O_RDONLY)
        try:
            for i, f in enumerate(files):
                data = f.read_bytes()
                t0 = time.perf_counter()
                fd, name = tempfile.mkstemp(suffix=".partial", dir=workdir)
                t1 = time.perf_counter()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                t2 = time.perf_counter()
                os.fdatasync(fd)
                os.close(fd)
                t3 = time.perf_counter()
                os.replace(name, final_dir / f"{i}.dcm")
                os.fsync(dfd)
                t4 = time.perf_counter()
                for k, v in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    spent[k] += v
        finally:
            os.close(dfd)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return sum(spent.values()), {k: 1000 * v / len(files) for k, v in spent.items()}


def timeline(series_dir: Path, work_root: Path, env: dict[str, str]) -> None:
    """Where one instance's time goes in our listener: an in-process DicomNode whose fast
    data phase (:mod:`dicom_node.fastpath`) stamps the arrival of each C-STORE command,
    the last dataset fragment, the end of the store decision and the sent response; the
    fdatasync, directory fsync and index commit are timed too. Medians and means per
    instance are printed. (Diagnosis: patches dicom_node functions in this process only.)"""
    import dicom_node.fastpath as fastpath
    import dicom_node.server as server
    import dicom_node.storage as storage
    from dicom_node.settings import NodeSettings, StabilitySettings

    marks: list[tuple[float, str]] = []
    durations: dict[str, list[float]] = {"fdatasync(file)": [], "fsync(directory)": [], "index commit": []}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        def run(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                durations[name].append(time.perf_counter() - t)
        return run

    saved = (fastpath.TRACE, storage.sync_fd, storage.fsync_dir)
    fastpath.TRACE = lambda phase: marks.append((time.perf_counter(), phase))
    storage.sync_fd = timed("fdatasync(file)", storage.sync_fd)
    storage.fsync_dir = timed("fsync(directory)", storage.fsync_dir)
    workdir = Path(tempfile.mkdtemp(prefix="timeline-", dir=work_root))
    settle()
    try:
        node = server.DicomNode(NodeSettings(ae_title="DENTFUSE", port=0), StabilitySettings(), workdir)
        node.index.add = timed("index commit", node.index.add)  # type: ignore[method-assign]
        port = node.start()
        t0 = time.perf_counter()
        subprocess.run([dcmtk("storescu"), "-aec", "DENTFUSE", "127.0.0.1", str(port), "+sd", "+sp", "*.dcm",
                        str(series_dir), "-xe"], env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        node.close()
    finally:
        fastpath.TRACE, storage.sync_fd, storage.fsync_dir = saved
        shutil.rmtree(workdir, ignore_errors=True)
    phases: dict[str, list[float]] = {
        "receive the dataset (command to last PDV)": [],
        "store: checks, fdatasync, rename, dir fsync, index": [],
        "encode and send the response": [],
        "sender's turn + our read of the next command": []}
    cur: dict[str, float] = {}
    for t, kind in marks:
        if kind == "command":
            if "response_sent" in cur:
                phases["sender's turn + our read of the next command"].append(t - cur["response_sent"])
            cur = {}
        cur[kind] = t
        if kind == "response_sent" and len(cur) == 4:
            phases["receive the dataset (command to last PDV)"].append(cur["dataset_complete"] - cur["command"])
            phases["store: checks, fdatasync, rename, dir fsync, index"].append(cur["stored"] - cur["dataset_complete"])
            phases["encode and send the response"].append(cur["response_sent"] - cur["stored"])
    n = len(phases["encode and send the response"])
    if not n:
        print("  timeline: the fast data phase did not run (nothing to break down)")
        return
    print(f"  timeline of our listener: {wall:.2f} s, {1000 * wall / n:.2f} ms per instance "
          f"({n} instances); per instance, median / mean:")
    rows = list(phases.items()) + [(f"  of which {k}", v) for k, v in durations.items()]
    for name, values in rows:
        if values:
            print(f"    {name:52s} {1000 * statistics.median(values):6.2f} / {1000 * statistics.mean(values):6.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=400)
    ap.add_argument("--size", type=int, default=512, help="rows = columns of the default series")
    ap.add_argument("--large", action="store_true", help="also a 576-slice 768 x 768 series (~680 MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--orthanc", action="store_true", help="also send to Orthanc")
    ap.add_argument("--receivers", default="dentfuse,storescp",
                    help="comma-separated: dentfuse (our listener alone), storescp, orthanc, serve (the whole "
                         "dentfuse serve application); for diagnosis also nofsync (our listener "
                         "without file fsyncs), stock (our listener with its fast data phase off: every PDU "
                         "through pynetdicom), fastloop (stock with pynetdicom's 1 ms polling "
                         "sleeps cut to 0.1 ms) and discard (stock pynetdicom keeping nothing)")
    ap.add_argument("--storescp-pdu", type=int, default=131072,
                    help="storescp's max receive PDU (dcmtk's maximum 131072; its default is 16384)")
    ap.add_argument("--nagle", action="store_true", help="do not set TCP_NODELAY=1 for the dcmtk programs")
    ap.add_argument("--work-dir", type=Path, default=REPO / "bench" / "out",
                    help="where receivers write (one file system for all)")
    ap.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the runs as JSON")
    ap.add_argument("--timeline", action="store_true",
                    help="also break one send to our listener down into phases per instance (diagnosis)")
    args = ap.parse_args()

    names = [n.strip() for n in args.receivers.split(",") if n.strip()]
    if args.orthanc and "orthanc" not in names:
        names.append("orthanc")
    make = {"dentfuse": Ours, "storescp": lambda: StoreScp(args.storescp_pdu), "orthanc": Orthanc,
            "nofsync": OursNoFsync, "stock": OursStock, "fastloop": OursFastLoop, "discard": PynetdicomDiscard, "serve": Serve}
    receivers = [make[n]() for n in names]

    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if not args.nagle:
        env["TCP_NODELAY"] = "1"
    args.work_dir.mkdir(parents=True, exist_ok=True)

    shapes = [(args.slices, args.size, args.size)]
    if args.large:
        shapes.append((576, 768, 768))
    print(f"machine: {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"TCP_NODELAY={'unset' if args.nagle else '1'} for storescu/storescp/Orthanc; "
          f"storescp --max-pdu {args.storescp_pdu}; dentfuse: unlimited PDU, TCP_NODELAY on accepted sockets, "
          f"fdatasync + rename + directory fsync + index per instance; storescp writes without fsync; "
          f"storescu -xe (Explicit VR LE)", flush=True)
    runs: list[Run] = []
    for shape in shapes:
        series_dir = make_series(*shape)
        files = sorted(series_dir.glob("*.dcm"))
        total = sum(f.stat().st_size for f in files)
        for f in files:  # into the page cache, so the sender's disk is not measured
            f.read_bytes()
        print(f"\nseries {series_dir.name}: {len(files)} instances, {total / 1e6:.0f} MB", flush=True)
        if args.timeline:
            timeline(series_dir, args.work_dir, env)
        if "dentfuse" in names:
            secs, ms = disk_floor(files, args.work_dir)
            print(f"  disk floor (create, write, fdatasync, rename, dir fsync; no network, no checks): "
                  f"{len(files) / secs:.0f} inst/s = {total / 1e6 / secs:.0f} MB/s; per instance "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
            secs, ips, ms = store_path_floor(files, args.work_dir)
            print(f"  import path (copy in, inspect_instance, fsync, rename, index; no network): {ips:.0f} inst/s = {total / 1e6 / secs:.0f} MB/s; "
                  "per instance " + ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items()), flush=True)
        for i in range(args.repeat):
            for rcv in receivers:
                run = send_once(rcv, series_dir, files, total, args.work_dir, env)
                run.round = i + 1
                ok = "" if run.received in (len(files), -1) else f"  ONLY {run.received} of {len(files)} RECEIVED"
                print(f"  run {i + 1} {run.receiver:9s} {run.seconds:6.2f} s {run.mb_per_s:7.1f} MB/s "
                      f"{run.instances_per_s:7.1f} inst/s  peak RSS {run.peak_rss_mb:6.0f} MB "
                      f"(idle {run.baseline_rss_mb:.0f} MB)  load {os.getloadavg()[0]:.2f}{ok}", flush=True)
                runs.append(run)

    print("\nmedians")
    print(f"  {'series':24s} {'receiver':9s} {'MB/s':>8s} {'inst/s':>8s} {'peak RSS MB':>12s} {'vs storescp':>12s}")
    for shape in shapes:
        sname = f"ct_{shape[0]}x{shape[1]}x{shape[2]}_seed7"
        med: dict[str, tuple[float, float, float]] = {}
        for rcv in receivers:
            rs = [r for r in runs if r.series == sname and r.receiver == rcv.name]
            med[rcv.name] = (statistics.median(r.mb_per_s for r in rs),
                             statistics.median(r.instances_per_s for r in rs), max(r.peak_rss_mb for r in rs))
        base = med.get("storescp", (0.0, 0.0, 0.0))[0]
        for name, (mbs, ips, rss) in med.items():
            ratio = f"{mbs / base:.2f}x" if base else "-"
            print(f"  {sname:24s} {name:9s} {mbs:8.1f} {ips:8.1f} {rss:12.0f} {ratio:>12s}")
        scp = {r.round: r.mb_per_s for r in runs if r.series == sname and r.receiver == "storescp"}
        for name in med:
            ratios = sorted(r.mb_per_s / scp[r.round] for r in runs
                            if r.series == sname and r.receiver == name and name != "storescp" and r.round in scp)
            if ratios:  # each run against the storescp run of the same round (same machine state)
                print(f"  {'':24s} {name} / storescp, round by round: median {statistics.median(ratios):.2f}x "
                      f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x, {len(ratios)} rounds)")
        if "dentfuse" in med and "orthanc" in med:
            print(f"  {'':24s} dentfuse / orthanc: {med['dentfuse'][0] / med['orthanc'][0]:.2f}x")
    if args.json_out:
        args.json_out.write_text(json.dumps([r.__dict__ for r in runs], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
