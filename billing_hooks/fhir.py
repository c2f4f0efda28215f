"""FHIR R4 claim evidence, built and validated with the ``fhir.resources.R4B`` models.

One Bundle (type ``collection``, every ``fullUrl`` a ``urn:uuid``, every reference
resolving inside the bundle) holds:

* ``Claim`` (type ``oral``, CDT codes under ``http://www.ada.org/cdt``): the decided line
  (D0395, or D0394) with its fee, then each suggested companion code as an unpriced item
  marked with the extension ``urn:dentfuse:fhir:suggested-line`` (valueBoolean true) so
  that nobody bills it without confirming. Each item lists, in ``informationSequence``,
  the ``supportingInfo`` entries it rests on: the fusion report (DocumentReference,
  category ``attachment``) and the input studies (ImagingStudy, category ``info``).
* ``Provenance`` targeting the Claim (FHIR cannot reference an item inside a resource;
  the decided item is named in ``Provenance.target.extension`` as its sequence), agent
  the dentfuse software (a ``Device`` with its version), entities the input studies and
  the report.
* ``DocumentReference`` for the PDF report: ``identifier`` holds the attachment control
  number (system ``urn:dentfuse:attachment-control-number``, the same value as the 837D
  ``PWK06``) and the report's SHA-256 (system ``urn:dentfuse:sha256``, lowercase hex);
  ``content.attachment.hash`` holds the base64 SHA-1 that FHIR R4 defines.
* ``ImagingStudy`` per input study, ``Patient`` (identifier only unless the practice
  system supplies more), ``Organization`` for provider and payer, ``Coverage``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from fhir.resources.R4B.bundle import Bundle

from billing_hooks.decision import CODE_LABELS, BillingDecision
from billing_hooks.ledger import iso
from billing_hooks.parties import PatientInfo, ProviderInfo
from fusion.records import FusionInput, FusionResult

CDT_SYSTEM = "http://www.ada.org/cdt"
NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
ACN_SYSTEM = "urn:dentfuse:attachment-control-number"
SHA256_SYSTEM = "urn:dentfuse:sha256"
CLAIM_SYSTEM = "urn:dentfuse:claim"
LINE_KEY_EXT = "urn:dentfuse:fhir:claim-line-key"
SUGGESTED_EXT = "urn:dentfuse:fhir:suggested-line"
TARGET_ITEM_EXT = "urn:dentfuse:fhir:target-claim-item"
_NS = uuid.UUID("6f1d3c52-5a2e-4f0b-9d55-3c0c8a9e7b11")
_GENDER = {"M": "male", "F": "female", "O": "other", "U": "unknown"}


@dataclass(frozen=True)
class ReportRef:
    """The fusion report attached to a claim."""

    report_id: str  # attachment control number
    sha256: str
    sha1_b64: str
    size: int
    title: str
    content_type: str = "application/pdf"


def uid_for(i: FusionInput) -> str:
    """The series UID of an input, or a deterministic 2.25 UID from its content hash."""
    if i.series_instance_uid:
        return i.series_instance_uid
    return "2.25." + str(int((i.content_sha256 or "0")[:30], 16))


def _ref(urls: Mapping[str, str], key: str) -> dict[str, str]:
    return {"reference": urls[key]}


def _fhir_date(da: str) -> str | None:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else None


def build_claim_bundle(decision: BillingDecision, result: FusionResult, *, provider: ProviderInfo,
                       patient: PatientInfo, report: ReportRef, claim_id: str, created: datetime,
                       service_date: str, line_keys: Mapping[str, str], fees: Mapping[str, float],
                       currency: str, software_version: str) -> dict[str, Any]:
    """Return the Bundle as JSON-ready dict (validated by the R4B models).

    Raises
    ------
    pydantic.ValidationError
        If a resource is invalid (a bug: the inputs are checked by the caller).
    """
    if decision.code is None:
        raise ValueError(f"fusion {decision.fusion_id}: no decided code to claim")
    fid = decision.fusion_id
    urls: dict[str, str] = {}

    def url(key: str) -> str:
        urls.setdefault(key, f"urn:uuid:{uuid.uuid5(_NS, f'{fid}/{claim_id}/{key}')}")
        return urls[key]

    resources: list[tuple[str, dict[str, Any]]] = []
    when = iso(created)

    # Patient, organisations, coverage, software
    pat: dict[str, Any] = {"resourceType": "Patient", "identifier": [{
        "system": f"urn:dentfuse:patient-id-issuer:{patient.issuer}" if patient.issuer else "urn:dentfuse:patient-id",
        "value": patient.patient_id}]}
    if patient.last_name or patient.first_name:
        pat["name"] = [{k: v for k, v in (("family", patient.last_name),
                                          ("given", [patient.first_name] if patient.first_name else None)) if v}]
    if _fhir_date(patient.birth_date):
        pat["birthDate"] = _fhir_date(patient.birth_date)
    if patient.sex.upper() in _GENDER:
        pat["gender"] = _GENDER[patient.sex.upper()]
    url("patient"); resources.append(("patient", pat))
    url("provider"); resources.append(("provider", {
        "resourceType": "Organization", "identifier": [{"system": NPI_SYSTEM, "value": provider.npi}],
        "name": provider.name}))
    url("payer"); resources.append(("payer", {
        "resourceType": "Organization", "identifier": [{"system": "urn:dentfuse:payer-id", "value": provider.payer_id}],
        "name": provider.payer_name}))
    url("coverage"); resources.append(("coverage", {
        "resourceType": "Coverage", "status": "active", "beneficiary": _ref(urls, "patient"),
        "subscriberId": patient.member_id or patient.patient_id, "payor": [_ref(urls, "payer")]}))
    url("software"); resources.append(("software", {
        "resourceType": "Device", "status": "active",
        "deviceName": [{"name": "dentfuse", "type": "manufacturer-name"}],
        "type": {"text": "image fusion and billing software"},
        "version": [{"value": software_version}]}))

    # Input studies
    studies: dict[str, list[FusionInput]] = {}
    for i in result.inputs:
        studies.setdefault(i.study_instance_uid or f"no-study:{uid_for(i)}", []).append(i)
    study_keys: dict[str, str] = {}
    for n, (study_uid, inputs) in enumerate(studies.items(), start=1):
        key = f"study{n}"
        study_keys[study_uid] = key
        series = []
        for i in inputs:
            mod = (i.modality or ("M3D" if i.kind == "surface" else "OT")).upper().replace("CBCT", "CT")
            s: dict[str, Any] = {"uid": uid_for(i), "modality": {"system": DCM_SYSTEM, "code": mod},
                                 "description": f"{i.role} {i.kind} input"}
            if i.sop_instance_uids:
                s["numberOfInstances"] = len(i.sop_instance_uids)
                s["instance"] = [{"uid": u, "sopClass": {"system": "urn:ietf:rfc:3986",
                                                         "code": f"urn:oid:{i.sop_class_uid or '1.2.840.10008.5.1.4.1.1.7'}"}}
                                 for u in i.sop_instance_uids]
            series.append(s)
        study: dict[str, Any] = {"resourceType": "ImagingStudy", "status": "available",
                                 "subject": _ref(urls, "patient"), "numberOfSeries": len(series), "series": series}
        if not study_uid.startswith("no-study:"):
            study["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]
        started = next((_fhir_date(i.acquisition_date) for i in inputs if _fhir_date(i.acquisition_date)), None)
        if started:
            study["started"] = started
        url(key); resources.append((key, study))

    # Report
    url("report"); resources.append(("report", {
        "resourceType": "DocumentReference", "status": "current", "docStatus": "final",
        "identifier": [{"system": ACN_SYSTEM, "value": report.report_id},
                       {"system": SHA256_SYSTEM, "value": report.sha256}],
        "type": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": _ref(urls, "patient"), "date": when, "author": [_ref(urls, "software")],
        "description": f"dentfuse fusion report for fusion {fid}",
        "content": [{"attachment": {"contentType": report.content_type, "size": report.size, "hash": report.sha1_b64,
                                    "title": report.title}}],
        "context": {"related": [_ref(urls, k) for k in study_keys.values()]}}))

    # Claim
    supporting = [{"sequence": 1, "category": {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/claiminformationcategory", "code": "attachment"}]},
        "valueReference": _ref(urls, "report")}]
    info_of_study: dict[str, int] = {}
    for study_uid, key in study_keys.items():
        seq = len(supporting) + 1
        info_of_study[study_uid] = seq
        supporting.append({"sequence": seq, "category": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/claiminformationcategory", "code": "info"}]},
            "valueReference": _ref(urls, key)})
    fee = round(float(fees[decision.code]), 2)
    items: list[dict[str, Any]] = [{
        "sequence": 1,
        "extension": [{"url": LINE_KEY_EXT, "valueString": line_keys[decision.code]}],
        "productOrService": {"coding": [{"system": CDT_SYSTEM, "code": decision.code,
                                         "display": CODE_LABELS.get(decision.code, decision.code)}]},
        "servicedDate": service_date, "quantity": {"value": 1},
        "unitPrice": {"value": fee, "currency": currency}, "net": {"value": fee, "currency": currency},
        "informationSequence": [s["sequence"] for s in supporting]}]
    for c in decision.companions:
        study_uid = next((k for k, ins in studies.items()
                          for i in ins if i.content_sha256 == c.evidence.get("content_sha256")
                          and i.series_instance_uid == c.evidence.get("series_instance_uid")), None)
        seqs = [info_of_study[study_uid]] if study_uid in info_of_study else []
        items.append({
            "sequence": len(items) + 1,
            "extension": [{"url": SUGGESTED_EXT, "valueBoolean": True}],
            "productOrService": {"coding": [{"system": CDT_SYSTEM, "code": c.code, "display": c.label}],
                                 "text": "suggested, not billed: " + c.reason},
            "servicedDate": service_date, "quantity": {"value": 1},
            **({"informationSequence": seqs} if seqs else {})})
    url("claim"); resources.append(("claim", {
        "resourceType": "Claim", "status": "active",
        "identifier": [{"system": CLAIM_SYSTEM, "value": claim_id}],
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "oral"}]},
        "use": "claim", "patient": _ref(urls, "patient"), "created": when, "provider": _ref(urls, "provider"),
        "insurer": _ref(urls, "payer"),
        "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority", "code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": _ref(urls, "coverage")}],
        "supportingInfo": supporting, "item": items, "total": {"value": fee, "currency": currency}}))

    url("provenance"); resources.append(("provenance", {
        "resourceType": "Provenance",
        "target": [{"reference": urls["claim"], "extension": [{"url": TARGET_ITEM_EXT, "valuePositiveInt": 1}]}],
        "recorded": when, "reason": [{"text": "; ".join(decision.reasons)[:1000]}],
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                         "code": "assembler"}]}, "who": _ref(urls, "software")}],
        "entity": [{"role": "source", "what": _ref(urls, k)} for k in study_keys.values()]
        + [{"role": "source", "what": _ref(urls, "report")}]}))

    bundle = {"resourceType": "Bundle", "type": "collection", "timestamp": when,
              "identifier": {"system": CLAIM_SYSTEM, "value": claim_id},
              "entry": [{"fullUrl": urls[key], "resource": res} for key, res in resources]}
    model = Bundle.model_validate(bundle)  # strict: raises on anything R4B does not accept
    return model.model_dump(mode="json", exclude_none=True)
