"""Payer policy for D0395 decisions (configuration keys under ``[billing.policy]``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PayerPolicy:
    """What a payer accepts. Every field is a configuration key."""

    surface_scans_count_as_3d: bool = True  # an intraoral surface scan counts as a 3D input
    frequency_limit: int = 0  # D0395 claims per patient per period; 0 = no limit
    frequency_period_days: int = 365
    require_rationale: bool = True  # rule 8: hold claim lines until medical necessity is documented
    suggest_companion_codes: tuple[str, ...] = ("D0364", "D0365", "D0366", "D0367", "D0801", "D0802", "D0394")
    cbct_limited_fov_max_mm: float = 60.0  # D0364 when the CBCT's largest in-plane extent is at most this
    cbct_both_jaws_min_height_mm: float = 50.0  # D0367 when the craniocaudal extent is at least this
    min_volume_slices: int = 10  # rule 1: a CT/CBCT/MR volume needs at least this many voxels along each axis
    fee_schedule: tuple[str, ...] = ()  # "CODE=amount" entries, e.g. ["D0395=350.00"]; needed to export a claim
    currency: str = "USD"


@dataclass(frozen=True)
class DeliverySettings:
    """Where claim evidence goes (configuration keys under ``[billing.delivery]``)."""

    drop_dir: str = ""  # "" = <data_dir>/outbox/drop
    http_url: str = ""  # "" = no HTTP delivery
    max_attempts: int = 8
    backoff_s: float = 2.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0
    ledger_synchronous: str = "FULL"  # SQLite synchronous mode of the ledger: FULL (power-loss safe) or NORMAL
