"""`dentfuse review`: a fusion whose registration was flagged gets a person's verdict; the
decision, report, ledger and PACS forwarding follow it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from billing_helpers import cbct
from dicom_node.forward import queue_counts
from fusion.records import IDENTITY4, FusionOutput, FusionResult, QualityCheck
from pipeline.bootstrap import Finisher, build_billing
from pipeline.cli import main
from pipeline.config import load_config

ENV = {"DENTFUSE_PACS_DESTINATIONS": "main=PACS@127.0.0.1:104", "DENTFUSE_CONFIG": None, "DENTFUSE_DATA_DIR": None}
REVIEW = (QualityCheck("overlap_fraction", 0.30, 0.35, ">=", False, "review"),)


def _registration_file(path: Path) -> str:
    """A small real DICOM instance standing in for the Spatial Registration output."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.66.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = "DF-0001", "REG"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def flagged(tmp_path: Path) -> Path:
    """A data directory holding fusion F1 whose registration the gate flagged for review,
    finalized like the pipeline does (decision, report R1, outputs held back)."""
    data = tmp_path / "data"
    cfg = load_config(None, flags={"data_dir": data}, environ={k: v for k, v in ENV.items() if v})
    fdir = data / "fusions" / "F1"
    reg = fdir / "registration.dcm"
    result = FusionResult(
        fusion_id="F1", patient_key="DF-0001", method="volume-rigid-mattes-mi", purpose="fusion",
        inputs=(cbct("a"), cbct("b", role="moving", date="20260701")), transform_moving_to_fixed=IDENTITY4,
        fixed_frame_of_reference_uid="1.2.3", moving_frame_of_reference_uid="1.2.4", verdict="needs_review",
        reasons=("overlap 0.30 below 0.35",), metrics={"final_metric": -0.4}, quality_checks=REVIEW,
        outputs=(FusionOutput("registration", str(reg), _registration_file(reg)),), created_at="2026-11-26T08:30:00Z")
    (fdir / "result.json").write_text(result.to_json(), encoding="utf-8")
    billing = build_billing(cfg)
    forward_calls: list[Any] = []
    try:
        fin = Finisher(cfg, billing, SimpleNamespace(enqueue=lambda *a: forward_calls.append(a)))
        assert fin.finalize(SimpleNamespace(payload={"operator": "CBCT1"}), result, lambda s: None) == "needs_review"
    finally:
        billing.close()
    assert forward_calls == []  # a doubtful registration is not sent to the PACS
    assert (data / "reports" / "F1" / "F1-R1.pdf").is_file()
    return data


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=ENV)


def test_review_accept_moves_on_reissues_report_and_queues_outputs(flagged: Path) -> None:
    res = _cli("review", "F1", "--accept", "--reviewer", "T. Tech", "--note", "QA overlays checked at 16 and 36",
               "--data-dir", str(flagged), "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["status"] == "needs_documentation" and doc["code"] == "D0395"
    assert doc["outputs_queued_for_pacs"] == 1
    r4 = next(r for r in doc["rules"] if r["rule_id"] == "r4_registration_quality")
    assert r4["passed"] and "T. Tech reviewed it" in r4["reason"]
    assert queue_counts(flagged)["pending"] == 1
    page = (flagged / "reports" / "F1" / "F1-R2.html").read_text(encoding="utf-8")
    assert "T. Tech" in page
    events = _cli("events", "--data-dir", str(flagged), "--fusion-id", "F1", "--kind", "review", "--json")
    assert events.exit_code == 0, events.output
    reviews = [e for e in json.loads(events.output) if e["kind"] == "review"]
    assert [(e["event"]["accepted"], e["event"]["reviewer"]) for e in reviews] == [(True, "T. Tech")]
    assert _cli("ledger", "verify", "--data-dir", str(flagged)).exit_code == 0


def test_review_reject_is_never_billed_nor_forwarded(flagged: Path) -> None:
    res = _cli("review", "F1", "--reject", "--reviewer", "T. Tech", "--note", "molars misaligned by 2 mm",
               "--data-dir", str(flagged))
    assert res.exit_code == 0, res.output
    assert "now not eligible" in res.output and "molars misaligned by 2 mm" in res.output
    assert queue_counts(flagged)["pending"] == 0
    assert (flagged / "reports" / "F1" / "F1-R2.pdf").is_file()


def test_review_refuses_without_a_verdict_or_for_an_unknown_fusion(flagged: Path) -> None:
    res = _cli("review", "F1", "--reviewer", "T. Tech", "--note", "n", "--data-dir", str(flagged))
    assert res.exit_code == 2 and "--accept or --reject" in res.output
    res = _cli("review", "F9", "--accept", "--reviewer", "T. Tech", "--note", "n", "--data-dir", str(flagged))
    assert res.exit_code == 1 and "not in the ledger" in res.output
    res = _cli("review", "F1", "--accept", "--reviewer", " ", "--note", "n", "--data-dir", str(flagged))
    assert res.exit_code == 1 and "--reviewer" in res.output


def test_documented_then_accepted_claim_carries_the_report_that_shows_the_review(flagged: Path) -> None:
    env = {**ENV, "DENTFUSE_BILLING_POLICY_FEE_SCHEDULE": "D0395=350.00"}
    run = CliRunner().invoke(main, ["document", "F1", "--rationale", "Implant planning at 36.", "--clinician",
                                    "Dr. A. Molar", "--data-dir", str(flagged), "--json"], env=env)
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["status"] == "needs_review"  # documented, still waiting for review
    run = CliRunner().invoke(main, ["review", "F1", "--accept", "--reviewer", "T. Tech", "--note", "QA overlays checked",
                                    "--data-dir", str(flagged), "--json"], env=env)
    assert run.exit_code == 0, run.output
    doc = json.loads(run.output)
    reports = sorted((flagged / "reports" / "F1").glob("F1-R*.pdf"))
    assert doc["status"] == "exported" and doc["report_id"] == reports[-1].stem == "F1-R3"
    meta = json.loads((flagged / "reports" / "F1" / "F1-R3.json").read_text(encoding="utf-8"))
    assert meta["state"]["status"] == "ready_to_bill"
    assert "T. Tech" in (flagged / "reports" / "F1" / "F1-R3.html").read_text(encoding="utf-8")
