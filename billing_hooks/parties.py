"""Who is on a claim: the billing provider and payer (configuration), and the patient."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Mapping


def software_version() -> str:
    """The installed dentfuse version (recorded as the Provenance agent)."""
    try:
        return version("dentfuse")
    except PackageNotFoundError:  # source tree without installation
        return "0+unknown"


@dataclass(frozen=True)
class ProviderInfo:
    """Billing provider and payer, from ``[billing]`` in the configuration."""

    npi: str
    name: str
    payer_id: str
    payer_name: str
    tax_id: str = ""
    address_line: str = ""
    city: str = ""
    state: str = ""
    postal_code: str = ""
    contact_name: str = "BILLING"
    phone: str = ""
    submitter_id: str = ""  # ISA06/GS02/1000A id; the NPI when empty
    receiver_id: str = ""  # ISA08/GS03/1000B id; the payer id when empty
    usage: str = "P"  # ISA15: P production, T test

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | "ProviderInfo") -> "ProviderInfo":
        if isinstance(d, ProviderInfo):
            return d
        known = set(cls.__dataclass_fields__)
        return cls(**{k: str(v) for k, v in d.items() if k in known})


@dataclass(frozen=True)
class PatientInfo:
    """What a claim says about the patient. dentfuse knows only the DICOM patient ID; the
    practice-management system supplies names and birth date through ``patient_resolver``."""

    patient_id: str
    issuer: str = ""
    member_id: str = ""
    last_name: str = ""
    first_name: str = ""
    birth_date: str = ""  # YYYYMMDD
    sex: str = ""  # M, F, U
