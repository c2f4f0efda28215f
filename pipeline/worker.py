"""The in-process worker pool: each fusion runs in its own worker PROCESS.

A crash in a fusion (a segfault in a native library, running out of memory, a kill)
takes down only that job's process; the listener and the other workers go on, and the
job is retried or stopped by the queue's attempt budget.

Layout
------
* ``WorkerPool`` runs ``workers`` slot threads in the serving process. A slot claims a job
  from the :class:`~pipeline.jobs.JobQueue`, starts one child process for it (context
  ``forkserver`` with the fusion modules preloaded, so a child starts in milliseconds and
  never inherits the listener's threads; ``spawn`` where forkserver does not exist),
  extends the job's lease while the child runs, and reads the child's answer from the
  job's output folder: ``result.json`` (a :class:`~fusion.records.FusionResult`) or
  ``error.json``.
* The child reports its progress stages straight into the job queue (``status`` shows them).
* After a successful child, the slot calls ``finalize(job, result, progress)`` in the serving
  process (billing decision, report, forwarding); then the job is ``done`` or
  ``needs_review``. ``finalize`` must be idempotent: a job may run again after a kill.
* A child that already wrote ``result.json`` for this fusion id is not run again (a restart
  between the fusion and its finalisation re-uses the fusion instead of redoing it).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.jobs import Job, JobQueue, LeaseLostError

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
ERROR_FILE = "error.json"

# errors that will not go away by trying again: the job stops at once
PERMANENT_ERRORS = ("InputError", "GeometryError", "PatientMismatchError")

FinalizeFn = Callable[[Job, Any, Callable[[str], None]], str]
"""finalize(job, fusion_result, stage) -> final job state ("done" or "needs_review")."""


@dataclass(frozen=True)
class ChildOutcome:
    ok: bool
    result: Any = None  # FusionResult
    error: str = ""
    permanent: bool = False


def owner_name(slot: int) -> str:
    """``host:pid:slot``: lets a restart on the same host tell a dead owner from a live one."""
    return f"{socket.gethostname()}:{os.getpid()}:{slot}"


def owner_alive(owner: str) -> bool:
    """False when ``owner`` is a worker of a process on this host that no longer exists."""
    try:
        host, pid_text, _slot = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours: leave it to its lease
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    try:
        import psutil

        return bool(psutil.pid_exists(pid))
    except Exception:  # pragma: no cover - psutil is a dependency
        return True


def mp_context() -> multiprocessing.context.BaseContext:
    """forkserver (preloading the fusion modules) where available, else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["pipeline.worker", "fusion.volume_fusion", "fusion.surface_fusion"])
        return ctx
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------------------------
# the child side
# ---------------------------------------------------------------------------------------
def run_fusion(payload: Mapping[str, Any], out_dir: Path, progress: Callable[..., None]) -> Any:
    """Run one planned fusion described by a job payload; return its FusionResult.

    Payload keys: ``kind`` (volume/surface), ``fusion_id``, ``fixed.paths``, ``moving.paths``,
    ``purpose``, ``operator``, ``seed``, ``gate`` (threshold dict).
    """
    kind = payload["kind"]
    fixed_paths = [Path(p) for p in payload["fixed"]["paths"]]
    moving_paths = [Path(p) for p in payload["moving"]["paths"]]
    gate = dict(payload.get("gate") or {})
    if kind == "volume":
        from fusion.gates import VolumeGateThresholds
        from fusion.volume_fusion import fuse_volumes

        return fuse_volumes(
            fixed_paths, moving_paths, out_dir, gate=VolumeGateThresholds(**gate),
            seed=int(payload.get("seed", 0)), purpose=payload.get("purpose", "fusion"),
            operator=payload.get("operator", ""), fusion_id=payload["fusion_id"], progress=progress,
        )
    if kind == "surface":
        from fusion.gates import SurfaceGateThresholds
        from fusion.surface_fusion import fuse_surface

        if len(moving_paths) != 1:
            raise ValueError(f"fusion {payload['fusion_id']}: a surface job needs one scan file, "
                             f"got {len(moving_paths)}")
        return fuse_surface(
            fixed_paths, moving_paths[0], out_dir, gate=SurfaceGateThresholds(**gate),
            seed=int(payload.get("seed", 0)), operator=payload.get("operator", ""),
            fusion_id=payload["fusion_id"], progress=progress,
        )
    if kind == "test":  # used by the pipeline's own tests (see tests/test_pipeline_worker.py)
        import importlib

        module, attr = str(payload["target"]).split(":")
        return getattr(importlib.import_module(module), attr)(payload, out_dir, progress)
    raise ValueError(f"unknown job kind {kind!r}; expected volume or surface")


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent (the forkserver, which itself exits
    when the serving process dies) goes away: a killed ``serve`` leaves no orphan fusion
    writing into a folder the next attempt will use."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(4)
    except (OSError, AttributeError):  # not Linux: the owner check in progress() remains
        pass


