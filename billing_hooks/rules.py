"""The D0395 rules of DESIGN.md as explicit rule objects.

Every rule has an id, a plain-language title, and a check that returns a
:class:`~billing_hooks.decision.RuleResult` with a reason a billing manager can read and
the evidence the rule looked at. Rules are pure: file hashes, earlier claims and the
documentation status are gathered by the service and passed in a :class:`RuleContext`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from billing_hooks.decision import RuleResult
from billing_hooks.policy import PayerPolicy
from fusion.records import FusionInput, FusionResult

VOLUME_MODALITIES = frozenset({"CT", "MR", "CBCT"})
MODALITY_WORDS = {"CT": "CT/CBCT", "CBCT": "CBCT", "MR": "MR"}
CLAIM_TRACK = frozenset({"needs_documentation", "ready_to_bill", "exported"})


@dataclass(frozen=True)
class OutputCheck:
    """What the service found on disk for one fusion output."""

    kind: str
    path: str
    declared_sha256: str
    exists: bool
    actual_sha256: str


@dataclass(frozen=True)
class PriorClaim:
    """An earlier decision of the same patient that is on the claim track."""

    fusion_id: str
    input_set_key: str
    code: str
    status: str
    decided_at: datetime


@dataclass(frozen=True)
class ReviewRecord:
    """A person's review of the registration (``dentfuse review``): the latest one counts."""

    accepted: bool
    reviewer: str
    note: str
    reviewed_at: str  # ISO-8601 UTC

    def to_evidence(self) -> dict[str, object]:
        return {"accepted": self.accepted, "reviewer": self.reviewer, "note": self.note,
                "reviewed_at": self.reviewed_at}


@dataclass(frozen=True)
class RuleContext:
    result: FusionResult
    policy: PayerPolicy
    now: datetime
    output_checks: tuple[OutputCheck, ...] = ()
    ledgered_output_hashes: frozenset[str] = frozenset()
    prior_claims: tuple[PriorClaim, ...] = ()
    rationale: str = ""
    clinician: str = ""
    review: ReviewRecord | None = None


@dataclass(frozen=True)
class Rule:
    """One D0395 rule: ``check(context)`` returns its :class:`RuleResult`."""

    rule_id: str
    title: str
    check: Callable[[RuleContext], RuleResult] = field(repr=False)

    def evaluate(self, ctx: RuleContext) -> RuleResult:
        return self.check(ctx)


def _name(i: FusionInput) -> str:
    if i.kind == "surface":
        return "surface scan " + (i.source_path.rsplit("/", 1)[-1] if i.source_path else i.series_instance_uid or "?")
    what = MODALITY_WORDS.get(i.modality.upper(), i.modality or "unknown modality")
    if i.kind == "2d":
        what = f"2D {i.modality or 'image'}"
    date = f" of {i.acquisition_date[:4]}-{i.acquisition_date[4:6]}-{i.acquisition_date[6:8]}" if len(i.acquisition_date) == 8 else ""
    return f"{what} series {i.series_instance_uid or '?'}{date}"


def counts_as_3d(i: FusionInput, policy: PayerPolicy) -> tuple[bool, str]:
    """Whether one input counts as a 3D input for D0395, and why (plain language)."""
    if i.kind == "2d":
        return False, f"{_name(i)} is a 2D image; 2D images never count"
    if i.kind == "surface":
        if not policy.surface_scans_count_as_3d:
            return False, f"{_name(i)} is a 3D surface scan, but this payer's policy does not count surface scans as 3D inputs"
        if len(i.shape) == 2 and i.shape[1] <= 0:
            return False, f"{_name(i)} has no faces"
        return True, f"{_name(i)} is a 3D surface scan"
    if i.kind == "volume":
        if i.modality.upper() not in VOLUME_MODALITIES:
            return False, f"{_name(i)} has modality {i.modality or 'unknown'}, not a CT/CBCT/MR volume"
        if len(i.shape) != 3:
            return False, f"{_name(i)} has no recorded 3D geometry (voxel grid), so it cannot be shown to be a volume"
        if min(i.shape) < policy.min_volume_slices:
            return False, (f"{_name(i)} has only {min(i.shape)} slices along one axis "
                           f"(at least {policy.min_volume_slices} needed)")
        if i.spacing_mm and (len(i.spacing_mm) != 3 or min(i.spacing_mm) <= 0):
            return False, f"{_name(i)} has inconsistent voxel spacing {list(i.spacing_mm)}"
        return True, f"{_name(i)} is a 3D {MODALITY_WORDS.get(i.modality.upper(), i.modality)} volume of {i.shape[0]}x{i.shape[1]}x{i.shape[2]} voxels"
    return False, f"{_name(i)} is not an image volume or surface scan"


