"""The D0395 scenario table, companion codes and rule objects (hand-built FusionResults)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pytest

from billing_hooks.companions import suggest_companions
from billing_hooks.errors import NotReadyError
from billing_hooks.decision import BillingDecision
from billing_hooks.policy import PayerPolicy
from billing_hooks.rules import RULES
from fusion.records import QualityCheck
from billing_helpers import GOOD_CHECKS, POLICY, FakeClock, attach_pdf, cbct, make_hook, mr, pano, result, scan

R8 = "r8_rationale_documented"


@dataclass
class Scenario:
    name: str
    run: Callable[[Path], BillingDecision]
    status: str
    code: str | None
    failed: set[str]
    reason_contains: str = ""


def _record(tmp: Path, inputs, policy: PayerPolicy = POLICY, **kw) -> BillingDecision:
    hook = make_hook(tmp / "data", policy=policy)
    return hook.record_fusion(result(tmp, "F1", tuple(inputs), **kw))


def _twice_same_inputs(tmp: Path) -> BillingDecision:
    hook = make_hook(tmp / "data")
    first = hook.record_fusion(result(tmp, "F1", (cbct("a"), scan())))
    assert first.status == "needs_documentation"
    return hook.record_fusion(result(tmp, "F2", (cbct("a"), scan())))  # re-run: new fusion id, same input set


def _delivered_twice(tmp: Path) -> BillingDecision:
    hook = make_hook(tmp / "data")
    r = result(tmp, "F1", (cbct("a"), scan()))
    first = hook.record_fusion(r)
    again = hook.record_fusion(r)
    assert again == first
    assert [e.kind for e in hook.ledger.entries(fusion_id="F1")] == ["fusion_recorded", "decision", "duplicate_delivery"]
    assert len(hook.decisions()) == 1
    return again


def _frequency(tmp: Path) -> BillingDecision:
    clock = FakeClock()
    hook = make_hook(tmp / "data", clock=clock, policy=replace(POLICY, frequency_limit=1, frequency_period_days=365))
    assert hook.record_fusion(result(tmp, "F0", (cbct("a"), scan()))).status == "needs_documentation"
    clock.advance(days=30)
    return hook.record_fusion(result(tmp, "F1", (cbct("b", date="20260901"), scan("upper2.stl"))))


def _frequency_next_period(tmp: Path) -> BillingDecision:
    clock = FakeClock()
    hook = make_hook(tmp / "data", clock=clock, policy=replace(POLICY, frequency_limit=1, frequency_period_days=365))
    hook.record_fusion(result(tmp, "F0", (cbct("a"), scan())))
    clock.advance(days=400)
    return hook.record_fusion(result(tmp, "F1", (cbct("b", date="20271001"), scan("upper2.stl"))))


def _rationale_added(tmp: Path) -> BillingDecision:
    hook = make_hook(tmp / "data")
    first = hook.record_fusion(result(tmp, "F1", (cbct("a"), scan())))
    assert (first.status, first.code, first.failed) == ("needs_documentation", "D0395", (R8,))
    d = hook.document("F1", rationale="Implant planning at 36: nerve canal vs. planned implant position.",
                      clinician="Dr. A. Molar")
    assert d.rationale.startswith("Implant planning") and d.clinician == "Dr. A. Molar"
    return d


REVIEW = (QualityCheck("overlap_fraction", 0.30, 0.35, ">=", False, "review"),)
REJECT = (QualityCheck("final_metric", -0.02, -0.10, "<=", False, "reject"),)

SCENARIOS = [
    Scenario("cbct_plus_intraoral_scan", lambda t: _record(t, [cbct("a"), scan()]), "needs_documentation", "D0395", {R8}),
    Scenario("cbct_plus_cbct_months_apart",
             lambda t: _record(t, [cbct("a", date="20260101"), cbct("b", role="moving", date="20260615")]),
             "needs_documentation", "D0395", {R8}),
    Scenario("cbct_plus_mr", lambda t: _record(t, [cbct("a"), mr("m")]), "needs_documentation", "D0395", {R8}),
    Scenario("single_cbct", lambda t: _record(t, [cbct("a")]), "not_eligible", None, {"r1_3d_inputs", R8},
             "at least two 3D inputs"),
    Scenario("same_cbct_resent_under_new_series_uid",
             lambda t: _record(t, [cbct("a"), cbct("a_resent", role="moving", content="voxels-a")]),
             "not_eligible", None, {"r2_distinct_acquisitions", R8}, "one acquisition"),
    Scenario("cbct_plus_panoramic_2d", lambda t: _record(t, [cbct("a"), pano()]), "not_eligible", None,
             {"r1_3d_inputs", R8}, "2D images never count"),
    Scenario("two_patients", lambda t: _record(t, [cbct("a"), cbct("p2", role="moving", patient="DF-0002",
                                                                      demographics_sha256="f" * 64)]),
             "not_eligible", None, {"r3_one_patient", R8}, "different patient"),
    Scenario("gate_rejected",
             lambda t: _record(t, [cbct("a"), cbct("b", role="moving")], verdict="rejected", checks=REJECT,
                               reasons=("final metric -0.02 above -0.10",)),
             "not_eligible", None, {"r4_registration_quality", R8}, "rejected by its quality gate"),
    Scenario("gate_flagged_for_review",
             lambda t: _record(t, [cbct("a"), cbct("b", role="moving")], verdict="needs_review", checks=REVIEW,
                               reasons=("overlap 0.30 below 0.35",)),
             "needs_review", None, {"r4_registration_quality", R8}, "review"),
    Scenario("accepted_without_quality_figures",
             lambda t: _record(t, [cbct("a"), cbct("b", role="moving")], checks=()),
             "needs_review", None, {"r4_registration_quality", R8}, "no evidence"),
    Scenario("same_fusion_rerun", _twice_same_inputs, "not_eligible", None, {"r6_billed_once", R8},
             "already claimed with fusion F1"),
    Scenario("event_delivered_twice", _delivered_twice, "needs_documentation", "D0395", {R8}),
    Scenario("subtraction_same_modality",
             lambda t: _record(t, [cbct("a"), cbct("b", role="moving")], purpose="subtraction"),
             "needs_documentation", "D0394", {R8}),
    Scenario("subtraction_across_modalities",
             lambda t: _record(t, [cbct("a"), mr("m")], purpose="subtraction"),
             "not_eligible", None, {"r7_subtraction_code", R8}, "one modality"),
    Scenario("policy_excludes_surface_scans",
             lambda t: _record(t, [cbct("a"), scan()], policy=replace(POLICY, surface_scans_count_as_3d=False)),
             "not_eligible", None, {"r1_3d_inputs", R8}, "does not count surface scans"),
    Scenario("rationale_missing_then_added", _rationale_added, "ready_to_bill", "D0395", set()),
    Scenario("frequency_limit_reached", _frequency, "not_eligible", None, {"r6_frequency_limit", R8},
             "allows 1 D0395 claim"),
    Scenario("frequency_limit_next_period", _frequency_next_period, "needs_documentation", "D0395", {R8}),
    Scenario("output_missing_on_disk",
             lambda t: _record(t, [cbct("a"), scan()], write_outputs=False), "not_eligible", None,
             {"r5_outputs_recorded", R8}, "no output files"),
]


def _reviewed(tmp: Path, *, accepted: bool, verdict: str = "needs_review", checks=None, reasons=()) -> BillingDecision:
    hook = make_hook(tmp / "data")
    hook.record_fusion(result(tmp, "F1", (cbct("a"), cbct("b", role="moving")), verdict=verdict,
                              checks=REVIEW if checks is None else checks, reasons=reasons))
    return hook.review("F1", accepted=accepted, reviewer="T. Tech",
                       note="QA overlays checked: incisors and molars line up" if accepted else "molars misaligned")


REVIEW_SCENARIOS = [
    Scenario("flagged_then_review_accepted", lambda t: _reviewed(t, accepted=True, reasons=("overlap 0.30 below 0.35",)),
             "needs_documentation", "D0395", {R8}),
    Scenario("flagged_then_review_rejected", lambda t: _reviewed(t, accepted=False), "not_eligible", None,
             {"r4_registration_quality", R8}, "T. Tech reviewed the registration"),
    Scenario("no_quality_figures_then_review_accepted", lambda t: _reviewed(t, accepted=True, verdict="accepted",
                                                                          checks=()),
             "needs_documentation", "D0395", {R8}),
    Scenario("gate_rejected_stays_rejected_after_review", lambda t: _reviewed(t, accepted=True, verdict="rejected",
                                                                            checks=REJECT),
             "not_eligible", None, {"r4_registration_quality", R8}, "rejected by its quality gate"),
    Scenario("passing_registration_rejected_by_reviewer",
             lambda t: _reviewed(t, accepted=False, verdict="accepted", checks=GOOD_CHECKS),
             "not_eligible", None, {"r4_registration_quality", R8}, "rejected it"),
]
SCENARIOS += REVIEW_SCENARIOS


def assert_plain_language(text: str) -> None:
    assert text[:1].isupper(), text
    assert text.endswith("."), text
    assert len(text.split()) >= 6, text
    assert not re.search(r"\br\d_|None|\{|\}|\[|\]|Traceback|\w\(", text), f"not plain language: {text}"


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_scenario_table(tmp_path: Path, sc: Scenario) -> None:
    d = sc.run(tmp_path)
    assert d.status == sc.status
    assert d.code == sc.code
    assert set(d.failed) == sc.failed
    assert set(d.passed) | set(d.failed) == {r.rule_id for r in RULES}
    assert d.reasons
    for reason in d.reasons:
        assert_plain_language(reason)
    if sc.reason_contains:
        assert any(sc.reason_contains in r for r in d.reasons), d.reasons
    for r in d.rules:
        assert r.title and r.reason and isinstance(r.evidence, dict) and r.evidence, r
    assert BillingDecision.from_dict(d.to_dict()) == d


def test_rerun_is_billed_once_and_names_the_first_fusion(tmp_path: Path) -> None:
    d = _twice_same_inputs(tmp_path)
    assert d.duplicate_of == "F1"


def test_rationale_then_report_exports_exactly_one_claim(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "data")
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), scan())))
    d = hook.document("F1", rationale="Implant planning at 36.", clinician="Dr. A. Molar")
    assert d.status == "ready_to_bill"  # no report yet: nothing to attach to a claim
    attach_pdf(hook, tmp_path, "F1", "RPT-F1-1")
    d = hook.require_decision("F1")
    assert d.status == "exported" and d.report_id == "RPT-F1-1"
    (tmp_path / "later").mkdir()
    attach_pdf(hook, tmp_path / "later", "F1", "RPT-F1-2")
    assert hook.require_decision("F1").report_id == "RPT-F1-1"  # a sent claim keeps its attachment
    assert hook.record_fusion(result(tmp_path, "F2", (cbct("a"), scan()))).status == "not_eligible"  # re-run
    assert hook.export("F1") == hook.export("F1")
    assert [r.fusion_id for r in hook.outbox.rows()] == ["F1", "F1"]
    with pytest.raises(NotReadyError, match="already exported"):
        hook.document("F1", rationale="changed", clinician="Dr B")


def test_report_attached_before_documentation_is_exported_on_documentation(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "data")
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), scan())))
    attach_pdf(hook, tmp_path, "F1", "RPT-F1-1")
    assert hook.require_decision("F1").status == "needs_documentation"
    d = hook.document("F1", rationale="Implant planning at 36.", clinician="Dr. A. Molar")
    assert (d.status, d.code, d.report_id) == ("exported", "D0395", "RPT-F1-1")
    kinds = [e.kind for e in hook.ledger.entries(fusion_id="F1")]
    assert kinds.index("documentation") < kinds.index("exported")


def test_unknown_fusion_and_empty_rationale_are_refused(tmp_path: Path) -> None:
    from billing_hooks.errors import BillingError, NotReadyError, UnknownFusionError

    hook = make_hook(tmp_path / "data")
    with pytest.raises(UnknownFusionError, match="not in the ledger"):
        hook.document("nope", rationale="x", clinician="y")
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"),)))
    with pytest.raises(BillingError, match="rationale is empty"):
        hook.document("F1", rationale="  ", clinician="Dr A")
    with pytest.raises(NotReadyError, match="not eligible"):
        hook.export("F1")


@pytest.mark.parametrize("extent,expected", [
    ((50.0, 50.0, 40.0), ["D0364"]),
    ((80.0, 80.0, 40.0), ["D0365", "D0366"]),
    ((160.0, 160.0, 90.0), ["D0367"]),
    ((), []),
])
def test_cbct_companion_by_field_of_view(tmp_path: Path, extent, expected) -> None:
    r = result(tmp_path, "F1", (cbct("a", extent=extent), mr("m")), write_outputs=False)
    got = suggest_companions(r, POLICY)
    assert [c.code for c in got] == expected  # the MR gets no capture code
    for c in got:
        assert c.label and "D03" not in c.label and "not been billed" in c.reason


def test_surface_scan_companions_and_policy_filter(tmp_path: Path) -> None:
    r = result(tmp_path, "F1", (cbct("a"), scan("upper.stl"), scan("model_lower.stl", content_sha256="9" * 64)),
               write_outputs=False)
    assert [c.code for c in suggest_companions(r, POLICY)] == ["D0367", "D0801", "D0802"]
    only = replace(POLICY, suggest_companion_codes=("D0801",))
    assert [c.code for c in suggest_companions(r, only)] == ["D0801"]


def test_rules_are_explicit_objects() -> None:
    ids = [r.rule_id for r in RULES]
    assert len(ids) == len(set(ids))
    for n in range(1, 9):
        assert any(i.startswith(f"r{n}_") for i in ids), n
    assert all(r.title for r in RULES)


def test_review_accepted_then_documented_exports_and_is_ledgered(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "data")
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), cbct("b", role="moving")), verdict="needs_review",
                              checks=REVIEW, reasons=("overlap 0.30 below 0.35",)))
    attach_pdf(hook, tmp_path, "F1", "RPT-F1-1")
    assert hook.require_decision("F1").status == "needs_review"
    # documentation alone does not get a doubtful registration billed
    assert hook.document("F1", rationale="Implant planning at 36.", clinician="Dr. A. Molar").status == "needs_review"
    d = hook.review("F1", accepted=True, reviewer="T. Tech", note="QA overlays checked")
    assert (d.status, d.code, d.report_id) == ("exported", "D0395", "RPT-F1-1")
    r4 = next(r for r in d.rules if r.rule_id == "r4_registration_quality")
    assert r4.passed and "T. Tech reviewed it" in r4.reason and r4.evidence["review"]["accepted"] is True
    kinds = [e.kind for e in hook.ledger.entries(fusion_id="F1")]
    assert kinds.index("review") < kinds.index("exported")
    review = hook.ledger.entries(fusion_id="F1", kind="review")[0].event
    assert review == {"accepted": True, "reviewer": "T. Tech", "note": "QA overlays checked",
                      "gate_verdict": "needs_review", "status_before": "needs_review"}
    with pytest.raises(NotReadyError, match="already exported"):
        hook.review("F1", accepted=False, reviewer="Dr B", note="changed my mind")
    assert hook.ledger.verify().ok


def test_review_needs_a_reviewer_and_a_note_and_the_latest_counts(tmp_path: Path) -> None:
    from billing_hooks.errors import BillingError, UnknownFusionError

    hook = make_hook(tmp_path / "data")
    with pytest.raises(UnknownFusionError):
        hook.review("nope", accepted=True, reviewer="T", note="n")
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), cbct("b", role="moving")), verdict="needs_review",
                              checks=REVIEW))
    with pytest.raises(BillingError, match="--reviewer"):
        hook.review("F1", accepted=True, reviewer=" ", note="looks fine")
    with pytest.raises(BillingError, match="--note"):
        hook.review("F1", accepted=True, reviewer="T. Tech", note="")
    assert hook.review("F1", accepted=False, reviewer="T. Tech", note="molars off").status == "not_eligible"
    assert hook.review("F1", accepted=True, reviewer="Dr. Lead", note="re-checked").status == "needs_documentation"
    assert len(hook.ledger.entries(fusion_id="F1", kind="review")) == 2
