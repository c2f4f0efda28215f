"""The billing hook: record fusions, decide D0395, keep the ledger, export and deliver.

Usage (the pipeline builds one per data directory)::

    hook = BillingHook(cfg.data_dir, cfg.billing.policy, cfg.billing.delivery,
                       provider={"npi": ..., "name": ..., "payer_id": ..., "payer_name": ...})
    decision = hook.record_fusion(result, operator="STORESCU")
    hook.attach_report(result.fusion_id, report_id="RPT-...", path=pdf, sha256=digest)
    hook.document(result.fusion_id, rationale="implant planning ...", clinician="Dr A")
    hook.deliver_pending()

All state lives in the ledger (the latest ``decision`` entry of a fusion is its current
decision); the outbox table shares its database and its transactions.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

from billing_hooks import fhir, rules, x12
from billing_hooks.companions import suggest_companions
from billing_hooks.decision import CODE_LABELS, BillingDecision
from billing_hooks.errors import BillingError, ExportError, NotReadyError, UnknownFusionError
from billing_hooks.ledger import Ledger, LedgerEntry, canonical_json, iso, parse_iso, sha256_file, utc_now
from billing_hooks.outbox import Outbox, _atomic_write
from billing_hooks.parties import PatientInfo, ProviderInfo, software_version
from billing_hooks.policy import DeliverySettings, PayerPolicy
from fusion.records import FusionResult

log = logging.getLogger(__name__)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")
_FEE = re.compile(r"^\s*(D\d{4})\s*=\s*(\d+(?:\.\d{1,2})?)\s*$")


def claim_line_key(input_set_key: str, code: str) -> str:
    """Idempotency key of a claim line: the same input set and code always give the same key."""
    return "DFL-" + hashlib.sha256(f"{input_set_key}|{code}".encode()).hexdigest()[:40].upper()


def claim_id_for(input_set_key: str, code: str) -> str:
    """Claim identifier (CLM01, at most 20 characters), stable for the input set and code."""
    return "DF" + hashlib.sha256(f"claim|{input_set_key}|{code}".encode()).hexdigest()[:18].upper()


def parse_fee_schedule(entries: tuple[str, ...]) -> dict[str, float]:
    """``("D0395=350.00", ...)`` -> ``{"D0395": 350.0}``; raises ExportError on a bad entry."""
    fees: dict[str, float] = {}
    for e in entries:
        m = _FEE.match(e)
        if not m:
            raise ExportError(f"billing.policy.fee_schedule entry {e!r} is not CODE=amount (e.g. D0395=350.00)")
        fees[m[1]] = float(m[2])
    return fees


def _jsonable(v: Any) -> Any:
    """Make a FusionResult dict safe for canonical JSON (non-finite floats become text)."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):
        return _jsonable(v.tolist())
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


Provider = ProviderInfo  # the name the pipeline looks for
LEDGER_RELPATH = Path("billing") / "ledger.sqlite"


def ledger_path(data_dir: Path) -> Path:
    """Where the ledger (and the outbox) of a data directory lives."""
    return Path(data_dir) / LEDGER_RELPATH


