"""ASC X12 837 Dental (005010X224A2) claim for the decided line.

One interchange: ISA / GS / ST / BHT, loops 1000A (submitter), 1000B (receiver), 2000A
+ 2010AA (billing provider), 2000B + 2010BA (subscriber = patient) + 2010BB (payer),
2300 (CLM, and PWK naming the fusion report by its attachment control number), 2400
(LX, ``SV3*AD:<code>``, ``DTP*472``, ``REF*6R`` = the claim-line idempotency key), then
SE / GE / IEA with correct counts and control numbers.

Only the decided code is a service line: suggested companion codes are left to a person
(they may already have been billed when the image was captured).
Separators: element ``*``, component ``:``, repetition ``^``, segment ``~``.
"""

from __future__ import annotations

import re
from datetime import datetime

from billing_hooks.decision import BillingDecision
from billing_hooks.errors import ExportError
from billing_hooks.parties import PatientInfo, ProviderInfo

_BAD = re.compile(r"[*~:^\r\n]")


def _v(text: str, max_len: int | None = None) -> str:
    """An element value: X12 delimiters removed, upper case, trimmed to ``max_len``."""
    out = _BAD.sub(" ", str(text)).strip().upper()
    return out[:max_len] if max_len else out


def _id(text: str, max_len: int) -> str:
    """An identifier value: delimiters removed, case kept (it is compared with other systems)."""
    return _BAD.sub("", str(text)).strip()[:max_len]


def _amount(v: float) -> str:
    s = f"{v:.2f}".rstrip("0").rstrip(".")
    return s or "0"


def build_837d(decision: BillingDecision, *, provider: ProviderInfo, patient: PatientInfo, claim_id: str,
               attachment_control_number: str, line_key: str, fee: float, service_date: str,
               control_number: int, created: datetime) -> str:
    """Return the interchange text (segments separated by ``~`` and a newline).

    Parameters
    ----------
    control_number:
        ISA13/IEA02 (9 digits) and GS06/GE02; unique per interchange from this submitter.
    service_date:
        ``YYYY-MM-DD`` or ``YYYYMMDD``, the date of the fusion (DTP*472).

    Raises
    ------
    ExportError
        A value the 837D requires is missing from the configuration.
    """
    if decision.code is None:
        raise ExportError(f"fusion {decision.fusion_id}: no decided code; nothing to claim")
    if not 1 <= control_number <= 999_999_999:
        raise ExportError(f"interchange control number {control_number} is outside 1..999999999")
    missing = [name for name, val in (("billing.provider_npi", provider.npi), ("billing.provider_name", provider.name),
                                      ("billing.payer_id", provider.payer_id), ("billing.payer_name", provider.payer_name))
               if not val]
    if missing:
        raise ExportError(f"cannot write an 837D for fusion {decision.fusion_id}: set {', '.join(missing)} in the configuration")
    sender = _v(provider.submitter_id or provider.npi, 15)
    receiver = _v(provider.receiver_id or provider.payer_id, 15)
    d8 = created.strftime("%Y%m%d")
    ctrl9 = f"{control_number:09d}"
    gs_ctrl = str(control_number)
    svc = service_date.replace("-", "")
    segs: list[str] = []

    def seg(*elements: str) -> None:
        # trailing empty elements are dropped, as X12 requires
        el = list(elements)
        while el and el[-1] == "":
            el.pop()
        segs.append("*".join(el))

    isa = ["ISA", "00", " " * 10, "00", " " * 10, "ZZ", sender.ljust(15), "ZZ", receiver.ljust(15),
           created.strftime("%y%m%d"), created.strftime("%H%M"), "^", "00501", ctrl9, "0",
           "T" if provider.usage.upper() == "T" else "P", ":"]
    segs.append("*".join(isa))
    seg("GS", "HC", sender, receiver, d8, created.strftime("%H%M"), gs_ctrl, "X", "005010X224A2")
    st_index = len(segs)
    seg("ST", "837", "0001", "005010X224A2")
    seg("BHT", "0019", "00", _v(claim_id, 50), d8, created.strftime("%H%M"), "CH")
    # 1000A submitter
    seg("NM1", "41", "2", _v(provider.name, 60), "", "", "", "", "46", sender)
    per = ["PER", "IC", _v(provider.contact_name or provider.name, 60)]
    if provider.phone:
        per += ["TE", re.sub(r"\D", "", provider.phone)]
    seg(*per)
    # 1000B receiver
    seg("NM1", "40", "2", _v(provider.payer_name, 60), "", "", "", "", "46", receiver)
    # 2000A billing provider
    seg("HL", "1", "", "20", "1")
    seg("NM1", "85", "2", _v(provider.name, 60), "", "", "", "", "XX", _v(provider.npi, 80))
    if provider.address_line:
        seg("N3", _v(provider.address_line, 55))
    if provider.city:
        seg("N4", _v(provider.city, 30), _v(provider.state, 2), _v(provider.postal_code, 15))
    if provider.tax_id:
        seg("REF", "EI", re.sub(r"\D", "", provider.tax_id))
    # 2000B subscriber (the patient is the subscriber)
    seg("HL", "2", "1", "22", "0")
    seg("SBR", "P", "18", "", "", "", "", "", "", "CI")
    member = patient.member_id or patient.patient_id
    seg("NM1", "IL", "1", _v(patient.last_name or patient.patient_id, 60), _v(patient.first_name, 35),
        "", "", "", "MI", _id(member, 80))
    if len(patient.birth_date) == 8 and patient.sex.upper() in ("M", "F", "U"):
        seg("DMG", "D8", patient.birth_date, patient.sex.upper())
    # 2010BB payer
    seg("NM1", "PR", "2", _v(provider.payer_name, 60), "", "", "", "", "PI", _v(provider.payer_id, 80))
    # 2300 claim
    seg("CLM", _id(claim_id, 20), _amount(fee), "", "", "11:B:1", "Y", "A", "Y", "Y")
    seg("PWK", "RR", "EL", "", "", "AC", _id(attachment_control_number, 80))
    # 2400 service line
    seg("LX", "1")
    seg("SV3", f"AD:{decision.code}", _amount(fee), "", "", "", "1")
    seg("DTP", "472", "D8", svc)
    seg("REF", "6R", _id(line_key, 50))
    count = len(segs) - st_index + 1  # ST..SE inclusive
    seg("SE", str(count), "0001")
    seg("GE", "1", gs_ctrl)
    seg("IEA", "1", ctrl9)
    return "~\n".join(segs) + "~\n"


def parse_segments(text: str) -> list[list[str]]:
    """Split an interchange into segments of elements (for checks and tests)."""
    return [s.strip().split("*") for s in text.split("~") if s.strip()]
