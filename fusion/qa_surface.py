"""QA pictures of a scan-to-CBCT fusion (PNG, Pillow only).

* ``qa_scan_<view>.png``: CBCT slices through several teeth (axial through the crowns,
  sagittal through each side's molars, coronal through the front teeth) with the
  registered scan's cross-section drawn over them: on a right fusion the contour hugs
  the crowns' edges;
* ``qa_scan_distance.png``: the scan seen from the occlusal side, coloured by its
  distance to the CBCT crown surface (0 mm blue .. >= 1 mm red). Crowns should be blue;
  gingiva has no counterpart in the CBCT and is expected to be red.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from fusion.dicom_common import sha256_file
from fusion.records import FusionOutput

log = logging.getLogger(__name__)

_CMAP = np.array(
    [[0.0, 0, 0, 160], [0.25, 0, 160, 255], [0.5, 40, 200, 60], [0.75, 250, 220, 0], [1.0, 220, 30, 30]]
)


def colormap(values: np.ndarray, vmax: float) -> np.ndarray:
    """RGB uint8 for values in [0, vmax] (blue -> cyan -> green -> yellow -> red)."""
    t = np.clip(np.asarray(values, float) / max(vmax, 1e-9), 0.0, 1.0)
    out = np.empty((t.size, 3))
    for c in range(3):
        out[:, c] = np.interp(t.ravel(), _CMAP[:, 0], _CMAP[:, c + 1])
    return out.astype(np.uint8)


def _window(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / max(hi - lo, 1e-9), 0.0, 1.0) * 255).astype(np.uint8)


def _segments_in_plane(vertices: np.ndarray, faces: np.ndarray, axis: int, value: float) -> np.ndarray:
    """Intersection segments of a triangle mesh with the plane ``x[axis] == value``; (S, 2, 3)."""
    tri = vertices[faces]  # (F, 3, 3)
    d = tri[:, :, axis] - value
    side = d > 0
    cross = side.any(axis=1) & ~side.all(axis=1)
    tri, d = tri[cross], d[cross]
    pts = np.empty((len(tri), 3, 3))
    hits = np.zeros((len(tri), 3), dtype=bool)
    for e, (a, b) in enumerate(((0, 1), (1, 2), (2, 0))):
        da, db = d[:, a], d[:, b]
        hit = (da > 0) != (db > 0)
        t = np.where(hit, da / np.where(hit, da - db, 1.0), 0.0)
        pts[:, e] = tri[:, a] + t[:, None] * (tri[:, b] - tri[:, a])
        hits[:, e] = hit
    # a triangle crossing the plane has exactly two crossing edges (sign test is strict on one side)
    two = hits.sum(axis=1) == 2
    order = np.argsort(~hits[two], axis=1, kind="stable")[:, :2]
    return np.take_along_axis(pts[two], order[:, :, None], axis=1)


def write_contour_pictures(
    out_dir: Path,
    voxels: np.ndarray,
    affine: np.ndarray,
    scan_vertices_lps: np.ndarray,
    scan_faces: np.ndarray,
    *,
    window: tuple[float, float],
    title: str = "",
    zoom: int = 3,
) -> list[FusionOutput]:
    """Draw the registered scan's cross-sections over CBCT slices through several teeth.

    ``scan_vertices_lps`` are in the CBCT frame. Slices are taken on the CBCT's own grid
    (no resampling); positions come from the scan's extent in index space.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    aff = np.asarray(affine, float)
    ijk = np.linalg.solve(aff[:3, :3], (np.asarray(scan_vertices_lps, float) - aff[:3, 3]).T).T
    nz, ny, nx = voxels.shape
    inside = (ijk[:, 0] >= 0) & (ijk[:, 0] < nx) & (ijk[:, 1] >= 0) & (ijk[:, 1] < ny) & (ijk[:, 2] >= 0) & (ijk[:, 2] < nz)
    ref = ijk[inside] if inside.sum() > 100 else np.clip(ijk, 0, [nx - 1, ny - 1, nz - 1])
    qi = np.quantile(ref, [0.1, 0.5, 0.9], axis=0)
    views = [
        ("axial", 2, float(np.quantile(ref[:, 2], 0.5))),
        ("sagittal_a", 0, float(qi[0, 0])),
        ("sagittal_b", 0, float(qi[2, 0])),
        ("coronal", 1, float(np.quantile(ref[:, 1], 0.15))),
    ]
    outputs: list[FusionOutput] = []
    for name, axis, value in views:
        s = int(np.clip(round(value), 0, (nx, ny, nz)[axis] - 1))
        if axis == 2:
            img = voxels[s]  # rows j, cols i
            to_xy = lambda p: (p[:, 0], p[:, 1])  # noqa: E731
        elif axis == 1:
            img = voxels[:, s, :][::-1]  # rows k (flipped: top = high k), cols i
            to_xy = lambda p: (p[:, 0], (nz - 1) - p[:, 2])  # noqa: E731
        else:
            img = voxels[:, :, s][::-1]  # rows k flipped, cols j
            to_xy = lambda p: (p[:, 1], (nz - 1) - p[:, 2])  # noqa: E731
        g = _window(np.asarray(img, float), *window)
        pic = Image.fromarray(g).convert("RGB").resize((g.shape[1] * zoom, g.shape[0] * zoom), Image.NEAREST)
        draw = ImageDraw.Draw(pic)
        segs = _segments_in_plane(ijk, np.asarray(scan_faces), axis, float(s))
        if len(segs):
            x0, y0 = to_xy(segs[:, 0])
            x1, y1 = to_xy(segs[:, 1])
            for xa, ya, xb, yb in zip((x0 + 0.5) * zoom, (y0 + 0.5) * zoom, (x1 + 0.5) * zoom, (y1 + 0.5) * zoom):
                draw.line([(float(xa), float(ya)), (float(xb), float(yb))], fill=(255, 210, 0), width=1)
        draw.text((4, 4), f"{title}  {name} slice {s}  scan contour (yellow)", fill=(255, 255, 255))
        path = out_dir / f"qa_scan_{name}.png"
        pic.save(path)
        outputs.append(FusionOutput(kind="qa_png", path=str(path), sha256=sha256_file(path), media_type="image/png"))
    return outputs


