"""Rigid registration by Mattes mutual information on a fixed set of samples, in numpy.

The finest level of a CT-MR registration needs many samples and a fine histogram to land
on the true optimum (see :mod:`fusion.register_volume`). ITK's Mattes metric cost about
1.3 us per sample and iteration single-threaded here (40 ms an iteration at 30000 samples;
with several threads its sums change order from run to run). This module computes the
same quantities with whole-array numpy operations in a fixed order, so a run is
reproducible to the last bit, at about 0.25 us per sample and iteration (10 ms at 40000):

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
from typing import Callable

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


def _x_pairs(flat: np.ndarray) -> np.ndarray:
    """Each voxel of a flat float32 image paired with its +x neighbour, as one float64 per
    voxel (a view of the two float32 values): one gather reads both."""
    pairs = np.empty((len(flat), 2), np.float32)
    pairs[:, 0] = flat
    pairs[:-1, 1] = flat[1:]
    pairs[-1, 1] = 0.0
    return pairs.view(np.float64).ravel()


def _pair_reader(pairs: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Reads a voxel and its +x neighbour from :func:`_x_pairs` in one gather."""
    def read(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        both = pairs[at].view(np.float32).reshape(-1, 2).T
        return both[0].astype(np.float64), both[1].astype(np.float64)
    return read


def _flat_reader(flat: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Reads a voxel and its +x neighbour from a flat image (two gathers, no table)."""
    def read(at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return flat[at].astype(np.float64), flat[at + 1].astype(np.float64)
    return read


def _trilinear(read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], size_xyz: np.ndarray, idx: np.ndarray,
               gradient: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Trilinear interpolation of a C-ordered (z, y, x) image (``read``: its voxel pairs
    along x, :func:`_pair_reader` or :func:`_flat_reader`) at continuous (i, j, k) indices
    ``idx`` (3, N: one row per axis, the layout that keeps every operation on contiguous
    arrays) inside [0, size - 1]; with ``gradient``, also the gradient of the interpolant
    with respect to (i, j, k) (3, N)."""
    i0 = np.floor(idx)
    np.clip(i0, 0, (size_xyz - 2)[:, None], out=i0)
    f = idx - i0
    i0 = i0.astype(np.int64)
    sy = int(size_xyz[0])
    sz = int(size_xyz[0] * size_xyz[1])
    base = i0[0] + i0[1] * sy + i0[2] * sz

    def corners(offset: int) -> tuple[np.ndarray, np.ndarray]:
        return read(base + offset if offset else base)

    c000, c100 = corners(0)
    c010, c110 = corners(sy)
    c001, c101 = corners(sz)
    c011, c111 = corners(sy + sz)
    fx, fy, fz = f
    d00, d10, d01, d11 = c100 - c000, c110 - c010, c101 - c001, c111 - c011
    c00, c10, c01, c11 = c000 + d00 * fx, c010 + d10 * fx, c001 + d01 * fx, c011 + d11 * fx
    e0, e1 = c10 - c00, c11 - c01
    c0, c1 = c00 + e0 * fy, c01 + e1 * fy
    value = c0 + (c1 - c0) * fz
    if not gradient:
        return value, None
    dx0 = d00 + (d10 - d00) * fy
    dx1 = d01 + (d11 - d01) * fy
    grad = np.empty((3, idx.shape[1]))
    grad[0] = dx0 + (dx1 - dx0) * fz
    grad[1] = e0 + (e1 - e0) * fz
    grad[2] = c1 - c0
    return value, grad


def _bspline3_window(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the four bins ``floor(kappa) - 1 .. floor(kappa) + 2`` under a cubic
    B-spline window centred at ``kappa``, and their derivatives with respect to ``kappa``;
    ``u = kappa - floor(kappa)`` in [0, 1). Both (4, n)."""
    u2 = u * u
    u3 = u2 * u
    v = 1.0 - u
    w = np.empty((4, len(u)))
    w[0] = v * v * v / 6.0
    w[1] = (3.0 * u3 - 6.0 * u2 + 4.0) / 6.0
    w[2] = (-3.0 * u3 + 3.0 * u2 + 3.0 * u + 1.0) / 6.0
    w[3] = u3 / 6.0
    dw = np.empty((4, len(u)))
    dw[0] = -0.5 * v * v
    dw[1] = 1.5 * u2 - 2.0 * u
    dw[2] = -1.5 * u2 + u + 0.5
    dw[3] = 0.5 * u2
    return w, dw


def _rotation(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the rotation vector ``w`` (radians; Rodrigues)."""
    angle = float(np.linalg.norm(w))
    if angle < 1e-15:
        return np.eye(3)
    k = w / angle
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


class MovingTable:
    """The moving image as the metric reads it: voxel pairs along x (:func:`_x_pairs`),
    geometry and intensity range. Built once and shared by the runs of one registration
    (a forked child inherits it)."""

    def __init__(self, moving: sitk.Image) -> None:
        if min(moving.GetSize()) < 2:
            raise RegistrationError("the moving image of the registration is thinner than two voxels")
        flat = np.ascontiguousarray(sitk.GetArrayViewFromImage(moving), dtype=np.float32).ravel()
        self.read = _pair_reader(_x_pairs(flat))
        self.size = np.array(moving.GetSize(), np.int64)
        self.minimum, self.maximum = float(flat.min()), float(flat.max())
        d_m, self.origin = _index_matrix(moving)
        self.inverse = np.linalg.inv(d_m)  # LPS -> index


def _draw_from_mask(mask_flat: np.ndarray, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``samples`` flat indices drawn uniformly (with replacement) among the nonzero
    voxels of ``mask_flat``: by rejection when the mask is not sparse (no index list of the
    whole mask), else from the list."""
    picks: list[np.ndarray] = []
    need, drawn = samples, 0
    while need > 0 and drawn < 20 * samples:
        trial = rng.integers(0, len(mask_flat), size=2 * need + 64)
        drawn += len(trial)
        kept = trial[mask_flat[trial] != 0][:need]
        picks.append(kept)
        need -= len(kept)
    if need > 0:  # a sparse mask: draw the rest from the list of its voxels
        candidates = np.flatnonzero(mask_flat)
        if len(candidates) == 0:
            raise RegistrationError("the fixed sampling mask is empty")
        picks.append(candidates[rng.integers(0, len(candidates), size=need)])
    return np.concatenate(picks)


class MattesMetric:
    """Mattes mutual information between ``fixed`` (at seeded samples of ``mask``) and
    ``moving``, and its derivative for a rigid update (see the module docstring)."""

    def __init__(self, fixed: sitk.Image, mask: sitk.Image | None, moving: sitk.Image | MovingTable, *,
                 samples: int, bins: int, seed: int) -> None:
        if bins < 2 * PADDING + 2:
            raise ValueError(f"at least {2 * PADDING + 2} histogram bins are needed, got {bins}")
        if min(fixed.GetSize()) < 2:
            raise RegistrationError("the fixed image of the registration is thinner than two voxels")
        table = moving if isinstance(moving, MovingTable) else MovingTable(moving)
        self.bins = bins
        farr = sitk.GetArrayViewFromImage(fixed)
        fsize = np.array(fixed.GetSize(), np.int64)
        rng = np.random.default_rng(seed)
        if mask is not None:
            pick = _draw_from_mask(sitk.GetArrayViewFromImage(mask).ravel(), samples, rng)
        else:
            pick = rng.integers(0, farr.size, size=samples)
        # in memory order: neighbouring samples read neighbouring moving voxels (a random
        # order cost ~3x the time in cache misses)
        pick.sort()
        k, j, i = np.unravel_index(pick, farr.shape)
        idx = np.stack([i, j, k], axis=1).astype(float) + rng.uniform(-0.5, 0.5, size=(len(pick), 3))
        np.clip(idx, 0.0, fsize - 1.0, out=idx)
        idx = np.ascontiguousarray(idx.T)  # (3, n): one row per axis
        fvals, _ = _trilinear(_flat_reader(np.ascontiguousarray(farr, dtype=np.float32).ravel()), fsize, idx,
                              gradient=False)
        d_f, o_f = _index_matrix(fixed)
        self.points = d_f @ idx + o_f[:, None]  # fixed LPS, (3, n)
        self.centroid = self.points.mean(axis=1)
        self.relative = self.points - self.centroid[:, None]
        self.radius = max(float(np.max(np.linalg.norm(self.relative, axis=0))), 1.0)
        f_min, f_max = float(fvals.min()), float(fvals.max())
        f_width = (f_max - f_min) / (bins - 2 * PADDING) or 1.0
        fixed_bin = np.clip(np.floor((fvals - f_min) / f_width + PADDING).astype(np.int64),
                            PADDING, bins - PADDING - 1)
        self.fixed_cell = fixed_bin * bins  # row of each sample in the joint histogram
        self.moving_read = table.read
        self.moving_size = table.size
        self.moving_min = table.minimum
        self.moving_width = (table.maximum - table.minimum) / (bins - 2 * PADDING) or 1.0
        self.moving_origin = table.origin
        self.moving_inverse = table.inverse

    def evaluate(self, f2m: np.ndarray, derivative: bool = True) -> tuple[float, np.ndarray | None, int]:
        """(mutual information, its gradient (6,: rotation about the samples' image, scaled
        to mm at their radius; translation mm) or None, number of samples inside the moving
        image) for the fixed->moving map ``f2m``."""
        bins = self.bins
        A = f2m[:3, :3]
        B = self.moving_inverse @ A  # fixed LPS -> moving index, linear part
        off = self.moving_inverse @ (f2m[:3, 3] - self.moving_origin)
        # explicit products rather than a BLAS matmul: OpenBLAS serialises the calls of
        # concurrent Python threads (the consistency runs), these loops release the GIL
        px, py, pz = self.points
        ci = np.empty_like(self.points)
        for r in range(3):
            np.multiply(px, B[r, 0], out=ci[r])
            ci[r] += B[r, 1] * py
            ci[r] += B[r, 2] * pz
            ci[r] += off[r]
        top = self.moving_size - 1.0
        inside = (ci[0] >= 0.0) & (ci[0] <= top[0]) & (ci[1] >= 0.0) & (ci[1] <= top[1]) & \
            (ci[2] >= 0.0) & (ci[2] <= top[2])
        n = int(np.count_nonzero(inside))
        if n < 16:
            return 0.0, None, n
        # samples outside the moving image are interpolated at the clamped index and weigh 0
        weight = inside.astype(np.float64) if n < ci.shape[1] else None
        mval, mgrad = _trilinear(self.moving_read, self.moving_size, ci, gradient=derivative)
        # the moving values lie in [min, max]: kappa in [PADDING, bins - PADDING], so the four
        # bins of the window stay inside the histogram
        kappa = np.clip((mval - self.moving_min) / self.moving_width + PADDING, PADDING, bins - PADDING - 1e-9)
        k0 = np.floor(kappa)
        w, dw = _bspline3_window(kappa - k0)
        if weight is not None:
            w *= weight
            dw *= weight
        first = self.fixed_cell + k0.astype(np.int64) - 1  # joint-histogram cell of the window's first bin
        cells = first[None, :] + np.arange(4)[:, None]  # (4, n)
        joint = np.bincount(cells.ravel(), weights=w.ravel(), minlength=bins * bins).reshape(bins, bins)
        joint /= joint.sum()
        pf = joint.sum(axis=1)
        pm = joint.sum(axis=0)
        nz = joint > 0
        outer = pf[:, None] * pm[None, :]
        mi = float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
        if not derivative:
            return mi, None, n
        assert mgrad is not None
        log_ratio = np.zeros_like(joint)
        log_ratio[nz] = np.log(joint[nz] / np.broadcast_to(pm[None, :], joint.shape)[nz])
        # d MI / d moving value of each sample: the window moves with the value
        dmi_dm = (dw * log_ratio.ravel()[cells]).sum(axis=0) / (self.moving_width * n)
        q = mgrad * dmi_dm  # (3, n): d MI / d moving index, per sample
        # translation: the sum of d MI / d y = M^-T q (M: moving index -> LPS, linear part)
        g_trans = self.moving_inverse.T @ q.sum(axis=1)
        # rotation about the samples' image c: sum of r x dMI/dy with r = y - c = A rel; for a
        # rotation A, (A a) x (A b) = A (a x b), so the sum is A (sum of rel x B^T q), whose
        # components come from the 3x3 matrix (rel q^T) B (one pass over the samples)
        D = np.einsum("in,jn->ij", self.relative, q) @ B  # einsum: no BLAS (see above)
        g_rot = A @ np.array([D[1, 2] - D[2, 1], D[2, 0] - D[0, 2], D[0, 1] - D[1, 0]]) / self.radius
        return mi, np.concatenate([g_rot, g_trans]), n

    def step(self, f2m: np.ndarray, update: np.ndarray) -> np.ndarray:
        """``f2m`` followed by the rigid update (rotation part scaled as in :meth:`evaluate`)."""
        R = _rotation(update[:3] / self.radius)
        centre = f2m[:3, :3] @ self.centroid + f2m[:3, 3]
        out = np.eye(4)
        out[:3, :3] = R @ f2m[:3, :3]
        out[:3, 3] = R @ (f2m[:3, 3] - centre) + centre + update[3:]
        return out


def register_rigid_mattes(fixed: sitk.Image, mask: sitk.Image | None, moving: sitk.Image | MovingTable,
                          fixed_to_moving: np.ndarray,
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


class ForkedCall:
    """``fn()`` computed in a forked child process, for numpy work that should use another
    core: Python threads would serialise on the GIL between the many short array
    operations of :meth:`MattesMetric.evaluate` (measured: two runs on two threads took as
    long as one after the other).

    The child inherits the parent's memory (images included, copy-on-write), runs ``fn``
    (which must be plain numpy/Python work: no ITK filters, whose thread pool does not
    exist in the child; no logging), sends the pickled result through a pipe and leaves
    with ``os._exit``. :meth:`result` returns it, or, when the platform cannot fork or the
    child failed or exceeded ``timeout_s``, computes ``fn()`` here: the same computation,
    so the same result either way.
    """

    def __init__(self, fn: Callable[[], object], timeout_s: float = 120.0) -> None:
        import os

        self._fn = fn
        self._timeout_s = timeout_s
        self._pid = 0
        self._read_fd = -1
        if not hasattr(os, "fork"):
            return
        read_fd, write_fd = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(read_fd)
            os.close(write_fd)
            return
        if pid == 0:  # the child: compute, send, leave without running the parent's cleanup
            status = 1
            try:
                os.close(read_fd)
                import pickle

                data = pickle.dumps(fn(), protocol=pickle.HIGHEST_PROTOCOL)
                view = memoryview(data)
                while view:
                    view = view[os.write(write_fd, view):]
                status = 0
            except BaseException:  # noqa: BLE001 - the parent computes it itself
                pass
            finally:
                os._exit(status)
        os.close(write_fd)
        self._pid, self._read_fd = pid, read_fd

    def cancel(self) -> None:
        """Stop the child (if any) and reap it; :meth:`result` must not be called after."""
        import os
        import signal

        if self._pid:
            pid, self._pid = self._pid, 0
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(self._read_fd)

    def result(self) -> object:
        import os
        import pickle
        import select
        import signal
        import time

        if not self._pid:
            return self._fn()
        chunks: list[bytes] = []
        deadline = time.monotonic() + self._timeout_s
        ok = False
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._read_fd], [], [], left)[0]:
                    os.kill(self._pid, signal.SIGKILL)
                    break
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    ok = True
                    break
                chunks.append(chunk)
        finally:
            os.close(self._read_fd)
            _, status = os.waitpid(self._pid, 0)
        if ok and status == 0 and chunks:
            return pickle.loads(b"".join(chunks))
        return self._fn()


__all__ = ["ForkedCall", "MattesMetric", "MattesRun", "MovingTable", "register_rigid_mattes"]
