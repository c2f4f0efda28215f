"""Rigid (6-DOF) volume-to-volume registration with SimpleITK, and its quality gate.

Method (see DESIGN.md, "What was measured"):

1. Both volumes are BinShrink-ed once to about ``target_spacing_mm`` and cast to float32.
   Every smoothed, coarser image is BinShrink-ed first and smoothed on the small image for
   the remaining variance (smoothing the shrunk images at full size cost ~1.4 s of ~8 s).
2. Initialisation by a global search: the moving volume is centred on the fixed one by the
   centres of their thresholded bodies, of their brightest voxels (same modality only) and
   of their grids (centres measured on the ``coarse_spacing_mm`` images), each combined with
   a set of rotation starts. Every start runs ``search_first_iterations`` of Mattes-MI rigid
   registration at ``search_spacing_mm``; the best ``search_keep`` distinct ones go on for
   the rest of ``search_iterations``; the best distinct few are re-run at
   ``coarse_spacing_mm``. These runs on tiny images use one thread each
   (``small_image_threads``): on a loaded 2-core machine the thread hand-offs cost more
   wall time than they saved. Independent runs (the starts of a phase, the candidates,
   the consistency restarts) run ``parallel_runs`` at a time on Python threads instead
   (SimpleITK releases the GIL in Execute); every run stays single-threaded and seeded, so
   the result does not depend on the order they finish in.
3. Refinement from the best start: Mattes mutual information with a fixed number of
   samples (seeded), regular-step gradient descent, a 2-level pyramid on the shrunk images;
   the levels after the first start with the smaller step ``fine_learning_rate`` and stop
   at ``coarse_min_step`` except the finest (``min_step``). For two volumes of the same
   modality the finest level samples only the fixed image's edges (``edge_fraction`` of
   its voxels, largest gradient magnitude; ``edge_samples`` samples): the flat regions
   only add noise to the MI estimate. CT-MR samples the whole body there
   (``cross_modality_final_samples``, with ``cross_modality_final_bins`` histogram bins and
   a slower, longer step schedule): the CT's edges have no MR counterpart everywhere, and
   with 32 bins and 14000 samples the optimum itself sat ~0.06 mm off on the large pair.
   The finest level's fixed image is cropped to the moving field of view placed by the
   level before (``finest_margin_mm``) and, when it samples the body, to the body's box in
   it (``finest_body_box``); its samples are drawn on a grid ``finest_virtual_shrink`` times
   coarser (ITK copies the sampling grid at the start of every run).
4. Evidence for the gate: final metric, optimizer stop condition, overlap fraction of the
   bodies, and a consistency figure: the finest level also runs from ``consistency_starts``
   (CT-MR: ``cross_modality_consistency_starts``) perturbed copies of the first level's
   solution (other seeds), all at once with the main run, and the transforms are compared
   by the largest displacement of the corners of the overlap region (mm). When they agree
   (``average_max_mm``) the result is their average.

SimpleITK's registration transform maps *fixed* points to *moving* points; everything
this module returns is the inverse, ``moving -> fixed`` (DESIGN.md convention).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk

from fusion.errors import RegistrationError
from fusion.gates import VolumeGateThresholds
from fusion.mattes import ForkedCall, MovingTable, register_rigid_mattes
from fusion.records import QualityCheck, Verdict
from fusion.volume import Volume, volume_to_sitk

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class VolumeRegistrationParameters:
    """Tunable parameters of :func:`register_volumes` (recorded in the FusionResult)."""

    target_spacing_mm: float = 0.55  # BinShrink both images once to about this spacing (factor rounded)
    search_spacing_mm: float = 4.0  # wide global search resolution (every start)
    search_samples: int = 1500
    search_iterations: int = 25  # iterations of a global-search start in all (both phases)
    search_first_iterations: int = 8  # phase 1: every start runs this many iterations ...
    search_keep: int = 12  # ... phase 2: the best distinct this many continue for the rest
    bright_fraction: float = 0.02  # centre of the brightest voxels: a translation start
    coarse_spacing_mm: float = 2.0  # the best wide-search candidates are re-run here
    coarse_candidates: int = 4
    pyramid_shrink: tuple[int, ...] = (2, 1)  # refinement levels on the shrunk images
    pyramid_sigma_mm: tuple[float, ...] = (1.0, 0.0)
    histogram_bins: int = 32
    metric_samples: int = 10000  # fixed number of Mattes MI samples per evaluation (coarser levels)
    final_samples: int = 30000  # samples at the finest level
    average_consistent_runs: bool = True  # average the main and restart solutions when they agree
    average_max_mm: float = 0.5  # ... within this corner displacement
    coarse_samples: int = 2000
    learning_rate: float = 2.0  # regular-step GD initial step (scaled by physical shift)
    fine_learning_rate: float = 0.5  # initial step at the later pyramid levels (the start is already close)
    final_learning_rate: float = 0.5  # ... and at the finest one
    min_step: float = 1e-3  # regular-step GD stops below this step at the finest level
    coarse_min_step: float = 0.01  # ... and at the levels before it (the finest level polishes)
    edge_fraction: float = 0.10  # the finest level samples only this fraction of the fixed voxels: the largest gradient magnitude
    edge_samples: int = 3000  # Mattes MI samples among those edge voxels per evaluation (0: final_samples over the body)
    edge_cross_modality: bool = False  # edge sampling also when the modalities differ (CT-MR: the edges do not correspond)
    cross_modality_final_samples: int = 40000  # CT-MR finest level: samples over the whole body ...
    cross_modality_final_bins: int = 64  # ... Mattes MI histogram bins there ...
    cross_modality_final_relaxation: float = 0.8  # ... the optimizer's step shrinks more slowly ...
    cross_modality_final_min_step: float = 5e-4  # ... and further (large CT-MR pair, the 10 bench motions: TRE 0.058 -> 0.049 mm)
    cross_modality_final_engine: str = "numpy"  # "numpy" (fusion.mattes: same metric and optimizer, ~5x cheaper
    # per iteration, bit-reproducible) or "itk"
    finest_body_box: bool = True  # ... and, sampling the body (CT-MR), to the body's box in it (large CBCT-MR pair, the 10
    # bench motions: TRE mean 0.068 -> 0.058 mm; 10 other motions: 0.065 -> 0.054 mm). Not for edge sampling: CBCT-CBCT TRE 0.0075 -> 0.0106 mm
    finest_virtual_shrink: int = 2  # the finest level draws its samples on a grid this many times coarser (see _run)
    finest_margin_mm: float = 3.0  # the finest level's fixed image is cropped to the moving field of view plus this
    max_iterations: int = 200
    coarse_iterations: int = 30
    relaxation: float = 0.6
    rotation_starts_deg: tuple[tuple[float, float, float], ...] = (
        (0, 0, 0), (12, 0, 0), (-12, 0, 0), (0, 12, 0), (0, -12, 0), (0, 0, 12), (0, 0, -12),
        (8, 8, 8), (-8, -8, -8), (8, -8, 8), (-8, 8, -8), (8, 8, -8), (-8, -8, 8), (-8, 8, 8), (8, -8, -8),
    )
    refine_candidates: int = 2  # distinct global-search candidates refined at the first level
    consistency_starts: int = 2
    cross_modality_consistency_starts: int = 1  # CT-MR: one restart, in a forked child while the main run goes on (two cores)
    consistency_perturbation_deg: float = 0.5  # restarts at the finest level from the first level's solution turned by this ...
    consistency_perturbation_mm: float = 0.5  # ... and shifted by this (a restart that does not come back disagrees by ~1 mm)
    threads: int = 0  # 0 = SimpleITK default
    small_image_threads: int = 1  # the global search runs on tiny images: thread hand-offs cost more than they save
    refine_threads: int = 1  # ITK threads of the refinement runs (0: default). With 2, Mattes MI's per-thread sums were added
    # in varying order and the optimizer path changed with it (~1e-5 mm run to run); on the loaded 2-core machine one
    # thread cost no wall time
    parallel_runs: int = 2  # independent registration runs (search starts, candidates, restarts) at once, each on its
    # own Python thread (SimpleITK releases the GIL in Execute) with its own ITK thread count (the runs' own
    # ``small_image_threads`` / ``refine_threads``; with 0 they run one after the other). Every run is seeded and
    # single-threaded, so the results do not depend on the order the runs finish in
    overlap_grid_step: int = 4  # overlap evidence on every n-th voxel of the shrunk images (2 mm at 0.5 mm)

    def __post_init__(self) -> None:
        if self.cross_modality_final_engine not in ("numpy", "itk"):
            raise ValueError(f"cross_modality_final_engine must be 'numpy' or 'itk', not "
                             f"{self.cross_modality_final_engine!r}")
        if min(self.histogram_bins, self.cross_modality_final_bins) < 8:
            raise ValueError("histogram_bins and cross_modality_final_bins must be at least 8")


@dataclass(frozen=True)
class VolumeRegistration:
    """The outcome of :func:`register_volumes` (before the gate)."""

    matrix_moving_to_fixed: np.ndarray  # 4x4, moving frame (LPS mm) -> fixed frame
    final_metric: float  # Mattes MI, negated (lower is better)
    stop_condition: str
    converged: bool
    iterations: int
    overlap_fraction: float
    consistency_mm: float
    metrics: dict[str, float]
    parameters: VolumeRegistrationParameters
    seed: int
    timings_s: dict[str, float] = field(default_factory=dict)
    overlap_box_fixed: np.ndarray | None = None  # (2, 3) LPS corners (min, max) of the overlap


# ---- helpers ---------------------------------------------------------------------

def _shrink_to(img: sitk.Image, target_mm: float) -> sitk.Image:
    factors = [max(1, int(round(target_mm / s))) for s in img.GetSpacing()]
    return sitk.BinShrink(img, factors) if any(f > 1 for f in factors) else img


def _smooth_shrink(img: sitk.Image, sigma_mm: float, target_mm: float) -> sitk.Image:
    """Gaussian-smoothed (``sigma_mm``) and shrunk to about ``target_mm``, cheaply: BinShrink
    first to about ``sigma_mm`` (the box average is part of the smoothing), then a recursive
    Gaussian on the small image for the remaining variance, then BinShrink to the target.
    Smoothing the full image first cost ~0.2 s per call at 200^3."""
    if sigma_mm <= 0:
        return _shrink_to(img, target_mm)
    pre = _shrink_to(img, min(target_mm, sigma_mm))
    box_var = float(np.mean([((round(p / s) ** 2) - 1) / 12 * s * s
                             for p, s in zip(pre.GetSpacing(), img.GetSpacing())]))
    rest = math.sqrt(max(sigma_mm * sigma_mm - box_var, 0.0))
    if rest > 0.05 * sigma_mm:
        pre = sitk.SmoothingRecursiveGaussian(pre, rest)
    return _shrink_to(pre, target_mm)


def _body_threshold(arr: np.ndarray) -> float:
    """Otsu threshold of the image (separates air/background from the body)."""
    from skimage.filters import threshold_otsu

    sample = arr[:: max(1, arr.shape[0] // 64), :: 2, :: 2].ravel()
    if sample.size == 0 or float(sample.max()) == float(sample.min()):
        return float(sample.max()) if sample.size else 0.0
    return float(threshold_otsu(sample))


def _body_mask(img: sitk.Image) -> tuple[sitk.Image, float]:
    arr = sitk.GetArrayViewFromImage(img)
    thr = _body_threshold(arr)
    mask = sitk.BinaryThreshold(img, lowerThreshold=thr, upperThreshold=1e30, insideValue=1, outsideValue=0)
    return mask, thr


def _euler_from_matrix(fixed_to_moving: np.ndarray, center: np.ndarray) -> sitk.Euler3DTransform:
    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in center))
    t.SetMatrix(tuple(float(v) for v in fixed_to_moving[:3, :3].ravel()))
    # x_m = R (x_f - c) + c + t  ==  R x_f + b  ->  t = b - c + R c
    b = fixed_to_moving[:3, 3]
    t.SetTranslation(tuple(float(v) for v in (b - center + fixed_to_moving[:3, :3] @ center)))
    return t


def _matrix_of(t: sitk.Transform) -> np.ndarray:
    """4x4 fixed->moving matrix of a SimpleITK rigid/affine transform."""
    e = sitk.Euler3DTransform(t) if not isinstance(t, sitk.Euler3DTransform) else t
    m = np.eye(4)
    R = np.array(e.GetMatrix()).reshape(3, 3)
    c = np.array(e.GetCenter())
    m[:3, :3] = R
    m[:3, 3] = np.array(e.GetTranslation()) + c - R @ c
    return m


def _rot(deg_xyz: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = (math.radians(float(v)) for v in deg_xyz)
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _close(a: np.ndarray, b: np.ndarray, mm: float = 1.0, rot: float = 0.02) -> bool:
    """Two 4x4 rigid matrices within ``mm`` translation and ``rot`` rotation-element difference."""
    return bool(np.abs(a[:3, 3] - b[:3, 3]).max() < mm and np.abs(a[:3, :3] - b[:3, :3]).max() < rot)


def _centroid(img: sitk.Image, mask: np.ndarray) -> np.ndarray | None:
    """LPS centroid of the voxels of ``img`` where ``mask`` (z, y, x array) is true, or None."""
    kji = np.nonzero(mask)
    if len(kji[0]) == 0:
        return None
    idx = np.array([kji[2].mean(), kji[1].mean(), kji[0].mean()])
    return np.array(img.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx)))


def _finest_fixed(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image, moving_to_fixed: np.ndarray,
                  margin_mm: float, counted: bool, to_mask_box: bool = True
                  ) -> tuple[sitk.Image, sitk.Image, int | None]:
    """``fixed`` and its sampling ``mask`` cropped to the box (fixed index space) around the
    moving image's field of view placed by ``moving_to_fixed`` (4x4, moving LPS -> fixed LPS),
    widened by ``margin_mm``; and the mask's voxel count in the crop when ``counted`` (then
    the samples count kept samples, see :func:`_run`) else None. Samples outside the moving
    field of view are dropped by ITK anyway; the set-up cost of a run grows with the fixed
    image."""
    size = np.array(moving.GetSize(), float)
    corners = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5)
                        for z in (-0.5, size[2] - 0.5)])
    d_m = np.array(moving.GetDirection()).reshape(3, 3) * np.array(moving.GetSpacing())[None, :]
    pts = corners @ d_m.T + np.array(moving.GetOrigin())
    pts = pts @ moving_to_fixed[:3, :3].T + moving_to_fixed[:3, 3]
    d_f = np.array(fixed.GetDirection()).reshape(3, 3) * np.array(fixed.GetSpacing())[None, :]
    idx = np.linalg.solve(d_f, (pts - np.array(fixed.GetOrigin())).T).T
    pad = margin_mm / np.array(fixed.GetSpacing())
    fsize = np.array(fixed.GetSize())
    lo = np.clip(np.floor(idx.min(axis=0) - pad), 0, fsize - 1).astype(int)
    hi = np.clip(np.ceil(idx.max(axis=0) + pad), 0, fsize - 1).astype(int)
    if np.any(hi - lo < 8):  # (nearly) no overlap: keep the whole image, the gate will judge
        lo, hi = np.zeros(3, int), fsize - 1
    # ... and further (``to_mask_box``) to the box of the sampling mask's voxels in it: the
    # samples are drawn there only, and the set-up cost of a run (ITK's random sampler visits
    # every voxel of the fixed image) grows with the fixed image
    marr = sitk.GetArrayViewFromImage(mask)[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
    ext = []
    for ax in range(3):  # numpy axis 0 = z
        other = tuple(a for a in range(3) if a != ax)
        nz = np.flatnonzero(marr.any(axis=other))
        ext.append((int(nz[0]), int(nz[-1])) if len(nz) else (0, marr.shape[ax] - 1))
    mlo = np.array([ext[2][0], ext[1][0], ext[0][0]])
    mhi = np.array([ext[2][1], ext[1][1], ext[0][1]])
    if to_mask_box and np.all(mhi - mlo >= 8):
        lo, hi = lo + np.maximum(mlo - 1, 0), lo + np.minimum(mhi + 1, hi - lo)
    sub = [int(v) for v in hi - lo + 1]
    log.debug("finest level: fixed image cropped to %s of %s voxels", sub, fsize.tolist())
    f_crop = sitk.RegionOfInterest(fixed, sub, [int(v) for v in lo])
    m_crop = sitk.RegionOfInterest(mask, sub, [int(v) for v in lo])
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(m_crop))) if counted else None
    return f_crop, m_crop, count


def _edge_mask(levels: list[tuple[sitk.Image, sitk.Image, sitk.Image]], shrinks: tuple[int, ...],
               fraction: float) -> sitk.Image:
    """Mask (on the finest level's fixed grid) of about ``fraction`` of its voxels: those with
    the largest gradient magnitude, measured on the coarsest (smoothed, shrunk) level's fixed
    image and repeated onto the finest grid (a Gaussian gradient of the fine image itself cost
    ~0.6 s at 200^3; this ~0.05 s)."""
    fine = levels[-1][0]
    k = int(shrinks[0] // shrinks[-1])
    grad = sitk.GradientMagnitude(levels[0][0])
    garr = sitk.GetArrayViewFromImage(grad)
    thr = float(np.quantile(garr, 1.0 - fraction))
    small = (garr > thr).astype(np.uint8)
    big = np.zeros(sitk.GetArrayViewFromImage(fine).shape, np.uint8)
    if k > 1:
        small = small.repeat(k, 0).repeat(k, 1).repeat(k, 2)
    nz, ny, nx = (min(a, b) for a, b in zip(small.shape, big.shape))
    big[:nz, :ny, :nx] = small[:nz, :ny, :nx]
    out = sitk.GetImageFromArray(big)
    out.CopyInformation(fine)
    return out


def _image_centre(img: sitk.Image) -> np.ndarray:
    size = np.array(img.GetSize(), float)
    return np.array(img.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2)))


def _grid_points(img: sitk.Image, step: int = 4) -> np.ndarray:
    """Physical points of every ``step``-th voxel (N, 3) and their flat z,y,x order."""
    size = img.GetSize()
    ii = [np.arange(0, size[a], step) for a in range(3)]
    K, J, I = np.meshgrid(ii[2], ii[1], ii[0], indexing="ij")
    idx = np.stack([I.ravel(), J.ravel(), K.ravel()], 1).astype(float)
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    return idx @ d.T + np.array(img.GetOrigin()), (K.ravel(), J.ravel(), I.ravel())


def _inside(img: sitk.Image, pts: np.ndarray) -> np.ndarray:
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    idx = np.linalg.solve(d, (pts - np.array(img.GetOrigin())).T).T
    size = np.array(img.GetSize())
    return np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)


def _mask_at(mask_arr: np.ndarray, img: sitk.Image, pts: np.ndarray) -> np.ndarray:
    d = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())[None, :]
    idx = np.rint(np.linalg.solve(d, (pts - np.array(img.GetOrigin())).T).T).astype(int)
    size = np.array(img.GetSize())
    ok = np.all((idx >= 0) & (idx < size), axis=1)
    out = np.zeros(len(pts), bool)
    out[ok] = mask_arr[idx[ok, 2], idx[ok, 1], idx[ok, 0]] > 0
    return out


def overlap_evidence(fixed: sitk.Image, fixed_mask: sitk.Image, moving: sitk.Image, moving_mask: sitk.Image,
                     moving_to_fixed: np.ndarray, step: int = 2) -> tuple[float, float, float, np.ndarray | None]:
    """Overlap of the two bodies under ``moving_to_fixed``.

    Returns (fraction of the moving body inside the fixed grid, fraction of the fixed body
    inside the moving grid, fraction of the smaller body's voxels that land on the other
    body, (2, 3) min/max LPS box of the overlap in the fixed frame or None).
    """
    fm = sitk.GetArrayViewFromImage(fixed_mask)
    mm = sitk.GetArrayViewFromImage(moving_mask)
    fp, fidx = _grid_points(fixed, step)
    mp, midx = _grid_points(moving, step)
    f_body = fm[fidx] > 0
    m_body = mm[midx] > 0
    inv = np.linalg.inv(moving_to_fixed)
    fp_in_m = fp[f_body] @ inv[:3, :3].T + inv[:3, 3]
    mp_in_f = mp[m_body] @ moving_to_fixed[:3, :3].T + moving_to_fixed[:3, 3]
    frac_m_in_f = float(_inside(fixed, mp_in_f).mean()) if m_body.any() else 0.0
    frac_f_in_m = float(_inside(moving, fp_in_m).mean()) if f_body.any() else 0.0
    f_on_m = _mask_at(mm, moving, fp_in_m)
    m_on_f = _mask_at(fm, fixed, mp_in_f)
    body_agreement = max(float(f_on_m.mean()) if f_on_m.size else 0.0, float(m_on_f.mean()) if m_on_f.size else 0.0)
    both = fp[f_body][f_on_m]
    box = np.stack([both.min(axis=0), both.max(axis=0)]) if len(both) >= 8 else None
    return frac_m_in_f, frac_f_in_m, body_agreement, box


def max_corner_displacement_mm(a: np.ndarray, b: np.ndarray, box: np.ndarray) -> float:
    """Largest distance between where two moving->fixed transforms put the 8 corners of a
    fixed-frame box (mapped back to the moving frame with ``a``)."""
    lo, hi = box
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ainv = np.linalg.inv(a)
    src = corners @ ainv[:3, :3].T + ainv[:3, 3]  # moving-frame points that a maps to the corners
    pb = src @ b[:3, :3].T + b[:3, 3]
    return float(np.max(np.linalg.norm(pb - corners, axis=1)))


def average_rigid(transforms: list[np.ndarray], box: np.ndarray) -> np.ndarray:
    """The rigid moving->fixed transform that best maps (least squares, Kabsch) the
    moving-frame preimages of a fixed-frame box's corners and centre to the mean of where
    ``transforms`` put them."""
    lo, hi = box
    pts = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
                   + [list((lo + hi) / 2)])
    inv0 = np.linalg.inv(transforms[0])
    src = pts @ inv0[:3, :3].T + inv0[:3, 3]
    dst = np.mean([src @ t[:3, :3].T + t[:3, 3] for t in transforms], axis=0)
    cs, cd = src.mean(axis=0), dst.mean(axis=0)
    H = (src - cs).T @ (dst - cd)
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(Vt.T @ U.T))
    R = Vt.T @ np.diag([1.0, 1.0, d]) @ U.T
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = cd - R @ cs
    return out


# ---- registration ------------------------------------------------------------------

def _sitk_seed(seed: int) -> int:
    """SimpleITK treats seed 0 as "wall clock" (non-reproducible): shift every seed by one."""
    return int(seed) % (2**31 - 2) + 1


def _method(params: VolumeRegistrationParameters, samples: int, seed: int, iterations: int,
            fixed_mask: sitk.Image | None, learning_rate: float, min_step: float | None = None,
            bins: int = 0, relaxation: float = 0.0) -> sitk.ImageRegistrationMethod:
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins or params.histogram_bins)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(1.0, _sitk_seed(seed))  # replaced below by a fixed count
    r.SetInterpolator(sitk.sitkLinear)
    # gradients by central differences at the sample points, not a full gradient image per run
    r.SetMetricUseFixedImageGradientFilter(False)
    r.SetMetricUseMovingImageGradientFilter(False)
    r.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=params.min_step if min_step is None else min_step,
        numberOfIterations=iterations,
        relaxationFactor=relaxation or params.relaxation, gradientMagnitudeTolerance=1e-8)
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    return r


def _run(fixed: sitk.Image, moving: sitk.Image, init: sitk.Euler3DTransform, *, params: VolumeRegistrationParameters,
         samples: int, seed: int, iterations: int, shrink: tuple[int, ...], sigmas_mm: tuple[float, ...],
         fixed_mask: sitk.Image | None, learning_rate: float, threads: int = 0,
         mask_voxels: int | None = None, min_step: float | None = None, virtual_shrink: int = 1,
         bins: int = 0, relaxation: float = 0.0) -> tuple[sitk.Euler3DTransform, float, str, int]:
    # a fixed number of samples at the finest level of this run. ITK draws
    # ``percentage * voxels`` random voxels and drops those outside the mask: with
    # ``mask_voxels`` given, ``samples`` counts the samples kept (inside the mask), otherwise
    # the voxels drawn over the whole image.
    #
    # ``virtual_shrink`` > 1 draws the samples on a grid that many times coarser than the
    # fixed image's (ITK jitters each sample by a third of that grid's spacing; the fixed
    # value is still interpolated from the fixed image): ITK copies the virtual domain
    # through a ShrinkImageFilter at the start of every run, 0.12 s of a 0.18 s set-up for a
    # 5.5M-voxel fixed image (0.06 s with 2)
    n_vox = fixed.GetNumberOfPixels() if mask_voxels is None else mask_voxels
    n_vox = n_vox / virtual_shrink ** 3
    pct = min(1.0, samples / max(1.0, n_vox))
    r = _method(params, samples, seed, iterations, fixed_mask, learning_rate, min_step, bins, relaxation)
    if threads:
        r.SetNumberOfThreads(threads)
    if virtual_shrink > 1 and min(fixed.GetSize()) >= 4 * virtual_shrink:
        spacing = np.array(fixed.GetSpacing()) * virtual_shrink
        direction = np.array(fixed.GetDirection()).reshape(3, 3)
        # the same physical extent: the first coarse voxel's centre sits half a fine voxel
        # short of the middle of the first virtual_shrink fine voxels
        origin = np.array(fixed.GetOrigin()) + direction @ (0.5 * (spacing - np.array(fixed.GetSpacing())))
        r.SetVirtualDomain([int(v) // virtual_shrink for v in fixed.GetSize()], [float(v) for v in origin],
                           [float(v) for v in spacing], fixed.GetDirection())
    r.SetMetricSamplingPercentagePerLevel([min(1.0, pct * (s ** 3)) for s in shrink], _sitk_seed(seed))
    r.SetShrinkFactorsPerLevel(list(shrink))
    r.SetSmoothingSigmasPerLevel(list(sigmas_mm))
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    r.SetOptimizerScalesFromPhysicalShift()
    t = sitk.Euler3DTransform(init)
    r.SetInitialTransform(t, inPlace=True)
    t_start = time.perf_counter()
    # the metric takes its thread count from the global default when Execute builds it
    # (SetNumberOfThreads alone left it multi-threaded: results varied in the last digits)
    default_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    # (register_volumes sets it once around its parallel sections: runs on two Python
    # threads must not set and restore it under each other)
    set_threads = bool(threads) and threads != default_threads
    try:
        if set_threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        r.Execute(fixed, moving)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[-1] if str(exc) else repr(exc)
        if "samples" in msg.lower() or "too many samples" in msg.lower() or "outside" in msg.lower():
            return t, 0.0, f"failed: {msg}", 0
        raise RegistrationError(f"SimpleITK registration failed: {msg}") from exc
    finally:
        if set_threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(default_threads)
    log.debug("run on %s voxels, %d samples: %d iterations, metric %.4f, %.3f s (%s)", fixed.GetSize(), samples,
              r.GetOptimizerIteration(), r.GetMetricValue(), time.perf_counter() - t_start,
              r.GetOptimizerStopConditionDescription()[:60])
    return t, float(r.GetMetricValue()), r.GetOptimizerStopConditionDescription(), int(r.GetOptimizerIteration())


def register_volumes(
    fixed: Volume,
    moving: Volume,
    *,
    params: VolumeRegistrationParameters = VolumeRegistrationParameters(),
    seed: int = 0,
    progress: Progress | None = None,
) -> VolumeRegistration:
    """Rigidly register ``moving`` to ``fixed`` (Mattes MI, seeded, multi-start).

    Parameters
    ----------
    fixed, moving
        The volumes; ``fixed`` defines the registered frame.
    params
        :class:`VolumeRegistrationParameters`.
    seed
        Seeds metric sampling and the consistency perturbations: same inputs, same seed ->
        the same transform.
    progress
        Optional ``callback(stage, fraction_done)``.

    Returns
    -------
    VolumeRegistration
        moving->fixed matrix and the evidence the gate needs.

    Raises
    ------
    RegistrationError
        Registration could not run at all (e.g. an empty image).
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    say = progress or (lambda stage, frac: None)
    if params.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(params.threads)

    def pmap(fn: Callable, items: list, threads: int, width: int = 0) -> list:
        """``[fn(x) for x in items]``, on ``params.parallel_runs`` Python threads when the
        runs are single-threaded ITK runs (``threads`` 1). ITK's global default thread count is
        set once around them: ``_run`` then leaves it alone (it must not set and restore it
        under a concurrent run). ``width`` overrides the number of runs at once."""
        items = list(items)
        width = width or params.parallel_runs
        if width < 2 or threads != 1 or len(items) < 2:
            return [fn(x) for x in items]
        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
        try:
            with ThreadPoolExecutor(min(width, len(items))) as pool:
                return list(pool.map(fn, items))
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)

    say("preparing images", 0.0)
    # shrink in the stored type (BinShrink averages; integer types round to the nearest
    # integer, far below the noise), then float32 on the small images only
    def prepare(vol: Volume) -> tuple[sitk.Image, sitk.Image, float, sitk.Image, sitk.Image]:
        img = sitk.Cast(_shrink_to(volume_to_sitk(vol), params.target_spacing_mm), sitk.sitkFloat32)
        mask, thr = _body_mask(img)
        coarse = _smooth_shrink(img, params.coarse_spacing_mm / 2, params.coarse_spacing_mm)
        search = _smooth_shrink(img, params.search_spacing_mm / 2, params.search_spacing_mm)
        return img, mask, thr, coarse, search

    # the two volumes side by side (the conversion copies and the mask run on one core each)
    with ThreadPoolExecutor(2) as pool:
        (f_img, f_mask, f_thr, f_coarse, f_search), (m_img, m_mask, m_thr, m_coarse, m_search) = \
            pool.map(prepare, [fixed, moving])
    fc_mask, _ = _body_mask(f_coarse)
    fc_arr = sitk.GetArrayViewFromImage(f_coarse)
    mc_arr = sitk.GetArrayViewFromImage(m_coarse)
    f_sd = float(np.std(fc_arr))
    m_sd = float(np.std(mc_arr))
    if f_sd == 0 or m_sd == 0:
        raise RegistrationError(
            f"series {fixed.series_instance_uid if f_sd == 0 else moving.series_instance_uid} is a constant "
            "image; there is nothing to register")
    timings["prepare"] = time.perf_counter() - t0

    # ---- coarse global search: a wide search at search_spacing_mm, the best few at coarse_spacing_mm
    t1 = time.perf_counter()
    # translation starts from centres measured on the coarse images (a few mm of precision
    # is all a start needs; on the shrunk images this cost ~0.2 s)
    f_com = _centroid(f_coarse, fc_arr >= f_thr)
    m_com = _centroid(m_coarse, mc_arr >= m_thr)
    centre = f_com if f_com is not None else _image_centre(f_img)
    translations = []
    if f_com is not None and m_com is not None:
        translations.append(("centre of mass", m_com - f_com))
    cross_modality = bool(fixed.modality and moving.modality and fixed.modality != moving.modality)
    if not cross_modality:  # bone and enamel are the brightest in CT; in MR they are dark
        f_bright = _centroid(f_coarse, fc_arr >= np.quantile(fc_arr, 1.0 - params.bright_fraction))
        m_bright = _centroid(m_coarse, mc_arr >= np.quantile(mc_arr, 1.0 - params.bright_fraction))
        if f_bright is not None and m_bright is not None:
            translations.append(("bright centre", m_bright - f_bright))
    translations.append(("geometric centre", _image_centre(m_img) - _image_centre(f_img)))
    fs_mask, _ = _body_mask(f_search)
    timings["search_starts"] = time.perf_counter() - t1
    wide: list[tuple[float, np.ndarray, str]] = []
    first_its = min(params.search_first_iterations or params.search_iterations, params.search_iterations)
    starts: list[tuple[sitk.Euler3DTransform, str]] = []
    for tname, trans in translations:
        for rot in params.rotation_starts_deg:
            # fixed->moving start: rotate about the fixed centre, then shift centres
            m = np.eye(4)
            R = _rot(rot)
            m[:3, :3] = R
            m[:3, 3] = centre + trans - R @ centre
            starts.append((_euler_from_matrix(m, centre), f"{tname} {rot}"))

    def phase1(start: tuple[sitk.Euler3DTransform, str]) -> tuple[sitk.Euler3DTransform, float, str, int]:
        return _run(f_search, m_search, start[0], params=params, samples=params.search_samples,
                    seed=seed, iterations=first_its, shrink=(1,), sigmas_mm=(0.0,),
                    fixed_mask=fs_mask, learning_rate=params.learning_rate * 4,
                    threads=params.small_image_threads)

    for (t, metric, stop, _), (_, label) in zip(pmap(phase1, starts, params.small_image_threads), starts):
        if not stop.startswith("failed"):
            wide.append((metric, _matrix_of(t), label))
    say("global search", 0.3)
    wide.sort(key=lambda c: c[0])
    if first_its < params.search_iterations:
        # phase 2: most starts have shown after a few iterations that they lead nowhere;
        # the best distinct ones go on from where they are (with half the initial step)
        going_on: list[tuple[float, np.ndarray, str]] = []
        for metric0, mat, label in wide:
            if any(_close(mat, o[1], mm=2.0, rot=0.03) for o in going_on):
                continue
            going_on.append((metric0, mat, label))
            if len(going_on) >= params.search_keep:
                break
        wide = []

        def phase2(cand: tuple[float, np.ndarray, str]) -> tuple[sitk.Euler3DTransform, float, str, int]:
            return _run(f_search, m_search, _euler_from_matrix(cand[1], centre), params=params,
                        samples=params.search_samples, seed=seed,
                        iterations=params.search_iterations - first_its, shrink=(1,), sigmas_mm=(0.0,),
                        fixed_mask=fs_mask, learning_rate=params.learning_rate * 2,
                        threads=params.small_image_threads)

        for (t, metric, stop, _), (_, _, label) in zip(pmap(phase2, going_on, params.small_image_threads), going_on):
            if not stop.startswith("failed"):
                wide.append((metric, _matrix_of(t), label))
        wide.sort(key=lambda c: c[0])
        say("global search", 0.4)
    candidates: list[tuple[float, np.ndarray, str]] = []
    kept: list[np.ndarray] = []
    coarse_starts: list[tuple[np.ndarray, str]] = []
    for metric0, mat, label in wide:
        if any(_close(mat, o) for o in kept):
            continue
        kept.append(mat)
        coarse_starts.append((mat, label))
        if len(kept) >= params.coarse_candidates:
            break

    def coarse_run(cand: tuple[np.ndarray, str]) -> tuple[sitk.Euler3DTransform, float, str, int]:
        return _run(f_coarse, m_coarse, _euler_from_matrix(cand[0], centre), params=params,
                    samples=params.coarse_samples, seed=seed, iterations=params.coarse_iterations,
                    shrink=(1,), sigmas_mm=(0.0,), fixed_mask=fc_mask,
                    learning_rate=params.learning_rate * 2, threads=params.small_image_threads)

    for (t, metric, stop, _), (_, label) in zip(pmap(coarse_run, coarse_starts, params.small_image_threads), coarse_starts):
        if not stop.startswith("failed"):
            candidates.append((metric, _matrix_of(t), label))
    say("global search", 0.5)
    if not candidates:
        raise RegistrationError(
            f"no start of the global search overlapped: series {moving.series_instance_uid} and "
            f"{fixed.series_instance_uid} do not seem to share anatomy")
    candidates.sort(key=lambda c: c[0])
    timings["global_search"] = time.perf_counter() - t1
    log.info("global search: best %.4f (%s), %d candidates", candidates[0][0], candidates[0][2], len(candidates))

    # ---- pyramid images, built once and shared by every refinement
    t_pyr = time.perf_counter()
    levels: list[tuple[sitk.Image, sitk.Image, sitk.Image]] = []
    for shrink, sigma in zip(params.pyramid_shrink, params.pyramid_sigma_mm):
        fl, ml = f_img, m_img
        if shrink > 1:  # shrink first, then smooth the small image for the remaining variance
            fl = sitk.BinShrink(fl, [shrink] * 3)
            ml = sitk.BinShrink(ml, [shrink] * 3)
        if sigma > 0:
            box_f = float(np.mean([(shrink * shrink - 1) / 12 * s * s for s in f_img.GetSpacing()]))
            box_m = float(np.mean([(shrink * shrink - 1) / 12 * s * s for s in m_img.GetSpacing()]))
            fl = sitk.SmoothingRecursiveGaussian(fl, math.sqrt(max(sigma * sigma - box_f, 0.01 * sigma * sigma)))
            ml = sitk.SmoothingRecursiveGaussian(ml, math.sqrt(max(sigma * sigma - box_m, 0.01 * sigma * sigma)))
        ml_mask = f_mask if shrink == 1 else sitk.Cast(sitk.BinShrink(f_mask, [shrink] * 3) > 0.5, sitk.sitkUInt8)
        levels.append((fl, ml, ml_mask))
    # the finest level samples the fixed image's edges: the voxels of largest gradient
    # magnitude carry the alignment information (flat regions only add noise to the MI
    # estimate); measured on the large CBCT pair, 3000 edge samples gave about half the TRE
    # of 20000 samples over the whole body, at a fraction of the cost
    edge_mask: sitk.Image | None = None
    edge_voxels = 0
    if params.edge_fraction > 0 and params.edge_samples > 0 and (params.edge_cross_modality or not cross_modality):
        edge_mask = _edge_mask(levels, params.pyramid_shrink, params.edge_fraction)
        edge_voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(edge_mask)))
        if edge_voxels < params.edge_samples:  # a nearly flat image: sample the body instead
            edge_mask = None

    # the numpy engine's view of the finest moving image, built once for all its runs
    moving_table = (MovingTable(levels[-1][1]) if cross_modality and edge_mask is None
                    and params.cross_modality_final_engine == "numpy" else None)
    timings["pyramid"] = time.perf_counter() - t_pyr

    # the finest level's fixed image and sampling mask, cropped to the moving field of view
    # once the first level has placed it (set below; the per-run set-up cost of ITK's
    # registration grows with the fixed image)
    finest_fixed: list[tuple[sitk.Image, sitk.Image, int | None]] = []

    def finest_crop(moving_to_fixed: np.ndarray) -> tuple[sitk.Image, sitk.Image, int | None]:
        fl, ml, mk = levels[-1]
        return _finest_fixed(fl, ml, mk if edge_mask is None else edge_mask, moving_to_fixed, params.finest_margin_mm,
                             counted=edge_mask is not None or cross_modality,
                             to_mask_box=edge_mask is None and params.finest_body_box)

    def refine(start_f2m: np.ndarray, run_seed: int, first: int = 0, stop_before: int | None = None
               ) -> tuple[float, np.ndarray, str, int]:
        t = _euler_from_matrix(start_f2m, centre)
        metric, stop, its = 0.0, "not run", 0
        last = len(levels) if stop_before is None else stop_before
        for n in range(first, last):
            fl, ml, mk = levels[n]
            finest = n == len(levels) - 1
            samples = params.final_samples if finest else params.metric_samples
            mask_voxels = None
            bins, relaxation, min_step = 0, 0.0, params.min_step if finest else params.coarse_min_step
            if finest:
                # the crop made once for the concurrent finest runs, else this run's own
                fl, mk, mask_voxels = finest_fixed[0] if finest_fixed else finest_crop(np.linalg.inv(_matrix_of(t)))
                if edge_mask is not None:
                    samples = params.edge_samples
                elif cross_modality:
                    samples = params.cross_modality_final_samples
                    bins, relaxation = params.cross_modality_final_bins, params.cross_modality_final_relaxation
                    min_step = params.cross_modality_final_min_step
            if finest and moving_table is not None:
                run = register_rigid_mattes(fl, mk, moving_table, _matrix_of(t), samples=samples, bins=bins, seed=run_seed,
                                            learning_rate=params.final_learning_rate, relaxation=relaxation,
                                            min_step=min_step, max_iterations=params.max_iterations)
                t, metric, stop, its = _euler_from_matrix(run.fixed_to_moving, centre), run.metric, \
                    run.stop_condition, run.iterations
                break
            t, metric, stop, its = _run(fl, ml, t, params=params, samples=samples, seed=run_seed,
                                        iterations=params.max_iterations, shrink=(1,), sigmas_mm=(0.0,),
                                        fixed_mask=mk, mask_voxels=mask_voxels,
                                        threads=params.refine_threads,
                                        virtual_shrink=params.finest_virtual_shrink if finest else 1,
                                        bins=bins, relaxation=relaxation, min_step=min_step,
                                        learning_rate=(params.learning_rate if n == 0 else
                                                       params.final_learning_rate if finest else params.fine_learning_rate))
            if stop.startswith("failed"):
                break
        return metric, _matrix_of(t), stop, its

    # ---- refinement of the best two distinct candidates
    t2 = time.perf_counter()
    refined: list[tuple[float, np.ndarray, str, int, str]] = []
    tried: list[np.ndarray] = []
    tried_labels: list[str] = []
    for metric0, mat, label in candidates:
        if any(_close(mat, o) for o in tried):
            continue
        tried.append(mat)
        tried_labels.append(label)
        if len(tried) >= params.refine_candidates:
            break
    # the distinct candidates compete at the first pyramid level; the winner goes on
    for (metric, f2m, stop, its), label in zip(pmap(lambda mat: refine(mat, seed, 0, 1), tried, params.refine_threads), tried_labels):
        refined.append((metric, f2m, stop, its, label))
    refined.sort(key=lambda c: c[0])
    best_metric, best_f2m, best_stop, best_its, best_label = refined[0]
    timings["refine"] = time.perf_counter() - t2
    say("refinement", 0.6)

    # ---- the finest levels, with the consistency restarts: the main run goes on from the
    # first level's solution, each restart from that solution turned and shifted (about the
    # overlap's centre, seeded); all of them run at once (each single-threaded and seeded,
    # so none depends on another or on the order they finish in)
    t3 = time.perf_counter()
    rng = np.random.default_rng(seed)
    consistency = 0.0
    alternative_mm = float("nan")
    restarts: list[np.ndarray] = []
    _, _, _, box0 = overlap_evidence(f_img, f_mask, m_img, m_mask, np.linalg.inv(best_f2m),
                                     step=params.overlap_grid_step)
    next_level = 1 if len(levels) > 1 else 0  # with one level the candidates ran the finest already
    if next_level:  # the finest fixed image cropped once, around the first level's solution, for every run
        finest_fixed.append(finest_crop(np.linalg.inv(best_f2m)))
    runs: list[tuple[np.ndarray, int]] = [(best_f2m, seed)] if next_level else []
    if box0 is not None:
        box_c = box0.mean(axis=0)
        for k in range(params.cross_modality_consistency_starts if cross_modality else params.consistency_starts):
            axis = rng.normal(size=3)
            axis /= np.linalg.norm(axis)
            ang = math.radians(params.consistency_perturbation_deg)
            K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
            R = np.eye(3) + math.sin(ang) * K + (1 - math.cos(ang)) * K @ K
            shift = rng.normal(size=3)
            shift = shift / np.linalg.norm(shift) * params.consistency_perturbation_mm
            pert = np.eye(4)
            pert[:3, :3] = R
            pert[:3, 3] = box_c - R @ box_c + shift  # rotate about the overlap centre, then shift
            runs.append((best_f2m @ pert, seed + 1 + k))
    numpy_finest = next_level == len(levels) - 1 and moving_table is not None
    if numpy_finest and params.parallel_runs > 1 and len(runs) > 1:
        # numpy runs would serialise on the GIL in threads: the restarts run in forked
        # children (pure numpy work there), the main run here, at the same time
        children = [ForkedCall(lambda st=st: refine(st[0], st[1], next_level)) for st in runs[1:]]
        try:
            main_run = refine(runs[0][0], runs[0][1], next_level)
        except BaseException:
            for child in children:
                child.cancel()
            raise
        finals = [main_run] + [c.result() for c in children]  # type: ignore[misc]
    else:
        # (all at once even beyond parallel_runs: three runs on two cores end sooner than two rounds)
        finals = pmap(lambda st: refine(st[0], st[1], next_level), runs, params.refine_threads,
                      width=len(runs) if params.parallel_runs > 1 else 1)
    if next_level:
        best_metric, best_f2m, best_stop, best_its = finals.pop(0)
    timings["finest"] = time.perf_counter() - t3
    say("finest level", 0.9)

    moving_to_fixed = np.linalg.inv(best_f2m)
    t_ov = time.perf_counter()
    frac_m, frac_f, body_agree, box = overlap_evidence(f_img, f_mask, m_img, m_mask, moving_to_fixed,
                                                       step=params.overlap_grid_step)
    timings["overlap"] = time.perf_counter() - t_ov
    if box is None or box0 is None:
        consistency = float("inf")
    else:
        if len(refined) > 1:
            alternative_mm = max_corner_displacement_mm(moving_to_fixed, np.linalg.inv(refined[1][1]), box)
        for _, f2m, _, _ in finals:
            other = np.linalg.inv(f2m)
            restarts.append(other)
            consistency = max(consistency, max_corner_displacement_mm(moving_to_fixed, other, box))
        if params.average_consistent_runs and restarts and consistency <= params.average_max_mm:
            moving_to_fixed = average_rigid([moving_to_fixed] + restarts, box)
    say("consistency", 1.0)

    converged = not best_stop.startswith("failed") and "Maximum number of iterations" not in best_stop
    metrics = {
        "final_metric": best_metric,
        "optimizer_iterations": float(best_its),
        "overlap_fraction": max(frac_m, frac_f),
        "moving_body_in_fixed_fraction": frac_m,
        "fixed_body_in_moving_fraction": frac_f,
        "body_agreement_fraction": body_agree,
        "consistency_mm": consistency,
        "second_start_displacement_mm": alternative_mm,
        "global_search_best_metric": candidates[0][0],
        "fixed_body_threshold": f_thr,
        "moving_body_threshold": m_thr,
    }
    timings["total"] = time.perf_counter() - t0
    log.info("registered %s -> %s: metric %.4f, overlap %.2f, consistency %.3f mm, %s (%.2f s)",
             moving.series_instance_uid, fixed.series_instance_uid, best_metric, metrics["overlap_fraction"],
             consistency, best_stop, timings["total"])
    return VolumeRegistration(
        matrix_moving_to_fixed=moving_to_fixed,
        final_metric=best_metric,
        stop_condition=best_stop,
        converged=converged,
        iterations=best_its,
        overlap_fraction=metrics["overlap_fraction"],
        consistency_mm=consistency,
        metrics=metrics,
        parameters=params,
        seed=seed,
        timings_s=timings,
        overlap_box_fixed=box,
    )


