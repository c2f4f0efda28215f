"""The fusion planner over a hand-built inventory."""

from __future__ import annotations

import dataclasses

from pipeline.planner import (FusionPlanRules, SeriesInfo, eligible_inputs, explain_series, fusion_id_for, job_key,
                              plan_fusions)

P1 = "DF-0001"


def s(uid: str, modality: str = "CT", kind: str = "volume", date: str = "20250101", fp: str = "",
      received: str = "", patient: str = P1, n: int = 100, version: str = "v1", **kw: object) -> SeriesInfo:
    return SeriesInfo(patient_key=patient, study_instance_uid="1.2.9", series_instance_uid=uid,
                      modality=modality, kind=kind, instance_count=n, content_version=version,
                      pixel_fingerprint=fp or f"fp-{uid}", acquisition_date=date,
                      first_received_at=received or f"2026-01-01T00:00:{uid[-2:]}", **kw)  # type: ignore[arg-type]


def pairs(plans: list) -> set[tuple[str, str, str]]:
    return {(p.rule, p.fixed.series_instance_uid, p.moving.series_instance_uid) for p in plans}


def test_demo_patient_plans_cbct_pair_scan_and_skips_duplicate_and_2d() -> None:
    a = s("1.1.01", date="20250101")
    b = s("1.1.02", date="20250601")
    resent = s("1.1.03", date="20250101", fp="fp-1.1.01")
    scan = s("1.1.04", modality="M3D", kind="surface", date="20250601", n=1)
    pano = s("1.1.05", modality="PX", kind="2d", n=1)
    plans = plan_fusions(P1, [a, b, resent, scan, pano], FusionPlanRules())
    assert pairs(plans) == {("cbct_cbct", "1.1.01", "1.1.02"), ("cbct_scan", "1.1.02", "1.1.04")}
    why = explain_series(P1, [a, b, resent, scan, pano])
    assert why["1.1.01"] == why["1.1.02"] == why["1.1.04"] == "input"
    assert why["1.1.03"].startswith("duplicate of series 1.1.01") and "2D" in why["1.1.05"]
    # with evidence pairing on, the copy is planned once, with its original only
    plans = plan_fusions(P1, [a, b, resent, scan, pano], FusionPlanRules(pair_duplicates_for_evidence=True))
    assert pairs(plans) == {
        ("cbct_cbct", "1.1.01", "1.1.02"),  # earlier CBCT fixed
        ("cbct_scan", "1.1.02", "1.1.04"),  # scan with the CBCT closest in date
        ("duplicate_evidence", "1.1.01", "1.1.03"),
    }
    kinds = {p.rule: p.kind for p in plans}
    assert kinds == {"cbct_cbct": "volume", "cbct_scan": "surface", "duplicate_evidence": "volume"}
    assert len({p.key for p in plans}) == len(plans)
    # the pano never appears; the re-sent copy never pairs with B or the scan
    assert all("1.1.05" not in p.key for p in plans)


def test_duplicate_alone_makes_no_fusion() -> None:
    a, dup = s("1.1.01"), s("1.1.03", fp="fp-1.1.01")
    assert plan_fusions(P1, [a, dup], FusionPlanRules()) == []
    # whichever arrives first is the original
    late_original = dataclasses.replace(a, first_received_at="2027-01-01")
    assert explain_series(P1, [late_original, dup])["1.1.01"].startswith("duplicate of series 1.1.03")


def test_two_patients_never_fused_together() -> None:
    a = s("1.1.01")
    other = s("1.1.02", patient="DF-0002")
    scan_other = s("1.1.03", modality="M3D", kind="surface", patient="DF-0002", n=1)
    assert plan_fusions(P1, [a, other, scan_other], FusionPlanRules()) == []
    for p in plan_fusions("DF-0002", [a, other, scan_other], FusionPlanRules()):
        assert p.fixed.patient_key == p.moving.patient_key == "DF-0002"


def test_cbct_pair_outside_interval_is_not_planned() -> None:
    a, b = s("1.1.01", date="20200101"), s("1.1.02", date="20250101")
    assert plan_fusions(P1, [a, b], FusionPlanRules(cbct_cbct_max_interval_days=365)) == []
    assert len(plan_fusions(P1, [a, b], FusionPlanRules(cbct_cbct_max_interval_days=3650))) == 1


def test_rules_switch_off_and_mr() -> None:
    a, mr, scan = s("1.1.01"), s("1.1.02", modality="MR"), s("1.1.03", modality="M3D", kind="surface", n=1)
    plans = plan_fusions(P1, [a, mr, scan], FusionPlanRules())
    assert pairs(plans) == {("cbct_mr", "1.1.01", "1.1.02"), ("cbct_scan", "1.1.01", "1.1.03")}
    assert plan_fusions(P1, [a, mr, scan], FusionPlanRules(plan_cbct_mr=False, plan_cbct_scan=False)) == []
    # scan or MR alone, without a CBCT: nothing to fuse with
    assert plan_fusions(P1, [mr, scan], FusionPlanRules()) == []


def test_job_key_idempotent_and_changes_only_with_content() -> None:
    a, b = s("1.1.01"), s("1.1.02")
    k1 = plan_fusions(P1, [a, b], FusionPlanRules())[0].key
    k2 = plan_fusions(P1, [b, a], FusionPlanRules())[0].key  # order of arrival does not matter
    assert k1 == k2 == job_key(P1, [a, b])
    # re-opened with the same content: same key, same fusion id
    same = plan_fusions(P1, [a, dataclasses.replace(b, first_received_at="2026-02-02")], FusionPlanRules())
    assert same[0].key == k1 and same[0].fusion_id == fusion_id_for(k1)
    # a late instance changed B's content: a new key
    changed = plan_fusions(P1, [a, dataclasses.replace(b, content_version="v2", instance_count=101)],
                           FusionPlanRules())
    assert changed[0].key != k1 and changed[0].fusion_id != fusion_id_for(k1)


def test_eligible_inputs_explains_skips() -> None:
    keep, skipped = eligible_inputs([
        s("1.1.01"), s("1.1.02", kind="2d", modality="DX"), s("1.1.03", kind="registration", modality="REG"),
        s("1.1.04", derived_by_us=True), s("1.1.05", modality="PT"), s("1.1.06", n=1),
    ])
    assert [k.series_instance_uid for k in keep] == ["1.1.01"]
    reasons = {x.series_instance_uid: why for x, why in skipped}
    assert "2D" in reasons["1.1.02"] and "dentfuse" in reasons["1.1.04"]
    assert "PT" in reasons["1.1.05"] and "single instance" in reasons["1.1.06"]
