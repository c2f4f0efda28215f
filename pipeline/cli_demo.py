"""``dentfuse demo``: the whole product on the bundled synthetic patient, no configuration.

A fresh data directory, the listener on a free loopback port, the synthetic patient sent
over DICOM (CBCT A, CBCT B, the intraoral scan as Encapsulated STL, the 2D panoramic and
the re-sent copy of A), a short quiet period, fusion jobs in worker processes, D0395
decisions in the ledger, a rationale documented *by the demo* (labelled as such) so that
the FHIR and X12 exports are produced and delivered to the drop directory, and a report
(PDF + HTML) per fusion. Then a summary and the paths of everything written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import pipeline
from pipeline.bootstrap import decision_or_none
from pipeline.cli_common import common_options, emit_json, input_note, short_uid
from pipeline.config import ConfigError, load_config

log = logging.getLogger(__name__)

DEMO_QUIET_PERIOD_S = 2.0
DEMO_FEE_SCHEDULE = ("D0395=350.00",)  # the demo's own fee, so that a claim can be exported
DEMO_CALLING_AE = "DEMO_SCANNER"
DEMO_CLINICIAN = "dentfuse demo (not a clinician)"
DEMO_RATIONALE = ("DEMO ONLY - written automatically by `dentfuse demo` for a synthetic patient, not a clinical "
                  "record: fusion of the CBCT with the second CBCT / intraoral scan to plan an implant.")
# the cases sent, in order: (case folder, files glob, what it is)
DEMO_CASES: tuple[tuple[str, str, str], ...] = (
    ("p1_cbct_a", "*.dcm", "CBCT A"),
    ("p1_cbct_b", "*.dcm", "CBCT B (months later)"),
    ("p1_scan", "upper.dcm", "intraoral scan (Encapsulated STL)"),
    ("p1_pano", "*.dcm", "panoramic (2D)"),
    ("p1_cbct_a_resent", "*.dcm", "CBCT A re-sent (duplicate)"),
)


def bundled_set() -> Path:
    return Path(pipeline.__file__).resolve().parents[1] / "test_volumes" / "small"


def demo_files(root: Path, cases: Sequence[tuple[str, str, str]] = DEMO_CASES) -> list[tuple[str, list[Path]]]:
    out = []
    for case, pattern, label in cases:
        folder = root / case
        files = sorted(folder.glob(pattern))
        if not files:
            raise click.ClickException(f"{folder} has no {pattern} files; regenerate the synthetic set with "
                                       f"python test_volumes/generate.py --out {root}")
        out.append((label, files))
    return out


def send_files(files: Sequence[Path], host: str, port: int, called_ae: str, calling_ae: str = DEMO_CALLING_AE,
               on_sent: Callable[[Path, int], None] | None = None) -> int:
    """C-STORE ``files`` on one association (pynetdicom SCU); return how many succeeded.

    Raises
    ------
    click.ClickException
        The association failed or an instance was refused.
    """
    from dicom_node.scu import close, open_association, read_identity, send_file, storage_contexts
    from dicom_node.settings import PacsDestination

    idents = [read_identity(f) for f in files]
    dest = PacsDestination(name="dentfuse", ae_title=called_ae, host=host, port=port)
    ok = 0
    # at most 128 presentation contexts per association: group by SOP class / syntax
    assoc = open_association(calling_ae, dest, storage_contexts(idents))
    try:
        for n, ident in enumerate(idents, 1):
            status = send_file(assoc, ident, msg_id=n)
            if status != 0x0000:
                raise click.ClickException(f"{ident.path} was refused with status 0x{status & 0xFFFF:04X}")
            ok += 1
            if on_sent is not None:
                on_sent(Path(ident.path), status)
    finally:
        close(assoc)
    return ok


@dataclass
class DemoRun:
    data_dir: Path
    port: int
    timings_s: dict[str, float]
    received: list[dict[str, Any]]
    fusions: list[dict[str, Any]]
    paths: dict[str, Any]


def _side(p: dict[str, Any]) -> str:
    d = p.get("acquisition_date") or ""
    return f"{p.get('modality', '?')} {d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 else str(p.get("modality", "?"))


def summarise(app: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """What was received, and each fusion with its quality and decision."""
    received = []
    explained: dict[str, dict[str, str]] = {}
    for s in app.node.index.series():
        if s.patient_key not in explained:
            explained[s.patient_key] = app.explain_patient(s.patient_key)
        received.append({"patient_key": s.patient_key, "series_instance_uid": s.series_instance_uid,
                         "modality": s.modality, "kind": s.kind, "instances": s.instance_count,
                         "planner": explained[s.patient_key].get(s.series_instance_uid, "not stable yet")})
    fusions = []
    for job in sorted(app.jobs.list(limit=1000), key=lambda j: j.job_id):
        fid = job.payload.get("fusion_id", "")
        row: dict[str, Any] = {"fusion_id": fid, "rule": job.payload.get("rule", ""), "job_state": job.state,
                               "fixed": _side(job.payload["fixed"]), "moving": _side(job.payload["moving"]),
                               "fixed_series_instance_uid": job.payload["fixed"]["series_instance_uid"],
                               "moving_series_instance_uid": job.payload["moving"]["series_instance_uid"],
                               "error": job.error, "attempts": job.attempts}
        rfile = app.data_dir / "fusions" / fid / "result.json"
        if rfile.is_file():
            result = app.load_result(fid)
            row.update({"verdict": result.verdict, "method": result.method,
                        "quality": [{"name": q.name, "value": q.value, "threshold": q.threshold,
                                     "comparison": q.comparison, "passed": q.passed} for q in result.quality_checks],
                        "reasons_fusion": list(result.reasons), "out_dir": str(rfile.parent),
                        "timings_s": dict(result.timings_s)})
        d = decision_or_none(app.billing, fid) if fid else None
        if d is not None:
            row.update({"code": d.code, "status": d.status, "reasons": list(d.reasons),
                        "failed_rules": list(d.failed), "companions": [c.code for c in d.companions],
                        "report_id": d.report_id, "rationale": d.rationale})
        fusions.append(row)
    return received, fusions


def written_paths(app: Any) -> dict[str, Any]:
    data = app.data_dir

    def files(folder: Path, pattern: str = "*") -> list[str]:
        return sorted(str(p) for p in folder.rglob(pattern) if p.is_file()) if folder.is_dir() else []

    drop = Path(app.cfg.billing.delivery.drop_dir or data / "outbox" / "drop")
    return {
        "data_dir": str(data),
        "fusion_outputs": sorted(str(p) for p in (data / "fusions").iterdir() if p.is_dir())
        if (data / "fusions").is_dir() else [],
        "reports": [p for p in files(data / "reports") if p.endswith((".pdf", ".html"))],
        "claims": files(data / "exports"),
        "delivered": files(drop),
        "ledger": str(data / "billing" / "ledger.sqlite"),
        "index": str(data / "index.sqlite"),
        "jobs": str(data / "jobs.sqlite3"),
        "received_instances": str(data / "instances"),
    }


def run_demo(data_dir: Path, *, source: Path | None = None, console: Console | None = None,
             quiet_period_s: float = DEMO_QUIET_PERIOD_S, timeout_s: float = 300.0,
             config_file: Path | None = None) -> DemoRun:
    """Run the demo into ``data_dir``; returns what it did (see :class:`DemoRun`)."""
    from pipeline.bootstrap import App

    console = console or Console(stderr=True)
    source = source or bundled_set()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    try:
        cfg = load_config(config_file, flags={
            "data_dir": data_dir, "node.port": 0, "node.bind_address": "127.0.0.1",
            "stability.quiet_period_s": quiet_period_s, "stability.check_interval_s": 0.2,
            "fusion.workers": 2, "billing.policy.fee_schedule": DEMO_FEE_SCHEDULE,
        })
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    groups = demo_files(source)
    app = App(cfg, planner_interval_s=0.2)
    port = app.start()
    try:
        console.print(f"[bold]dentfuse demo[/bold]: data in {data_dir}; listening as {cfg.node.ae_title} on "
                      f"127.0.0.1:{port}")
        total = sum(len(f) for _l, f in groups)
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("C-STORE " + ", ".join(label for label, _f in groups), total=total)
            # CBCT A first (it is the original the re-sent copy duplicates), then one
            # association per series in parallel, as several modalities would send
            from concurrent.futures import ThreadPoolExecutor

            send_files(groups[0][1], "127.0.0.1", port, cfg.node.ae_title,
                       on_sent=lambda _p, _s: progress.advance(task))
            with ThreadPoolExecutor(max_workers=len(groups)) as ex:
                futures = [ex.submit(send_files, files, "127.0.0.1", port, cfg.node.ae_title,
                                     on_sent=lambda _p, _s: progress.advance(task)) for _label, files in groups[1:]]
                for f in futures:
                    f.result()
            timings["send_s"] = time.monotonic() - t0
            progress.update(task, description=f"sent {total} instances")
            console.print(f"waiting {quiet_period_s:g} s of quiet before a series counts as complete "
                          "(the demo's quiet period; a clinic uses 60 s); 2 fusion worker processes; "
                          f"demo fee schedule {', '.join(DEMO_FEE_SCHEDULE)}")
            job_tasks: dict[int, Any] = {}
            wait = progress.add_task("series stability", total=None)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                for job in app.jobs.list(limit=100):
                    if job.job_id not in job_tasks:
                        job_tasks[job.job_id] = progress.add_task(
                            f"fusion {job.payload.get('rule')} {job.payload.get('fusion_id')}", total=1.0)
                    done = job.state in ("done", "failed", "needs_review")
                    progress.update(job_tasks[job.job_id], completed=1.0 if done else job.progress,
                                    description=f"fusion {job.payload.get('rule')} {job.payload.get('fusion_id')}: "
                                                f"{job.state if done else job.stage}")
                if app.idle():
                    break
                time.sleep(0.1)
            else:
                raise click.ClickException(f"the demo did not finish in {timeout_s:.0f} s; see `dentfuse status "
                                           f"--data-dir {data_dir}`")
            progress.update(wait, total=1, completed=1, description="every series stable and fused")
            timings["fused_s"] = time.monotonic() - t0
            doc = progress.add_task("documenting (demo rationale), exporting, delivering", total=None)
            for job in app.jobs.list(limit=1000):
                fid = job.payload.get("fusion_id")
                d = decision_or_none(app.billing, fid) if fid else None
                if d is not None and d.status == "needs_documentation":
                    app.document(fid, rationale=DEMO_RATIONALE, clinician=DEMO_CLINICIAN)
            app.billing.deliver_pending()
            progress.update(doc, total=1, completed=1)
        timings["total_s"] = time.monotonic() - t0
        received, fusions = summarise(app)
        paths = written_paths(app)
    finally:
        app.stop()
    return DemoRun(data_dir=data_dir, port=port, timings_s=timings, received=received, fusions=fusions, paths=paths)


def print_run(run: DemoRun, console: Console) -> None:
    t = Table(title="received over DICOM", title_justify="left")
    for c in ("patient", "modality", "kind", "instances", "series"):
        t.add_column(c, no_wrap=True)
    t.add_column("fusion input?")
    for r in run.received:
        t.add_row(r["patient_key"], r["modality"], r["kind"], str(r["instances"]),
                  short_uid(r["series_instance_uid"]), input_note(r["planner"]))
    console.print(t)

    console.print()
    console.print("[bold]fusions[/bold]")
    for f in run.fusions:
        verdict = f.get("verdict", f["job_state"] + (f": {f['error']}" if f["error"] else ""))
        console.print(f"  [bold]{f['fusion_id']}[/bold] {f['rule']}: {f['moving']} \u2192 {f['fixed']}  "
                      f"verdict [bold]{verdict}[/bold]")
        if f.get("quality"):
            q = Table(box=None, padding=(0, 1), show_edge=False)
            for c in ("    check", "measured", "threshold", ""):
                q.add_column(c, no_wrap=True)
            for c in f["quality"]:
                q.add_row(f"    {c['name']}", f"{c['value']:.4g}", f"{c['comparison']} {c['threshold']:.4g}",
                          "ok" if c["passed"] else "[red]FAIL[/red]")
            console.print(q)

    console.print()
    console.print("[bold]D0395 decisions[/bold]")
    for f in run.fusions:
        if "status" not in f:
            continue
        console.print(f"  [bold]{f['fusion_id']}[/bold]: code {f.get('code') or 'none'}, "
                      f"status [bold]{f['status']}[/bold], report {f.get('report_id') or '-'}, "
                      f"companions suggested: {', '.join(f['companions']) or '-'}")
        for reason in f["reasons"]:
            console.print(f"    - {reason}")
    console.print()
    console.print(f"finished in {run.timings_s.get('total_s', 0):.1f} s "
                  f"(sent in {run.timings_s.get('send_s', 0):.1f} s, fused by {run.timings_s.get('fused_s', 0):.1f} s)")
    console.print("[bold]written:[/bold]")
    for k, v in run.paths.items():
        if isinstance(v, list):
            console.print(f"  {k}:")
            for p in v:
                console.print(f"    {p}", overflow="ignore", crop=False, soft_wrap=True)
        else:
            console.print(f"  {k}: {v}", overflow="ignore", crop=False, soft_wrap=True)
    console.print(f"next: dentfuse status --data-dir {run.data_dir}\n"
                  f"      dentfuse events --data-dir {run.data_dir}\n"
                  f"      dentfuse ledger verify --data-dir {run.data_dir}", soft_wrap=True)


@click.command("demo")
@common_options
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A synthetic set made by test_volumes/generate.py (default: the bundled test_volumes/small).")
def demo(cfg_opts: dict[str, Any], as_json: bool, source: Path | None) -> None:
    """Run the whole workflow on the bundled synthetic patient (no configuration needed)."""
    data_dir = cfg_opts.get("flags", {}).get("data_dir")
    if data_dir is None:
        data_dir = Path.cwd() / f"dentfuse-demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    data_dir = Path(data_dir).resolve()
    if data_dir.exists() and any(data_dir.iterdir()):
        raise click.ClickException(f"{data_dir} is not empty; the demo needs a fresh data directory "
                                   "(omit --data-dir for a new one)")
    console = Console(stderr=as_json)
    run = run_demo(data_dir, source=source, console=Console(stderr=True), config_file=cfg_opts.get("config_file"))
    if as_json:
        emit_json({"data_dir": str(run.data_dir), "port": run.port, "timings_s": run.timings_s,
                   "received": run.received, "fusions": run.fusions, "paths": run.paths})
    else:
        print_run(run, console)