class BillingHook:
    """Decide, record, export and deliver D0395 claims for fusions.

    Parameters
    ----------
    data_dir:
        The dentfuse data directory; the ledger is ``data_dir/billing/ledger.sqlite`` and
        exports go to ``data_dir/exports/<fusion_id>/``.
    policy, delivery:
        ``cfg.billing.policy`` and ``cfg.billing.delivery``.
    provider:
        Billing provider and payer: a :class:`ProviderInfo` or a mapping with at least
        ``npi``, ``name``, ``payer_id``, ``payer_name``.
    clock:
        Returns the current aware UTC datetime; injectable for tests.
    patient_resolver:
        Optional ``patient_key -> PatientInfo`` from the practice-management system; by
        default claims carry only the DICOM patient ID.
    """

    def __init__(self, data_dir: Path, policy: PayerPolicy, delivery: DeliverySettings, *,
                 provider: ProviderInfo | Mapping[str, Any], clock: Callable[[], datetime] | None = None,
                 patient_resolver: Callable[[str], PatientInfo] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.policy = policy
        self.delivery = delivery
        self.provider = ProviderInfo.from_mapping(provider)
        self._clock = clock or utc_now
        self._patient_resolver = patient_resolver
        self.ledger = Ledger(ledger_path(self.data_dir), synchronous=delivery.ledger_synchronous,
                             clock=self._clock, base_dir=self.data_dir)
        self.outbox = Outbox(self.ledger, delivery, self.data_dir)

    @classmethod
    def from_config(cls, cfg: Any, *, clock: Callable[[], datetime] | None = None,
                    patient_resolver: Callable[[str], PatientInfo] | None = None) -> "BillingHook":
        """Build from the pipeline configuration (``cfg.data_dir`` and ``cfg.billing``)."""
        b = cfg.billing
        provider = ProviderInfo(npi=b.provider_npi, name=b.provider_name, payer_id=b.payer_id,
                                payer_name=b.payer_name)
        return cls(Path(cfg.data_dir), b.policy, b.delivery, provider=provider, clock=clock,
                   patient_resolver=patient_resolver)

    def close(self) -> None:
        self.ledger.close()

    def __enter__(self) -> "BillingHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- paths -------------------------------------------------------------------------
    def _rel(self, path: str | Path) -> str:
        p = Path(path)
        try:
            return p.resolve().relative_to(self.data_dir.resolve()).as_posix()
        except ValueError:
            return str(p.resolve())

    def _abs(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else self.data_dir / p

    # -- reading state -----------------------------------------------------------------
    def _latest(self, fusion_id: str, kind: str) -> LedgerEntry | None:
        found = self.ledger.entries(fusion_id=fusion_id, kind=kind)
        return found[-1] if found else None

    def decision(self, fusion_id: str) -> BillingDecision | None:
        """The current decision of a fusion, or None when the fusion was never recorded."""
        e = self._latest(fusion_id, "decision")
        return BillingDecision.from_dict(e.event) if e is not None else None

    def require_decision(self, fusion_id: str) -> BillingDecision:
        """The current decision of a fusion. Raises :class:`UnknownFusionError`."""
        d = self.decision(fusion_id)
        if d is None:
            raise UnknownFusionError(fusion_id)
        return d

    def decisions(self) -> list[BillingDecision]:
        """The current decision of every recorded fusion, in the order they were recorded."""
        latest: dict[str, BillingDecision] = {}
        for e in self.ledger.entries(kind="decision"):
            latest.pop(e.fusion_id, None)
            latest[e.fusion_id] = BillingDecision.from_dict(e.event)
        order = [e.fusion_id for e in self.ledger.entries(kind="fusion_recorded")]
        return [latest[f] for f in order if f in latest]

    def fusion_result(self, fusion_id: str) -> FusionResult:
        e = self._latest(fusion_id, "fusion_recorded")
        if e is None:
            raise UnknownFusionError(fusion_id)
        return FusionResult.from_dict(e.event["result"])

    def _documentation(self, fusion_id: str) -> tuple[str, str]:
        e = self._latest(fusion_id, "documentation")
        return (e.event["rationale"], e.event["clinician"]) if e else ("", "")

    def _review(self, fusion_id: str) -> rules.ReviewRecord | None:
        e = self._latest(fusion_id, "review")
        if e is None:
            return None
        return rules.ReviewRecord(bool(e.event.get("accepted")), str(e.event.get("reviewer", "")),
                                  str(e.event.get("note", "")), e.recorded_at)

    def _report(self, fusion_id: str) -> Mapping[str, Any] | None:
        e = self._latest(fusion_id, "report_attached")
        return e.event if e else None

    def _prior_claims(self, patient_key: str) -> tuple[rules.PriorClaim, ...]:
        latest: dict[str, BillingDecision] = {}
        claimed_at: dict[str, str] = {}  # when the fusion first entered the claim track
        for e in self.ledger.entries(kind="decision", patient_key=patient_key):
            d = BillingDecision.from_dict(e.event)
            latest[e.fusion_id] = d
            if d.status in rules.CLAIM_TRACK:
                claimed_at.setdefault(e.fusion_id, d.decided_at)
        return tuple(rules.PriorClaim(d.fusion_id, d.input_set_key, d.code or "", d.status,
                                      parse_iso(claimed_at[d.fusion_id]))
                     for d in latest.values() if d.status in rules.CLAIM_TRACK and d.code)

    # -- deciding ----------------------------------------------------------------------
    def _output_checks(self, result: FusionResult) -> tuple[rules.OutputCheck, ...]:
        out = []
        for o in result.outputs:
            p = self._abs(o.path) if o.path else None
            exists = bool(p and p.exists())
            actual = sha256_file(p) if exists and p is not None else ""
            out.append(rules.OutputCheck(o.kind, o.path, o.sha256, exists, actual))
        return tuple(out)

    def _decide(self, result: FusionResult, checks: tuple[rules.OutputCheck, ...], ledgered: frozenset[str],
                now: datetime, rationale: str, clinician: str, report_id: str) -> BillingDecision:
        prior = tuple(c for c in self._prior_claims(result.patient_key) if c.fusion_id != result.fusion_id)
        ctx = rules.RuleContext(result, self.policy, now, checks, ledgered, prior, rationale, clinician,
                                self._review(result.fusion_id))
        results = rules.evaluate(ctx)
        status = rules.status_of(results)
        code = rules.procedure_code(result) if status in ("needs_documentation", "ready_to_bill") else None
        failed = [r for r in results if not r.passed]
        if failed:
            reasons = tuple(r.reason for r in failed)
        else:
            reasons = (f"All D0395 rules hold; {code} ({CODE_LABELS[code]}) is ready to bill.",)  # type: ignore[index]
        companions = suggest_companions(result, self.policy) if status != "not_eligible" else ()
        dup = next((r.evidence.get("earlier_claims", [""])[0] for r in failed if r.rule_id == "r6_billed_once"), "")
        return BillingDecision(fusion_id=result.fusion_id, patient_key=result.patient_key,
                               input_set_key=result.input_set_key, code=code, status=status,  # type: ignore[arg-type]
                               rules=results, reasons=reasons, companions=companions, decided_at=iso(now),
                               rationale=rationale, clinician=clinician, report_id=report_id, duplicate_of=dup)

    def record_fusion(self, result: FusionResult, *, operator: str = "") -> BillingDecision:
        """Ledger a fusion with its evidence, decide, and ledger the decision.

        Idempotent: recording the same fusion id again returns the existing decision and
        adds a ``duplicate_delivery`` note; another fusion of an input set that is already
        claimed is recorded but not eligible (rule 6).
        """
        if not result.fusion_id or not _SAFE_ID.match(result.fusion_id):
            raise BillingError(f"fusion id {result.fusion_id!r} must be 1-50 letters, digits, '.', '_' or '-'")
        checks = self._output_checks(result)  # hashing happens outside the write transaction
        body = _jsonable(result.to_dict())
        event_sha = hashlib.sha256(canonical_json(body).encode()).hexdigest()
        now = self._clock()
        with self.ledger.transaction():
            existing = self._latest(result.fusion_id, "decision")
            if existing is not None:
                first = self._latest(result.fusion_id, "fusion_recorded")
                same = bool(first and first.event.get("event_sha256") == event_sha)
                self.ledger.append("duplicate_delivery", {
                    "event_sha256": event_sha, "same_content": same, "operator": operator or result.operator,
                    "note": "the same fusion was delivered again; it is billed once"},
                    fusion_id=result.fusion_id, patient_key=result.patient_key, at=now)
                log.info("fusion %s delivered again (same content: %s); keeping its decision", result.fusion_id, same)
                return BillingDecision.from_dict(existing.event)
            files = [{"path": self._rel(self._abs(c.path)), "sha256": c.actual_sha256, "role": f"output:{c.kind}"}
                     for c in checks if c.exists and c.actual_sha256 == c.declared_sha256]
            self.ledger.append("fusion_recorded", {
                "result": body, "event_sha256": event_sha, "operator": operator or result.operator,
                "input_set_key": result.input_set_key, "files": files},
                fusion_id=result.fusion_id, patient_key=result.patient_key, at=now)
            decision = self._decide(result, checks, frozenset(f["sha256"] for f in files), now, "", "", "")
            self.ledger.append("decision", decision.to_dict(), fusion_id=result.fusion_id,
                               patient_key=result.patient_key, at=now)
        log.info("fusion %s: %s %s (failed: %s)", result.fusion_id, decision.status, decision.code or "-",
                 ",".join(decision.failed) or "none")
        return decision

    def preview_documentation(self, fusion_id: str, *, rationale: str, clinician: str) -> BillingDecision:
        """The decision that :meth:`document` would reach with this rationale, without
        recording anything (the pipeline renders it in the report version that shows the
        rationale before the claim is exported)."""
        return self._decide_again(fusion_id, rationale, clinician)

    def _decide_again(self, fusion_id: str, rationale: str, clinician: str) -> BillingDecision:
        """The decision for a recorded fusion now (outputs re-checked, latest review and
        report), with this documentation."""
        result = self.fusion_result(fusion_id)
        checks = self._output_checks(result)
        recorded = self._latest(fusion_id, "fusion_recorded")
        ledgered = frozenset(f["sha256"] for f in recorded.event.get("files", ())) if recorded else frozenset()
        report = self._report(fusion_id)
        return self._decide(result, checks, ledgered, self._clock(), rationale, clinician,
                            report["report_id"] if report else "")

    def attach_report(self, fusion_id: str, *, report_id: str, path: Path, sha256: str) -> None:
        """Ledger the fusion report; ``report_id`` is the claim attachment control number.

        Raises
        ------
        UnknownFusionError, BillingError
            Unknown fusion, unsafe report id, missing file or hash mismatch.
        """
        current = self.require_decision(fusion_id)
        if not _SAFE_ID.match(report_id):
            raise BillingError(f"report id {report_id!r} must be 1-50 letters, digits, '.', '_' or '-' "
                               "(it becomes the claim attachment control number)")
        p = Path(path)
        if not p.is_file():
            raise BillingError(f"report {p} for fusion {fusion_id} does not exist; write the report first")
        actual = sha256_file(p)
        if actual != sha256.lower():
            raise BillingError(f"report {p} has sha256 {actual}, not {sha256}; it changed after it was written")
        prev = self._report(fusion_id)
        if prev and prev["report_id"] == report_id and prev["sha256"] == actual:
            return
        rel = self._rel(p)
        if current.status == "exported":  # a later report version; the sent claim keeps its attachment
            self.ledger.append("report_attached", {
                "report_id": report_id, "path": rel, "sha256": actual, "size": p.stat().st_size,
                "after_export": True, "claim_attachment": current.report_id,
                "files": [{"path": rel, "sha256": actual, "role": "report"}]},
                fusion_id=fusion_id, patient_key=current.patient_key)
            return
        with self.ledger.transaction():
            self.ledger.append("report_attached", {
                "report_id": report_id, "path": rel, "sha256": actual, "size": p.stat().st_size,
                "files": [{"path": rel, "sha256": actual, "role": "report"}]},
                fusion_id=fusion_id, patient_key=current.patient_key)
            d = dataclasses.replace(current, report_id=report_id)
            self.ledger.append("decision", d.to_dict(), fusion_id=fusion_id, patient_key=current.patient_key)
        self._maybe_export(fusion_id)

    def document(self, fusion_id: str, *, rationale: str, clinician: str) -> BillingDecision:
        """Ledger the clinical rationale (rule 8) and decide again (needs_documentation ->
        ready_to_bill); when a report is attached, export the claim with the latest report
        as its attachment (the pipeline attaches a report version showing the rationale
        before documenting, see :meth:`preview_documentation` for the preview it is written from).

        Raises
        ------
        UnknownFusionError, BillingError, NotReadyError
        """
        current = self.require_decision(fusion_id)
        if not rationale.strip():
            raise BillingError("the rationale is empty; describe why the fusion was clinically necessary")
        if not clinician.strip():
            raise BillingError("name the clinician who documents the rationale (--clinician)")
        if current.status == "exported":
            raise NotReadyError(f"fusion {fusion_id} was already exported; its claim documentation cannot change")
        with self.ledger.transaction():
            self.ledger.append("documentation", {"rationale": rationale.strip(), "clinician": clinician.strip()},
                               fusion_id=fusion_id, patient_key=current.patient_key)
            decision = self.preview_documentation(fusion_id, rationale=rationale.strip(), clinician=clinician.strip())
            self.ledger.append("decision", decision.to_dict(), fusion_id=fusion_id, patient_key=current.patient_key)
        self._maybe_export(fusion_id)
        return self.require_decision(fusion_id)

    def review(self, fusion_id: str, *, accepted: bool, reviewer: str, note: str,
               export: bool = True) -> BillingDecision:
        """Ledger a person's review of the registration and decide again (rule 4).

        Accepting a registration the gate flagged (``needs_review``) lets the fusion go on
        to documentation and billing; rejecting one makes it not eligible, whatever its
        gate said. A registration the gate rejected stays not eligible either way. The
        latest review counts; every review stays in the ledger.

        A decision that becomes ready to bill is exported with the latest report attached,
        unless ``export`` is False: then the claim goes out when the caller attaches the
        report that shows the review (:meth:`attach_report` exports).

        Raises
        ------
        UnknownFusionError, BillingError, NotReadyError
            Unknown fusion, reviewer or note missing, or the claim was already exported.
        """
        current = self.require_decision(fusion_id)
        if not reviewer.strip():
            raise BillingError("name the person who reviewed the registration (--reviewer)")
        if not note.strip():
            raise BillingError("say what the review found (--note), e.g. which QA pictures were checked")
        if current.status == "exported":
            raise NotReadyError(f"fusion {fusion_id} was already exported; its review cannot change the claim")
        result = self.fusion_result(fusion_id)
        with self.ledger.transaction():
            self.ledger.append("review", {"accepted": bool(accepted), "reviewer": reviewer.strip(),
                                          "note": note.strip(), "gate_verdict": result.verdict,
                                          "status_before": current.status},
                               fusion_id=fusion_id, patient_key=current.patient_key)
            decision = self._decide_again(fusion_id, *self._documentation(fusion_id))
            self.ledger.append("decision", decision.to_dict(), fusion_id=fusion_id, patient_key=current.patient_key)
        log.info("fusion %s reviewed (%s): now %s", fusion_id, "accepted" if accepted else "rejected", decision.status)
        if export:
            self._maybe_export(fusion_id)
        return self.require_decision(fusion_id)

    def _maybe_export(self, fusion_id: str) -> None:
        d = self.require_decision(fusion_id)
        if d is None or d.status != "ready_to_bill" or self._report(fusion_id) is None:
            return
        try:
            self.export(fusion_id)
        except ExportError as exc:
            self.ledger.append("export_blocked", {"reason": str(exc)}, fusion_id=fusion_id, patient_key=d.patient_key)
            log.warning("fusion %s is ready to bill but could not be exported: %s", fusion_id, exc)

    # -- exporting ---------------------------------------------------------------------
    def export(self, fusion_id: str) -> dict[str, Path]:
        """Write the FHIR bundle and the 837D into ``data_dir/exports/<fusion_id>/``, ledger
        them with their hashes, mark the decision exported and queue their delivery, all in
        one transaction. Returns ``{"fhir": path, "x12": path}``; exporting again returns
        the same files.

        Raises
        ------
        NotReadyError
            The decision is not ready to bill.
        ExportError
            No report attached, no fee for the code, or provider data missing.
        """
        d = self.require_decision(fusion_id)
        if d.status == "exported":
            e = self._latest(fusion_id, "exported")
            assert e is not None
            return {f["role"]: self._abs(f["path"]) for f in e.event["files"]}
        if d.status != "ready_to_bill":
            raise NotReadyError(f"fusion {fusion_id} is {d.status.replace('_', ' ')}, not ready to bill: "
                                + " ".join(d.reasons))
        report = self._report(fusion_id)
        if report is None:
            raise ExportError(f"fusion {fusion_id} has no fusion report attached; attach the report first "
                              "(its id is the claim attachment control number)")
        fees = parse_fee_schedule(self.policy.fee_schedule)
        if d.code not in fees:
            raise ExportError(f"no fee for {d.code} in billing.policy.fee_schedule; add e.g. \"{d.code}=350.00\"")
        result = self.fusion_result(fusion_id)
        pid, _, issuer = result.patient_key.partition("^")
        patient = (self._patient_resolver(result.patient_key) if self._patient_resolver
                   else PatientInfo(patient_id=pid, issuer=issuer))
        report_path = self._abs(report["path"])
        if not report_path.is_file() or sha256_file(report_path) != report["sha256"]:
            raise ExportError(f"report {report_path} of fusion {fusion_id} is missing or changed since it was attached")
        sha1 = base64.b64encode(hashlib.sha1(report_path.read_bytes()).digest()).decode()
        assert d.code is not None
        key = claim_line_key(d.input_set_key, d.code)
        claim_id = claim_id_for(d.input_set_key, d.code)
        now = self._clock()
        service_date = (parse_iso(result.created_at) if result.created_at else now).date().isoformat()
        out_dir = self.data_dir / "exports" / fusion_id
        with self.ledger.transaction() as conn:
            control = int(conn.execute("SELECT COUNT(*) FROM ledger WHERE kind='exported'").fetchone()[0]) + 1
            bundle = fhir.build_claim_bundle(
                d, result, provider=self.provider, patient=patient,
                report=fhir.ReportRef(report["report_id"], report["sha256"], sha1, int(report["size"]),
                                      report_path.name),
                claim_id=claim_id, created=now, service_date=service_date, line_keys={d.code: key}, fees=fees,
                currency=self.policy.currency, software_version=software_version())
            text837 = x12.build_837d(d, provider=self.provider, patient=patient, claim_id=claim_id,
                                     attachment_control_number=report["report_id"], line_key=key, fee=fees[d.code],
                                     service_date=service_date, control_number=control, created=now)
            fhir_bytes = (json.dumps(bundle, indent=2, sort_keys=True) + "\n").encode()
            x12_bytes = text837.encode("ascii", "replace")
            paths = {"fhir": out_dir / "claim.fhir.json", "x12": out_dir / "claim.837"}
            _atomic_write(paths["fhir"], fhir_bytes)
            _atomic_write(paths["x12"], x12_bytes)
            files = [{"path": self._rel(paths[r]), "sha256": hashlib.sha256(b).hexdigest(), "role": r}
                     for r, b in (("fhir", fhir_bytes), ("x12", x12_bytes))]
            self.ledger.append("exported", {
                "claim_id": claim_id, "code": d.code, "idempotency_key": key, "interchange_control_number": control,
                "attachment_control_number": report["report_id"], "fee": fees[d.code],
                "currency": self.policy.currency, "files": files}, fusion_id=fusion_id, patient_key=d.patient_key, at=now)
            exported = dataclasses.replace(d, status="exported", decided_at=iso(now), report_id=report["report_id"],
                                           reasons=d.reasons + (f"Claim {claim_id} exported (FHIR R4 bundle and "
                                                                f"X12 837D) and queued for delivery.",))
            self.ledger.append("decision", exported.to_dict(), fusion_id=fusion_id, patient_key=d.patient_key, at=now)
            for f in files:
                self.outbox.enqueue(conn, fusion_id=fusion_id, artifact=f["role"], path=f["path"], sha256=f["sha256"],
                                    media_type="application/fhir+json" if f["role"] == "fhir" else "application/edi-x12",
                                    idempotency_key=key, now=now)
        log.info("fusion %s exported as claim %s", fusion_id, claim_id)
        return paths

    # -- delivering --------------------------------------------------------------------
    def deliver_pending(self, now: datetime | None = None) -> dict[str, int]:
        """Attempt every due outbox row once; returns counts (delivered, retry, dead, waiting)."""
        return self.outbox.deliver_pending(now or self._clock())
