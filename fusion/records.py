"""Records that leave the fusion package.

This module imports only the standard library so that ``billing_hooks`` (which sees
fusion only through :class:`FusionResult`) and ``pipeline`` can use it without pulling
SimpleITK or trimesh in.

Conventions
-----------
* Coordinates are DICOM patient coordinates (LPS) in millimetres.
* ``transform_moving_to_fixed`` maps a point given in the *moving* input's frame of
  reference to the *fixed* (registered) frame: ``p_fixed = M @ [x, y, z, 1]``.
  It is stored row-major as a 4x4 nested tuple.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

Matrix4 = tuple[tuple[float, float, float, float], ...]

InputKind = Literal["volume", "surface", "2d", "other"]
Verdict = Literal["accepted", "rejected", "needs_review"]

IDENTITY4: Matrix4 = (
    (1.0, 0.0, 0.0, 0.0),
    (0.0, 1.0, 0.0, 0.0),
    (0.0, 0.0, 1.0, 0.0),
    (0.0, 0.0, 0.0, 1.0),
)


def as_matrix4(values: Sequence[Sequence[float]] | Sequence[float]) -> Matrix4:
    """Return a 4x4 row-major tuple from a nested 4x4 or a flat 16-value sequence.

    Raises
    ------
    ValueError
        If the shape is not 4x4 / 16 or a value is not finite.
    """
    flat: list[float]
    seq = list(values)
    if len(seq) == 16 and not isinstance(seq[0], (list, tuple)) and not hasattr(seq[0], "__len__"):
        flat = [float(v) for v in seq]  # type: ignore[arg-type]
    else:
        if len(seq) != 4 or any(len(r) != 4 for r in seq):  # type: ignore[arg-type]
            raise ValueError(f"expected a 4x4 matrix or 16 values, got shape {len(seq)}x?")
        flat = [float(v) for row in seq for v in row]  # type: ignore[union-attr]
    if not all(math.isfinite(v) for v in flat):
        raise ValueError("matrix contains a non-finite value")
    return tuple(tuple(flat[r * 4 : r * 4 + 4]) for r in range(4))  # type: ignore[return-value]


@dataclass(frozen=True)
class RigidTransform:
    """A rigid transform between two DICOM frames of reference.

    ``matrix`` maps a point in ``source_frame_uid`` (LPS mm) to ``target_frame_uid``
    (LPS mm). The rotation block is orthonormal with determinant +1 (checked).
    """

    matrix: Matrix4
    source_frame_uid: str
    target_frame_uid: str

    def __post_init__(self) -> None:
        m = as_matrix4(self.matrix)
        object.__setattr__(self, "matrix", m)
        r = [row[:3] for row in m[:3]]
        # orthonormality and det +1, tolerance suited to float64 round trips
        for i in range(3):
            for j in range(3):
                dot = sum(r[k][i] * r[k][j] for k in range(3))
                if abs(dot - (1.0 if i == j else 0.0)) > 1e-5:
                    raise ValueError(
                        f"transform {self.source_frame_uid} -> {self.target_frame_uid} is not rigid: "
                        "rotation block is not orthonormal"
                    )
        det = (
            r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
            - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
            + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0])
        )
        if abs(det - 1.0) > 1e-5:
            raise ValueError(
                f"transform {self.source_frame_uid} -> {self.target_frame_uid} has determinant {det:.6f}; "
                "a rigid transform needs +1 (no reflection, no scaling)"
            )
        if tuple(m[3]) != (0.0, 0.0, 0.0, 1.0):
            raise ValueError("last row of a rigid 4x4 must be 0 0 0 1")

    def inverse(self) -> "RigidTransform":
        """Return the transform mapping ``target_frame_uid`` back to ``source_frame_uid``."""
        r = [row[:3] for row in self.matrix[:3]]
        t = [row[3] for row in self.matrix[:3]]
        rt = [[r[j][i] for j in range(3)] for i in range(3)]
        ti = [-sum(rt[i][k] * t[k] for k in range(3)) for i in range(3)]
        m = tuple(tuple(rt[i]) + (ti[i],) for i in range(3)) + ((0.0, 0.0, 0.0, 1.0),)
        return RigidTransform(m, self.target_frame_uid, self.source_frame_uid)  # type: ignore[arg-type]

    def apply(self, point: Sequence[float]) -> tuple[float, float, float]:
        """Map one point (x, y, z) from the source frame to the target frame."""
        x, y, z = (float(v) for v in point)
        return tuple(row[0] * x + row[1] * y + row[2] * z + row[3] for row in self.matrix[:3])  # type: ignore[return-value]


@dataclass(frozen=True)
class FusionInput:
    """One input of a fusion, as evidence for provenance and billing.

    ``content_sha256`` is a hash of the *content* (decoded voxel values, or mesh vertices
    and faces), not of the files, so that a re-sent series with new UIDs and identical
    pixels is recognisable as the same acquisition. ``demographics_sha256`` is a hash of
    birth date and sex, so that patient consistency can be checked without storing them.
    """

    role: Literal["fixed", "moving"]
    kind: InputKind
    modality: str
    patient_id: str
    issuer_of_patient_id: str = ""
    demographics_sha256: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()
    sop_class_uid: str = ""
    frame_of_reference_uid: str = ""
    content_sha256: str = ""
    acquisition_date: str = ""  # DICOM DA (YYYYMMDD) or ""
    source_path: str = ""
    shape: tuple[int, ...] = ()  # volume (x, y, z) voxels, or (n_vertices, n_faces)
    spacing_mm: tuple[float, ...] = ()
    extent_mm: tuple[float, ...] = ()  # physical size along x, y, z

    @property
    def patient_key(self) -> str:
        return patient_key(self.patient_id, self.issuer_of_patient_id)


def patient_key(patient_id: str, issuer_of_patient_id: str = "") -> str:
    """The key a patient is indexed by: ``ID`` or ``ID^ISSUER``."""
    return f"{patient_id}^{issuer_of_patient_id}" if issuer_of_patient_id else patient_id


@dataclass(frozen=True)
class FusionOutput:
    """A file a fusion wrote. ``kind`` is one of: derived_series, registration, volume_nifti,
    volume_nrrd, qa_png, scan_stl, encapsulated_stl, label_volume, segmentation, report_pdf,
    report_html, fusion_json (free text is allowed; these are the ones used here)."""

    kind: str
    path: str
    sha256: str
    sop_instance_uids: tuple[str, ...] = ()
    series_instance_uid: str = ""
    media_type: str = ""


@dataclass(frozen=True)
class QualityCheck:
    """One measured quality figure against its configured threshold."""

    name: str
    value: float
    threshold: float
    comparison: Literal["<=", ">=", "<", ">"]
    passed: bool
    severity: Literal["reject", "review"] = "reject"
    description: str = ""


@dataclass(frozen=True)
class FusionResult:
    """What one fusion did, with everything needed to trust or bill it."""

    fusion_id: str
    patient_key: str
    method: str  # "volume-rigid-mattes-mi" or "surface-rigid-icp" ...
    purpose: Literal["fusion", "subtraction"]
    inputs: tuple[FusionInput, ...]
    transform_moving_to_fixed: Matrix4
    fixed_frame_of_reference_uid: str
    moving_frame_of_reference_uid: str
    verdict: Verdict
    reasons: tuple[str, ...]
    metrics: Mapping[str, float]
    quality_checks: tuple[QualityCheck, ...] = ()
    software_versions: Mapping[str, str] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    outputs: tuple[FusionOutput, ...] = ()
    timings_s: Mapping[str, float] = field(default_factory=dict)
    created_at: str = ""  # ISO 8601 UTC
    operator: str = ""  # user name or calling AE title that triggered it

    def __post_init__(self) -> None:
        object.__setattr__(self, "transform_moving_to_fixed", as_matrix4(self.transform_moving_to_fixed))
        if self.verdict not in ("accepted", "rejected", "needs_review"):
            raise ValueError(f"fusion {self.fusion_id}: unknown verdict {self.verdict!r}")

    @property
    def input_set_key(self) -> str:
        """Idempotency basis: patient + sorted input content hashes."""
        return self.patient_key + "|" + ",".join(sorted(i.content_sha256 for i in self.inputs))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["transform_moving_to_fixed"] = [list(r) for r in self.transform_moving_to_fixed]
        d["metrics"] = dict(self.metrics)
        d["software_versions"] = dict(self.software_versions)
        d["parameters"] = dict(self.parameters)
        d["timings_s"] = dict(self.timings_s)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, default=_json_default)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FusionResult":
        d = dict(d)
        d["inputs"] = tuple(
            FusionInput(**{**i, "sop_instance_uids": tuple(i.get("sop_instance_uids", ())),
                           "shape": tuple(i.get("shape", ())),
                           "spacing_mm": tuple(i.get("spacing_mm", ())),
                           "extent_mm": tuple(i.get("extent_mm", ()))})
            for i in d.get("inputs", ())
        )
        d["outputs"] = tuple(
            FusionOutput(**{**o, "sop_instance_uids": tuple(o.get("sop_instance_uids", ()))})
            for o in d.get("outputs", ())
        )
        d["quality_checks"] = tuple(QualityCheck(**q) for q in d.get("quality_checks", ()))
        d["reasons"] = tuple(d.get("reasons", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> "FusionResult":
        return cls.from_dict(json.loads(text))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    return str(o)