def write_distance_map(
    out_path: Path,
    scan_vertices_lps: np.ndarray,
    scan_faces: np.ndarray,
    distances_mm: np.ndarray,
    *,
    vmax_mm: float = 1.0,
    title: str = "",
    size: int = 800,
) -> FusionOutput:
    """Occlusal view of the scan coloured by per-vertex distance to the CBCT surface.

    The view axis is the scan's thinnest principal direction; faces are painted back to
    front. A colour bar shows the scale (values >= ``vmax_mm`` are red).
    """
    v = np.asarray(scan_vertices_lps, float)
    f = np.asarray(scan_faces, np.int64)
    c = v.mean(axis=0)
    _, _, vt = np.linalg.svd(v - c, full_matrices=False)
    u_ax, w_ax, view = vt[0], vt[1], vt[2]
    x = (v - c) @ u_ax
    y = (v - c) @ w_ax
    z = (v - c) @ view
    span = max(np.ptp(x), np.ptp(y), 1e-6)
    margin = 40
    scale = (size - 2 * margin) / span
    px = (x - x.min()) * scale + margin
    py = (y - y.min()) * scale + margin
    h = int(np.ptp(y) * scale + 2 * margin + 60)
    pic = Image.new("RGB", (size, max(h, 200)), (30, 30, 30))
    draw = ImageDraw.Draw(pic)
    d = np.abs(np.asarray(distances_mm, float))
    dface = np.nanmean(np.where(np.isfinite(d), d, vmax_mm)[f], axis=1)
    # rasterise by splatting points sampled on every face (spacing < one pixel), nearest
    # to the viewer last (painter's order), vectorised
    from fusion.surface_outputs import surface_samples

    samples, fid = surface_samples(np.c_[px, py, z], f, 0.7)
    order = np.argsort(samples[:, 2], kind="stable")
    sx = np.clip(np.rint(samples[order, 0]).astype(int), 0, pic.width - 1)
    sy = np.clip(np.rint(samples[order, 1]).astype(int), 0, pic.height - 1)
    colors = colormap(dface[fid[order]], vmax_mm)
    canvas = np.asarray(pic).copy()
    canvas[sy, sx] = colors
    pic = Image.fromarray(canvas)
    draw = ImageDraw.Draw(pic)
    # colour bar
    bar_y = pic.height - 40
    for k in range(256):
        col = colormap(np.array([k / 255.0 * vmax_mm]), vmax_mm)[0]
        draw.line([(margin + k * 2, bar_y), (margin + k * 2, bar_y + 12)], fill=tuple(int(t) for t in col), width=2)
    draw.text((margin, bar_y + 14), "0 mm", fill=(255, 255, 255))
    draw.text((margin + 480, bar_y + 14), f">= {vmax_mm:g} mm", fill=(255, 255, 255))
    draw.text((4, 4), f"{title}  scan-to-CBCT surface distance (gingiva has no CBCT counterpart)", fill=(255, 255, 255))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out_path)
    return FusionOutput(kind="qa_png", path=str(out_path), sha256=sha256_file(out_path), media_type="image/png")


def scan_distances(level_tree, level_points: np.ndarray, level_normals: np.ndarray, vertices: np.ndarray,
                   max_mm: float = 3.0) -> np.ndarray:
    """Per-vertex distance to a surface (tangent-plane distance at the nearest surface point;
    inf beyond ``max_mm``)."""
    d, k = level_tree.query(vertices, distance_upper_bound=max_mm)
    out = np.full(len(vertices), np.inf)
    hit = np.isfinite(d)
    out[hit] = np.abs(np.einsum("ij,ij->i", vertices[hit] - level_points[k[hit]], level_normals[k[hit]]))
    # the tangent-plane distance can underestimate far off-surface points: keep the larger
    # of the plane distance and (point distance - half the surface spacing)
    out[hit] = np.maximum(out[hit], d[hit] - 0.3)
    return out


__all__: Sequence[str] = ("write_contour_pictures", "write_distance_map", "scan_distances", "colormap")
