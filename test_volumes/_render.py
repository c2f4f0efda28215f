"""Rendering the implicit anatomy into acquisition grids, and the intraoral scan mesh."""

from __future__ import annotations

import math

import numpy as np
import trimesh
from scipy import ndimage
from skimage import measure

from test_volumes._anatomy import Anatomy, Materials
from test_volumes._dicomio import Grid


def grid_around(corners_anat: np.ndarray, pose: np.ndarray, direction: np.ndarray,
                spacing: tuple[float, float, float], min_size_mm: tuple[float, float, float] | None = None) -> Grid:
    """Smallest grid with the given axes that holds the anatomy-frame points (mapped by pose)."""
    pts = corners_anat @ pose[:3, :3].T + pose[:3, 3]
    proj = pts @ direction  # coordinates along each grid axis
    lo, hi = proj.min(axis=0), proj.max(axis=0)
    if min_size_mm is not None:
        centre = (lo + hi) / 2
        half = np.maximum((hi - lo) / 2, np.array(min_size_mm) / 2)
        lo, hi = centre - half, centre + half
    sp = np.array(spacing)
    size = np.ceil((hi - lo) / sp).astype(int) + 1
    lo = np.round(lo / 0.5) * 0.5  # scanners start on tidy numbers
    origin = direction @ lo
    return Grid(size=tuple(int(s) for s in size), spacing=tuple(float(s) for s in spacing),
                origin=tuple(float(o) for o in origin),
                direction=tuple(float(v) for v in direction.reshape(-1)))


def box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])


