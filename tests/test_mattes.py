"""fusion.mattes: the numpy Mattes mutual information used at the finest CT-MR level."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from fusion.mattes import MattesMetric, register_rigid_mattes
from fusion.register_volume import VolumeRegistrationParameters


def _phantom(size: int = 48, spacing: float = 1.0, seed: int = 3) -> np.ndarray:
    """A smooth (z, y, x) phantom: a few blurred ellipsoids of different intensity."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:size, 0:size, 0:size].astype(float) * spacing
    c = size * spacing / 2
    img = np.zeros((size, size, size))
    body = ((x - c) / (0.42 * size * spacing)) ** 2 + ((y - c) / (0.38 * size * spacing)) ** 2 + \
        ((z - c) / (0.40 * size * spacing)) ** 2
    img += 100 * (body < 1)
    for _ in range(6):
        centre = c + rng.uniform(-0.2, 0.2, 3) * size * spacing
        radii = rng.uniform(0.06, 0.14, 3) * size * spacing
        r = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2
        img += rng.uniform(60, 200) * (r < 1)
    smooth = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(img.astype(np.float32)), 1.2 * spacing)
    return sitk.GetArrayFromImage(smooth).astype(np.float32)


def _image(arr: np.ndarray, spacing: float = 1.0, origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin(origin)
    return img


def _rigid(deg: tuple[float, float, float], shift: tuple[float, float, float], centre: np.ndarray) -> np.ndarray:
    t = sitk.Euler3DTransform(tuple(float(v) for v in centre), *(math.radians(d) for d in deg),
                              tuple(float(v) for v in shift))
    m = np.eye(4)
    R = np.array(t.GetMatrix()).reshape(3, 3)
    m[:3, :3] = R
    m[:3, 3] = np.array(t.GetTranslation()) + centre - R @ centre
    return m


@pytest.fixture(scope="module")
def pair() -> tuple[sitk.Image, sitk.Image, sitk.Image, np.ndarray]:
    """Fixed CT-like phantom, and an MR-like moving image (other contrast) that is the
    fixed anatomy moved by a known rigid map; (fixed, fixed mask, moving, true fixed->moving)."""
    arr = _phantom()
    fixed = _image(arr)
    centre = np.array([23.5, 23.5, 23.5])
    truth = _rigid((4.0, -3.0, 5.0), (1.5, -2.0, 1.0), centre)  # fixed -> moving
    # the moving image samples the fixed anatomy at truth^-1 (a moving point y shows the
    # fixed anatomy at truth^-1 y), with an inverted, non-linear contrast
    inv = np.linalg.inv(truth)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(inv[:3, :3].ravel()))
    t.SetTranslation(tuple(inv[:3, 3]))
    moved = sitk.Resample(fixed, fixed, t, sitk.sitkLinear, 0.0)
    marr = sitk.GetArrayFromImage(moved)
    mr = (400.0 - marr) * (marr > 1) + 0.002 * marr ** 2
    moving = _image(mr.astype(np.float32))
    mask = sitk.Cast(sitk.BinaryErode(sitk.Cast(fixed > 20, sitk.sitkUInt8), [4, 4, 4]), sitk.sitkUInt8)
    return fixed, mask, moving, truth


def _max_displacement(a: np.ndarray, b: np.ndarray, pts: np.ndarray) -> float:
    pa = pts @ a[:3, :3].T + a[:3, 3]
    pb = pts @ b[:3, :3].T + b[:3, 3]
    return float(np.max(np.linalg.norm(pa - pb, axis=1)))


def test_derivative_matches_finite_differences(pair):
    fixed, mask, moving, truth = pair
    start = truth @ _rigid((1.0, 0.5, -1.0), (0.7, 0.4, -0.5), np.array([23.5, 23.5, 23.5]))
    metric = MattesMetric(fixed, mask, moving, samples=20000, bins=32, seed=1)
    mi, grad, n = metric.evaluate(start)
    assert grad is not None and n == 20000  # every sample inside the moving image: no jumps
    eps = 1e-4
    for i in range(6):
        u = np.zeros(6)
        u[i] = eps
        plus = metric.evaluate(metric.step(start, u), derivative=False)[0]
        minus = metric.evaluate(metric.step(start, -u), derivative=False)[0]
        fd = (plus - minus) / (2 * eps)
        assert fd == pytest.approx(grad[i], rel=0.02, abs=2e-4), (i, fd, grad[i])


def test_value_agrees_with_itk_mattes(pair):
    """The same quantity as ITK's Mattes metric (ITK evaluated on every voxel of the mask)."""
    fixed, mask, moving, truth = pair
    metric = MattesMetric(fixed, mask, moving, samples=60000, bins=32, seed=2)
    ours = -metric.evaluate(truth, derivative=False)[0]
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(32)
    r.SetMetricSamplingStrategy(r.NONE)
    r.SetMetricFixedMask(mask)
    r.SetInterpolator(sitk.sitkLinear)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(truth[:3, :3].ravel()))
    t.SetTranslation(tuple(truth[:3, 3]))
    r.SetInitialTransform(t)
    itk = r.MetricEvaluate(fixed, moving)
    assert ours < -0.3
    assert ours == pytest.approx(itk, rel=0.05)


