"""Wiring: import -> index -> stability -> planner -> jobs; finalize -> decision, report,
documentation follow-up; all with a fake billing hook and tiny hand-made DICOM files."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fusion.records import FusionInput, FusionOutput, FusionResult
from pipeline.bootstrap import App
from pipeline.cli_jobs import import_paths
from pipeline.config import load_config

CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def write_series(folder: Path, patient: str, pixels: np.ndarray, date: str, sop_class: str = CT,
                 modality: str = "CT", series_uid: str | None = None, study_uid: str | None = None) -> str:
    """One file per slice; returns the series UID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame = generate_uid()
    for z in range(pixels.shape[0]):
        sop = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.PatientID, ds.PatientName = patient, "Test^Patient"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame
        ds.Modality, ds.StudyDate, ds.AcquisitionDate = modality, date, date
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels[z].astype("<i2").tobytes()
        ds.save_as(folder / f"{z:03d}.dcm", enforce_file_format=True)
    return series_uid


class FakeBilling:
    """Records calls; decisions as plain objects with the attributes the pipeline reads."""

    def __init__(self) -> None:
        self.decisions_by_id: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []

    def decision(self, fusion_id: str) -> Any:
        return self.decisions_by_id.get(fusion_id)

    def decisions(self) -> list[Any]:
        return list(self.decisions_by_id.values())

    def record_fusion(self, result: FusionResult, operator: str = "") -> Any:
        from billing_hooks.decision import BillingDecision, RuleResult

        self.calls.append(("record_fusion", result.fusion_id))
        d = BillingDecision(fusion_id=result.fusion_id, patient_key=result.patient_key,
                            input_set_key=result.input_set_key, code="D0395", status="needs_documentation",
                            rules=(RuleResult("R8", "Rationale documented", False, "no rationale yet",
                                              blocks="needs_documentation"),),
                            reasons=("Waiting for the clinical rationale.",))
        self.decisions_by_id[result.fusion_id] = d
        return d

    def attach_report(self, fusion_id: str, report_id: str, path: Path, sha256: str) -> None:
        self.calls.append(("attach_report", report_id))
        self.decisions_by_id[fusion_id] = dataclasses.replace(self.decisions_by_id[fusion_id], report_id=report_id)

    def preview_documentation(self, fusion_id: str, *, rationale: str, clinician: str) -> Any:
        return dataclasses.replace(self.decisions_by_id[fusion_id], status="ready_to_bill", rationale=rationale,
                                   clinician=clinician)

    def document(self, fusion_id: str, rationale: str, clinician: str) -> None:
        self.calls.append(("document", fusion_id))
        self.decisions_by_id[fusion_id] = dataclasses.replace(
            self.decisions_by_id[fusion_id], status="ready_to_bill", rationale=rationale, clinician=clinician)

    def export(self, fusion_id: str) -> None:
        self.calls.append(("export", fusion_id))
        self.decisions_by_id[fusion_id] = dataclasses.replace(self.decisions_by_id[fusion_id], status="exported")

    def deliver_pending(self) -> None:
        self.calls.append(("deliver_pending", ""))


@pytest.fixture()
def cfg(tmp_path: Path) -> Any:
    return load_config(None, flags={"data_dir": tmp_path / "data", "node.port": 0,
                                    "stability.quiet_period_s": 0.0}, environ={})


