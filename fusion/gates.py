"""Quality-gate thresholds for registrations (standard library only).

The pipeline builds these from the configuration (``[fusion.volume_gate]`` and
``[fusion.surface_gate]`` tables; every field here is a configuration key).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeGateThresholds:
    """Thresholds for volume-to-volume (rigid, mutual information) registrations.

    A figure beyond a ``reject`` threshold rejects the fusion; beyond a ``review``
    threshold (but within the reject one) it is routed to review.
    """

    min_overlap_fraction: float = 0.20  # reject below: fraction of the moving volume's body inside the fixed grid
    review_overlap_fraction: float = 0.35  # review below
    max_final_metric: float = -0.10  # reject above (Mattes MI is reported negated: lower is better)
    max_consistency_mm: float = 0.5  # review above: disagreement between independent runs (landmark-free)
    reject_consistency_mm: float = 2.0  # reject above
    require_convergence: bool = True  # reject when the optimizer hit its iteration limit without converging
    min_body_agreement: float = 0.5  # reject below: fraction of overlapping body voxels landing on the other body


@dataclass(frozen=True)
class SurfaceGateThresholds:
    """Thresholds for scan-to-CBCT surface registrations.

    Measured on the synthetic patients (tests/test_surface_registration.py): a right fit has
    an inlier fraction of ~0.62-0.67 (the scans carry a narrow gingiva strip; DESIGN.md
    measured 0.40-0.50 on phantoms with more gingiva) and an inlier RMS of 0.05 mm (0.08 mm
    with a metal crown); the opposing arch on an upper-only CBCT reaches ~0.23 / 0.15 mm
    with a second-best pose within 0.03 of it; p1's scan on p2's CBCT (another patient)
    0.18-0.25 / 0.15 mm; non-teeth meshes stay below 0.05.
    """

    inlier_distance_mm: float = 0.3  # a scan point within this distance (and agreeing normal) is an inlier
    max_inlier_rms_mm: float = 0.12  # reject above: RMS distance of inlier scan points to the CBCT surface
    min_inlier_fraction: float = 0.30  # reject below
    review_inlier_fraction: float = 0.38  # review below
    min_hypothesis_margin: float = 0.08  # review below: best minus second-best distinct hypothesis inlier fraction
    distinct_hypothesis_mm: float = 1.5  # two poses are distinct hypotheses when scan points move more (RMS) between them
    max_hypotheses: int = 4  # global pose hypotheses refined and scored (at least 2: the margin needs a second)
    fine_sample_mm: float = 0.5  # scan sampling step of the final ICP stages
    max_scan_faces: int = 2_000_000  # reject scans declaring more faces (checked before parsing)
    cbct_surface_step_mm: float = 0.0  # block-average finer CBCTs to about this voxel size before surface extraction (0: native; keep <= 0.5)
