"""QA pictures of a volume fusion, for a technician to check at a glance (PNG, Pillow).

For each of the axial, coronal and sagittal planes through the centre of the overlap, one
PNG with four panels: fixed, moving resampled onto the fixed grid, a checkerboard of the
two, and a colour overlay (fixed in magenta, moving in green: where they agree the
anatomy is grey/white, misregistered edges show as coloured fringes). Pixels are shown
with the fixed grid's physical aspect ratio. Axial views follow the radiological
convention of the DICOM grid (the patient's right on the viewer's left for standard
orientations); coronal and sagittal views have superior at the top.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fusion.dicom_common import sha256_file
from fusion.records import FusionOutput
from fusion.volume import Volume

log = logging.getLogger(__name__)

PANEL_PX = 320  # longest side of each panel
CHECKER_TILES = 8  # tiles along the longest side


def _window(a: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    vals = a[body] if body is not None and body.any() else a
    lo, hi = np.percentile(vals, [1.0, 99.5]) if vals.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def _planes(fixed: Volume, fixed_arr: np.ndarray, moving_arr: np.ndarray, centre_ijk: np.ndarray):
    """Yield (name, fixed 2D, moving 2D, (row mm, col mm))."""
    i, j, k = (int(round(v)) for v in centre_ijk)
    nz, ny, nx = fixed_arr.shape
    i, j, k = min(max(i, 0), nx - 1), min(max(j, 0), ny - 1), min(max(k, 0), nz - 1)
    sx, sy, sz = fixed.spacing
    up_is_k = fixed.direction[2, 2] > 0  # +k runs superior: flip so that superior is on top
    yield "axial", fixed_arr[k], moving_arr[k], (sy, sx)
    cf, cm = fixed_arr[:, j, :], moving_arr[:, j, :]
    if up_is_k:
        cf, cm = cf[::-1], cm[::-1]
    yield "coronal", cf, cm, (sz, sx)
    sf, sm = fixed_arr[:, :, i], moving_arr[:, :, i]
    if up_is_k:
        sf, sm = sf[::-1], sm[::-1]
    yield "sagittal", sf, sm, (sz, sy)


def _to_image(rgb: np.ndarray, row_mm: float, col_mm: float) -> Image.Image:
    h, w = rgb.shape[:2]
    ph, pw = h * row_mm, w * col_mm
    scale = PANEL_PX / max(ph, pw)
    size = (max(1, int(round(pw * scale))), max(1, int(round(ph * scale))))
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).resize(size, Image.BILINEAR)


def write_qa_pictures(
    out_dir: Path,
    fixed: Volume,
    moving_on_fixed: np.ndarray,
    *,
    centre_lps: np.ndarray | None = None,
    title: str = "",
    prefix: str = "qa",
) -> list[FusionOutput]:
    """Write ``<prefix>_axial.png``, ``_coronal.png`` and ``_sagittal.png`` into ``out_dir``.

    Parameters
    ----------
    fixed
        The fixed volume (defines the grid).
    moving_on_fixed
        The moving volume resampled onto the fixed grid, (z, y, x) like ``fixed.voxels``.
    centre_lps
        Point the three planes pass through (default: centre of the fixed grid); pass the
        centre of the overlap.
    title
        Caption line (e.g. verdict and fusion id); no patient names.
    """
    if moving_on_fixed.shape != fixed.voxels.shape:
        raise ValueError(f"moving_on_fixed shape {moving_on_fixed.shape} is not the fixed grid {fixed.voxels.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if centre_lps is None:
        centre_ijk = (np.array(fixed.shape_xyz) - 1) / 2.0
    else:
        centre_ijk = fixed.lps_to_index(np.asarray(centre_lps, float)[None])[0]
    fa = fixed.voxels.astype(np.float32)
    ma = moving_on_fixed.astype(np.float32)
    outputs: list[FusionOutput] = []
    for name, f2, m2, (row_mm, col_mm) in _planes(fixed, fa, ma, centre_ijk):
        fb = f2 > np.percentile(f2, 50)
        mb = m2 > np.percentile(m2, 50)
        fw, mw = _window(f2, fb), _window(m2, mb)
        h, w = fw.shape
        tile = max(1, int(max(h * row_mm, w * col_mm) / CHECKER_TILES))
        rr = (np.arange(h) * row_mm // tile).astype(int)
        cc = (np.arange(w) * col_mm // tile).astype(int)
        checker = ((rr[:, None] + cc[None, :]) % 2).astype(bool)
        cb = np.where(checker, fw, mw)
        grey = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
        overlay = np.stack([fw, mw, fw], axis=2)
        panels = [("fixed", grey(fw)), ("moving (registered)", grey(mw)), ("checkerboard", grey(cb)),
                  ("overlay: fixed magenta, moving green", overlay)]
        imgs = [(label, _to_image(p, row_mm, col_mm)) for label, p in panels]
        pad, cap = 6, 16
        W = sum(im.width for _, im in imgs) + pad * (len(imgs) + 1)
        H = max(im.height for _, im in imgs) + 2 * pad + 2 * cap
        canvas = Image.new("RGB", (W, H), (20, 20, 20))
        draw = ImageDraw.Draw(canvas)
        draw.text((pad, 2), f"{name}  {title}"[:160], fill=(230, 230, 230))
        x = pad
        for label, im in imgs:
            canvas.paste(im, (x, cap + pad))
            draw.text((x, cap + pad + im.height + 2), label, fill=(200, 200, 200))
            x += im.width + pad
        path = out_dir / f"{prefix}_{name}.png"
        canvas.save(path, format="PNG", optimize=False)
        outputs.append(FusionOutput(kind="qa_png", path=str(path), sha256=sha256_file(path), media_type="image/png"))
    log.info("wrote QA pictures to %s", out_dir)
    return outputs
