"""The fusion report (PDF + HTML) from a hand-built fusion and decision."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from billing_hooks.decision import BillingDecision, CompanionSuggestion, RuleResult
from fusion.records import FusionInput, FusionOutput, FusionResult, QualityCheck
from pipeline.report import LedgerRef, existing_versions, write_report


def make_result(tmp_path: Path) -> FusionResult:
    qa = tmp_path / "qa_axial.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(qa)
    return FusionResult(
        fusion_id="F0123456789ABCDE", patient_key="DF-0001", method="volume-rigid-mattes-mi", purpose="fusion",
        inputs=(
            FusionInput(role="fixed", kind="volume", modality="CT", patient_id="DF-0001",
                        study_instance_uid="1.2.826.0.1.1", series_instance_uid="1.2.826.0.1.1.1",
                        frame_of_reference_uid="1.2.826.0.1.9", content_sha256="a" * 64,
                        acquisition_date="20250102", shape=(120, 120, 80), spacing_mm=(0.5, 0.5, 0.5)),
            FusionInput(role="moving", kind="volume", modality="CT", patient_id="DF-0001",
                        study_instance_uid="1.2.826.0.1.2", series_instance_uid="1.2.826.0.1.2.1",
                        frame_of_reference_uid="1.2.826.0.1.8", content_sha256="b" * 64,
                        acquisition_date="20250702"),
        ),
        transform_moving_to_fixed=((1, 0, 0, 5.0), (0, 1, 0, -2.0), (0, 0, 1, 1.5), (0, 0, 0, 1)),
        fixed_frame_of_reference_uid="1.2.826.0.1.9", moving_frame_of_reference_uid="1.2.826.0.1.8",
        verdict="accepted", reasons=(), metrics={"final_metric": -0.61, "overlap_fraction": 0.72},
        quality_checks=(QualityCheck("overlap_fraction", 0.72, 0.2, ">=", True, "reject", "moving body inside fixed grid"),
                        QualityCheck("consistency_mm", 0.03, 0.5, "<=", True, "review", "two runs agree")),
        software_versions={"dentfuse": "0.1.0", "SimpleITK": "2.5.0"}, parameters={"shrink": 2},
        outputs=(FusionOutput(kind="qa_png", path=str(qa), sha256=hashlib.sha256(qa.read_bytes()).hexdigest()),),
        created_at="2026-11-26T20:00:00+00:00", operator="CBCT_SCANNER",
    )


def make_decision(rationale: str = "") -> BillingDecision:
    return BillingDecision(
        fusion_id="F0123456789ABCDE", patient_key="DF-0001", input_set_key="DF-0001|a|b", code="D0395",
        status="ready_to_bill" if rationale else "needs_documentation",
        rules=(RuleResult("R1", "Two or more 3D inputs", True, "2 CBCT volumes are 3D inputs"),
               RuleResult("R8", "Medical necessity documented", bool(rationale),
                          "rationale documented" if rationale else "no clinical rationale yet",
                          blocks="needs_documentation")),
        reasons=("Every rule holds." if rationale else "Waiting for the clinical rationale.",),
        companions=(CompanionSuggestion("D0367", "CBCT both jaws", "field of view 120 x 120 x 80 mm"),),
        decided_at="2026-11-26T20:00:01+00:00", rationale=rationale, clinician="Dr. Demo" if rationale else "",
    )


def test_report_pdf_and_html_show_the_evidence(tmp_path: Path) -> None:
    result = make_result(tmp_path)
    rep = write_report(result, make_decision(), tmp_path / "reports",
                       ledger=[LedgerRef(1, "fusion.recorded", "f" * 64, "2026-11-26T20:00:01Z"),
                               LedgerRef(2, "decision", "e" * 64)])
    assert rep.report_id == "F0123456789ABCDE-R1" and rep.version == 1
    pdf = rep.pdf_path.read_bytes()
    assert pdf.startswith(b"%PDF-") and len(pdf) > 2000
    assert rep.pdf_sha256 == hashlib.sha256(pdf).hexdigest()
    page = rep.html_path.read_text()
    for needle in ("DF-0001", "1.2.826.0.1.2.1", "a" * 64, "2025-01-02", "SimpleITK", "2.5.0",
                   "overlap_fraction", "&gt;= 0.200", "D0395", "Needs documentation", "Not documented yet",
                   "D0367", "fusion.recorded", "data:image/png;base64,", "F0123456789ABCDE-R1", "5.00000"):
        assert needle in page, needle
    assert b"dentfuse fusion report F0123456789ABCDE-R1" in pdf  # document title in the PDF info


def test_new_version_when_documented_and_never_overwritten(tmp_path: Path) -> None:
    result = make_result(tmp_path)
    d = tmp_path / "reports"
    r1 = write_report(result, make_decision(), d)
    r2 = write_report(result, make_decision("Implant planning at 36 needs the scan on the bone."), d)
    assert (r1.version, r2.version) == (1, 2) and r2.report_id.endswith("-R2")
    assert r1.pdf_path.exists() and r1.pdf_sha256 != r2.pdf_sha256
    page = r2.html_path.read_text()
    assert "Implant planning at 36" in page and "Dr. Demo" in page and "Ready to bill" in page
    assert existing_versions(d, result.fusion_id) == [1, 2]
    with pytest.raises(FileExistsError, match="never overwritten"):
        write_report(result, make_decision(), d, version=1)


def test_report_is_reproducible_for_the_same_content(tmp_path: Path) -> None:
    result = make_result(tmp_path)
    a = write_report(result, make_decision(), tmp_path / "a", generated_at="2026-11-26T20:00:00+00:00")
    b = write_report(result, make_decision(), tmp_path / "b", generated_at="2026-11-26T20:00:00+00:00")
    assert a.pdf_sha256 == b.pdf_sha256 and a.html_sha256 == b.html_sha256


def test_rejected_fusion_without_decision_is_reported_as_such(tmp_path: Path) -> None:
    import dataclasses

    result = dataclasses.replace(
        make_result(tmp_path), verdict="rejected", reasons=("overlap_fraction 0.05 below 0.20",),
        quality_checks=(QualityCheck("overlap_fraction", 0.05, 0.2, ">=", False, "reject", "too little overlap"),))
    rep = write_report(result, None, tmp_path / "reports")
    page = rep.html_path.read_text()
    assert "rejected - overlap_fraction 0.05 below 0.20" in page
    assert ">FAIL<" in page and "No billing decision recorded yet." in page
    assert rep.pdf_path.read_bytes().startswith(b"%PDF-")
