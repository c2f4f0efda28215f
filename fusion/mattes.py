"""Rigid registration by Mattes mutual information on a fixed set of samples, in numpy.

The finest level of a CT-MR registration needs many samples and a fine histogram to land
on the true optimum (see :mod:`fusion.register_volume`). ITK's Mattes metric costs about
1.3 us per sample and iteration single-threaded (and with several threads its sums change
order from run to run). This module computes the same quantities with whole-array numpy
operations, in a fixed order, so a run is reproducible to the last bit and about an order
of magnitude cheaper per iteration:

* samples: ``samples`` voxels drawn (seeded) from the fixed sampling mask, each jittered
  uniformly within its voxel; the fixed value is interpolated there (trilinear) once;
* joint histogram with Mattes' Parzen windows: a zero-order (box) window on the fixed
  intensity, a cubic B-spline window on the moving one; two bins of padding each side, the
  fixed range from the samples, the moving range from the whole moving image (as ITK);
* the moving image is interpolated trilinearly; its gradient is the gradient of that
  interpolant (the same eight voxels);
* derivative of the mutual information with respect to a rigid update of the fixed->moving
  map, ``y -> exp([w]x) (y - c) + c + t`` about the image ``c`` of the samples' centroid;
  the rotation is scaled by the samples' radius so that the six parameters are all
  millimetres of displacement;
* regular-step gradient ascent as ITK's ``RegularStepGradientDescentOptimizerv4``: the
  step is multiplied by ``relaxation`` each time the gradient turns back, and the run stops
  when it falls below ``min_step`` (mm).

Transforms are 4x4 matrices mapping a *fixed* LPS point (mm) to a *moving* LPS point, as
SimpleITK's registration transforms (the caller inverts them for the moving->fixed
convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from fusion.errors import RegistrationError

PADDING = 2  # histogram bins of padding each side (ITK's Mattes metric)


@dataclass(frozen=True)
class MattesRun:
    """The outcome of :func:`register_rigid_mattes`."""

    fixed_to_moving: np.ndarray  # 4x4, fixed LPS (mm) -> moving LPS (mm)
    metric: float  # mutual information at the result, negated (lower is better), as ITK reports it
    stop_condition: str  # "failed: ..." when too few samples overlapped the moving image
    iterations: int
    valid_samples: int


def _index_matrix(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(direction * spacing, origin): LPS = D @ (i, j, k) + origin."""
    d = np.array(img.GetDirection(), float).reshape(3, 3) * np.array(img.GetSpacing(), float)[None, :]
    return d, np.array(img.GetOrigin(), float)


