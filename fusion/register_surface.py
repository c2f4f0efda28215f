"""Rigid registration of an intraoral scan to a CBCT's teeth surface.

The scan's frame is arbitrary (any rotation, large translations), about half of a scan
is gingiva with no CBCT counterpart, and the CBCT surface holds both arches. The method
(numpy/scipy only; see DESIGN.md "Scan to CBCT"):

1. **Global alignment**: both surfaces are voxel-downsampled (~1.5 mm) and described by
   FPFH features (fast point feature histograms, oriented normals; the scan's orientation
   is found by a convexity vote and the other one is tried when nothing fits).
   Correspondences are feature-space nearest neighbours, typically only a few percent of
   them right. Instead of RANSAC's random triples, a *second-order spatial compatibility*
   score (SC^2: pairs of correspondences that preserve distances and normal angles, counted
   through common partners) singles out the consistent ones; each top seed's consensus set
   is solved by Kabsch (rotation det +1: never scaling or reflection).
2. **Multi-hypothesis**: candidate poses are scored quickly, then refined (trimmed ICP at
   2 -> 0.8 mm) until ``max_hypotheses`` *distinct* poses are known, each scored by
   *inlier fraction* (scan points within ``inlier_distance_mm`` of the CBCT surface with
   agreeing normals). The margin between the best and the second-best distinct pose tells
   an unambiguous fit from an ambiguous one.
3. **Refinement**: trimmed, Tukey-weighted point-to-plane ICP at 0.8 -> 0.4 mm cut-offs
   with a normal-agreement test, so gingiva, holes, roots and bone do not pull; CBCT
   surface near metal is ignored in these fine stages.

:func:`register_surface` returns a :class:`SurfaceRegistration` with the matrix (scan
frame -> CBCT frame) and the figures the quality gate (:func:`evaluate_gate`) needs.
Why not open3d: its FPFH + RANSAC did this in 1.6 s on the phantoms (DESIGN.md); this
numpy/scipy version takes about 1 s of CPU on a 160k-face scan against a 0.25 mm CBCT
(bench/surface.py) without a heavy dependency and its system libraries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from fusion.cbct_surface import CbctSurface
from fusion.errors import RegistrationError
from fusion.gates import SurfaceGateThresholds
from fusion.records import QualityCheck

log = logging.getLogger(__name__)

METHOD = "surface-rigid-fpfh-ransac-icp"


# ---------------------------------------------------------------------------------------
# point-set helpers


def voxel_downsample(points: np.ndarray, normals: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Average points and normals per cubic cell of ``voxel_mm`` (normals renormalised)."""
    keys = np.floor(points / voxel_mm).astype(np.int64)
    keys -= keys.min(axis=0)
    dims = keys.max(axis=0) + 1
    flat = (keys[:, 0] * dims[1] + keys[:, 1]) * dims[2] + keys[:, 2]
    uniq, inv, counts = np.unique(flat, return_inverse=True, return_counts=True)
    p = np.zeros((uniq.size, 3))
    n = np.zeros((uniq.size, 3))
    for d in range(3):
        p[:, d] = np.bincount(inv, weights=points[:, d], minlength=uniq.size)
        n[:, d] = np.bincount(inv, weights=normals[:, d], minlength=uniq.size)
    p /= counts[:, None]
    nn = np.linalg.norm(n, axis=1)
    ok = nn > 1e-6
    return p[ok], n[ok] / nn[ok, None]


def mesh_vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals following the face winding (unit length; zeros if isolated)."""
    tri = vertices[faces]
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # length = 2 * area
    vn = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(vn, faces[:, k], fn)
    ln = np.linalg.norm(vn, axis=1, keepdims=True)
    return np.where(ln > 0, vn / np.maximum(ln, 1e-300), 0.0)


def area_weighted_samples(vertices: np.ndarray, faces: np.ndarray, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Scan points for registration: face centroids (area-uniform support) voxel-averaged."""
    tri = vertices[faces]
    cent = tri.mean(axis=1)
    fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    ln = np.linalg.norm(fn, axis=1, keepdims=True)
    ok = ln[:, 0] > 0
    fn = fn[ok] / ln[ok]
    return voxel_downsample(cent[ok], fn, voxel_mm)