def test_recovers_a_known_motion_across_contrasts(pair):
    fixed, mask, moving, truth = pair
    start = truth @ _rigid((2.0, -1.5, 1.0), (1.0, 0.8, -1.2), np.array([23.5, 23.5, 23.5]))
    run = register_rigid_mattes(fixed, mask, moving, start, samples=20000, bins=32, seed=0, learning_rate=0.5,
                                relaxation=0.8, min_step=5e-4, max_iterations=300)
    pts = np.array([[x, y, z] for x in (10, 37) for y in (10, 37) for z in (10, 37)], float)
    assert _max_displacement(start, truth, pts) > 2.0
    err = _max_displacement(run.fixed_to_moving, truth, pts)
    assert err < 0.1, (err, run.stop_condition)
    assert run.stop_condition.startswith("Step too small")
    assert run.metric < -0.3


def test_same_seed_same_result_and_seed_draws_the_samples(pair):
    fixed, mask, moving, truth = pair
    start = truth @ _rigid((1.0, 0.0, 0.0), (0.5, 0.0, 0.0), np.array([23.5, 23.5, 23.5]))
    kw = dict(samples=5000, bins=32, learning_rate=0.5, relaxation=0.8, min_step=1e-3, max_iterations=100)
    a = register_rigid_mattes(fixed, mask, moving, start, seed=4, **kw)
    b = register_rigid_mattes(fixed, mask, moving, start, seed=4, **kw)
    c = register_rigid_mattes(fixed, mask, moving, start, seed=5, **kw)
    assert np.array_equal(a.fixed_to_moving, b.fixed_to_moving) and a.metric == b.metric
    assert not np.array_equal(a.fixed_to_moving, c.fixed_to_moving)


def test_no_overlap_is_a_failed_run(pair):
    fixed, mask, moving, _ = pair
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)
    run = register_rigid_mattes(fixed, mask, moving, far, samples=2000, bins=32, seed=0, learning_rate=0.5,
                                relaxation=0.8, min_step=1e-3, max_iterations=10)
    assert run.stop_condition.startswith("failed") and run.valid_samples == 0


def test_parameters_are_checked():
    with pytest.raises(ValueError, match="cross_modality_final_engine"):
        VolumeRegistrationParameters(cross_modality_final_engine="gpu")
    with pytest.raises(ValueError, match="bins"):
        VolumeRegistrationParameters(cross_modality_final_bins=4)


def test_forked_call_runs_in_a_child_and_falls_back_here():
    import os

    from fusion.mattes import ForkedCall

    parent = os.getpid()
    assert ForkedCall(os.getpid).result() != parent  # computed in a child

    def fails_in_child() -> str:
        if os.getpid() != parent:
            raise RuntimeError("child")
        return "here"

    assert ForkedCall(fails_in_child).result() == "here"

    def hangs_in_child() -> str:
        if os.getpid() != parent:
            import time

            time.sleep(30)
        return "here"

    assert ForkedCall(hangs_in_child, timeout_s=0.5).result() == "here"


def test_ct_mr_result_does_not_depend_on_running_restarts_in_children(small_set):
    """The consistency restart runs in a forked child by default; one after the other in
    this process it gives the same transform, bit for bit."""
    import dataclasses

    from fusion.register_volume import register_volumes
    from fusion.volume import load_series
    from test_volumes.groundtruth import GroundTruth

    gt = GroundTruth.load(small_set)
    f, m = load_series(gt.series_dir("p1_cbct_a")), load_series(gt.series_dir("p1_mr"))
    forked = register_volumes(f, m, seed=3)
    here = register_volumes(f, m, seed=3, params=dataclasses.replace(VolumeRegistrationParameters(), parallel_runs=1))
    assert np.array_equal(forked.matrix_moving_to_fixed, here.matrix_moving_to_fixed)
    assert forked.consistency_mm == here.consistency_mm and forked.final_metric == here.final_metric
    # the ITK engine (same metric and schedule, ITK's samples) lands within a fraction of a voxel
    from fusion.register_volume import max_corner_displacement_mm

    itk = register_volumes(f, m, seed=3, params=VolumeRegistrationParameters(cross_modality_final_engine="itk"))
    assert forked.overlap_box_fixed is not None
    gap = max_corner_displacement_mm(forked.matrix_moving_to_fixed, itk.matrix_moving_to_fixed, forked.overlap_box_fixed)
    assert gap < 0.25, gap


def test_samples_are_drawn_inside_the_mask_dense_or_sparse():
    from fusion.errors import RegistrationError
    from fusion.mattes import _draw_from_mask

    dense = np.zeros(10000, np.uint8)
    dense[2000:9000] = 1
    sparse = np.zeros(10000, np.uint8)
    sparse[[3, 500, 7777]] = 1  # rejection gives up: drawn from the list of its voxels
    for mask in (dense, sparse):
        a = _draw_from_mask(mask, 5000, np.random.default_rng(1))
        b = _draw_from_mask(mask, 5000, np.random.default_rng(1))
        assert len(a) == 5000 and np.array_equal(a, b) and np.all(mask[a] == 1)
    assert set(_draw_from_mask(sparse, 5000, np.random.default_rng(2)).tolist()) == {3, 500, 7777}
    with pytest.raises(RegistrationError, match="empty"):
        _draw_from_mask(np.zeros(100, np.uint8), 10, np.random.default_rng(0))


def test_a_cancelled_forked_call_leaves_no_child():
    import os
    import time

    from fusion.mattes import ForkedCall

    parent = os.getpid()

    def slow() -> int:
        if os.getpid() != parent:
            time.sleep(30)
        return 1

    call = ForkedCall(slow)
    pid = call._pid
    assert pid
    call.cancel()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped already
