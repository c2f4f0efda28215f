"""Companion codes suggested next to D0395 (never added to a claim on their own).

* D0364-D0367 for a CBCT input by its field of view (``extent_mm`` of the volume input
  and the payer policy thresholds);
* D0801 / D0802 for a 3D dental surface scan (direct intraoral scan / scan of a model);
* D0394 is not a companion: it replaces D0395 for same-modality subtraction (rule 7).

Labels are our own short wording (CDT descriptors are copyrighted by the ADA).
"""

from __future__ import annotations

from billing_hooks.decision import CODE_LABELS, CompanionSuggestion
from billing_hooks.policy import PayerPolicy
from fusion.records import FusionInput, FusionResult

_MODEL_HINTS = ("model", "cast", "impression", "stone")


def _cbct_codes(i: FusionInput, policy: PayerPolicy) -> list[tuple[str, str]]:
    if len(i.extent_mm) != 3:
        return []
    x, y, z = (float(v) for v in i.extent_mm)
    in_plane = max(x, y)
    fov = f"{x:.0f} x {y:.0f} x {z:.0f} mm"
    if in_plane <= policy.cbct_limited_fov_max_mm:
        return [("D0364", f"its field of view ({fov}) is at most {policy.cbct_limited_fov_max_mm:.0f} mm across, "
                          "less than one whole jaw")]
    if z >= policy.cbct_both_jaws_min_height_mm:
        return [("D0367", f"its field of view ({fov}) is at least {policy.cbct_both_jaws_min_height_mm:.0f} mm high, "
                          "enough for both jaws")]
    why = (f"its field of view ({fov}) covers one full arch; confirm which: D0365 for the mandible, "
           "D0366 for the maxilla")
    return [("D0365", why), ("D0366", why)]


def suggest_companions(result: FusionResult, policy: PayerPolicy) -> tuple[CompanionSuggestion, ...]:
    """Suggest capture codes for the fusion's inputs, restricted to ``policy.suggest_companion_codes``.

    Each distinct acquisition (by content hash) gets at most one suggestion set.
    """
    allowed = set(policy.suggest_companion_codes)
    out: list[CompanionSuggestion] = []
    seen: set[str] = set()
    for i in result.inputs:
        key = i.content_sha256 or i.series_instance_uid or i.source_path
        if key in seen:
            continue
        seen.add(key)
        evidence = {"series_instance_uid": i.series_instance_uid, "content_sha256": i.content_sha256,
                    "modality": i.modality, "extent_mm": list(i.extent_mm), "acquisition_date": i.acquisition_date}
        if i.kind == "volume" and i.modality.upper() in ("CT", "CBCT"):
            for code, why in _cbct_codes(i, policy):
                if code in allowed:
                    out.append(CompanionSuggestion(
                        code, CODE_LABELS[code],
                        f"Suggested for the CBCT series {i.series_instance_uid or '?'} because {why}; bill it only "
                        "if that capture has not been billed already.", evidence))
        elif i.kind == "surface":
            hint = (i.source_path + " " + i.modality).lower()
            code = "D0802" if any(h in hint for h in _MODEL_HINTS) else "D0801"
            what = "a scan of a model or impression" if code == "D0802" else "a direct intraoral scan"
            if code in allowed:
                name = i.source_path.rsplit("/", 1)[-1] or i.series_instance_uid or "?"
                out.append(CompanionSuggestion(
                    code, CODE_LABELS[code],
                    f"Suggested for the 3D surface scan {name}, recorded as {what}; bill it only if that scan "
                    "has not been billed already.", evidence))
    return tuple(out)