def convexity_sign(points: np.ndarray, normals: np.ndarray, radius_mm: float = 2.5) -> float:
    """+1 when normals point out of the (mostly convex) crowns, -1 when they point in.

    Crowns are bumps: seen along an outward normal, neighbours lie behind the tangent plane.
    """
    tree = cKDTree(points)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(points), size=min(len(points), 600), replace=False)
    nb = tree.query_ball_point(points[idx], radius_mm, return_sorted=False)
    votes = []
    for i, lst in zip(idx, nb):
        if len(lst) < 5:
            continue
        votes.append(float(np.mean((points[lst] - points[i]) @ normals[i])))
    if not votes:
        return 1.0
    return -1.0 if np.median(votes) > 0 else 1.0


# ---------------------------------------------------------------------------------------
# FPFH


def fpfh(points: np.ndarray, normals: np.ndarray, radius_mm: float, bins: int = 11) -> np.ndarray:
    """Fast Point Feature Histograms (Rusu et al. 2009), vectorised; (N, 3*bins) float32."""
    n = len(points)
    tree = cKDTree(points)
    pairs = tree.query_pairs(radius_mm, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros((n, 3 * bins), np.float32)
    i, j = pairs[:, 0], pairs[:, 1]
    d = points[j] - points[i]
    dist = np.linalg.norm(d, axis=1)
    ok = dist > 1e-9
    i, j, d, dist = i[ok], j[ok], d[ok], dist[ok]
    dn = d / dist[:, None]
    ni, nj = normals[i], normals[j]
    # source = the point whose normal makes the smaller angle with the connecting line
    swap = np.einsum("ij,ij->i", ni, dn) < np.einsum("ij,ij->i", nj, -dn)
    u = np.where(swap[:, None], nj, ni)
    nt = np.where(swap[:, None], ni, nj)
    dn = np.where(swap[:, None], -dn, dn)
    v = np.cross(u, dn)
    vl = np.linalg.norm(v, axis=1)
    good = vl > 1e-9
    v = v / np.maximum(vl, 1e-12)[:, None]
    w = np.cross(u, v)
    alpha = np.einsum("ij,ij->i", v, nt)
    phi = np.einsum("ij,ij->i", u, dn)
    theta = np.arctan2(np.einsum("ij,ij->i", w, nt), np.einsum("ij,ij->i", u, nt))
    ba = np.clip(((alpha + 1) * 0.5 * bins).astype(int), 0, bins - 1)
    bp = np.clip(((phi + 1) * 0.5 * bins).astype(int), 0, bins - 1)
    bt = np.clip(((theta + np.pi) / (2 * np.pi) * bins).astype(int), 0, bins - 1)
    i, j, ba, bp, bt, dist = i[good], j[good], ba[good], bp[good], bt[good], dist[good]
    spfh = np.zeros((n, 3 * bins))
    for b, off in ((ba, 0), (bp, bins), (bt, 2 * bins)):
        np.add.at(spfh, (i, b + off), 1.0)
        np.add.at(spfh, (j, b + off), 1.0)
    cnt = np.bincount(np.concatenate([i, j]), minlength=n).astype(float)
    spfh /= np.maximum(cnt, 1)[:, None]
    # FPFH = SPFH(p) + 1/k sum_k SPFH(p_k) / w_k
    wgt = 1.0 / dist
    acc = np.zeros_like(spfh)
    np.add.at(acc, i, spfh[j] * wgt[:, None])
    np.add.at(acc, j, spfh[i] * wgt[:, None])
    feat = spfh + acc / np.maximum(cnt, 1)[:, None]
    # normalise each sub-histogram to 100 (PCL convention)
    for k in range(3):
        s = feat[:, k * bins : (k + 1) * bins].sum(axis=1, keepdims=True)
        feat[:, k * bins : (k + 1) * bins] *= 100.0 / np.maximum(s, 1e-12)
    return feat.astype(np.float32)


# ---------------------------------------------------------------------------------------
# rigid solvers


def kabsch(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares rotation + translation (det +1, no scale) mapping src onto dst; 4x4."""
    if weights is None:
        weights = np.ones(len(src))
    wsum = weights.sum()
    cs = (src * weights[:, None]).sum(0) / wsum
    cd = (dst * weights[:, None]).sum(0) / wsum
    h = ((src - cs) * weights[:, None]).T @ (dst - cd)
    u, _, vt = np.linalg.svd(h)
    dfix = np.sign(np.linalg.det(vt.T @ u.T))
    r = vt.T @ np.diag([1.0, 1.0, dfix]) @ u.T
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = cd - r @ cs
    return m


def _batched_kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """src, dst: (K, P, 3). Returns (K, 4, 4) proper rigid transforms."""
    cs = src.mean(axis=1, keepdims=True)
    cd = dst.mean(axis=1, keepdims=True)
    h = np.einsum("kpi,kpj->kij", src - cs, dst - cd)
    u, _, vt = np.linalg.svd(h)
    v = np.transpose(vt, (0, 2, 1))
    ut = np.transpose(u, (0, 2, 1))
    det = np.linalg.det(v @ ut)
    dmat = np.tile(np.eye(3), (len(src), 1, 1))
    dmat[:, 2, 2] = np.sign(det)
    r = v @ dmat @ ut
    m = np.tile(np.eye(4), (len(src), 1, 1))
    m[:, :3, :3] = r
    m[:, :3, 3] = cd[:, 0] - np.einsum("kij,kj->ki", r, cs[:, 0])
    return m


def _small_rotation(a: float, b: float, c: float) -> np.ndarray:
    ca, sa, cb, sb, cc, sc = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    rx = np.array([[1, 0, 0], [0, ca, -sa], [0, sa, ca]])
    ry = np.array([[cb, 0, sb], [0, 1, 0], [-sb, 0, cb]])
    rz = np.array([[cc, -sc, 0], [sc, cc, 0], [0, 0, 1]])
    return rz @ ry @ rx


def orthonormalize(m: np.ndarray) -> np.ndarray:
    """Nearest proper rotation for the 3x3 block (keeps translation)."""
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    out = np.eye(4)
    out[:3, :3] = r
    out[:3, 3] = m[:3, 3]
    return out


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:3, :3].T + m[:3, 3]


# ---------------------------------------------------------------------------------------
# target


@dataclass(frozen=True, eq=False)
class SurfaceLevel:
    """Points with outward normals and their KD-tree."""

    points: np.ndarray
    normals: np.ndarray
    tree: cKDTree

    @classmethod
    def from_points(cls, points: np.ndarray, normals: np.ndarray) -> "SurfaceLevel":
        return cls(points, normals, cKDTree(points))


@dataclass(frozen=True, eq=False)
class SurfaceTarget:
    """A CBCT teeth surface prepared for registration (trees and features built once).

    ``full``: every surface vertex; ``fine``: vertices away from metal (final stages);
    ``mid``: ~0.6 mm resampling for fast hypothesis refinement; ``coarse_*``: ~1.5 mm
    resampling with FPFH features for global alignment.
    """

    surface: CbctSurface
    full: SurfaceLevel
    fine: SurfaceLevel
    mid: SurfaceLevel
    coarse_points: np.ndarray
    coarse_normals: np.ndarray
    coarse_features: np.ndarray
    coarse_voxel_mm: float
    feature_radius_mm: float


def prepare_target(surface: CbctSurface, *, coarse_voxel_mm: float = 1.5, feature_radius_mm: float = 3.5,
                   mid_voxel_mm: float = 0.6) -> SurfaceTarget:
    """Build KD-trees and FPFH features of a CBCT teeth surface (reusable across scans)."""
    pts = np.asarray(surface.vertices, dtype=np.float64)
    nrm = np.asarray(surface.normals, dtype=np.float64)
    if len(pts) < 50:
        raise RegistrationError(f"CBCT teeth surface has only {len(pts)} vertices; nothing to register to")
    usable = ~np.asarray(surface.near_metal, dtype=bool)
    full = SurfaceLevel.from_points(pts, nrm)
    fine = SurfaceLevel.from_points(pts[usable], nrm[usable]) if 50 <= usable.sum() < len(pts) else full
    mp, mn = voxel_downsample(pts, nrm, mid_voxel_mm)
    cp, cn = voxel_downsample(pts, nrm, coarse_voxel_mm)
    feat = fpfh(cp, cn, feature_radius_mm)
    return SurfaceTarget(
        surface=surface,
        full=full,
        fine=fine,
        mid=SurfaceLevel.from_points(mp, mn),
        coarse_points=cp,
        coarse_normals=cn,
        coarse_features=feat,
        coarse_voxel_mm=coarse_voxel_mm,
        feature_radius_mm=feature_radius_mm,
    )


# ---------------------------------------------------------------------------------------
# scoring and ICP


@dataclass(frozen=True)
class InlierStats:
    fraction: float
    rms_mm: float
    n_inliers: int
    n_points: int


def inlier_stats(
    level: SurfaceLevel,
    pts: np.ndarray,
    nrm: np.ndarray,
    m: np.ndarray,
    inlier_distance_mm: float,
    *,
    spacing_mm: float = 0.5,
    min_normal_dot: float = 0.7,
) -> InlierStats:
    """Scan points (mapped by ``m``) within ``inlier_distance_mm`` of the CBCT surface with
    agreeing normals; distance measured to the nearest surface point's tangent plane (that
    point itself within ``2 * inlier_distance_mm + spacing_mm``)."""
    p = apply(m, pts)
    n = nrm @ m[:3, :3].T
    bound = 2.0 * inlier_distance_mm + spacing_mm
    d, k = level.tree.query(p, distance_upper_bound=bound, workers=-1 if len(p) > 8000 else 1)
    hit = np.isfinite(d)
    kk = k[hit]
    q = level.points[kk]
    qn = level.normals[kk]
    plane = np.abs(np.einsum("ij,ij->i", p[hit] - q, qn))
    agree = np.einsum("ij,ij->i", n[hit], qn) >= min_normal_dot
    ok = agree & (plane <= inlier_distance_mm)
    n_in = int(ok.sum())
    rms = float(np.sqrt(np.mean(plane[ok] ** 2))) if n_in else float("inf")
    return InlierStats(n_in / max(len(pts), 1), rms, n_in, len(pts))


def icp_point_to_plane(
    levels: tuple[SurfaceLevel, ...],
    pts: np.ndarray,
    nrm: np.ndarray,
    init: np.ndarray,
    *,
    max_distances_mm: tuple[float, ...] = (2.0, 0.8, 0.4),
    max_iterations: int = 30,
    tolerance_mm: float = 1e-4,
    min_normal_dot: float = 0.5,
) -> tuple[np.ndarray, int]:
    """Trimmed point-to-plane ICP, one stage per cut-off (``levels[i]`` is the target of
    stage ``i``). Correspondences farther than the stage's cut-off or with disagreeing
    normals are dropped, and the rest are Tukey-weighted, so gingiva, holes, roots and
    bone do not pull. Returns (4x4 scan -> target, iterations)."""
    m = init.copy()
    total = 0
    extent = float(np.max(np.ptp(pts, axis=0))) if len(pts) else 1.0
    for level, cut in zip(levels, max_distances_mm):
        for _ in range(max_iterations):
            total += 1
            p = apply(m, pts)
            n = nrm @ m[:3, :3].T
            d, k = level.tree.query(p, distance_upper_bound=cut, workers=-1 if len(p) > 8000 else 1)
            hit = np.isfinite(d)
            if hit.sum() < 12:
                break
            kk = k[hit]
            q = level.points[kk]
            qn = level.normals[kk]
            ph = p[hit]
            agree = np.einsum("ij,ij->i", n[hit], qn) >= min_normal_dot
            if agree.sum() < 12:
                break
            ph, q, qn = ph[agree], q[agree], qn[agree]
            r = np.einsum("ij,ij->i", ph - q, qn)
            s = cut * 0.5
            w = np.clip(1.0 - (r / (2 * s)) ** 2, 0.0, 1.0) ** 2
            a = np.hstack([np.cross(ph, qn), qn])
            aw = a * w[:, None]
            hmat = a.T @ aw + 1e-9 * np.eye(6)
            g = -aw.T @ r
            try:
                x = np.linalg.solve(hmat, g)
            except np.linalg.LinAlgError:
                break
            step = np.eye(4)
            step[:3, :3] = _small_rotation(*x[:3])
            step[:3, 3] = x[3:]
            m = orthonormalize(step @ m)
            # largest displacement of a scan point by this step (rotation about the origin
            # is compensated by the translation; bound it by the extent)
            if np.linalg.norm(x[3:]) + np.linalg.norm(x[:3]) * extent < tolerance_mm:
                break
    return m, total


# ---------------------------------------------------------------------------------------
# global alignment


def _correspondences(src_feat: np.ndarray, target: SurfaceTarget, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    # brute force in feature space (a KD-tree degenerates in 33 dimensions)
    a = src_feat.astype(np.float32)
    b = target.coarse_features.astype(np.float32)
    bb = np.einsum("ij,ij->i", b, b)
    tk = np.empty((len(a), k), dtype=np.int64)
    for c0 in range(0, len(a), 1024):
        d2 = bb[None, :] - 2.0 * (a[c0 : c0 + 1024] @ b.T)
        if k == 1:
            tk[c0 : c0 + 1024, 0] = np.argmin(d2, axis=1)
        else:
            tk[c0 : c0 + 1024] = np.argpartition(d2, k, axis=1)[:, :k]
    si = np.repeat(np.arange(len(src_feat)), tk.shape[1])
    return si, tk.ravel()


def consensus_hypotheses(
    src_pts: np.ndarray,
    src_nrm: np.ndarray,
    src_feat: np.ndarray,
    target: SurfaceTarget,
    rng: np.random.Generator,
    *,
    max_correspondences: int = 1500,
    length_tolerance_mm: float = 0.5,
    normal_tolerance: float = 0.25,
    n_seeds: int = 60,
    consensus_size: int = 24,
    inlier_mm: float = 2.0,
) -> list[tuple[np.ndarray, int]]:
    """Global pose hypotheses from FPFH correspondences.

    Correspondences (feature-space nearest neighbours) are filtered by *spatial
    compatibility*: two correct correspondences preserve the distance between their points
    (within ``length_tolerance_mm``) and the angle between their normals (cosines within
    ``normal_tolerance``). The second-order compatibility score (SC^2: number of
    correspondences compatible with both) is high only inside the set of correct ones, even
    when they are a few percent of all. Each of the ``n_seeds`` best-scoring seeds gives a
    consensus set (its most compatible partners) solved by Kabsch (rotation det +1, no
    scaling). Returns (4x4, number of correspondences agreeing within ``inlier_mm``),
    best first.
    """
    si, ti = _correspondences(src_feat, target)
    if len(si) > max_correspondences:
        pick = np.sort(rng.choice(len(si), size=max_correspondences, replace=False))
        si, ti = si[pick], ti[pick]
    if len(si) < 3:
        return []
    from scipy.spatial.distance import cdist

    s = src_pts[si].astype(np.float32)
    t = target.coarse_points[ti].astype(np.float32)
    ns = src_nrm[si].astype(np.float32)
    nt = target.coarse_normals[ti].astype(np.float32)
    from scipy import sparse

    ds = cdist(s, s).astype(np.float32)
    dt = cdist(t, t).astype(np.float32)
    comp = np.abs(ds - dt) < length_tolerance_mm
    del dt
    comp &= ds > 1.0
    del ds
    comp &= np.abs(ns @ ns.T - nt @ nt.T) < normal_tolerance
    c = sparse.csr_matrix(comp, dtype=np.float32)
    del comp
    sc2 = c.multiply(c @ c).tocsr()  # second-order compatibility (sparse: compatibility is rare)
    score = np.asarray(sc2.sum(axis=1)).ravel()
    order = np.argsort(-score)
    hyps: list[np.ndarray] = []
    seeds_used = 0
    for i in order:
        if score[i] <= 0 or seeds_used >= n_seeds:
            break
        seeds_used += 1
        row = sc2.getrow(i)
        cols, vals = row.indices, row.data
        partners = cols[np.argsort(-vals)[:consensus_size]]
        if partners.size < 2:
            continue
        members = np.concatenate([[i], partners])
        if np.linalg.matrix_rank(s[members] - s[members].mean(0), tol=0.5) < 2:
            continue
        hyps.append(kabsch(s[members].astype(np.float64), t[members].astype(np.float64)))
    if not hyps:
        return []
    ms = np.stack(hyps)
    pp = np.einsum("kij,pj->kpi", ms[:, :3, :3], s.astype(np.float64)) + ms[:, None, :3, 3]
    counts = (np.linalg.norm(pp - t[None], axis=2) < inlier_mm).sum(axis=1)
    best = np.argsort(-counts, kind="stable")
    return [(ms[b], int(counts[b])) for b in best]


def transform_distance_mm(a: np.ndarray, b: np.ndarray, pts: np.ndarray) -> float:
    """RMS displacement between two transforms over ``pts``."""
    return float(np.sqrt(np.mean(np.sum((apply(a, pts) - apply(b, pts)) ** 2, axis=1))))


# ---------------------------------------------------------------------------------------
# the registration


@dataclass(frozen=True)
class Hypothesis:
    matrix: np.ndarray
    inlier_fraction: float
    inlier_rms_mm: float
    ransac_votes: int


@dataclass(frozen=True, eq=False)
class SurfaceRegistration:
    """Result of :func:`register_surface`: ``matrix`` maps scan coordinates to the CBCT frame."""

    matrix: np.ndarray
    inlier_fraction: float
    inlier_rms_mm: float
    n_inliers: int
    n_points: int
    second_inlier_fraction: float
    hypothesis_margin: float
    n_hypotheses: int
    normal_sign: float
    iterations: int
    timings_s: dict[str, float] = field(default_factory=dict)
    parameters: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "inlier_fraction": self.inlier_fraction,
            "inlier_rms_mm": self.inlier_rms_mm,
            "n_inliers": float(self.n_inliers),
            "n_points": float(self.n_points),
            "second_best_inlier_fraction": self.second_inlier_fraction,
            "hypothesis_margin": self.hypothesis_margin,
            "n_hypotheses": float(self.n_hypotheses),
            "icp_iterations": float(self.iterations),
        }


def register_surface(
    scan_vertices: np.ndarray,
    scan_faces: np.ndarray,
    target: SurfaceTarget,
    *,
    gate: SurfaceGateThresholds = SurfaceGateThresholds(),
    seed: int = 0,
    progress: Callable[[str, float], None] | None = None,
) -> SurfaceRegistration:
    """Register a scan (vertices in its own frame, faces) to a prepared CBCT surface.

    Returns
    -------
    SurfaceRegistration
        ``matrix`` maps scan coordinates to the CBCT frame (LPS mm); the figures for the gate.

    Raises
    ------
    RegistrationError
        When registration cannot run at all (too few points, no hypothesis).
    """
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rng = np.random.default_rng(seed)
    v = np.asarray(scan_vertices, dtype=np.float64)
    f = np.asarray(scan_faces, dtype=np.int64)
    cv = target.coarse_voxel_mm
    # scan samples: coarse (features/RANSAC), medium (scoring, coarse ICP), fine (final ICP)
    fine_p, fine_n = area_weighted_samples(v, f, gate.fine_sample_mm)
    coarse_p, coarse_n = voxel_downsample(fine_p, fine_n, cv)
    timings["n_coarse"] = float(len(coarse_p))
    timings["n_fine"] = float(len(fine_p))
    if len(coarse_p) < 30:
        raise RegistrationError(f"scan has only {len(coarse_p)} samples at {cv} mm; too small to register")
    med_p, med_n = voxel_downsample(fine_p, fine_n, max(gate.fine_sample_mm, 0.6))
    if len(med_p) > 5000:  # hypothesis scoring: a fixed-size random subset is precise enough (+-0.01)
        pick = np.sort(np.random.default_rng(seed).choice(len(med_p), size=5000, replace=False))
        med_p, med_n = med_p[pick], med_n[pick]
    timings["n_medium"] = float(len(med_p))
    sign = convexity_sign(coarse_p, coarse_n)
    probe = coarse_p[np.random.default_rng(seed).choice(len(coarse_p), size=min(256, len(coarse_p)), replace=False)]
    timings["sample"] = time.perf_counter() - t0
    if progress:
        progress("features", 0.1)

    def attempt(sgn: float) -> tuple[list[Hypothesis], int]:
        cn = coarse_n * sgn
        t1 = time.perf_counter()
        feat = fpfh(coarse_p, cn, target.feature_radius_mm)
        timings["features"] = timings.get("features", 0.0) + time.perf_counter() - t1
        t1 = time.perf_counter()
        raw = consensus_hypotheses(coarse_p, cn, feat, target, rng)
        timings["global"] = timings.get("global", 0.0) + time.perf_counter() - t1
        t1 = time.perf_counter()
        # distinct candidates by their ransac vote, scored quickly by inlier fraction
        cands: list[tuple[np.ndarray, int]] = []
        for m, votes in raw:
            if all(transform_distance_mm(m, c, probe) > 2.0 for c, _ in cands):
                cands.append((m, votes))
            if len(cands) >= gate.max_hypotheses * 4:
                break
        quick = []
        for m, votes in cands:
            st = inlier_stats(target.mid, coarse_p, cn, m, 1.0, spacing_mm=0.6)
            quick.append((st.fraction, m, votes))
        quick.sort(key=lambda x: -x[0])
        hyps: list[Hypothesis] = []
        iters = 0
        # refine candidates until max_hypotheses *distinct* poses are known (candidates that
        # converge onto an already refined pose are duplicates, not competitors)
        refined = 0
        for qf, m, votes in quick:
            if qf < 0.3 * quick[0][0] or len(hyps) >= gate.max_hypotheses or refined >= 3 * gate.max_hypotheses:
                break
            if any(transform_distance_mm(m, h.matrix, probe) <= gate.distinct_hypothesis_mm for h in hyps):
                continue
            mr, it = icp_point_to_plane((target.mid, target.mid), coarse_p, cn, m, max_distances_mm=(2.0, 0.8),
                                        max_iterations=10, tolerance_mm=5e-3)
            iters += it
            refined += 1
            if any(transform_distance_mm(mr, h.matrix, probe) <= gate.distinct_hypothesis_mm for h in hyps):
                continue
            st = inlier_stats(target.mid, med_p, med_n * sgn, mr, gate.inlier_distance_mm, spacing_mm=0.6)
            hyps.append(Hypothesis(mr, st.fraction, st.rms_mm, votes))
        timings["hypotheses"] = timings.get("hypotheses", 0.0) + time.perf_counter() - t1
        hyps.sort(key=lambda h: -h.inlier_fraction)
        return hyps, iters

    hyps, iters = attempt(sign)
    if not hyps or hyps[0].inlier_fraction < gate.review_inlier_fraction:
        # the scan's winding may be inverted: try the other orientation too
        hyps2, it2 = attempt(-sign)
        iters += it2
        if hyps2 and (not hyps or hyps2[0].inlier_fraction > hyps[0].inlier_fraction):
            hyps, sign = hyps2, -sign
    if not hyps:
        # registration ran and found nothing: report it as a failed (rejected) fit, not a crash
        timings["total"] = time.perf_counter() - t0
        log.info("surface registration: no consistent global hypothesis (scan and CBCT share no shape)")
        return SurfaceRegistration(
            matrix=np.eye(4), inlier_fraction=0.0, inlier_rms_mm=gate.inlier_distance_mm, n_inliers=0, n_points=len(fine_p),
            second_inlier_fraction=0.0, hypothesis_margin=0.0, n_hypotheses=0, normal_sign=sign, iterations=iters,
            timings_s=timings, parameters={"coarse_voxel_mm": cv, "feature_radius_mm": target.feature_radius_mm},
        )
    best = hyps[0]
    second = 0.0
    for h in hyps[1:]:
        if transform_distance_mm(h.matrix, best.matrix, probe) > gate.distinct_hypothesis_mm:
            second = h.inlier_fraction
            break
    if progress:
        progress("refine", 0.7)
    t1 = time.perf_counter()
    m, it = icp_point_to_plane((target.fine, target.fine), fine_p, fine_n * sign, best.matrix, max_distances_mm=(0.8, 0.4),
                               tolerance_mm=5e-4)
    iters += it
    st = inlier_stats(target.full, fine_p, fine_n * sign, m, gate.inlier_distance_mm,
                      spacing_mm=max(target.surface.spacing_mm, 0.3))
    timings["refine"] = time.perf_counter() - t1
    # the margin compares like with like (same samples, same refinement depth)
    margin = best.inlier_fraction - second
    timings["total"] = time.perf_counter() - t0
    if st.n_inliers == 0:
        # no inliers: the RMS is undefined; report the cut-off (the worst an inlier can be)
        st = InlierStats(0.0, gate.inlier_distance_mm, 0, st.n_points)
    log.info(
        "surface registration: inlier fraction %.3f (rms %.3f mm), second %.3f, %d hypotheses, %.2f s",
        st.fraction, st.rms_mm, second, len(hyps), timings["total"],
    )
    return SurfaceRegistration(
        matrix=m,
        inlier_fraction=st.fraction,
        inlier_rms_mm=st.rms_mm,
        n_inliers=st.n_inliers,
        n_points=st.n_points,
        second_inlier_fraction=second,
        hypothesis_margin=margin,
        n_hypotheses=len(hyps),
        normal_sign=sign,
        iterations=iters,
        timings_s=timings,
        parameters={
            "coarse_voxel_mm": cv,
            "feature_radius_mm": target.feature_radius_mm,
            "fine_sample_mm": gate.fine_sample_mm,
            "icp_schedule_mm": "2.0,0.8,0.4",
            "inlier_distance_mm": gate.inlier_distance_mm,
            "normal_sign": sign,
        },
    )


def evaluate_gate(reg: SurfaceRegistration, gate: SurfaceGateThresholds) -> tuple[str, tuple[str, ...], tuple[QualityCheck, ...]]:
    """Apply the quality gate. Returns (verdict, reasons, checks)."""
    checks = (
        QualityCheck("inlier_fraction", reg.inlier_fraction, gate.min_inlier_fraction, ">=",
                     reg.inlier_fraction >= gate.min_inlier_fraction, "reject",
                     f"share of scan points within {gate.inlier_distance_mm} mm of the CBCT crown surface with agreeing normals"),
        QualityCheck("inlier_rms_mm", reg.inlier_rms_mm, gate.max_inlier_rms_mm, "<=",
                     reg.n_inliers > 0 and reg.inlier_rms_mm <= gate.max_inlier_rms_mm, "reject",
                     "RMS distance of the inlier scan points to the CBCT crown surface "
                     "(the inlier cut-off when there is no inlier)"),
        QualityCheck("inlier_fraction_review", reg.inlier_fraction, gate.review_inlier_fraction, ">=",
                     reg.inlier_fraction >= gate.review_inlier_fraction, "review",
                     "a low but not rejectable share of matching scan points"),
        QualityCheck("hypothesis_margin", reg.hypothesis_margin, gate.min_hypothesis_margin, ">=",
                     reg.hypothesis_margin >= gate.min_hypothesis_margin, "review",
                     "best minus second-best distinct pose's inlier fraction (ambiguous fit when small)"),
    )
    rejects = [c for c in checks if not c.passed and c.severity == "reject"]
    reviews = [c for c in checks if not c.passed and c.severity == "review"]
    if rejects:
        verdict = "rejected"
    elif reviews:
        verdict = "needs_review"
    else:
        verdict = "accepted"
    reasons = tuple(
        f"{c.name} {c.value:.4g} fails {c.comparison} {c.threshold:g} ({c.severity})" for c in rejects + reviews
    )
    return verdict, reasons, checks