def test_import_plans_fusions_once_and_replans_on_changed_content(tmp_path: Path, cfg: Any) -> None:
    rng = np.random.default_rng(1)
    a_pix = rng.integers(0, 1000, (4, 8, 8))
    src = tmp_path / "src"
    a = write_series(src / "a", "DF-0001", a_pix, "20250101")
    b = write_series(src / "b", "DF-0001", rng.integers(0, 1000, (4, 8, 8)), "20250601")
    dup = write_series(src / "a_resent", "DF-0001", a_pix, "20250101")
    pano = write_series(src / "pano", "DF-0001", rng.integers(0, 1000, (1, 8, 8)), "20250601", sop_class=DX, modality="DX")
    write_series(src / "other", "DF-0002", rng.integers(0, 1000, (4, 8, 8)), "20250101")
    (src / "notes.txt").write_text("not dicom")
    summary = import_paths(cfg, [src])
    assert len(summary["imported"]) == 17
    assert summary["skipped"] == [{"path": str(src / "notes.txt"),
                                   "reason": "neither a DICOM Part 10 file nor a STL/PLY/OBJ scan"}]

    billing = FakeBilling()
    app = App(cfg, workers=False, billing=billing)
    try:
        app.node.stability_monitor.check()
        assert app.process_stability_events() == 1
        jobs = {j.payload["rule"]: j for j in app.jobs.list()}
        assert set(jobs) == {"cbct_cbct"}
        assert jobs["cbct_cbct"].payload["fixed"]["series_instance_uid"] == a
        assert jobs["cbct_cbct"].payload["moving"]["series_instance_uid"] == b
        assert len(jobs["cbct_cbct"].payload["moving"]["paths"]) == 4
        why = app.explain_patient("DF-0001")
        assert why[dup].startswith(f"duplicate of series {a}") and why[a] == why[b] == "input"
        assert "2D" in why[pano]
        assert all(j.patient_key == "DF-0001" for j in app.jobs.list())
        assert app.node.stability_monitor.pending_events() == []
        # the same series again: nothing new
        assert app.plan_patient("DF-0001") and app.process_stability_events() == 0
        assert len(app.jobs.list()) == 1
        # a late instance re-opens B with new content: planned again, under a new key
        extra = tmp_path / "late"
        write_series(extra, "DF-0001", rng.integers(0, 1000, (1, 8, 8)), "20250601", series_uid=b,
                     study_uid=app.node.index.series(series_instance_uid=b)[0].study_instance_uid)
        import_paths(cfg, [extra])
        app.node.stability_monitor.check()
        assert app.process_stability_events() == 1
        newest = app.jobs.list()[0]
        assert newest.payload["rule"] == "cbct_cbct" and len(newest.payload["moving"]["paths"]) == 5
        assert newest.key != jobs["cbct_cbct"].key
    finally:
        app.close()


def fake_result(tmp_path: Path, fid: str = "FTEST0000000001") -> FusionResult:
    out = tmp_path / "out.txt"
    out.write_text("x")
    return FusionResult(
        fusion_id=fid, patient_key="DF-0001", method="volume-rigid-mattes-mi", purpose="fusion",
        inputs=(FusionInput(role="fixed", kind="volume", modality="CT", patient_id="DF-0001", content_sha256="a"),
                FusionInput(role="moving", kind="volume", modality="CT", patient_id="DF-0001", content_sha256="b")),
        transform_moving_to_fixed=((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)),
        fixed_frame_of_reference_uid="1.2", moving_frame_of_reference_uid="1.3", verdict="accepted", reasons=(),
        metrics={}, outputs=(FusionOutput(kind="qa_png_missing", path=str(out), sha256=""),))


def test_finalize_is_idempotent_and_documentation_makes_a_new_report(tmp_path: Path, cfg: Any) -> None:
    billing = FakeBilling()
    app = App(cfg, workers=False, billing=billing)
    try:
        result = fake_result(tmp_path)
        fdir = app.data_dir / "fusions" / result.fusion_id
        fdir.mkdir(parents=True)
        (fdir / "result.json").write_text(result.to_json())
        from pipeline.jobs import JobSpec

        job, _ = app.jobs.enqueue(JobSpec("k", "volume", "DF-0001", {"fusion_id": result.fusion_id, "operator": "SCU"}))
        stages: list[str] = []
        assert app.finalize(job, result, stages.append) == "done"
        assert app.finalize(job, result, stages.append) == "done"  # a retry after a crash
        assert [c for c in billing.calls if c[0] == "record_fusion"] == [("record_fusion", result.fusion_id)]
        assert [c for c in billing.calls if c[0] == "attach_report"] == [("attach_report", result.fusion_id + "-R1")]
        assert "billing decision" in stages and "report" in stages
        app.follow_up_documentation()
        assert not any(c[0] == "export" for c in billing.calls)  # nothing documented yet
        d = app.document(result.fusion_id, "Implant planning needs the scan on the bone.", "Dr. Test")
        assert d.status == "exported" and d.report_id == result.fusion_id + "-R2"
        page = (app.data_dir / "reports" / result.fusion_id / f"{result.fusion_id}-R2.html").read_text()
        assert "Implant planning needs the scan on the bone." in page
        app.follow_up_documentation()
        assert [c for c in billing.calls if c[0] == "export"] == [("export", result.fusion_id)]
    finally:
        app.close()


