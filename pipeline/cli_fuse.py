"""``dentfuse fuse FIXED MOVING --out DIR``: fuse two inputs from the command line."""

from __future__ import annotations

import getpass
import logging
import math
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.cli_common import build_config, common_options, emit_json

log = logging.getLogger(__name__)

#: Exit codes (documented in ``--help``).
EXIT_ACCEPTED = 0
EXIT_INPUT_ERROR = 5  # unreadable input, bad geometry, 2D image, patient mismatch, registration could not run
EXIT_REJECTED = 3  # registration ran and its quality gate rejected it
EXIT_NEEDS_REVIEW = 4  # registration ran; the gate routed it to review

ENCAPSULATED_STL = "1.2.840.10008.5.1.4.1.1.104.3"
MESH_SUFFIXES = (".stl", ".ply", ".obj")


def is_surface_input(path: Path) -> bool:
    """True for a mesh file (.stl/.ply/.obj) or a DICOM Encapsulated STL instance."""
    if path.is_file() and path.suffix.lower() in MESH_SUFFIXES:
        return True
    if path.is_file():
        try:
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            return str(ds.get("SOPClassUID", "")) == ENCAPSULATED_STL
        except Exception:  # noqa: BLE001 - not DICOM: not a surface either
            return False
    return False


@click.command("fuse", epilog=(
    "\b\nExit codes:\n"
    f"  {EXIT_ACCEPTED}  accepted: every quality check passed\n"
    f"  {EXIT_INPUT_ERROR}  input or geometry error (the message names the input), patient mismatch,\n"
    "     or the registration could not run\n"
    f"  {EXIT_REJECTED}  rejected by the quality gate (outputs: QA pictures and fusion.json only)\n"
    f"  {EXIT_NEEDS_REVIEW}  routed to review by the quality gate (all outputs written)\n"
    "  2  usage error (click), 1 configuration error"))
@click.argument("fixed", type=click.Path(exists=True, path_type=Path))
@click.argument("moving", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (created) for the registration, derived series, QA pictures and fusion.json.")
@click.option("--seed", type=int, default=None, help="Seed for metric sampling (default: config fusion.seed).")
@click.option("--operator", default=None, help="Who ran the fusion (default: the login name).")
@click.option("--purpose", type=click.Choice(["fusion", "subtraction"]), default="fusion", show_default=True,
              help="Why the volumes are registered (recorded for billing: subtraction is not D0395).")
@click.option("--fusion-id", default=None, help="Fusion id (default: a new random id).")
@common_options
def fuse(fixed: Path, moving: Path, out_dir: Path, seed: int | None, operator: str | None, purpose: str,
         fusion_id: str | None, cfg_opts: dict[str, Any], as_json: bool) -> None:
    """Fuse MOVING onto FIXED and write the outputs into --out.

    FIXED is a folder (or file) of the DICOM series that defines the frame, normally the
    CBCT. MOVING is another volume series (CBCT, MR) or an intraoral scan: a .stl/.ply/.obj
    file or a DICOM Encapsulated STL instance.
    """
    from fusion.errors import FusionError

    cfg = build_config(cfg_opts)
    seed = cfg.fusion.seed if seed is None else seed
    if operator is None:
        try:
            operator = getpass.getuser()
        except Exception:  # noqa: BLE001 - no login name in some containers
            operator = ""
    console = Console(stderr=True)
    surface = is_surface_input(moving)
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True, disable=as_json) as bar:
        task = bar.add_task("fusing", total=1.0)

        def progress(stage: str, fraction: float) -> None:
            bar.update(task, completed=max(0.0, min(1.0, fraction)), description=stage)

        try:
            if surface:
                from fusion.surface_fusion import fuse_surface

                result = fuse_surface([fixed], moving, out_dir, gate=cfg.fusion.surface_gate, seed=seed,
                                      operator=operator, fusion_id=fusion_id, progress=progress)
            else:
                from fusion.volume_fusion import fuse_volumes

                result = fuse_volumes([fixed], [moving], out_dir, gate=cfg.fusion.volume_gate, seed=seed,
                                      purpose=purpose, operator=operator, fusion_id=fusion_id, progress=progress)
        except FusionError as exc:
            if as_json:
                emit_json({"error": type(exc).__name__, "message": str(exc), "fixed": str(fixed),
                           "moving": str(moving)})
            else:
                console.print(f"[bold red]{type(exc).__name__}[/]: {exc}", highlight=False, soft_wrap=True)
            raise SystemExit(EXIT_INPUT_ERROR) from None
    if as_json:
        emit_json(result.to_dict())
    else:
        _print_summary(result, out_dir)
    code = {"accepted": EXIT_ACCEPTED, "rejected": EXIT_REJECTED, "needs_review": EXIT_NEEDS_REVIEW}[result.verdict]
    raise SystemExit(code)


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isinf(v) or math.isnan(v)):
        return str(v)
    return f"{v:.4g}"


def _print_summary(result: Any, out_dir: Path) -> None:
    console = Console()
    colour = {"accepted": "green", "rejected": "red", "needs_review": "yellow"}[result.verdict]
    console.print(f"[bold {colour}]{result.verdict.upper()}[/]  fusion {result.fusion_id}  ({result.method}, "
                  f"seed {result.seed})")
    for r in result.reasons:
        console.print(f"  - {r}", highlight=False)
    checks = Table(title="quality checks (measured vs threshold)")
    for col in ("check", "value", "threshold", "severity", "passed"):
        checks.add_column(col)
    for q in result.quality_checks:
        checks.add_row(q.name, _fmt(q.value), f"{q.comparison} {_fmt(q.threshold)}", q.severity,
                       "[green]yes[/]" if q.passed else "[red]no[/]")
    console.print(checks)
    metrics = Table(title="metrics (no landmarks: TRE is not measurable here)")
    metrics.add_column("metric")
    metrics.add_column("value")
    for k, v in sorted(result.metrics.items()):
        metrics.add_row(k, _fmt(float(v)))
    console.print(metrics)
    m = result.transform_moving_to_fixed
    console.print("transform moving -> fixed (LPS mm):")
    for row in m:
        console.print("  [" + "  ".join(f"{v: .6f}" for v in row) + "]", highlight=False)
    outs = Table(title=f"outputs in {out_dir}")
    outs.add_column("kind")
    outs.add_column("path")
    outs.add_column("sha256")
    for o in result.outputs:
        outs.add_row(o.kind, o.path, o.sha256[:16] + "...")
    outs.add_row("fusion_json", str(Path(out_dir) / "fusion.json"), "")
    console.print(outs)
    console.print(f"time {result.timings_s.get('total', 0.0):.1f} s")
