"""The billing decision record: what the hook decided for one fusion, and why."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

Status = Literal["not_eligible", "needs_review", "needs_documentation", "ready_to_bill", "exported"]
STATUSES: tuple[str, ...] = ("not_eligible", "needs_review", "needs_documentation", "ready_to_bill", "exported")

# Short labels of our own (the CDT descriptors are copyrighted by the ADA).
CODE_LABELS: dict[str, str] = {
    "D0395": "Fusion of 2+ 3D image volumes",
    "D0394": "Digital subtraction, same-modality images",
    "D0364": "CBCT capture + read, limited field (under one jaw)",
    "D0365": "CBCT capture + read, one full arch (mandible)",
    "D0366": "CBCT capture + read, one full arch (maxilla)",
    "D0367": "CBCT capture + read, both jaws",
    "D0801": "3D dental surface scan, direct (intraoral)",
    "D0802": "3D dental surface scan, indirect (model/impression)",
}


@dataclass(frozen=True)
class RuleResult:
    """The outcome of one D0395 rule for one fusion.

    ``blocks`` is the status a failure leads to (``not_eligible``, ``needs_review`` or
    ``needs_documentation``); ``evidence`` holds the values the rule looked at.
    """

    rule_id: str
    title: str
    passed: bool
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    blocks: str = "not_eligible"

    def to_dict(self) -> dict[str, Any]:
        return {"rule_id": self.rule_id, "title": self.title, "passed": self.passed,
                "reason": self.reason, "evidence": _plain(self.evidence), "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RuleResult":
        return cls(rule_id=d["rule_id"], title=d["title"], passed=bool(d["passed"]), reason=d["reason"],
                   evidence=dict(d.get("evidence", {})), blocks=d.get("blocks", "not_eligible"))


@dataclass(frozen=True)
class CompanionSuggestion:
    """A code suggested next to the decided one; a person confirms it before it is billed."""

    code: str
    label: str
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "label": self.label, "reason": self.reason, "evidence": _plain(self.evidence)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompanionSuggestion":
        return cls(code=d["code"], label=d["label"], reason=d["reason"], evidence=dict(d.get("evidence", {})))


@dataclass(frozen=True)
class BillingDecision:
    """What the billing hook decided for one fusion.

    ``code`` is the procedure code to claim (``D0395``, ``D0394`` for a same-modality
    subtraction) or None. ``reasons`` are plain-language sentences for a billing manager,
    one per failed rule (or one saying why the fusion is billable).
    """

    fusion_id: str
    patient_key: str
    input_set_key: str
    code: str | None
    status: Status
    rules: tuple[RuleResult, ...]
    reasons: tuple[str, ...]
    companions: tuple[CompanionSuggestion, ...] = ()
    decided_at: str = ""
    rationale: str = ""
    clinician: str = ""
    report_id: str = ""
    duplicate_of: str = ""  # fusion id that already claimed this input set (rule 6)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"fusion {self.fusion_id}: unknown billing status {self.status!r}")

    @property
    def passed(self) -> tuple[str, ...]:
        return tuple(r.rule_id for r in self.rules if r.passed)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(r.rule_id for r in self.rules if not r.passed)

    @property
    def code_label(self) -> str:
        return CODE_LABELS.get(self.code or "", "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fusion_id": self.fusion_id, "patient_key": self.patient_key, "input_set_key": self.input_set_key,
            "code": self.code, "status": self.status, "rules": [r.to_dict() for r in self.rules],
            "passed": list(self.passed), "failed": list(self.failed), "reasons": list(self.reasons),
            "companions": [c.to_dict() for c in self.companions], "decided_at": self.decided_at,
            "rationale": self.rationale, "clinician": self.clinician, "report_id": self.report_id,
            "duplicate_of": self.duplicate_of,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BillingDecision":
        return cls(
            fusion_id=d["fusion_id"], patient_key=d["patient_key"], input_set_key=d["input_set_key"],
            code=d.get("code"), status=d["status"],
            rules=tuple(RuleResult.from_dict(r) for r in d.get("rules", ())),
            reasons=tuple(d.get("reasons", ())),
            companions=tuple(CompanionSuggestion.from_dict(c) for c in d.get("companions", ())),
            decided_at=d.get("decided_at", ""), rationale=d.get("rationale", ""),
            clinician=d.get("clinician", ""), report_id=d.get("report_id", ""),
            duplicate_of=d.get("duplicate_of", ""),
        )


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        seq = sorted(v) if isinstance(v, (set, frozenset)) else v
        return [_plain(x) for x in seq]
    return v