def _r1(ctx: RuleContext) -> RuleResult:
    verdicts = [(i, *counts_as_3d(i, ctx.policy)) for i in ctx.result.inputs]
    n = sum(1 for _, ok, _w in verdicts if ok)
    evidence = {"inputs": [{"series_instance_uid": i.series_instance_uid, "kind": i.kind, "modality": i.modality,
                            "shape": list(i.shape), "counts": ok, "why": why} for i, ok, why in verdicts],
                "surface_scans_count_as_3d": ctx.policy.surface_scans_count_as_3d, "three_d_inputs": n}
    if n >= 2:
        return RuleResult("r1_3d_inputs", RULE_TITLES["r1_3d_inputs"], True,
                          f"The fusion used {n} 3D inputs.", evidence)
    whys = "; ".join(why for _, ok, why in verdicts if not ok)
    reason = f"D0395 needs at least two 3D inputs, but this fusion had {n}."
    if whys:
        reason += f" Not counted: {whys}."
    return RuleResult("r1_3d_inputs", RULE_TITLES["r1_3d_inputs"], False, reason, evidence)


def _r2(ctx: RuleContext) -> RuleResult:
    counted = [i for i in ctx.result.inputs if counts_as_3d(i, ctx.policy)[0]]
    evidence = {"inputs": [{"series_instance_uid": i.series_instance_uid, "content_sha256": i.content_sha256}
                           for i in counted]}
    problems: list[str] = []
    no_hash = [i for i in counted if not i.content_sha256]
    for i in no_hash:
        problems.append(f"{_name(i)} has no content hash, so it cannot be shown to be a separate acquisition")
    by_hash: dict[str, list[FusionInput]] = {}
    for i in counted:
        if i.content_sha256:
            by_hash.setdefault(i.content_sha256, []).append(i)
    for same in by_hash.values():
        if len(same) > 1:
            problems.append(
                f"{' and '.join(_name(i) for i in same)} contain identical image content: "
                "a re-sent or copied series is one acquisition, not two")
    series = [i.series_instance_uid for i in counted if i.series_instance_uid]
    dup_series = sorted({s for s in series if series.count(s) > 1})
    for s in dup_series:
        problems.append(f"series {s} was used twice")
    evidence["distinct_acquisitions"] = len(by_hash)
    if problems:
        return RuleResult("r2_distinct_acquisitions", RULE_TITLES["r2_distinct_acquisitions"], False,
                          "The inputs are not distinct acquisitions: " + "; ".join(problems) + ".", evidence)
    return RuleResult("r2_distinct_acquisitions", RULE_TITLES["r2_distinct_acquisitions"], True,
                      f"The 3D inputs are {len(by_hash)} different acquisitions (different series and image content).",
                      evidence)


def _r3(ctx: RuleContext) -> RuleResult:
    r = ctx.result
    keys = sorted({i.patient_key for i in r.inputs})
    demo = sorted({i.demographics_sha256 for i in r.inputs if i.demographics_sha256})
    evidence = {"fusion_patient_key": r.patient_key, "input_patient_keys": keys, "demographics_hashes": len(demo)}
    problems = []
    if len(keys) > 1:
        problems.append(f"the inputs belong to {len(keys)} different patient IDs ({', '.join(keys)})")
    elif keys and keys[0] != r.patient_key:
        problems.append(f"the inputs belong to patient {keys[0]} but the fusion was filed under {r.patient_key}")
    if len(demo) > 1:
        problems.append("the inputs disagree on birth date or sex")
    if not r.inputs:
        problems.append("the fusion lists no inputs")
    if problems:
        return RuleResult("r3_one_patient", RULE_TITLES["r3_one_patient"], False,
                          "The inputs do not all belong to one patient: " + "; ".join(problems)
                          + ". Such a fusion must not be used or billed.", evidence)
    return RuleResult("r3_one_patient", RULE_TITLES["r3_one_patient"], True,
                      f"All inputs belong to patient {r.patient_key}.", evidence)


