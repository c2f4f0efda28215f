"""Hand-built FusionResult records and a fake clock for the billing tests."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from billing_hooks.policy import DeliverySettings, PayerPolicy
from billing_hooks.service import BillingHook
from fusion.records import IDENTITY4, FusionInput, FusionOutput, FusionResult, QualityCheck

PROVIDER = {"npi": "1234567893", "name": "Smile Dental Clinic", "payer_id": "PAYER01", "payer_name": "Dental Payer",
            "tax_id": "12-3456789", "address_line": "1 Main St", "city": "Springfield", "state": "IL",
            "postal_code": "627010000", "phone": "(555) 010-0100"}
DEMO = hashlib.sha256(b"19800101|F").hexdigest()
POLICY = PayerPolicy(fee_schedule=("D0395=350.00", "D0394=120.00"))


class FakeClock:
    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 26, 9, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 0, days: float = 0) -> datetime:
        self.now += timedelta(seconds=seconds, days=days)
        return self.now


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cbct(name: str = "a", *, patient: str = "DF-0001", role: str = "fixed", content: str | None = None,
         date: str = "20260301", extent: tuple[float, ...] = (80.0, 80.0, 60.0), **kw: Any) -> FusionInput:
    args: dict[str, Any] = dict(
        role=role, kind="volume", modality="CT", patient_id=patient, demographics_sha256=DEMO,
        study_instance_uid=f"1.2.826.0.1.3680043.10.1.{abs(hash(name)) % 10**8}",
        series_instance_uid=f"1.2.826.0.1.3680043.10.2.{name}",
        sop_instance_uids=tuple(f"1.2.826.0.1.3680043.10.3.{name}.{k}" for k in range(1, 4)),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", frame_of_reference_uid=f"1.2.826.0.1.3680043.10.4.{name}",
        content_sha256=h(content or f"voxels-{name}"), acquisition_date=date, shape=(160, 160, 120),
        spacing_mm=(0.5, 0.5, 0.5), extent_mm=extent)
    args.update(kw)
    return FusionInput(**args)


def mr(name: str = "m", **kw: Any) -> FusionInput:
    return replace(cbct(name, role="moving", **kw), modality="MR", sop_class_uid="1.2.840.10008.5.1.4.1.1.4")


def scan(name: str = "upper.stl", **kw: Any) -> FusionInput:
    args: dict[str, Any] = dict(role="moving", kind="surface", modality="M3D", patient_id="DF-0001",
                                demographics_sha256=DEMO, source_path=f"/drop/{name}", content_sha256=h("mesh" + name),
                                shape=(97000, 195000), frame_of_reference_uid="")
    args.update(kw)
    return FusionInput(**args)


def pano(**kw: Any) -> FusionInput:
    args: dict[str, Any] = dict(role="moving", kind="2d", modality="PX", patient_id="DF-0001",
                                demographics_sha256=DEMO, series_instance_uid="1.2.826.0.1.3680043.10.2.pano",
                                content_sha256=h("pano"), shape=(2000, 1000))
    args.update(kw)
    return FusionInput(**args)


GOOD_CHECKS = (QualityCheck("overlap_fraction", 0.8, 0.2, ">=", True),
               QualityCheck("final_metric", -0.6, -0.1, "<=", True))


def result(tmp: Path, fusion_id: str, inputs: tuple[FusionInput, ...], *, verdict: str = "accepted",
           purpose: str = "fusion", checks: tuple[QualityCheck, ...] = GOOD_CHECKS, reasons: tuple[str, ...] = (),
           write_outputs: bool = True) -> FusionResult:
    out_dir = tmp / "fusions" / fusion_id
    outputs = []
    if write_outputs:
        out_dir.mkdir(parents=True, exist_ok=True)
        for kind, name in (("registration", "reg.dcm"), ("volume_nifti", "fused.nii.gz")):
            p = out_dir / name
            p.write_bytes(f"{fusion_id}:{kind}".encode())
            outputs.append(FusionOutput(kind, str(p), hashlib.sha256(p.read_bytes()).hexdigest()))
    return FusionResult(
        fusion_id=fusion_id, patient_key=inputs[0].patient_key, method="volume-rigid-mattes-mi",
        purpose=purpose,  # type: ignore[arg-type]
        inputs=inputs, transform_moving_to_fixed=IDENTITY4,
        fixed_frame_of_reference_uid=inputs[0].frame_of_reference_uid,
        moving_frame_of_reference_uid=inputs[-1].frame_of_reference_uid, verdict=verdict,  # type: ignore[arg-type]
        reasons=reasons, metrics={"final_metric": -0.6}, quality_checks=checks,
        software_versions={"SimpleITK": "2.5.0"}, parameters={"samples": 20000}, seed=7, outputs=tuple(outputs),
        created_at="2026-11-26T08:30:00Z", operator="STORESCU")


def make_hook(data_dir: Path, clock: FakeClock | None = None, policy: PayerPolicy = POLICY,
              delivery: DeliverySettings | None = None) -> BillingHook:
    return BillingHook(data_dir, policy, delivery or DeliverySettings(), provider=PROVIDER, clock=clock or FakeClock())


def attach_pdf(hook: BillingHook, tmp: Path, fusion_id: str, report_id: str = "RPT-0001") -> Path:
    p = tmp / f"{fusion_id}-report.pdf"
    p.write_bytes(b"%PDF-1.4\n% fusion report for " + fusion_id.encode() + b"\n%%EOF\n")
    hook.attach_report(fusion_id, report_id=report_id, path=p, sha256=hashlib.sha256(p.read_bytes()).hexdigest())
    return p
