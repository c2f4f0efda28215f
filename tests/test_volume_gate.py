"""The volume quality gate's decision logic on measured evidence, and its helpers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fusion.gates import VolumeGateThresholds
from fusion.register_volume import (
    VolumeRegistration,
    VolumeRegistrationParameters,
    average_rigid,
    evaluate_gate,
    max_corner_displacement_mm,
)
from test_volume_assembly import rotation


def _reg(**kw) -> VolumeRegistration:
    base = dict(matrix_moving_to_fixed=np.eye(4), final_metric=-0.9, stop_condition="Step too small", converged=True,
                iterations=20, overlap_fraction=0.8, consistency_mm=0.05,
                metrics={"body_agreement_fraction": 0.8}, parameters=VolumeRegistrationParameters(), seed=0)
    base.update(kw)
    return VolumeRegistration(**base)


def test_good_evidence_is_accepted():
    verdict, reasons, checks = evaluate_gate(_reg(), VolumeGateThresholds())
    assert verdict == "accepted" and all(c.passed for c in checks)
    assert {c.name for c in checks} >= {"final_metric", "overlap_fraction", "consistency_mm", "converged", "body_agreement"}


@pytest.mark.parametrize("change,verdict,name", [
    ({"final_metric": -0.05}, "rejected", "final_metric"),
    ({"overlap_fraction": 0.1}, "rejected", "overlap_fraction"),
    ({"overlap_fraction": 0.3}, "needs_review", "overlap_fraction_review"),
    ({"consistency_mm": 1.0}, "needs_review", "consistency_mm_review"),
    ({"consistency_mm": 5.0}, "rejected", "consistency_mm"),
    ({"consistency_mm": float("inf")}, "rejected", "consistency_mm"),
    ({"converged": False, "stop_condition": "Maximum number of iterations (200) exceeded."}, "rejected", "converged"),
    ({"metrics": {"body_agreement_fraction": 0.2}}, "rejected", "body_agreement"),
])
def test_bad_evidence_is_not_accepted(change, verdict, name):
    v, reasons, checks = evaluate_gate(_reg(**change), VolumeGateThresholds())
    assert v == verdict
    assert any(r.startswith(name + ":") for r in reasons), reasons
    assert not next(c for c in checks if c.name == name).passed


def test_thresholds_come_from_the_configuration():
    strict = dataclasses.replace(VolumeGateThresholds(), max_final_metric=-1.0)
    assert evaluate_gate(_reg(), strict)[0] == "rejected"
    lax = dataclasses.replace(VolumeGateThresholds(), require_convergence=False)
    assert evaluate_gate(_reg(converged=False), lax)[0] == "accepted"


def test_corner_displacement_and_average():
    box = np.array([[-10.0, -10.0, -10.0], [10.0, 10.0, 10.0]])
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = [0.3, 0.0, 0.0]
    assert max_corner_displacement_mm(a, b, box) == pytest.approx(0.3)
    c = np.eye(4)
    c[:3, :3] = rotation(0.0, 0.0, np.radians(1.0))
    # a 1 degree rotation about the origin moves the box corners by |r| * angle
    assert max_corner_displacement_mm(a, c, box) == pytest.approx(np.hypot(10, 10) * np.radians(1.0), rel=1e-3)
    avg = average_rigid([a, b], box)
    np.testing.assert_allclose(avg[:3, 3], [0.15, 0, 0], atol=1e-9)
    np.testing.assert_allclose(avg[:3, :3], np.eye(3), atol=1e-9)
    assert np.linalg.det(average_rigid([a, c], box)[:3, :3]) == pytest.approx(1.0)
