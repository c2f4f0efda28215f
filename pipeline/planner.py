"""Plan fusions for a patient from the stable 3D series we hold.

The planner looks only at one patient at a time (``Inventory.stable_series(patient_key)``
returns that patient's series), so two patients' inputs are never paired, whatever
arrives; a pair whose inputs disagree on the patient is refused here as well (and again
by fusion itself).

Rules (each one a configuration switch, ``fusion.plan_*``):

* CBCT + intraoral scan (``plan_cbct_scan``): each surface scan is fused with one CBCT,
  the one closest in date to the scan (the most recent on a tie): implant planning needs
  the scan on the current anatomy, not on every CBCT ever taken.
* CBCT + CBCT (``plan_cbct_cbct``): every two distinct CBCT acquisitions taken within
  ``cbct_cbct_max_interval_days``; the earlier one is fixed (it defines the frame).
* CBCT + MR (``plan_cbct_mr``): each MR with the CBCT closest in date.
* 2D images, registrations, segmentations and our own derived outputs are never inputs.

Duplicates (a series re-sent under new UIDs with identical pixels): the planner groups
series by their pixel fingerprint (a hash of the pixel data as stored, computed by the
inventory). Only the first received series of a group takes part in the rules above; the
copies are skipped with the reason "duplicate of <series>" (see :func:`explain_series`,
shown by ``dentfuse status`` and the demo). Choice: skip, rather than plan and let the
rules decide, because fusion itself refuses to register two series with identical voxel
content (``InputError``: one acquisition, not two), so a planned pair could only fail;
and a copy paired with other inputs would only repeat their fusions. Billing still guards
the same case (rule 2, content hashes) for fusions requested by hand.
(``FusionPlanRules.pair_duplicates_for_evidence`` plans the copy with its original anyway,
for sites that want the refusal on record as a failed job.)

Idempotency: a job key is ``patient | sorted series UIDs | content versions``, where a
series' content version is a hash of its instances (SOP UID + sha256). The same pair is
planned once; a series re-opened by a late instance is planned again only when its content
changed (a new instance, or different bytes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from typing import Iterable, Protocol, Sequence

VOLUME_MODALITIES_CBCT = ("CT",)
VOLUME_MODALITIES_MR = ("MR",)


@dataclass(frozen=True)
class SeriesInfo:
    """One stable series of one patient, as the planner needs it."""

    patient_key: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str  # DICOM modality: CT, MR, OT, M3D, DX, PX, ...
    kind: str  # volume / surface / 2d / registration / segmentation / other
    instance_count: int
    content_version: str  # hash of the series' instances (SOP UID + sha256)
    pixel_fingerprint: str = ""  # hash of the pixel / mesh payload, equal for a re-sent copy
    acquisition_date: str = ""  # YYYYMMDD or ""
    first_received_at: str = ""  # ISO 8601, orders duplicates (first received wins)
    derived_by_us: bool = False  # an output of dentfuse itself (never an input)
    paths: tuple[str, ...] = ()  # the instance files (volume) or the one scan file (surface)
    frame_of_reference_uid: str = ""


class Inventory(Protocol):
    """Where the planner reads a patient's stable series from (the node's index)."""

    def stable_series(self, patient_key: str) -> list[SeriesInfo]: ...


@dataclass(frozen=True)
class FusionPlanRules:
    plan_cbct_scan: bool = True
    plan_cbct_cbct: bool = True
    plan_cbct_mr: bool = True
    cbct_cbct_max_interval_days: int = 3650
    pair_duplicates_for_evidence: bool = False

    @classmethod
    def from_settings(cls, fusion_settings: object) -> "FusionPlanRules":
        """Build from :class:`pipeline.config.FusionSettings` (the ``[fusion]`` table)."""
        return cls(
            plan_cbct_scan=bool(getattr(fusion_settings, "plan_cbct_scan", True)),
            plan_cbct_cbct=bool(getattr(fusion_settings, "plan_cbct_cbct", True)),
            plan_cbct_mr=bool(getattr(fusion_settings, "plan_cbct_mr", True)),
            cbct_cbct_max_interval_days=int(getattr(fusion_settings, "cbct_cbct_max_interval_days", 3650)),
        )


@dataclass(frozen=True)
class PlannedFusion:
    """One fusion to run: ``fixed`` defines the frame; ``moving`` is registered onto it."""

    key: str
    fusion_id: str
    kind: str  # "volume" (volume + volume) or "surface" (CBCT + scan)
    rule: str  # cbct_scan / cbct_cbct / cbct_mr / duplicate_evidence
    patient_key: str
    fixed: SeriesInfo
    moving: SeriesInfo
    purpose: str = "fusion"
    notes: tuple[str, ...] = field(default_factory=tuple)


def job_key(patient_key: str, series: Sequence[SeriesInfo]) -> str:
    """``patient | sorted series UIDs | their content versions`` (the idempotency key)."""
    ordered = sorted(series, key=lambda s: s.series_instance_uid)
    return "|".join([patient_key, ",".join(s.series_instance_uid for s in ordered),
                     ",".join(s.content_version for s in ordered)])


def fusion_id_for(key: str) -> str:
    """A stable fusion id for a job key: a retried job writes the same fusion again."""
    return "F" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:15].upper()


def _is_cbct(s: SeriesInfo) -> bool:
    return s.kind == "volume" and s.modality.upper() in VOLUME_MODALITIES_CBCT


def _is_mr(s: SeriesInfo) -> bool:
    return s.kind == "volume" and s.modality.upper() in VOLUME_MODALITIES_MR


def _is_scan(s: SeriesInfo) -> bool:
    return s.kind == "surface"


def _date(s: SeriesInfo) -> date | None:
    d = (s.acquisition_date or "").strip()
    if len(d) >= 8 and d[:8].isdigit():
        try:
            return date(int(d[:4]), int(d[4:6]), int(d[6:8]))
        except ValueError:
            return None
    return None


def _days_between(a: SeriesInfo, b: SeriesInfo) -> int | None:
    da, db = _date(a), _date(b)
    if da is None or db is None:
        return None
    return abs((da - db).days)


def _order(s: SeriesInfo) -> tuple[str, str, str]:
    return (s.acquisition_date or "99999999", s.first_received_at, s.series_instance_uid)


def _closest_cbct(target: SeriesInfo, cbcts: Sequence[SeriesInfo]) -> SeriesInfo | None:
    if not cbcts:
        return None

    def score(c: SeriesInfo) -> tuple[int, str, str]:
        days = _days_between(c, target)
        # unknown dates sort after known ones; among equals prefer the most recent CBCT
        return (days if days is not None else 10**9, _neg(c.acquisition_date), _neg(c.first_received_at))

    return min(cbcts, key=score)


def _neg(text: str) -> str:
    # a key that sorts descending for digit strings / ISO times
    return "".join(chr(0x10FFFF - ord(ch)) for ch in (text or ""))


def eligible_inputs(series: Iterable[SeriesInfo]) -> tuple[list[SeriesInfo], list[tuple[SeriesInfo, str]]]:
    """Split series into planner inputs and skipped ones with the reason."""
    keep: list[SeriesInfo] = []
    skipped: list[tuple[SeriesInfo, str]] = []
    for s in series:
        if s.derived_by_us:
            skipped.append((s, "an output of dentfuse, not an acquisition"))
        elif s.kind == "2d":
            skipped.append((s, "2D image: never a fusion input (D0395 rule 1)"))
        elif s.kind not in ("volume", "surface"):
            skipped.append((s, f"{s.kind} object, not an image input"))
        elif s.kind == "volume" and not (_is_cbct(s) or _is_mr(s)):
            skipped.append((s, f"volume of modality {s.modality}: no fusion rule for it"))
        elif s.kind == "volume" and s.instance_count < 2 and len(s.paths) < 2:
            skipped.append((s, "a single instance is not a volume series"))
        else:
            keep.append(s)
    return keep, skipped


def _split_duplicates(inputs: Sequence[SeriesInfo]) -> tuple[list[SeriesInfo], list[tuple[SeriesInfo, SeriesInfo]]]:
    """(canonical series, [(duplicate, original)]): the first received of equal fingerprints wins."""
    canonical: list[SeriesInfo] = []
    duplicates: list[tuple[SeriesInfo, SeriesInfo]] = []
    by_fp: dict[str, SeriesInfo] = {}
    for s in sorted(inputs, key=lambda s: (s.first_received_at, s.series_instance_uid)):
        fp = s.pixel_fingerprint
        if fp and fp in by_fp:
            duplicates.append((s, by_fp[fp]))
            continue
        if fp:
            by_fp[fp] = s
        canonical.append(s)
    return canonical, duplicates


def explain_series(patient_key: str, series: Sequence[SeriesInfo]) -> dict[str, str]:
    """For each series UID of the patient: "input" or why the planner leaves it out."""
    mine = [s for s in series if s.patient_key == patient_key]
    inputs, skipped = eligible_inputs(mine)
    _canonical, duplicates = _split_duplicates(inputs)
    out = {s.series_instance_uid: "input" for s in inputs}
    out.update({s.series_instance_uid: why for s, why in skipped})
    for dup, orig in duplicates:
        out[dup.series_instance_uid] = (f"duplicate of series {orig.series_instance_uid} (identical pixel data): "
                                        "one acquisition, not fused again")
    return out


def plan_fusions(patient_key: str, series: Sequence[SeriesInfo], rules: FusionPlanRules) -> list[PlannedFusion]:
    """Plan the fusions for one patient.

    Parameters
    ----------
    patient_key:
        The patient (``ID`` or ``ID^ISSUER``); series of another patient are ignored.
    series:
        The patient's stable series (any kind; 2D and others are skipped).
    rules:
        Which pairings to plan.

    Returns
    -------
    list of PlannedFusion, deterministic order, no two with the same key.
    """
    mine = [s for s in series if s.patient_key == patient_key]
    inputs, _skipped = eligible_inputs(mine)

    canonical, duplicates = _split_duplicates(inputs)

    cbcts = sorted([s for s in canonical if _is_cbct(s)], key=_order)
    mrs = [s for s in canonical if _is_mr(s)]
    scans = [s for s in canonical if _is_scan(s)]

    plans: list[PlannedFusion] = []

    def add(fixed: SeriesInfo, moving: SeriesInfo, kind: str, rule: str, notes: tuple[str, ...] = ()) -> None:
        key = job_key(patient_key, [fixed, moving])
        if any(p.key == key for p in plans):
            return
        plans.append(PlannedFusion(key=key, fusion_id=fusion_id_for(key), kind=kind, rule=rule,
                                   patient_key=patient_key, fixed=fixed, moving=moving, notes=notes))

    if rules.plan_cbct_cbct:
        for i, a in enumerate(cbcts):
            for b in cbcts[i + 1:]:
                days = _days_between(a, b)
                if days is not None and days > rules.cbct_cbct_max_interval_days:
                    continue
                add(a, b, "volume", "cbct_cbct",
                    (f"{days} days apart" if days is not None else "acquisition dates unknown",))
    if rules.plan_cbct_scan:
        for scan in scans:
            c = _closest_cbct(scan, cbcts)
            if c is not None:
                add(c, scan, "surface", "cbct_scan")
    if rules.plan_cbct_mr:
        for mr in mrs:
            c = _closest_cbct(mr, cbcts)
            if c is not None:
                add(c, mr, "volume", "cbct_mr")
    if rules.pair_duplicates_for_evidence:
        for dup, orig in duplicates:
            if orig.kind == "volume" and dup.kind == "volume":
                add(orig, dup, "volume", "duplicate_evidence",
                    ("pixel data identical to the original series: planned once to record the evidence",))
    return plans