def render(anat: Anatomy, grid: Grid, pose: np.ndarray, mat: Materials, *, metal: bool = False,
           chunk_points: int = 1_500_000) -> np.ndarray:
    """Material values on the grid (array (nz, ny, nx) float32); pose maps anatomy -> grid frame."""
    nx, ny, nz = grid.size
    m = np.linalg.inv(pose) @ grid.index_to_frame()  # index -> anatomy
    h = float(np.mean(grid.spacing))
    out = np.empty((nz, ny, nx), dtype=np.float32)
    a3 = m[:3, :3]
    plane = (np.arange(ny)[:, None, None] * a3[:, 1] + np.arange(nx)[None, :, None] * a3[:, 0]).reshape(-1, 3)
    per = max(1, chunk_points // (nx * ny))
    for k0 in range(0, nz, per):
        k1 = min(nz, k0 + per)
        base = m[:3, 3] + np.arange(k0, k1)[:, None] * a3[:, 2]  # (nk, 3)
        p = (base[:, None, :] + plane[None, :, :]).reshape(-1, 3)
        out[k0:k1] = anat.paint(p, h, mat, metal=metal).reshape(k1 - k0, ny, nx)
    return out


def blur(vol: np.ndarray, sigma_vox: float) -> np.ndarray:
    return ndimage.gaussian_filter(vol, sigma=sigma_vox, mode="nearest").astype(np.float32)


def add_metal_streaks(vol: np.ndarray, grid: Grid, threshold: float, rng: np.random.Generator,
                      amplitude: float = 1.2) -> int:
    """Radial bright/dark streaks in each axial slice that holds metal; returns slices touched."""
    nz, ny, nx = vol.shape
    metal = vol > threshold
    counts = metal.reshape(nz, -1).sum(axis=1)
    if counts.max() == 0:
        return 0
    n_streaks = 14
    angles = rng.uniform(0, math.pi, n_streaks)
    signs = np.where(rng.random(n_streaks) < 0.55, -1.0, 1.0)
    weights = rng.uniform(0.5, 1.0, n_streaks)
    sx, sy = grid.spacing[0], grid.spacing[1]
    yy, xx = np.mgrid[0:ny, 0:nx]
    touched = 0
    for k in np.nonzero(counts)[0]:
        ys, xs = np.nonzero(metal[k])
        cy, cx = ys.mean(), xs.mean()
        dx = (xx - cx) * sx
        dy = (yy - cy) * sy
        r = np.hypot(dx, dy)
        strength = amplitude * min(1.0, counts[k] / (0.5 * counts.max()))
        pattern = np.zeros((ny, nx), dtype=np.float32)
        for a, s, w in zip(angles, signs, weights):
            perp = np.abs(-math.sin(a) * dx + math.cos(a) * dy)
            pattern += (s * w * np.exp(-0.5 * (perp / 0.7) ** 2)).astype(np.float32)
        pattern *= np.exp(-r / 22.0) * (r > 2.0)
        vol[k] += strength * pattern * (~metal[k])
        touched += 1
    return touched


# ---------------------------------------------------------------------------------------
# intraoral scan


def _solid_sdf(anat: Anatomy, p: np.ndarray, arch: str) -> np.ndarray:
    return np.minimum(anat.tooth_sdf(p, arch), anat.gingiva_sdf(p, arch))


def _cap_sdf(anat: Anatomy, p: np.ndarray, arch: str, strip_mm: float) -> np.ndarray:
    level = anat.gum_level[arch](p[:, :2]) + strip_mm
    return (p[:, 2] - level) if arch == "upper" else (-p[:, 2] - level)


def make_scan(anat: Anatomy, arch: str, step_mm: float, rng: np.random.Generator,
              noise_mm: float = 0.03, holes: int = 4, strip_mm: float = 1.5) -> trimesh.Trimesh:
    """Surface of one arch's crowns plus a strip of gingiva, in the anatomy frame (mm).

    Marching cubes on the exact signed distance, vertices projected back on the surface,
    the cut at the gum strip left open, a few holes punched, then noise along the normals.
    """
    pts = anat.arches[arch].points
    margin = anat.gum_half_width + 1.0
    lo_xy = pts.min(axis=0) - margin
    hi_xy = pts.max(axis=0) + margin
    top = float(anat.gum_level[arch].values.max()) + strip_mm + 1.0
    z_lo, z_hi = (1.5 - 1.0, top) if arch == "upper" else (-top, -0.5)
    xs = np.arange(lo_xy[0], hi_xy[0] + step_mm, step_mm)
    ys = np.arange(lo_xy[1], hi_xy[1] + step_mm, step_mm)
    zs = np.arange(z_lo, z_hi + step_mm, step_mm)
    gx, gy, gz = np.meshgrid(xs, ys, zs, indexing="ij")
    p = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
    field = np.full(len(p), 5.0)
    near = anat.dist[arch](p[:, :2]) < margin
    q = p[near]
    field[near] = np.maximum(_solid_sdf(anat, q, arch), _cap_sdf(anat, q, arch, strip_mm))
    field = field.reshape(gx.shape)
    verts, faces, _, _ = measure.marching_cubes(field, level=0.0, spacing=(step_mm,) * 3,
                                                gradient_direction="ascent")
    verts = verts + np.array([xs[0], ys[0], zs[0]])
    # drop the cap (the scan is open where the scanned strip of gingiva ends)
    cap = _cap_sdf(anat, verts, arch, strip_mm)
    solid = _solid_sdf(anat, verts, arch)
    on_cap = cap > solid - 1e-6
    keep = ~on_cap[faces].all(axis=1)
    faces = faces[keep]
    # project onto the exact surface (two Newton steps with a numerical gradient)
    eps = 1e-3
    for _ in range(2):
        d = _solid_sdf(anat, verts, arch)
        g = np.zeros_like(verts)
        for ax in range(3):
            e = np.zeros(3)
            e[ax] = eps
            g[:, ax] = (_solid_sdf(anat, verts + e, arch) - _solid_sdf(anat, verts - e, arch)) / (2 * eps)
        n = np.linalg.norm(g, axis=1, keepdims=True)
        g = g / np.maximum(n, 1e-9)
        verts = verts - d[:, None] * g
    mesh = trimesh.Trimesh(vertices=verts, faces=faces, process=True)
    parts = mesh.split(only_watertight=False)
    mesh = max(parts, key=lambda m: len(m.faces))
    # outward orientation: normals point to increasing distance
    probe = mesh.triangles_center + 0.05 * mesh.face_normals
    if np.mean(_solid_sdf(anat, probe, arch) > 0) < 0.5:
        mesh.invert()
    # holes: delete small patches of faces
    centres = mesh.triangles_center
    remove = np.zeros(len(mesh.faces), dtype=bool)
    for _ in range(holes):
        c = centres[rng.integers(len(centres))]
        remove |= np.linalg.norm(centres - c, axis=1) < rng.uniform(0.5, 1.1)
    mesh.update_faces(~remove)
    mesh.remove_unreferenced_vertices()
    normals = mesh.vertex_normals.copy()
    mesh.vertices = mesh.vertices + normals * rng.normal(0.0, noise_mm, (len(mesh.vertices), 1))
    return mesh
