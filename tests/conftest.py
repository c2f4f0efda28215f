"""Shared test fixtures.

Peers (dcmtk, dicom3tools, orthanc, elastix) are found on PATH. A test that needs one
calls :func:`require_peer`; it skips when the peer is missing, or fails when
``DENTFUSE_REQUIRE_PEERS=1`` (as in CI), so CI cannot pass by skipping.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_SET = REPO_ROOT / "test_volumes" / "small"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def peers_required() -> bool:
    return os.environ.get("DENTFUSE_REQUIRE_PEERS", "") not in ("", "0", "false", "no")


def require_peer(*programs: str) -> dict[str, str]:
    """Return {program: path} for programs on PATH, or skip (fail under REQUIRE_PEERS)."""
    found: dict[str, str] = {}
    missing = []
    for prog in programs:
        path = _which_native(prog)
        if path is None:
            missing.append(prog)
        else:
            found[prog] = path
    if missing:
        msg = f"peer program(s) not installed: {', '.join(missing)} (see .ci/run for the apt packages)"
        if peers_required():
            pytest.fail(msg + " and DENTFUSE_REQUIRE_PEERS=1")
        pytest.skip(msg)
    return found


def _which_native(prog: str) -> str | None:
    """Like ``shutil.which`` but prefers a native (ELF) program: pip-installed packages can
    put same-named Python scripts on PATH (pynetdicom's ``storescu``/``echoscu`` apps behind
    pyenv shims) in front of the dcmtk binaries the tests mean."""
    first_script = None
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/sbin"]:
        cand = Path(folder) / prog
        if not (cand.is_file() and os.access(cand, os.X_OK)):
            continue
        with open(cand, "rb") as fh:
            if fh.read(4) == b"\x7fELF":
                return str(cand)
        first_script = first_script or str(cand)
    return first_script


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def small_set() -> Path:
    """The committed small synthetic set (``test_volumes/small``)."""
    if not (SMALL_SET / "ground_truth.json").is_file():
        pytest.fail(f"{SMALL_SET} is missing; run python test_volumes/generate.py --out {SMALL_SET}")
    return SMALL_SET


def dcmtk(program: str) -> str:
    """Path of the dcmtk program (the pyenv shims of pynetdicom's apps share some names:
    storescu, echoscu; we need dcmtk's). Skips/fails like ``require_peer``."""
    require_peer(program)
    found = _find_dcmtk(program)
    if found:
        return found
    msg = f"dcmtk's {program} not found (only non-dcmtk programs of that name on PATH)"
    if peers_required():
        pytest.fail(msg)
    pytest.skip(msg)
    raise AssertionError  # unreachable


@functools.lru_cache(maxsize=None)
def _find_dcmtk(program: str) -> str:
    candidates = [Path(p) / program for p in os.environ.get("PATH", "").split(os.pathsep)]
    candidates += [Path("/usr/bin") / program]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            with open(cand, "rb") as fh:
                if fh.read(4) != b"\x7fELF":  # scripts (pyenv shims) are not dcmtk
                    continue
            try:
                out = subprocess.run([str(cand), "--version"], capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if "dcmtk" in (out.stdout + out.stderr).lower():
                return str(cand)
    return ""
