"""Versions of the software that computed a fusion (provenance)."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata

#: Distributions recorded in every FusionResult, in this order (absent ones are skipped).
DISTRIBUTIONS: tuple[str, ...] = (
    "dentfuse", "numpy", "scipy", "SimpleITK", "pydicom", "pynetdicom", "highdicom", "trimesh",
    "scikit-image", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle",
    "pyjpegls", "Pillow", "rtree",
)


@lru_cache(maxsize=1)
def _cached() -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = [("python", platform.python_version())]
    for dist in DISTRIBUTIONS:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(out)


def software_versions() -> dict[str, str]:
    """``{name: version}`` for Python and every installed distribution in :data:`DISTRIBUTIONS`
    (installed versions as reported by the package metadata, not guessed)."""
    return dict(_cached())