def parameters_dict(params: VolumeRegistrationParameters) -> dict:
    """The parameters as JSON-native values (tuples become lists)."""
    import json

    return json.loads(json.dumps(asdict(params)))


# ---- gate --------------------------------------------------------------------------

def evaluate_gate(reg: VolumeRegistration, gate: VolumeGateThresholds) -> tuple[Verdict, tuple[str, ...], tuple[QualityCheck, ...]]:
    """Decide accepted / rejected / needs_review from the measured evidence.

    Every check is returned as a :class:`QualityCheck`; a failed ``reject`` check rejects,
    otherwise a failed ``review`` check routes the fusion to review.
    """
    checks: list[QualityCheck] = []

    def check(name: str, value: float, threshold: float, comparison: str, severity: str, description: str) -> None:
        v = float(value)
        if math.isnan(v):
            passed = False
        elif comparison == "<=":
            passed = v <= threshold
        elif comparison == ">=":
            passed = v >= threshold
        elif comparison == "<":
            passed = v < threshold
        else:
            passed = v > threshold
        checks.append(QualityCheck(name, v if math.isfinite(v) else 1e9, float(threshold), comparison,  # type: ignore[arg-type]
                                   passed, severity, description))  # type: ignore[arg-type]

    check("final_metric", reg.final_metric, gate.max_final_metric, "<=", "reject",
          "Mattes mutual information at the solution (negated; lower is better)")
    check("overlap_fraction", reg.overlap_fraction, gate.min_overlap_fraction, ">=", "reject",
          "fraction of the smaller body's voxels inside the other volume's field of view")
    check("overlap_fraction_review", reg.overlap_fraction, gate.review_overlap_fraction, ">=", "review",
          "small overlap: the registration rests on little shared anatomy")
    check("body_agreement", reg.metrics.get("body_agreement_fraction", 0.0), gate.min_body_agreement, ">=", "reject",
          "fraction of the overlapping body voxels that land on the other volume's body")
    check("consistency_mm", reg.consistency_mm, gate.reject_consistency_mm, "<=", "reject",
          "largest disagreement (overlap-box corners) between restarts from perturbed poses")
    check("consistency_mm_review", reg.consistency_mm, gate.max_consistency_mm, "<=", "review",
          "restarts from perturbed poses disagree more than the review threshold")
    if gate.require_convergence:
        check("converged", 1.0 if reg.converged else 0.0, 1.0, ">=", "reject",
              f"optimizer stop condition: {reg.stop_condition}")
    failed_reject = [c for c in checks if not c.passed and c.severity == "reject"]
    failed_review = [c for c in checks if not c.passed and c.severity == "review"]
    reasons = tuple(
        f"{c.name}: {c.value:.4g} not {c.comparison} {c.threshold:.4g} ({c.description})"
        for c in failed_reject + failed_review
    )
    verdict: Verdict = "rejected" if failed_reject else "needs_review" if failed_review else "accepted"
    if verdict == "accepted":
        reasons = ("every quality check passed",)
    return verdict, reasons, tuple(checks)