def test_import_scan_with_sidecar_and_flags(tmp_path: Path, cfg: Any, small_set: Path) -> None:
    import json
    import shutil

    from pipeline.cli_jobs import ImportProblem

    scan = tmp_path / "scans" / "upper.stl"
    scan.parent.mkdir()
    shutil.copy(small_set / "p1_scan" / "upper.stl", scan)
    with pytest.raises(ImportProblem, match="no patient for this scan"):
        import_paths(cfg, [small_set / "p1_pano", scan])
    assert not (cfg.data_dir / "index.sqlite").exists()  # nothing imported half-way
    (tmp_path / "scans" / "upper.stl.json").write_text(json.dumps(
        {"patient_id": "DF-0001", "issuer_of_patient_id": "DENTFUSE-SIM", "study_date": "20250125"}))
    summary = import_paths(cfg, [scan.parent])  # the sidecar itself is not reported as skipped
    assert summary["skipped"] == []
    (rec,) = summary["imported"]
    assert rec["kind"] == "surface" and rec["patient_key"] == "DF-0001^DENTFUSE-SIM"
    ds = pydicom.dcmread(rec["stored"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.3" and ds.StudyDate == "20250125"
    assert ds.Manufacturer != "dentfuse"  # an acquisition, not one of our outputs
    # flags win over the sidecar, and the same file again is the same content (a new instance)
    other = import_paths(cfg, [scan], patient_id="DF-0009")
    assert other["imported"][0]["patient_key"] == "DF-0009^DENTFUSE-SIM"
    app = App(cfg, workers=False, billing=FakeBilling())
    try:
        app.node.stability_monitor.check()
        series = app.inventory.stable_series("DF-0001^DENTFUSE-SIM")
        assert [(s.kind, s.derived_by_us, s.acquisition_date) for s in series] == [("surface", False, "20250125")]
    finally:
        app.close()


def test_planning_waits_until_every_series_of_the_patient_is_stable(tmp_path: Path, cfg: Any) -> None:
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    write_series(src / "a", "DF-0001", rng.integers(0, 1000, (4, 8, 8)), "20250101")
    write_series(src / "b", "DF-0001", rng.integers(0, 1000, (4, 8, 8)), "20250601")
    import_paths(cfg, [src / "a", src / "b"])
    app = App(cfg, workers=False, billing=FakeBilling())
    try:
        app.node.stability_monitor.check()  # A and B announced
        write_series(src / "c", "DF-0001", rng.integers(0, 1000, (4, 8, 8)), "20250901")
        import_paths(cfg, [src / "c"])  # C is still arriving (not announced yet)
        assert not app.patient_quiet("DF-0001")
        assert app.process_stability_events() == 0
        assert len(app.node.stability_monitor.pending_events()) == 2  # kept for later, not lost
        app.node.stability_monitor.check()
        assert app.process_stability_events() == 3  # A+B, A+C, B+C planned together
        assert app.node.stability_monitor.pending_events() == []
    finally:
        app.close()


@pytest.mark.slow
def test_plan_and_run_a_patient_from_imported_files(tmp_path: Path, cfg: Any, small_set: Path) -> None:
    """`dentfuse import` + `dentfuse plan PATIENT --run`: real fusion, billing and report."""
    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.cli_jobs import plan_for_patient

    import_paths(cfg, [small_set / "p1_cbct_a", small_set / "p1_scan" / "upper.dcm", small_set / "p1_pano"])
    patient = "DF-0001^DENTFUSE-SIM"
    with pytest.raises(Exception, match="no stable series"):
        plan_for_patient(cfg, patient)  # nothing announced stable yet (no serve ran)
    with pytest.raises(Exception, match="patients: DF-0001"):
        plan_for_patient(cfg, "DF-0404", include_unstable=True)
    r = CliRunner().invoke(main, ["plan", patient, "--include-unstable", "--run", "--json",
                                  "--data-dir", str(cfg.data_dir)])
    assert r.exit_code == 0, r.output
    out = __import__("json").loads(r.output)
    (planned,) = out["planned"]
    assert planned["rule"] == "cbct_scan" and planned["created"]
    (ran,) = out["ran"]
    assert ran["state"] == "done" and ran["verdict"] == "accepted", ran
    from pipeline.bootstrap import build_billing

    billing = build_billing(cfg)
    try:
        d = billing.decision(ran["fusion_id"])
        assert d.code == "D0395" and d.status == "needs_documentation" and d.report_id == ran["fusion_id"] + "-R1"
    finally:
        billing.close()
    # planning again finds the same job
    again = plan_for_patient(cfg, patient, include_unstable=True)
    assert [(p["job_id"], p["created"], p["state"]) for p in again] == [(planned["job_id"], False, "done")]
