"""One place that builds the running system from a :class:`~pipeline.config.Config`.

``App`` wires:

* the DICOM node (listener, store, index, stability monitor) of ``dicom_node``;
* the planner loop: persisted ``SeriesStable`` events -> once every series of the patient
  is stable, :func:`pipeline.planner.plan_fusions` over the node's index -> jobs in the
  :class:`~pipeline.jobs.JobQueue` (idempotent keys), then the events are acknowledged (at
  least once: a crash before the ack re-plans, which the job keys make harmless);
* the worker pool (:class:`~pipeline.worker.WorkerPool`, one process per fusion);
* ``finalize`` for each computed fusion, in this process: billing decision (ledgered), the
  report (PDF + HTML, its hash ledgered), forwarding of accepted outputs to the configured
  PACS through the node's :class:`~dicom_node.forward.ForwardQueue`;
* documentation follow-up: a documented decision gets a new report version, then its claim
  is exported (FHIR + X12) and the outbox delivers it.

Every step is idempotent by fusion id, so a restart at any moment neither duplicates a
fusion nor a decision.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pipeline.config import Config
from pipeline.inventory import IndexInventory
from pipeline.jobs import Job, JobSpec, SqliteJobQueue
from pipeline.planner import FusionPlanRules, PlannedFusion, explain_series, plan_fusions
from pipeline.report import FusionReport, LedgerRef, existing_versions, write_report
from pipeline.worker import WorkerPool

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.sqlite3"
DELIVERY_INTERVAL_S = 2.0  # how often the serving loop runs a claim delivery pass
FOLLOW_UP_S = 15.0  # how often it re-checks documented decisions that are not exported yet
FORWARD_KINDS = ("derived_series", "registration", "encapsulated_stl", "segmentation")


def fusions_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "fusions"


def reports_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "reports"


def open_job_queue(cfg: Config) -> SqliteJobQueue:
    return SqliteJobQueue(Path(cfg.data_dir) / JOBS_FILE, max_attempts=cfg.fusion.job_max_attempts)


def build_billing(cfg: Config, clock: Callable[[], Any] | None = None) -> Any:
    """The billing hook for ``cfg`` (ledger, rules, exports, outbox in the data directory)."""
    from billing_hooks.service import BillingHook

    b = cfg.billing
    provider = {"npi": b.provider_npi, "name": b.provider_name, "payer_id": b.payer_id, "payer_name": b.payer_name}
    return BillingHook(Path(cfg.data_dir), b.policy, b.delivery, provider=provider, clock=clock)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file (preamble + ``DICM``)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def decision_or_none(billing: Any, fusion_id: str) -> Any | None:
    """The current decision of a fusion, or None when the billing hook has none."""
    try:
        return billing.decision(fusion_id)
    except Exception as exc:  # UnknownFusionError (or a fake's None)
        if type(exc).__name__ == "UnknownFusionError":
            return None
        raise


def job_spec_for(cfg: Config, inventory: IndexInventory, plan: PlannedFusion) -> JobSpec:
    """The job of a planned fusion: its inputs' files, gate thresholds, seed and operator."""
    gate = cfg.fusion.surface_gate if plan.kind == "surface" else cfg.fusion.volume_gate
    aets = inventory.calling_ae_titles(plan.moving.series_instance_uid) or ["dentfuse"]

    def side(s: Any) -> dict[str, Any]:
        return {"series_instance_uid": s.series_instance_uid, "study_instance_uid": s.study_instance_uid,
                "modality": s.modality, "kind": s.kind, "acquisition_date": s.acquisition_date,
                "paths": list(s.paths)}

    payload = {
        "kind": plan.kind, "rule": plan.rule, "fusion_id": plan.fusion_id, "purpose": plan.purpose,
        "seed": cfg.fusion.seed, "operator": aets[0], "gate": dataclasses.asdict(gate),
        "fixed": side(plan.fixed), "moving": side(plan.moving), "notes": list(plan.notes),
    }
    return JobSpec(key=plan.key, kind=plan.kind, patient_key=plan.patient_key, payload=payload)