def _trilinear(flat: np.ndarray, size_xyz: np.ndarray, idx: np.ndarray, gradient: bool
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Trilinear interpolation of a C-ordered (z, y, x) image given flat, at continuous
    (i, j, k) indices ``idx`` (N, 3) inside [0, size - 1]; with ``gradient``, also the
    gradient of the interpolant with respect to (i, j, k) (N, 3)."""
    i0 = np.minimum(np.floor(idx).astype(np.int64), size_xyz - 2)
    np.maximum(i0, 0, out=i0)
    f = idx - i0
    sy = int(size_xyz[0])
    sz = int(size_xyz[0] * size_xyz[1])
    base = i0[:, 0] + i0[:, 1] * sy + i0[:, 2] * sz
    c000 = flat[base]
    c100 = flat[base + 1]
    c010 = flat[base + sy]
    c110 = flat[base + (1 + sy)]
    c001 = flat[base + sz]
    c101 = flat[base + (1 + sz)]
    c011 = flat[base + (sy + sz)]
    c111 = flat[base + (1 + sy + sz)]
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    d00, d10, d01, d11 = c100 - c000, c110 - c010, c101 - c001, c111 - c011
    c00, c10, c01, c11 = c000 + d00 * fx, c010 + d10 * fx, c001 + d01 * fx, c011 + d11 * fx
    e0, e1 = c10 - c00, c11 - c01
    c0, c1 = c00 + e0 * fy, c01 + e1 * fy
    value = c0 + (c1 - c0) * fz
    if not gradient:
        return value, None
    dx0 = d00 + (d10 - d00) * fy
    dx1 = d01 + (d11 - d01) * fy
    grad = np.empty((len(idx), 3))
    grad[:, 0] = dx0 + (dx1 - dx0) * fz
    grad[:, 1] = e0 + (e1 - e0) * fz
    grad[:, 2] = c1 - c0
    return value, grad


def _bspline3_window(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the four bins ``floor(kappa) - 1 .. floor(kappa) + 2`` under a cubic
    B-spline window centred at ``kappa``, and their derivatives with respect to ``kappa``;
    ``u = kappa - floor(kappa)`` in [0, 1). Both (n, 4)."""
    u2 = u * u
    u3 = u2 * u
    v = 1.0 - u
    w = np.empty((len(u), 4))
    w[:, 0] = v * v * v / 6.0
    w[:, 1] = (3.0 * u3 - 6.0 * u2 + 4.0) / 6.0
    w[:, 2] = (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0) / 6.0
    w[:, 3] = u3 / 6.0
    dw = np.empty((len(u), 4))
    dw[:, 0] = -0.5 * v * v
    dw[:, 1] = 1.5 * u2 - 2.0 * u
    dw[:, 2] = -1.5 * u2 + u + 0.5
    dw[:, 3] = 0.5 * u2
    return w, dw


def _rotation(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector ``w`` (radians; Rodrigues)."""
    angle = float(np.linalg.norm(w))
    if angle < 1e-15:
        return np.eye(3)
    k = w / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


class MattesMetric:
    """Mattes mutual information between ``fixed`` (at seeded samples of ``mask``) and
    ``moving``, and its derivative for a rigid update (see the module docstring)."""

    def __init__(self, fixed: sitk.Image, mask: sitk.Image | None, moving: sitk.Image, *, samples: int,
                 bins: int, seed: int) -> None:
        if bins < 2 * PADDING + 2:
            raise ValueError(f"at least {2 * PADDING + 2} histogram bins are needed, got {bins}")
        if min(fixed.GetSize()) < 2 or min(moving.GetSize()) < 2:
            raise RegistrationError("an image of the registration is thinner than two voxels")
        self.bins = bins
        farr = sitk.GetArrayViewFromImage(fixed)
        fsize = np.array(fixed.GetSize(), np.int64)
        if mask is not None:
            candidates = np.flatnonzero(sitk.GetArrayViewFromImage(mask).ravel())
        else:
            candidates = np.arange(farr.size)
        if len(candidates) == 0:
            raise RegistrationError("the fixed sampling mask is empty")
        rng = np.random.default_rng(seed)
        # in memory order: neighbouring samples read neighbouring moving voxels (a random
        # order cost ~3x the time in cache misses)
        pick = np.sort(candidates[rng.integers(0, len(candidates), size=samples)])
        k, j, i = np.unravel_index(pick, farr.shape)
        idx = np.stack([i, j, k], axis=1).astype(float) + rng.uniform(-0.5, 0.5, size=(len(pick), 3))
        np.clip(idx, 0.0, fsize - 1.0, out=idx)
        fvals, _ = _trilinear(np.ascontiguousarray(farr, dtype=np.float64).ravel(), fsize, idx, gradient=False)
        d_f, o_f = _index_matrix(fixed)
        self.points = idx @ d_f.T + o_f  # fixed LPS
        self.centroid = self.points.mean(axis=0)
        self.radius = max(float(np.max(np.linalg.norm(self.points - self.centroid, axis=1))), 1.0)
        f_min, f_max = float(fvals.min()), float(fvals.max())
        f_width = (f_max - f_min) / (bins - 2 * PADDING) or 1.0
        self.fixed_bin = np.clip(np.floor((fvals - f_min) / f_width + PADDING).astype(np.int64),
                                 PADDING, bins - PADDING - 1)
        marr = sitk.GetArrayViewFromImage(moving)
        self.moving_flat = np.ascontiguousarray(marr, dtype=np.float32).ravel()
        self.moving_size = np.array(moving.GetSize(), np.int64)
        m_min, m_max = float(self.moving_flat.min()), float(self.moving_flat.max())
        self.moving_min = m_min
        self.moving_width = (m_max - m_min) / (bins - 2 * PADDING) or 1.0
        d_m, self.moving_origin = _index_matrix(moving)
        self.moving_inverse = np.linalg.inv(d_m)  # LPS -> index

    def evaluate(self, f2m: np.ndarray, derivative: bool = True) -> tuple[float, np.ndarray | None, int]:
        """(mutual information, its gradient (6,: rotation about the samples' image, scaled
        to mm at their radius; translation mm) or None, number of samples inside the moving
        image) for the fixed->moving map ``f2m``."""
        bins = self.bins
        y = self.points @ f2m[:3, :3].T + f2m[:3, 3]
        ci = (y - self.moving_origin) @ self.moving_inverse.T
        inside = np.all((ci >= 0.0) & (ci <= self.moving_size - 1.0), axis=1)
        n = int(np.count_nonzero(inside))
        if n < 16:
            return 0.0, None, n
        if n < len(ci):
            ci, y, fbin = ci[inside], y[inside], self.fixed_bin[inside]
        else:
            fbin = self.fixed_bin
        mval, mgrad = _trilinear(self.moving_flat, self.moving_size, ci, gradient=derivative)
        # the moving values lie in [min, max]: kappa in [PADDING, bins - PADDING], so the four
        # bins of the window stay inside the histogram
        kappa = np.clip((mval - self.moving_min) / self.moving_width + PADDING, PADDING, bins - PADDING - 1e-9)
        k0 = np.floor(kappa)
        w, dw = _bspline3_window(kappa - k0)
        kk = k0.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]  # (n, 4) moving bins in the window
        cells = fbin[:, None] * bins + kk
        joint = np.bincount(cells.ravel(), weights=w.ravel(), minlength=bins * bins).reshape(bins, bins)
        joint /= joint.sum()
        pf = joint.sum(axis=1)
        pm = joint.sum(axis=0)
        nz = joint > 0
        outer = pf[:, None] * pm[None, :]
        mi = float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
        if not derivative:
            return mi, None, n
        log_ratio = np.zeros_like(joint)
        log_ratio[nz] = np.log(joint[nz] / np.broadcast_to(pm[None, :], joint.shape)[nz])
        # d MI / d moving value of each sample: the window moves with the value
        dmi_dm = np.sum(dw * log_ratio.ravel()[cells], axis=1) / (self.moving_width * n)
        grad_y = (mgrad @ self.moving_inverse) * dmi_dm[:, None]  # d MI / d y per sample (LPS)
        centre = f2m[:3, :3] @ self.centroid + f2m[:3, 3]
        r = y - centre
        g_rot = np.cross(r, grad_y).sum(axis=0) / self.radius
        g_trans = grad_y.sum(axis=0)
        assert mgrad is not None
        return mi, np.concatenate([g_rot, g_trans]), n

    def step(self, f2m: np.ndarray, update: np.ndarray) -> np.ndarray:
        """``f2m`` followed by the rigid update (rotation part scaled as in :meth:`evaluate`)."""
        R = _rotation(update[:3] / self.radius)
        centre = f2m[:3, :3] @ self.centroid + f2m[:3, 3]
        out = np.eye(4)
        out[:3, :3] = R @ f2m[:3, :3]
        out[:3, 3] = R @ (f2m[:3, 3] - centre) + centre + update[3:]
        return out


def register_rigid_mattes(fixed: sitk.Image, mask: sitk.Image | None, moving: sitk.Image, fixed_to_moving: np.ndarray,
                          *, samples: int, bins: int, seed: int, learning_rate: float, relaxation: float,
                          min_step: float, max_iterations: int, gradient_tolerance: float = 1e-8) -> MattesRun:
    """Maximise Mattes mutual information over rigid maps, from ``fixed_to_moving`` (4x4,
    fixed LPS -> moving LPS), by regular-step gradient ascent (steps in mm; see the module
    docstring). ``seed`` draws the samples: same inputs and seed, same result."""
    metric = MattesMetric(fixed, mask, moving, samples=samples, bins=bins, seed=seed)
    f2m = np.array(fixed_to_moving, float)
    rate = float(learning_rate)
    previous: np.ndarray | None = None
    stop = f"Maximum number of iterations ({max_iterations}) exceeded."
    iterations = 0
    min_valid = max(16, samples // 10)
    mi, valid = 0.0, 0
    while iterations < max_iterations:
        mi, grad, valid = metric.evaluate(f2m)
        if grad is None or valid < min_valid:
            return MattesRun(f2m, 0.0, f"failed: only {valid} of {samples} samples inside the moving image",
                             iterations, valid)
        if previous is not None and float(grad @ previous) < 0:
            rate *= relaxation
        if rate < min_step:
            stop = (f"Step too small after {iterations} iterations. Current step ({rate:.6g}) is less than "
                    f"minimum step ({min_step:.6g}).")
            break
        norm = float(np.linalg.norm(grad))
        if norm < gradient_tolerance:
            stop = f"Gradient magnitude tolerance met after {iterations} iterations."
            break
        f2m = metric.step(f2m, grad * (rate / norm))
        previous = grad
        iterations += 1
    else:
        mi, _, valid = metric.evaluate(f2m, derivative=False)
    return MattesRun(f2m, -mi, stop, iterations, valid)


__all__ = ["MattesMetric", "MattesRun", "register_rigid_mattes"]