def _r4(ctx: RuleContext) -> RuleResult:
    r = ctx.result
    checks = [{"name": q.name, "value": q.value, "threshold": q.threshold, "comparison": q.comparison,
               "passed": q.passed, "severity": q.severity} for q in r.quality_checks]
    evidence: dict[str, object] = {"verdict": r.verdict, "fusion_reasons": list(r.reasons),
                                   "quality_checks": checks, "method": r.method}
    rid, title = "r4_registration_quality", RULE_TITLES["r4_registration_quality"]
    why = "; ".join(r.reasons)
    review = ctx.review
    if review is not None:
        evidence["review"] = review.to_evidence()
        when = review.reviewed_at[:10]
    failed_reject = [q for q in r.quality_checks if not q.passed and q.severity == "reject"]
    failed_review = [q for q in r.quality_checks if not q.passed and q.severity == "review"]
    if r.verdict == "rejected":
        return RuleResult(rid, title, False,
                          "The registration was rejected by its quality gate"
                          + (f" ({why})" if why else "") + "; a rejected fusion is recorded but never billed.",
                          evidence, "not_eligible")
    if failed_reject:
        names = ", ".join(q.name for q in failed_reject)
        return RuleResult(rid, title, False,
                          f"The registration failed the quality check {names} although it was marked accepted; "
                          "it is not billed.", evidence, "not_eligible")
    if review is not None and not review.accepted:
        return RuleResult(rid, title, False,
                          f"{review.reviewer} reviewed the registration on {when} and rejected it "
                          f"({review.note}); a rejected fusion is recorded but never billed.", evidence, "not_eligible")
    doubtful = r.verdict == "needs_review" or bool(failed_review) or not r.quality_checks
    if doubtful and review is not None:  # accepted by a person: the review is the evidence
        flagged = why or ", ".join(q.name for q in failed_review) or "no quality-gate figures"
        return RuleResult(rid, title, True,
                          f"The registration was flagged for review ({flagged}); {review.reviewer} reviewed it on "
                          f"{when} and accepted it ({review.note}).", evidence)
    if r.verdict == "needs_review":
        return RuleResult(rid, title, False,
                          "The registration is doubtful and waits for a person to review it"
                          + (f" ({why})" if why else "") + "; it is not billed until then.", evidence, "needs_review")
    if failed_review:
        names = ", ".join(q.name for q in failed_review)
        return RuleResult(rid, title, False,
                          f"The quality check {names} flagged the registration for review; it is not billed until then.",
                          evidence, "needs_review")
    if not r.quality_checks:
        return RuleResult(rid, title, False,
                          "No quality-gate figures were recorded for this registration, so there is no evidence "
                          "it is correct; it waits for review.", evidence, "needs_review")
    return RuleResult(rid, title, True,
                      f"The registration converged and passed all {len(r.quality_checks)} quality checks.", evidence)


def _r5(ctx: RuleContext) -> RuleResult:
    evidence = {"outputs": [{"kind": o.kind, "path": o.path, "declared_sha256": o.declared_sha256,
                             "exists": o.exists, "actual_sha256": o.actual_sha256} for o in ctx.output_checks]}
    rid, title = "r5_outputs_recorded", RULE_TITLES["r5_outputs_recorded"]
    if not ctx.output_checks:
        return RuleResult(rid, title, False, "The fusion wrote no output files, so there is nothing to show for it.",
                          evidence)
    problems = []
    for o in ctx.output_checks:
        name = o.path.rsplit("/", 1)[-1] or o.kind
        if not o.exists:
            problems.append(f"output {name} ({o.kind}) is missing on disk")
        elif not o.declared_sha256 or o.actual_sha256 != o.declared_sha256:
            problems.append(f"output {name} ({o.kind}) does not match the hash the fusion recorded")
        elif o.declared_sha256 not in ctx.ledgered_output_hashes:
            problems.append(f"output {name} ({o.kind}) has no hash in the ledger")
    if problems:
        return RuleResult(rid, title, False, "The fused outputs cannot be trusted: " + "; ".join(problems) + ".",
                          evidence)
    return RuleResult(rid, title, True,
                      f"All {len(ctx.output_checks)} output files exist and their hashes are in the ledger.", evidence)


def procedure_code(result: FusionResult) -> str:
    """D0394 for a subtraction, D0395 otherwise (rule 7 checks that a subtraction is same-modality)."""
    return "D0394" if result.purpose == "subtraction" else "D0395"


def _r6_once(ctx: RuleContext) -> RuleResult:
    key = ctx.result.input_set_key
    same = [c for c in ctx.prior_claims if c.input_set_key == key and c.fusion_id != ctx.result.fusion_id]
    evidence = {"input_set_key": key, "earlier_claims": [c.fusion_id for c in same]}
    rid, title = "r6_billed_once", RULE_TITLES["r6_billed_once"]
    if same:
        first = same[0]
        return RuleResult(rid, title, False,
                          f"This exact set of inputs was already claimed with fusion {first.fusion_id} "
                          f"on {first.decided_at.date().isoformat()}; the same input set is never billed twice.",
                          evidence)
    return RuleResult(rid, title, True, "This set of inputs has not been claimed before.", evidence)