def _owner_gone(owner: str) -> bool:
    try:
        pid = int(owner.rsplit(":", 2)[1])
    except (ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _child_main(open_queue: Callable[[], JobQueue], job_id: int, owner: str, lease_s: float,
                payload: dict[str, Any], out_dir: str, log_level: int) -> None:
    """Entry point of a worker process: run the fusion, write result.json or error.json."""
    _die_with_parent()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    out = Path(out_dir)
    queue = open_queue()
    last = {"t": 0.0, "stage": ""}

    def progress(stage: str, fraction: float | None = None, *args: Any, **kwargs: Any) -> None:
        now = time.monotonic()
        stage = str(stage)
        if stage == last["stage"] and now - last["t"] < 0.5:
            return
        last.update(t=now, stage=stage)
        if _owner_gone(owner):
            log.warning("job %s: the serving process is gone; stopping", job_id)
            os._exit(3)
        try:
            queue.heartbeat(job_id, owner, lease_s, stage=stage,
                            progress=None if fraction is None else float(fraction))
        except LeaseLostError:
            log.warning("job %s: lease lost while in stage %s; stopping", job_id, stage)
            os._exit(3)
        except Exception:  # progress is best effort; the fusion goes on
            log.debug("job %s: progress not recorded", job_id, exc_info=True)

    try:
        if out.exists():
            shutil.rmtree(out)  # leftovers of an attempt that was killed
        out.mkdir(parents=True)
        progress("starting", 0.0)
        result = run_fusion(payload, out, progress)
        _write_json_atomic(out / RESULT_FILE, result.to_json())
        code = 0
    except BaseException as exc:  # the answer goes to error.json; the exit code says it failed
        name = type(exc).__name__
        permanent = name in PERMANENT_ERRORS or any(c.__name__ in PERMANENT_ERRORS for c in type(exc).__mro__)
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / ERROR_FILE, json.dumps({
            "error": f"{name}: {exc}", "permanent": permanent, "traceback": traceback.format_exc(),
        }))
        code = 1
    closer = getattr(queue, "close", None)
    if closer is not None:
        closer()
    os._exit(code)


def read_outcome(out_dir: Path, fusion_id: str, exitcode: int | None) -> ChildOutcome:
    """What a finished child left in ``out_dir``."""
    from fusion.records import FusionResult

    res = out_dir / RESULT_FILE
    if exitcode == 0 and res.is_file():
        result = FusionResult.from_json(res.read_text(encoding="utf-8"))
        if result.fusion_id != fusion_id:
            return ChildOutcome(False, error=f"{res} holds fusion {result.fusion_id}, expected {fusion_id}")
        return ChildOutcome(True, result=result)
    err = out_dir / ERROR_FILE
    if err.is_file():
        try:
            data = json.loads(err.read_text(encoding="utf-8"))
            return ChildOutcome(False, error=str(data.get("error")), permanent=bool(data.get("permanent")))
        except ValueError:
            pass
    how = f"killed by signal {-exitcode}" if exitcode is not None and exitcode < 0 else f"exit code {exitcode}"
    return ChildOutcome(False, error=f"worker process died ({how}) without an answer")


def completed_result(out_dir: Path, fusion_id: str) -> Any | None:
    """The FusionResult a previous attempt already wrote for this fusion, if complete."""
    res = out_dir / RESULT_FILE
    if not res.is_file():
        return None
    try:
        from fusion.records import FusionResult

        result = FusionResult.from_json(res.read_text(encoding="utf-8"))
    except Exception:
        return None
    if result.fusion_id != fusion_id:
        return None
    for o in result.outputs:  # every output still present (else: run again)
        if o.path and not Path(o.path).exists():
            return None
    return result


