"""The teeth surface of a CBCT, as the target of scan-to-CBCT registration.

An intraoral scan sees crowns (enamel against air) and gingiva. In the CBCT the crown
surface is where enamel meets air. Two measured facts shape this module (see DESIGN.md):

* a marching-cubes surface *at the enamel grey level* sits ~0.6 mm inside the crowns;
  the right iso-level is half-way between air and enamel, where the partial-volume
  step crosses the true boundary;
* grey values are not calibrated (no HU), and a metal restoration adds streaks and a
  blooming, over-bright crown, so every level is estimated from the volume itself and
  metal is detected and flagged (the fine registration stage ignores surface near metal).

Steps of :func:`extract_teeth_surface`: estimate air / enamel / metal levels from the
histogram (:func:`estimate_grey_levels`); seed on enamel; keep the part of the
``value >= (air + enamel) / 2`` region connected to enamel seeds; marching cubes at that
level inside a few millimetres of enamel only (roots, bone and skin are excluded); vertex
normals oriented from enamel towards air.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fusion.errors import InputError

log = logging.getLogger(__name__)


class NoTeethFoundError(InputError):
    """The volume shows no enamel-like structure to register a scan to."""


@dataclass(frozen=True)
class GreyLevels:
    """Grey levels estimated from one volume (in its own, uncalibrated units)."""

    air: float
    enamel: float
    iso: float  # half-way between air and enamel: the crown surface
    seed: float  # voxels above this are enamel seeds
    metal: float  # voxels above this are metal
    metal_voxels: int = 0


@dataclass(frozen=True, eq=False)
class CbctSurface:
    """Teeth surface of a CBCT in its frame (LPS mm).

    ``normals`` are unit vectors pointing from enamel towards air (outward).
    ``near_metal`` flags vertices within ``metal_margin_mm`` of a metal voxel.
    """

    vertices: np.ndarray  # (N, 3) LPS mm
    faces: np.ndarray  # (M, 3)
    normals: np.ndarray  # (N, 3)
    near_metal: np.ndarray  # (N,) bool
    levels: GreyLevels
    frame_of_reference_uid: str = ""
    spacing_mm: float = 0.0

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])


def _smooth_hist(values: np.ndarray, lo: float, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    h, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    hs = ndimage.gaussian_filter1d(h.astype(float), 2.0)
    return hs, centres


def estimate_grey_levels(
    voxels: np.ndarray, *, max_samples: int = 2_000_000, seed: int = 0, min_peak_share: float = 0.01
) -> GreyLevels:
    """Estimate air, enamel and metal grey levels from a volume's own histogram.

    * air: the median of the darkest 1% of voxels;
    * enamel: the brightest histogram peak that holds a real share (``min_peak_share``,
      1%) of the bright voxels (those above the second Otsu split), ignoring small,
      spread-out bright populations (a metal crown, streaks);
    * metal: above ``enamel + 0.6 * (enamel - air)``.

    Raises
    ------
    NoTeethFoundError
        When no bright population distinct from air exists.
    """
    from skimage.filters import threshold_otsu

    flat = np.asarray(voxels).reshape(-1)
    if flat.size > max_samples:
        # a regular stride with a seeded offset: cheap (a view) and unbiased for a histogram
        step = flat.size // max_samples
        flat = flat[int(np.random.default_rng(seed).integers(step)) :: step]
    flat = flat.astype(np.float64)
    p = np.percentile(flat, [1.0, 99.99])
    air = float(np.median(flat[flat <= p[0]]))
    otsu = float(threshold_otsu(flat))
    bright = flat[flat > otsu]
    if bright.size < 100 or p[1] <= air:
        raise NoTeethFoundError("no bright (tooth/bone) voxels in the volume")
    # second split inside the bright voxels: bone/dentin vs enamel/metal
    otsu2 = float(threshold_otsu(bright))
    upper = bright[bright > otsu2]
    hi = float(np.percentile(upper, 99.9))
    hs, centres = _smooth_hist(upper, otsu2, hi, 128)
    total = hs.sum()
    # candidate peaks: local maxima with a real share of the mass around them
    peaks = [i for i in range(1, len(hs) - 1) if hs[i] >= hs[i - 1] and hs[i] >= hs[i + 1]]
    enamel = None
    for i in sorted(peaks, reverse=True):
        lo_i, hi_i = max(0, i - 6), min(len(hs), i + 7)
        if hs[lo_i:hi_i].sum() >= min_peak_share * total and i > 3:
            enamel = float(centres[i])
            break
    if enamel is None:
        enamel = float(np.percentile(upper, 75.0))
    if enamel <= air:
        raise NoTeethFoundError("enamel level not above air level")
    span = enamel - air
    metal = enamel + 0.6 * span
    levels = GreyLevels(
        air=air,
        enamel=enamel,
        iso=air + 0.5 * span,
        seed=air + 0.85 * span,
        metal=metal,
        metal_voxels=int(np.count_nonzero(np.asarray(voxels) > metal)),
    )
    log.debug("grey levels: air %.1f enamel %.1f iso %.1f metal %.1f", air, enamel, levels.iso, metal)
    return levels


def within_mm(mask: np.ndarray, spacing_zyx: np.ndarray, radius_mm: float, coarse_mm: float = 0.6) -> np.ndarray:
    """Voxels within ``radius_mm`` of ``mask`` (a generous band: the distance transform runs
    on a grid max-pooled to about ``coarse_mm``, so the band may be up to one coarse voxel
    wider; used for cropping and flagging, never for geometry)."""
    f = np.maximum(np.rint(coarse_mm / np.asarray(spacing_zyx, float)).astype(int), 1)
    shape = np.array(mask.shape)
    padded = -(-shape // f) * f
    m = np.zeros(tuple(padded), dtype=bool)
    m[: shape[0], : shape[1], : shape[2]] = mask
    pooled = m.reshape(padded[0] // f[0], f[0], padded[1] // f[1], f[1], padded[2] // f[2], f[2]).any(axis=(1, 3, 5))
    dist = ndimage.distance_transform_edt(~pooled, sampling=np.asarray(spacing_zyx, float) * f)
    near = dist <= radius_mm
    for ax in range(3):
        near = np.repeat(near, f[ax], axis=ax)
    return near[: shape[0], : shape[1], : shape[2]]


def extract_teeth_surface(
    voxels: np.ndarray,
    affine: np.ndarray,
    *,
    frame_of_reference_uid: str = "",
    levels: GreyLevels | None = None,
    band_mm: float = 2.5,
    metal_margin_mm: float = 1.5,
    min_seed_voxels: int = 20,
    max_step_mm: float | None = None,
) -> CbctSurface:
    """Extract the crown (enamel/air) surface of a CBCT.

    Parameters
    ----------
    voxels:
        (z, y, x) array (``Volume.voxels``), any numeric dtype.
    affine:
        4x4 continuous index (i, j, k, 1) -> LPS mm (``Volume.affine``).
    levels:
        Grey levels; estimated from ``voxels`` when omitted.
    band_mm:
        Only surface within this distance of enamel seed voxels is kept (excludes
        bone, roots' surroundings and skin).
    metal_margin_mm:
        Vertices within this distance of metal voxels are flagged ``near_metal``.
    max_step_mm:
        When the voxels are finer than this, the volume is block-averaged (partial-volume
        preserving) to about this step first (e.g. 0.4 for a 0.2 mm CBCT) for speed.

    Raises
    ------
    NoTeethFoundError
        No enamel seeds in the volume.
    """
    from skimage import measure

    vox = np.asarray(voxels)
    aff = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)  # (i, j, k) = (x, y, z)
    if max_step_mm is not None:
        factor = np.maximum(np.floor(max_step_mm / spacing + 1e-6).astype(int), 1)
        if factor.max() > 1:
            fx, fy, fz = (int(v) for v in factor)
            nz, ny, nx = (vox.shape[0] // fz) * fz, (vox.shape[1] // fy) * fy, (vox.shape[2] // fx) * fx
            v = vox[:nz, :ny, :nx].astype(np.float32)
            vox = v.reshape(nz // fz, fz, ny // fy, fy, nx // fx, fx).mean(axis=(1, 3, 5))
            scale = np.diag([fx, fy, fz, 1.0])
            shift = np.eye(4)
            shift[:3, 3] = [(fx - 1) / 2.0, (fy - 1) / 2.0, (fz - 1) / 2.0]
            aff = aff @ shift @ scale
            spacing = np.linalg.norm(aff[:3, :3], axis=0)
    if levels is None:
        levels = estimate_grey_levels(vox)
    seeds = (vox >= levels.seed) & (vox < levels.metal)
    if np.count_nonzero(seeds) < min_seed_voxels:
        raise NoTeethFoundError(
            f"only {int(np.count_nonzero(seeds))} enamel-like voxels (level {levels.seed:.1f}); "
            "the volume does not show teeth crowns"
        )
    # crop to the seeds' bounding box plus the band
    pad = np.ceil((band_mm + 1.0) / spacing[::-1]).astype(int)  # z, y, x
    lo = np.zeros(3, dtype=int)
    hi = np.zeros(3, dtype=int)
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        nz_ax = np.flatnonzero(seeds.any(axis=other))
        lo[ax] = max(int(nz_ax[0]) - int(pad[ax]), 0)
        hi[ax] = min(int(nz_ax[-1]) + int(pad[ax]) + 1, vox.shape[ax])
    sub = vox[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)
    seeds_c = seeds[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    above = sub >= levels.iso
    lab, n = ndimage.label(above)
    keep = np.zeros(n + 1, dtype=bool)
    keep[lab[seeds_c]] = True
    keep[0] = False
    solid = keep[lab]
    del lab
    # band: within band_mm of seeds
    band = within_mm(seeds_c, spacing[::-1], band_mm)
    metal = sub >= levels.metal
    if metal.any():
        # ignore isolated bright streak voxels: metal is a blob
        mlab, mn = ndimage.label(metal)
        sizes = np.bincount(mlab.ravel(), minlength=mn + 1)
        big = sizes >= 8
        big[0] = False
        metal = big[mlab]
    field = np.where(solid | ~above, sub, levels.iso - 1.0)  # unconnected bright blobs removed
    mask = band
    try:
        verts, faces, normals, _ = measure.marching_cubes(
            field, level=levels.iso, mask=mask, gradient_direction="descent", allow_degenerate=True
        )
    except (ValueError, RuntimeError) as exc:
        raise NoTeethFoundError(f"no crown surface at level {levels.iso:.1f}: {exc}") from exc
    if len(verts) == 0:
        raise NoTeethFoundError("empty crown surface")
    # keep faces whose vertices all lie in the band
    vi = np.rint(verts).astype(int)
    vi = np.clip(vi, 0, np.array(field.shape) - 1)
    in_band = band[vi[:, 0], vi[:, 1], vi[:, 2]]
    fk = in_band[faces].all(axis=1)
    faces = faces[fk]
    used = np.flatnonzero(np.bincount(faces.ravel(), minlength=len(verts)))
    remap = np.full(len(verts), -1)
    remap[used] = np.arange(used.size)
    verts = verts[used]
    normals = normals[used]
    faces = remap[faces]
    # index (z, y, x) in crop -> (i, j, k) full -> LPS
    ijk = (verts + lo)[:, ::-1]
    pts = ijk @ aff[:3, :3].T + aff[:3, 3]
    # normals: gradient in index space -> LPS via inverse transpose; orient outward by sampling
    g_idx = normals[:, ::-1]
    g = g_idx @ np.linalg.inv(aff[:3, :3])
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    step = float(spacing.min())
    probe = pts + g * step
    probe_idx = np.linalg.solve(aff[:3, :3], (probe - aff[:3, 3]).T).T[:, ::-1] - lo
    outside = ndimage.map_coordinates(sub, probe_idx.T, order=1, mode="nearest")
    if np.median(outside) > levels.iso:  # normals point into the brighter side: flip
        g = -g
    if np.linalg.det(aff[:3, :3]) < 0:
        faces = faces[:, ::-1]
    if metal.any():
        near_metal_vox = within_mm(metal, spacing[::-1], metal_margin_mm)
        vidx = np.clip(np.rint(verts).astype(int), 0, np.array(field.shape) - 1)
        near_metal = near_metal_vox[vidx[:, 0], vidx[:, 1], vidx[:, 2]]
    else:
        near_metal = np.zeros(len(pts), dtype=bool)
    log.debug("crown surface: %d vertices, %d near metal", len(pts), int(near_metal.sum()))
    return CbctSurface(
        vertices=pts,
        faces=faces.astype(np.int64),
        normals=g,
        near_metal=near_metal,
        levels=levels,
        frame_of_reference_uid=frame_of_reference_uid,
        spacing_mm=float(spacing.mean()),
    )