class Finisher:
    """What happens after a fusion was computed, in the serving process: the billing
    decision, the report (and its next version once documented), forwarding of accepted
    outputs to PACS, and the claim export. Every step is idempotent by fusion id.

    Works without the listener, so command-line tools can use it on a data directory.
    """

    def __init__(self, cfg: Config, billing: Any, forward: Any | None = None) -> None:
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.billing = billing
        self.forward = forward
        self._export_blocked: set[tuple[str, str]] = set()

    def finalize(self, job: Job, result: Any, stage: Callable[[str], None]) -> str:
        """Decide, report and forward one computed fusion; returns the job's final state."""
        fid = result.fusion_id
        stage("billing decision")
        decision = decision_or_none(self.billing, fid)
        if decision is None:
            decision = self.billing.record_fusion(result, operator=str(job.payload.get("operator", "")))
        stage("report")
        self.ensure_report(result, decision)
        if result.verdict == "accepted" and self.forward is not None and self.cfg.pacs.forward_outputs:
            stage("forwarding to PACS")
            self.forward_outputs(result)
        return "needs_review" if result.verdict == "needs_review" else "done"

    def ledger_refs(self, fusion_id: str) -> list[LedgerRef]:
        ledger = getattr(self.billing, "ledger", None)
        if ledger is None:
            return []
        return [LedgerRef(e.seq, e.kind, e.hash, e.recorded_at) for e in ledger.entries(fusion_id=fusion_id)]

    def ensure_report(self, result: Any, decision: Any) -> FusionReport | None:
        """Write and attach (ledger) a report unless the latest one already shows this
        decision state (status and rationale). Returns the new report or None."""
        rdir = reports_dir(self.data_dir) / result.fusion_id
        state = {"status": decision.status, "rationale": decision.rationale or ""}
        versions = existing_versions(rdir, result.fusion_id)
        if versions:
            try:
                meta = json.loads((rdir / f"{result.fusion_id}-R{versions[-1]}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            if meta.get("state") == state:
                if decision.report_id != meta.get("report_id") and decision.status != "exported":
                    # written but not attached (a crash in between): attach it now
                    self.billing.attach_report(result.fusion_id, report_id=meta["report_id"],
                                               path=Path(meta["pdf"]), sha256=meta["pdf_sha256"])
                return None
        report = write_report(result, decision, rdir, ledger=self.ledger_refs(result.fusion_id))
        meta = {"report_id": report.report_id, "pdf": str(report.pdf_path), "html": str(report.html_path),
                "pdf_sha256": report.pdf_sha256, "html_sha256": report.html_sha256, "state": state}
        (rdir / f"{report.report_id}.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        self.billing.attach_report(result.fusion_id, report_id=report.report_id, path=report.pdf_path,
                                   sha256=report.pdf_sha256)
        log.info("fusion %s: report %s written and ledgered", result.fusion_id, report.report_id)
        return report

    def forward_outputs(self, result: Any) -> int:
        """Queue the fusion's DICOM outputs for every configured PACS destination."""
        if self.forward is None:
            return 0
        n = 0
        for out in result.outputs:
            if out.kind not in FORWARD_KINDS:
                continue
            p = Path(out.path)
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            for f in files:
                if not is_dicom_file(f):  # e.g. the SHA256SUMS manifest of a derived series
                    continue
                for dest in self.cfg.pacs.destinations:
                    self.forward.enqueue(f, dest.name)
                    n += 1
        log.info("fusion %s: %d output instance(s) queued for PACS", result.fusion_id, n)
        return n

    def load_result(self, fusion_id: str) -> Any:
        from fusion.records import FusionResult

        return FusionResult.from_json((fusions_dir(self.data_dir) / fusion_id / "result.json").read_text("utf-8"))

    def document(self, fusion_id: str, rationale: str, clinician: str) -> Any:
        """Document the clinical rationale so that the claim carries a report that shows it.

        The next report version is written from the decision this documentation will
        produce (the billing hook's own re-decision, not a guess of ours) and ledgered; then
        the documentation is ledgered, which decides again and, when ready to bill, exports
        the claim with that report as its attachment. Returns the current decision.
        """
        rationale, clinician = rationale.strip(), clinician.strip()
        if not rationale or not clinician:
            raise ValueError("documentation needs a rationale and the documenting clinician")
        current = self.billing.decision(fusion_id)
        if current.status != "exported":
            preview = self.billing.preview_documentation(fusion_id, rationale=rationale, clinician=clinician)
            self.ensure_report(self.load_result(fusion_id), preview)
        self.billing.document(fusion_id, rationale=rationale, clinician=clinician)
        self.follow_up_documentation(only=fusion_id)
        return self.billing.decision(fusion_id)

    def review(self, fusion_id: str, *, accepted: bool, reviewer: str, note: str) -> tuple[Any, int]:
        """Record a person's review of a fusion's registration and follow it through.

        The billing hook ledgers the review and decides again; the report is re-issued for
        the new decision, and attaching it exports the claim when the fusion is now ready to
        bill (so the claim's attachment shows the review); an accepted fusion's DICOM
        outputs are then queued for the PACS (they were held back while the registration was
        doubtful), unless the gate rejected it. Returns the decision and the number of
        output instances queued.
        """
        decision = self.billing.review(fusion_id, accepted=accepted, reviewer=reviewer, note=note, export=False)
        result = self.load_result(fusion_id)
        self.ensure_report(result, decision)
        queued = 0
        if accepted and result.verdict != "rejected" and self.forward is not None and self.cfg.pacs.forward_outputs:
            queued = self.forward_outputs(result)
        return self.billing.decision(fusion_id), queued

    def follow_up_documentation(self, only: str | None = None) -> int:
        """For every documented decision still ready to bill (documented elsewhere, or its
        export was blocked): a report that shows the rationale, then the export.
        Returns how many claims were exported."""
        exported = 0
        for decision in self._decisions(only):
            if decision.status != "ready_to_bill" or not decision.rationale:
                continue
            marker = (decision.fusion_id, decision.decided_at)
            if marker in self._export_blocked:
                continue
            if not (fusions_dir(self.data_dir) / decision.fusion_id / "result.json").is_file():
                continue
            self.ensure_report(self.load_result(decision.fusion_id), decision)
            try:
                self.billing.export(decision.fusion_id)
                exported += 1
            except Exception as exc:  # ExportError / NotReadyError: recorded by the hook; tell once
                self._export_blocked.add(marker)
                log.warning("fusion %s is documented but its claim cannot be exported: %s", decision.fusion_id, exc)
        return exported

    def _decisions(self, only: str | None) -> list[Any]:
        if only is not None:
            d = decision_or_none(self.billing, only)
            return [d] if d is not None else []
        return list(self.billing.decisions())


def document_fusion(cfg: Config, fusion_id: str, rationale: str, clinician: str) -> Any:
    """Document a fusion's rationale on a data directory (with the report's next version
    and the claim export), without a running listener. Returns the decision."""
    billing = build_billing(cfg)
    try:
        return Finisher(cfg, billing).document(fusion_id, rationale, clinician)
    finally:
        billing.close()


def review_fusion(cfg: Config, fusion_id: str, *, accepted: bool, reviewer: str, note: str) -> tuple[Any, int]:
    """Review a fusion's registration on a data directory (decision, report, and for an
    accepted one its outputs queued in the persistent PACS forwarding queue, which
    ``dentfuse serve`` delivers). Returns the decision and the number of instances queued."""
    billing = build_billing(cfg)
    forward = build_forward_queue(cfg) if cfg.pacs.destinations and cfg.pacs.forward_outputs else None
    try:
        return Finisher(cfg, billing, forward).review(fusion_id, accepted=accepted, reviewer=reviewer, note=note)
    finally:
        billing.close()
        if forward is not None:
            forward.close()


def scu_tls(cfg: Config) -> Any:
    """A TLS client context for our SCU associations when a PACS destination asks for TLS."""
    if not any(d.tls for d in cfg.pacs.destinations):
        return None
    from dicom_node.scu import client_tls_context

    return client_tls_context(cfg.node.tls_ca_certificates, cfg.node.tls_certificate, cfg.node.tls_private_key)


def scu_timeouts(cfg: Config) -> Any:
    """Our SCU associations use the node's ACSE/DIMSE/network timeouts."""
    from dicom_node.scu import Timeouts

    return Timeouts(acse_s=cfg.node.acse_timeout_s, dimse_s=cfg.node.dimse_timeout_s,
                    network_s=cfg.node.network_timeout_s)


def build_forward_queue(cfg: Config, audit: Any | None = None) -> Any:
    """The node's PACS forwarding queue from the configuration (our AE title, the node's
    timeouts, TLS where a destination asks for it) writing an ``instances_sent`` audit row
    per batch to ``audit`` (the node's :class:`~dicom_node.audit.AuditTrail`) when given."""
    from dicom_node.forward import ForwardQueue, audit_sent_to

    return ForwardQueue(cfg.data_dir, cfg.pacs, cfg.node.ae_title, timeouts=scu_timeouts(cfg), tls=scu_tls(cfg),
                        on_sent=audit_sent_to(audit) if audit is not None else None)


class App:
    """The running dentfuse: node + planner + workers + billing + forwarding.

    Parameters
    ----------
    cfg:
        The configuration (``node.port`` 0 binds a free port).
    workers:
        Start the fusion worker pool (False: plan only, e.g. for tests of the planner).
    planner_interval_s:
        How often the planner looks at stability events (default: the stability monitor's
        ``check_interval_s``).
    """

    def __init__(self, cfg: Config, *, workers: bool = True, planner_interval_s: float | None = None,
                 billing: Any | None = None) -> None:
        from dicom_node.server import DicomNode

        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.node = DicomNode(cfg.node, cfg.stability, self.data_dir)
        self.jobs = open_job_queue(cfg)
        self.inventory = IndexInventory(self.node.index, self.node.stability_monitor)
        self.rules = FusionPlanRules.from_settings(cfg.fusion)
        self.billing = billing if billing is not None else build_billing(cfg)
        self.forward = None
        if cfg.pacs.destinations:
            self.forward = build_forward_queue(cfg, self.node.audit)
        self.finisher = Finisher(cfg, self.billing, self.forward)
        self.pool = WorkerPool(self.jobs, fusions_dir(self.data_dir), self.finalize, workers=cfg.fusion.workers,
                               on_job_finished=self._job_finished) if workers else None
        self.planner_interval_s = planner_interval_s or max(0.1, cfg.stability.check_interval_s)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_delivery = 0.0
        self._last_follow_up = 0.0
        self._lock = threading.RLock()
        self.port = 0
        self.node.stability_monitor.subscribe(lambda _ev: self._wake.set())

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> int:
        """Start listener, stability monitor, planner, workers and forwarding; return the port."""
        self.port = self.node.start()
        if self.forward is not None:
            self.forward.start(poll_interval_s=2.0)
        if self.pool is not None:
            self.pool.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dentfuse-planner", daemon=True)
        self._thread.start()
        log.info("dentfuse running on port %d (data %s, %d worker(s))", self.port, self.data_dir,
                 self.cfg.fusion.workers)
        return self.port

    def stop(self, worker_grace_s: float = 10.0) -> None:
        """Stop taking new work, let running fusions finish (up to ``worker_grace_s``, then
        their jobs are re-queued for the next start), stop forwarding, close the node."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.node.stop()  # no new instances while the rest winds down
        if self.pool is not None:
            self.pool.stop(timeout_s=worker_grace_s)
        if self.forward is not None:
            self.forward.stop()
        self.close()

    def close(self) -> None:
        for closer in (getattr(self.forward, "close", None), getattr(self.billing, "close", None),
                       self.node.close, self.jobs.close):
            if closer is None:
                continue
            try:
                closer()
            except Exception:
                log.exception("error while closing")

    def run_until_signal(self, on_started: Callable[["App"], None] | None = None,
                         stop_event: threading.Event | None = None) -> int:
        """Run until SIGINT/SIGTERM (or ``stop_event``); shut down cleanly; return 0."""
        stop = stop_event or threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            def _on_signal(signum: int, _frame: Any) -> None:
                log.info("signal %d: shutting down", signum)
                stop.set()

            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, _on_signal)
        try:
            self.start()
            if on_started is not None:
                on_started(self)
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    # -- the planner loop -------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception:
                log.exception("planner step failed; trying again")
            self._wake.wait(self.planner_interval_s)
            self._wake.clear()

    def step(self) -> None:
        """One round: plan from stability events; every few seconds deliver the claim
        outbox; every ``FOLLOW_UP_S`` re-check documented decisions (a safety net: the
        ``document`` command itself writes the report and exports)."""
        self.process_stability_events()
        now = time.monotonic()
        if now - self._last_follow_up >= FOLLOW_UP_S:
            self._last_follow_up = now
            try:
                self.follow_up_documentation()
            except Exception:
                log.exception("documentation follow-up failed; trying again later")
        if now - self._last_delivery >= DELIVERY_INTERVAL_S:
            self._last_delivery = now
            try:
                self.billing.deliver_pending()
            except Exception:
                log.exception("claim delivery round failed; the outbox retries")

    def _job_finished(self, job: Job) -> None:
        self._wake.set()

    def process_stability_events(self) -> int:
        """Plan fusions for every patient with pending stability events; ack the events.
        Returns the number of new jobs."""
        monitor = self.node.stability_monitor
        events = monitor.pending_events()
        if not events:
            return 0
        created = 0
        by_patient: dict[str, list[Any]] = {}
        for ev in events:
            by_patient.setdefault(ev.patient_key, []).append(ev)
        for patient, evs in by_patient.items():
            if not self.patient_quiet(patient):
                continue  # another series of this patient is still arriving: plan once it is stable
            try:
                created += sum(1 for _job, new in self.plan_patient(patient) if new)
            except Exception:
                log.exception("planning for patient %s failed; the events stay pending", patient)
                continue
            for ev in evs:
                monitor.ack(ev.event_id)
        return created

    def patient_quiet(self, patient_key: str) -> bool:
        """Every series of the patient is stable. Planning waits for that, so that series
        arriving together are planned together (a scan is paired with the CBCT closest in
        date among all of them, not with whichever CBCT finished arriving first)."""
        monitor = self.node.stability_monitor
        return all(monitor.is_stable(s.series_instance_uid) for s in self.node.index.series(patient_key=patient_key))

    def plan_patient(self, patient_key: str) -> list[tuple[Job, bool]]:
        """Plan and enqueue the fusions of one patient (idempotent)."""
        series = self.inventory.stable_series(patient_key)
        out = []
        for plan in plan_fusions(patient_key, series, self.rules):
            job, created = self.jobs.enqueue(self.job_spec(plan))
            if created:
                log.info("planned fusion %s (%s) for patient %s: %s + %s (job %d)", plan.fusion_id, plan.rule,
                         patient_key, plan.fixed.series_instance_uid, plan.moving.series_instance_uid, job.job_id)
            out.append((job, created))
        if any(new for _j, new in out) and self.pool is not None:
            self.pool.wake()
        return out

    def explain_patient(self, patient_key: str) -> dict[str, str]:
        """Series UID -> "input" or why the planner leaves it out (2D, duplicate, ...)."""
        return explain_series(patient_key, self.inventory.stable_series(patient_key))

    def job_spec(self, plan: PlannedFusion) -> JobSpec:
        return job_spec_for(self.cfg, self.inventory, plan)

    # -- after a fusion (delegated to the Finisher) -----------------------------------------
    def finalize(self, job: Job, result: Any, stage: Callable[[str], None]) -> str:
        with self._lock:
            return self.finisher.finalize(job, result, stage)

    def document(self, fusion_id: str, rationale: str, clinician: str) -> Any:
        with self._lock:
            return self.finisher.document(fusion_id, rationale, clinician)

    def follow_up_documentation(self, only: str | None = None) -> int:
        with self._lock:
            return self.finisher.follow_up_documentation(only)

    def load_result(self, fusion_id: str) -> Any:
        return self.finisher.load_result(fusion_id)

    # -- waiting (demo, tests) ------------------------------------------------------------------
    def idle(self) -> bool:
        """Nothing left to do: every series stable and planned, no queued or running job."""
        for s in self.node.index.series():
            if not self.node.stability_monitor.is_stable(s.series_instance_uid):
                return False
        if self.node.stability_monitor.pending_events(limit=1):
            return False
        c = self.jobs.counts()
        return c["queued"] == 0 and c["running"] == 0

    def wait_idle(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(poll_s)
        return False


def run_app(cfg: Config, on_started: Callable[[App], None] | None = None,
            stop_event: threading.Event | None = None) -> int:
    """``dentfuse serve``: build the :class:`App` from ``cfg`` and run it until SIGINT/SIGTERM
    (or ``stop_event``). Configuration problems become :class:`click.ClickException`."""
    import click

    from dicom_node.errors import DicomNodeError

    try:
        app = App(cfg)
    except DicomNodeError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        return app.run_until_signal(on_started=on_started, stop_event=stop_event)
    except DicomNodeError as exc:
        raise click.ClickException(str(exc)) from None