# ---------------------------------------------------------------------------------------
# the serving side
# ---------------------------------------------------------------------------------------
class WorkerPool:
    """``workers`` slots, each running one job at a time in a child process.

    Parameters
    ----------
    queue:
        The job queue (the embedded :class:`SqliteJobQueue` by default); each child opens it
        again with ``queue.opener()`` to report its progress.
    fusions_dir:
        Each job writes into ``fusions_dir / <fusion_id>``.
    finalize:
        Called in this process after a successful fusion; returns the final state.
    workers:
        Number of slots (``fusion.workers``).
    lease_s, heartbeat_s:
        Lease length and how often a slot renews it while a child runs.
    job_timeout_s:
        A child running longer is killed and the job fails (retried within its budget).
    poll_s:
        How often an idle slot looks for work (``wake()`` cuts the wait short).
    """

    def __init__(self, queue: JobQueue, fusions_dir: Path, finalize: FinalizeFn, *, workers: int = 1,
                 lease_s: float = 120.0, heartbeat_s: float = 2.0, job_timeout_s: float = 1800.0,
                 poll_s: float = 1.0, on_job_finished: Callable[[Job], None] | None = None) -> None:
        self.queue = queue
        self.fusions_dir = Path(fusions_dir)
        self.finalize = finalize
        self.workers = workers
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.job_timeout_s = job_timeout_s
        self.poll_s = poll_s
        self.on_job_finished = on_job_finished
        self._ctx = mp_context()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._children: dict[int, Any] = {}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        released = self.queue.release_owners(owner_alive)
        for j in released:
            log.warning("job %s (%s) re-queued: %s", j.job_id, j.payload.get("fusion_id"), j.error)
        self._stop.clear()
        if self._ctx.get_start_method() == "forkserver":
            # start the fork server now: it imports the fusion modules while data arrives,
            # not when the first fusion is due
            from multiprocessing import forkserver

            forkserver.ensure_running()
        for slot in range(self.workers):
            t = threading.Thread(target=self._loop, args=(slot,), name=f"dentfuse-worker-{slot}", daemon=True)
            t.start()
            self._threads.append(t)

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop taking jobs; give running children ``timeout_s`` to finish, then kill them
        (their jobs go back to the queue and run again after the next start)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            children = list(self._children.values())
        for p in children:
            if p.is_alive():
                p.kill()
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()

    def busy(self) -> int:
        with self._lock:
            return len(self._children)

    # -- the slot loop ---------------------------------------------------------------------
    def _loop(self, slot: int) -> None:
        owner = owner_name(slot)
        while not self._stop.is_set():
            try:
                expired = self.queue.release_expired()
                for j in expired:
                    log.warning("job %s re-queued: %s", j.job_id, j.error)
                job = self.queue.claim(owner, self.lease_s)
            except Exception:
                log.exception("worker %s: cannot read the job queue", owner)
                job = None
            if job is None:
                self._wake.wait(self.poll_s)
                self._wake.clear()
                continue
            try:
                self.run_job(job, owner)
            except LeaseLostError as exc:
                log.warning("job %s: %s", job.job_id, exc)
            except Exception as exc:  # finalisation failed: the job is retried
                log.exception("job %s failed while finalising", job.job_id)
                try:
                    self.queue.fail(job.job_id, owner, f"{type(exc).__name__}: {exc}")
                except LeaseLostError:
                    pass
            finally:
                if self.on_job_finished is not None:
                    done = self.queue.get(job.job_id)
                    if done is not None:
                        try:
                            self.on_job_finished(done)
                        except Exception:
                            log.exception("job %s: on_job_finished failed", job.job_id)

    def run_job(self, job: Job, owner: str) -> Job:
        """Run one claimed job to its end (in a child process), finalise it, record it."""
        fusion_id = str(job.payload["fusion_id"])
        out_dir = self.fusions_dir / fusion_id
        result = completed_result(out_dir, fusion_id)
        if result is not None:
            log.info("job %s: fusion %s already computed by an earlier attempt; finalising", job.job_id, fusion_id)
            self.queue.heartbeat(job.job_id, owner, self.lease_s, stage="fusion already computed")
        else:
            outcome = self._run_child(job, owner, out_dir)
            if self._stop.is_set() and not outcome.ok:
                # shutting down: the job goes back to the queue for the next start (no attempt used)
                return self.queue.release(job.job_id, owner, "stopped by shutdown before it finished")
            if not outcome.ok:
                log.warning("job %s (fusion %s) failed: %s", job.job_id, fusion_id, outcome.error)
                return self.queue.fail(job.job_id, owner, outcome.error, retry=not outcome.permanent)
            result = outcome.result

        def stage(name: str) -> None:
            self.queue.heartbeat(job.job_id, owner, self.lease_s, stage=name)

        state = self.finalize(job, result, stage)
        return self.queue.complete(job.job_id, owner, {
            "fusion_id": result.fusion_id, "verdict": result.verdict, "method": result.method,
            "out_dir": str(out_dir),
        }, state=state)

    def _run_child(self, job: Job, owner: str, out_dir: Path) -> ChildOutcome:
        proc = self._ctx.Process(
            target=_child_main,
            args=(self.queue.opener(), job.job_id, owner, self.lease_s, dict(job.payload), str(out_dir),
                  logging.getLogger().getEffectiveLevel()),
            name=f"dentfuse-fusion-{job.job_id}",
        )
        proc.start()
        with self._lock:
            self._children[job.job_id] = proc
        started = time.monotonic()
        try:
            while True:
                proc.join(timeout=self.heartbeat_s)
                if not proc.is_alive():
                    break
                if time.monotonic() - started > self.job_timeout_s:
                    proc.kill()
                    proc.join(timeout=10)
                    return ChildOutcome(False, error=f"fusion took longer than {self.job_timeout_s:.0f} s and was stopped")
                if self._stop.is_set() and time.monotonic() - started > 0:
                    # stop() decides when to kill; keep the lease meanwhile
                    pass
                self.queue.heartbeat(job.job_id, owner, self.lease_s)
        finally:
            with self._lock:
                self._children.pop(job.job_id, None)
        return read_outcome(out_dir, str(job.payload["fusion_id"]), proc.exitcode)