def _r6_frequency(ctx: RuleContext) -> RuleResult:
    p = ctx.policy
    code = procedure_code(ctx.result)
    rid, title = "r6_frequency_limit", RULE_TITLES["r6_frequency_limit"]
    since = ctx.now - timedelta(days=p.frequency_period_days)
    within = [c for c in ctx.prior_claims if c.code == code and c.decided_at >= since
              and c.fusion_id != ctx.result.fusion_id]
    evidence = {"code": code, "frequency_limit": p.frequency_limit, "period_days": p.frequency_period_days,
                "claims_in_period": [c.fusion_id for c in within]}
    if p.frequency_limit <= 0:
        return RuleResult(rid, title, True, "The payer policy sets no frequency limit.", evidence)
    if len(within) >= p.frequency_limit:
        return RuleResult(rid, title, False,
                          f"The payer allows {p.frequency_limit} {code} claim{'' if p.frequency_limit == 1 else 's'} "
                          f"per patient every "
                          f"{p.frequency_period_days} days, and this patient already has {len(within)} in that period.",
                          evidence)
    return RuleResult(rid, title, True,
                      f"Within the payer's limit ({len(within)} of {p.frequency_limit} {code} claims in "
                      f"{p.frequency_period_days} days).", evidence)


def _r7(ctx: RuleContext) -> RuleResult:
    r = ctx.result
    counted = [i for i in r.inputs if counts_as_3d(i, ctx.policy)[0]]
    mods = sorted({("SURFACE" if i.kind == "surface" else i.modality.upper().replace("CBCT", "CT")) for i in counted})
    evidence = {"purpose": r.purpose, "modalities": mods}
    rid, title = "r7_subtraction_code", RULE_TITLES["r7_subtraction_code"]
    if r.purpose != "subtraction":
        return RuleResult(rid, title, True, "The registration was done for fusion, not subtraction, so D0395 applies.",
                          evidence)
    if len(mods) == 1 and mods[0] != "SURFACE":
        return RuleResult(rid, title, True,
                          f"The registration was done to subtract two {MODALITY_WORDS.get(mods[0], mods[0])} volumes "
                          "of the same modality, so it is coded D0394 (subtraction) instead of D0395.", evidence)
    return RuleResult(rid, title, False,
                      "The registration was marked as a subtraction, but subtraction needs volumes of one modality "
                      f"(found: {', '.join(mods) or 'none'}); neither D0394 nor D0395 applies as recorded.", evidence)


def _r8(ctx: RuleContext) -> RuleResult:
    rid, title = "r8_rationale_documented", RULE_TITLES["r8_rationale_documented"]
    evidence = {"required": ctx.policy.require_rationale, "documented": bool(ctx.rationale.strip()),
                "clinician": ctx.clinician}
    if ctx.rationale.strip():
        return RuleResult(rid, title, True,
                          f"The clinical rationale was documented by {ctx.clinician or 'a clinician'}.", evidence)
    if not ctx.policy.require_rationale:
        return RuleResult(rid, title, True, "The payer policy does not require a documented rationale.", evidence)
    return RuleResult(rid, title, False,
                      "The clinical reason for the fusion (medical necessity) has not been documented yet; "
                      "the claim waits until a clinician adds it.", evidence, "needs_documentation")


RULE_TITLES: dict[str, str] = {
    "r1_3d_inputs": "At least two 3D inputs",
    "r2_distinct_acquisitions": "Inputs are distinct acquisitions",
    "r3_one_patient": "All inputs belong to one patient",
    "r4_registration_quality": "Registration passed its quality gate",
    "r5_outputs_recorded": "Fused outputs exist and are in the ledger",
    "r6_billed_once": "Same input set never billed twice",
    "r6_frequency_limit": "Payer frequency limit",
    "r7_subtraction_code": "Same-modality subtraction is D0394",
    "r8_rationale_documented": "Clinical rationale documented",
}

RULES: tuple[Rule, ...] = (
    Rule("r1_3d_inputs", RULE_TITLES["r1_3d_inputs"], _r1),
    Rule("r2_distinct_acquisitions", RULE_TITLES["r2_distinct_acquisitions"], _r2),
    Rule("r3_one_patient", RULE_TITLES["r3_one_patient"], _r3),
    Rule("r4_registration_quality", RULE_TITLES["r4_registration_quality"], _r4),
    Rule("r5_outputs_recorded", RULE_TITLES["r5_outputs_recorded"], _r5),
    Rule("r6_billed_once", RULE_TITLES["r6_billed_once"], _r6_once),
    Rule("r6_frequency_limit", RULE_TITLES["r6_frequency_limit"], _r6_frequency),
    Rule("r7_subtraction_code", RULE_TITLES["r7_subtraction_code"], _r7),
    Rule("r8_rationale_documented", RULE_TITLES["r8_rationale_documented"], _r8),
)


def evaluate(ctx: RuleContext) -> tuple[RuleResult, ...]:
    """Run every rule (none short-circuits, so every failure is reported)."""
    return tuple(rule.evaluate(ctx) for rule in RULES)


def status_of(results: tuple[RuleResult, ...]) -> str:
    """The decision status the rule results lead to (most severe failure wins)."""
    blocks = {r.blocks for r in results if not r.passed}
    for status in ("not_eligible", "needs_review", "needs_documentation"):
        if status in blocks:
            return status
    return "ready_to_bill"
