"""FHIR R4 claim bundle (fhir.resources R4B + fhirclient R4) and X12 837D structure."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

from billing_hooks.errors import ExportError
from billing_hooks.fhir import ACN_SYSTEM, CDT_SYSTEM, LINE_KEY_EXT, SHA256_SYSTEM, SUGGESTED_EXT
from billing_hooks.parties import software_version
from billing_hooks.x12 import parse_segments
from billing_helpers import POLICY, FakeClock, attach_pdf, cbct, make_hook, result, scan


def _export(tmp: Path, fusion_id: str = "F1", inputs=None, purpose: str = "fusion", hook=None):
    hook = hook or make_hook(tmp / "data")
    inputs = inputs or (cbct("a"), scan())
    hook.record_fusion(result(tmp, fusion_id, tuple(inputs), purpose=purpose))
    pdf = attach_pdf(hook, tmp, fusion_id, f"RPT-{fusion_id}-1")
    d = hook.document(fusion_id, rationale="Implant planning at 36.", clinician="Dr. A. Molar")
    assert d.status == "exported", d.reasons
    paths = hook.export(fusion_id)
    return hook, paths, pdf


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(node, list):
        for v in node:
            yield from _references(v)


def _by_type(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_fhir_bundle_validates_and_links_evidence(tmp_path: Path) -> None:
    hook, paths, pdf = _export(tmp_path)
    bundle = json.loads(paths["fhir"].read_text())

    from fhir.resources.R4B.bundle import Bundle as R4BBundle
    R4BBundle.model_validate(bundle)
    from fhirclient.models.bundle import Bundle as R4Bundle
    parsed = R4Bundle(bundle)  # strict: raises FHIRValidationError on anything R4 does not allow
    assert parsed.type == "collection" and len(parsed.entry) == len(bundle["entry"])

    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert len(set(urls)) == len(urls) and all(u.startswith("urn:uuid:") for u in urls)
    refs = list(_references(bundle))
    assert refs and set(refs) <= set(urls), set(refs) - set(urls)

    (claim,) = _by_type(bundle, "Claim")
    assert claim["type"]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/claim-type", "code": "oral"}
    codes = [(i["sequence"], i["productOrService"]["coding"][0]) for i in claim["item"]]
    assert all(c["system"] == CDT_SYSTEM for _, c in codes)
    assert [c["code"] for _, c in codes] == ["D0395", "D0367", "D0801"]
    billed = [i for i in claim["item"] if not any(x["url"] == SUGGESTED_EXT for x in i.get("extension", []))]
    suggested = [i for i in claim["item"] if i not in billed]
    assert [i["productOrService"]["coding"][0]["code"] for i in billed] == ["D0395"]
    assert all("net" not in i for i in suggested)
    assert claim["total"]["value"] == sum(i["net"]["value"] for i in billed) == 350.0
    assert claim["total"]["currency"] == "USD"
    seqs = {s["sequence"]: s for s in claim["supportingInfo"]}
    for item in claim["item"]:
        assert item.get("informationSequence") and set(item["informationSequence"]) <= set(seqs)
    target_of = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    kinds = {target_of[s["valueReference"]["reference"]]["resourceType"] for s in claim["supportingInfo"]}
    assert kinds == {"DocumentReference", "ImagingStudy"}
    line_key = next(x["valueString"] for x in billed[0]["extension"] if x["url"] == LINE_KEY_EXT)

    (doc,) = _by_type(bundle, "DocumentReference")
    ids = {i["system"]: i["value"] for i in doc["identifier"]}
    data = pdf.read_bytes()
    assert ids[ACN_SYSTEM] == "RPT-F1-1"
    assert ids[SHA256_SYSTEM] == hashlib.sha256(data).hexdigest()
    assert doc["content"][0]["attachment"]["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()

    (prov,) = _by_type(bundle, "Provenance")
    claim_url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Claim")
    assert prov["target"][0]["reference"] == claim_url
    device = target_of[prov["agent"][0]["who"]["reference"]]
    assert device["resourceType"] == "Device" and device["version"][0]["value"] == software_version()
    entity_types = sorted(target_of[e["what"]["reference"]]["resourceType"] for e in prov["entity"])
    assert entity_types == ["DocumentReference", "ImagingStudy", "ImagingStudy"]

    series = sorted(s["uid"] for st in _by_type(bundle, "ImagingStudy") for s in st["series"])
    r = hook.fusion_result("F1")
    assert r.inputs[0].series_instance_uid in series and len(series) == 2

    keys = {row.idempotency_key for row in hook.outbox.rows(fusion_id="F1")}
    assert keys == {line_key}


def _check_837(text: str) -> dict[str, list[list[str]]]:
    raw = [s for s in text.split("~") if s.strip()]
    assert len(raw[0].strip()) == 105 and raw[0].startswith("ISA*")  # fixed-width ISA (106 with terminator)
    segs = parse_segments(text)
    ids = [s[0] for s in segs]
    assert ids[:4] == ["ISA", "GS", "ST", "BHT"] and ids[-3:] == ["SE", "GE", "IEA"]
    isa, gs, st = segs[0], segs[1], segs[2]
    se, ge, iea = segs[-3], segs[-2], segs[-1]
    assert isa[12] == "00501" and isa[16] == ":" and len(isa) == 17
    assert gs[1] == "HC" and gs[8] == "005010X224A2" and st[1] == "837" and st[3] == "005010X224A2"
    assert int(se[1]) == ids.index("SE") - ids.index("ST") + 1  # ST..SE inclusive
    assert se[2] == st[2]
    assert ge[1] == str(ids.count("ST")) and ge[2] == gs[6]
    assert iea[1] == str(ids.count("GS")) and iea[2] == isa[13] and len(isa[13]) == 9
    order = [" ".join(s[:2]) for s in segs if s[0] in ("NM1", "HL", "SBR", "CLM", "PWK", "LX", "SV3", "DTP", "REF")]
    assert order == ["NM1 41", "NM1 40", "HL 1", "NM1 85", "REF EI", "HL 2", "SBR P", "NM1 IL", "NM1 PR", "CLM "
                     + next(s[1] for s in segs if s[0] == "CLM"), "PWK RR", "LX 1",
                     "SV3 " + next(s[1] for s in segs if s[0] == "SV3"), "DTP 472", "REF 6R"]
    hl = [s for s in segs if s[0] == "HL"]
    assert hl == [["HL", "1", "", "20", "1"], ["HL", "2", "1", "22", "0"]]
    by: dict[str, list[list[str]]] = {}
    for s in segs:
        by.setdefault(s[0], []).append(s)
    return by


def test_837d_structure_counts_and_cross_references(tmp_path: Path) -> None:
    hook, paths, _ = _export(tmp_path)
    by = _check_837(paths["x12"].read_text())
    bundle = json.loads(paths["fhir"].read_text())
    (doc,) = _by_type(bundle, "DocumentReference")
    acn = {i["system"]: i["value"] for i in doc["identifier"]}[ACN_SYSTEM]
    (pwk,) = by["PWK"]
    assert pwk[5] == "AC" and pwk[6] == acn
    (sv3,) = by["SV3"]
    assert sv3[1] == "AD:D0395" and float(sv3[2]) == 350.0
    (clm,) = by["CLM"]
    (claim,) = _by_type(bundle, "Claim")
    assert float(clm[2]) == claim["total"]["value"] and clm[1] == claim["identifier"][0]["value"]
    dtp = next(s for s in by["DTP"] if s[1] == "472")
    assert dtp[2] == "D8" and dtp[3] == "20261126"
    ref6r = next(s for s in by["REF"] if s[1] == "6R")
    assert ref6r[2] == hook.outbox.rows(fusion_id="F1")[0].idempotency_key
    assert by["ISA"][0][13] == "000000001"


def test_second_interchange_gets_next_control_number_and_d0394(tmp_path: Path) -> None:
    hook, _, _ = _export(tmp_path, "F1")
    _, paths, _ = _export(tmp_path, "F2", inputs=(cbct("c", date="20260101"), cbct("d", role="moving")),
                          purpose="subtraction", hook=hook)
    by = _check_837(paths["x12"].read_text())
    assert by["ISA"][0][13] == "000000002" and by["GS"][0][6] == "2" and by["IEA"][0][2] == "000000002"
    assert by["SV3"][0][1] == "AD:D0394" and float(by["SV3"][0][2]) == 120.0
    bundle = json.loads(paths["fhir"].read_text())
    (claim,) = _by_type(bundle, "Claim")
    assert claim["item"][0]["productOrService"]["coding"][0]["code"] == "D0394"


def test_export_blocked_without_fee_is_ledgered(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "data", policy=replace(POLICY, fee_schedule=()))
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), scan())))
    attach_pdf(hook, tmp_path, "F1")
    d = hook.document("F1", rationale="Implant planning at 36.", clinician="Dr. A. Molar")
    assert d.status == "ready_to_bill"
    (blocked,) = hook.ledger.entries(fusion_id="F1", kind="export_blocked")
    assert "fee_schedule" in blocked.event["reason"]
    with pytest.raises(ExportError, match="fee_schedule"):
        hook.export("F1")
    assert hook.outbox.rows() == []


def test_export_rejects_changed_report(tmp_path: Path) -> None:
    hook = make_hook(tmp_path / "data", clock=FakeClock())
    hook.record_fusion(result(tmp_path, "F1", (cbct("a"), scan())))
    with pytest.raises(Exception, match="sha256"):
        p = tmp_path / "r.pdf"
        p.write_bytes(b"%PDF")
        hook.attach_report("F1", report_id="RPT-1", path=p, sha256="0" * 64)
    with pytest.raises(Exception, match="report id"):
        hook.attach_report("F1", report_id="bad id*~", path=p, sha256=hashlib.sha256(b"%PDF").hexdigest())
