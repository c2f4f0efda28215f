"""``dentfuse import`` (files into the node's index) and ``dentfuse status``."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import click
from rich.console import Console
from rich.table import Table

from pipeline.bootstrap import is_dicom_file
from pipeline.cli_common import build_config, common_options, emit_json, input_note, short_uid
from pipeline.config import Config

log = logging.getLogger(__name__)

MESH_SUFFIXES = (".stl", ".ply", ".obj")


class ImportProblem(click.ClickException):
    """A file cannot be imported; the message names it and the remedy."""


# ------------------------------------------------------------------------------ import
@dataclass(frozen=True)
class MeshIdentity:
    patient_id: str
    issuer_of_patient_id: str = ""
    study_instance_uid: str = ""
    patient_name: str = ""
    study_date: str = ""
    manufacturer: str = ""
    source: str = "flags"


def mesh_identity(mesh: Path, patient_id: str | None, issuer: str | None, study_uid: str | None,
                  patient_name: str | None) -> MeshIdentity:
    """Patient and study of a scan file: command-line flags win, else a sidecar JSON
    (``upper.stl.json`` or ``upper.json`` next to the file) with ``patient_id``,
    ``issuer_of_patient_id``, ``study_instance_uid``, ``patient_name``, ``study_date``."""
    side: dict[str, Any] = {}
    used = ""
    for cand in (mesh.with_name(mesh.name + ".json"), mesh.with_suffix(".json")):
        if cand.is_file():
            try:
                side = json.loads(cand.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ImportProblem(f"{cand}: sidecar is not valid JSON ({exc}); fix it or pass --patient-id") from None
            if not isinstance(side, dict):
                raise ImportProblem(f"{cand}: sidecar must be a JSON object with patient_id, study_instance_uid")
            used = str(cand)
            break
    pid = patient_id or str(side.get("patient_id", "") or "")
    if not pid:
        raise ImportProblem(
            f"{mesh}: no patient for this scan; pass --patient-id (and --study-uid) or put a sidecar "
            f"{mesh.name}.json with patient_id and study_instance_uid next to it")
    return MeshIdentity(
        patient_id=pid,
        issuer_of_patient_id=issuer if issuer is not None else str(side.get("issuer_of_patient_id", "") or ""),
        study_instance_uid=study_uid or str(side.get("study_instance_uid", "") or ""),
        patient_name=patient_name if patient_name is not None else str(side.get("patient_name", "") or ""),
        study_date=str(side.get("study_date", "") or ""),
        manufacturer=str(side.get("manufacturer", "") or ""),
        source="flags" if patient_id else f"sidecar {used}",
    )


def wrap_mesh(mesh: Path, ident: MeshIdentity, out_dir: Path) -> Path:
    """Wrap an STL/PLY/OBJ scan into a DICOM Encapsulated STL file in ``out_dir`` (a new
    frame of reference: the scanner's own; the patient and study from ``ident``)."""
    from pydicom.uid import generate_uid

    from fusion.surface import load_scan
    from fusion.surface_outputs import write_encapsulated_stl

    scan = load_scan(mesh)
    ids = {"PatientID": ident.patient_id, "IssuerOfPatientID": ident.issuer_of_patient_id,
           "PatientName": ident.patient_name, "StudyInstanceUID": ident.study_instance_uid,
           "StudyDate": ident.study_date}
    out = write_encapsulated_stl(
        scan, out_dir / (mesh.stem + ".dcm"), frame_of_reference_uid=generate_uid(),
        patient_ids={k: v for k, v in ids.items() if v},
        series_description=f"intraoral scan imported from {mesh.name}"[:64],
        document_title=f"Intraoral scan {mesh.name}"[:64],
        manufacturer=ident.manufacturer or "unknown scanner (imported)", model_name="dentfuse import",
    )
    return Path(out.path)


def iter_inputs(paths: Iterable[Path]) -> Iterable[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            yield p
        else:
            raise ImportProblem(f"{p} does not exist")


def import_paths(cfg: Config, paths: list[Path], *, patient_id: str | None = None, issuer: str | None = None,
                 study_uid: str | None = None, patient_name: str | None = None,
                 calling_ae_title: str = "IMPORT") -> dict[str, Any]:
    """Import DICOM files and scan files into the data directory's store and index.

    Returns a summary: imported instances (SOP UID, series, kind), skipped files with the reason.
    """
    from dicom_node.errors import DicomNodeError
    from dicom_node.index import InstanceIndex
    from dicom_node.ingest import ingest_file
    from dicom_node.server import INDEX_FILE
    from dicom_node.storage import InstanceStore

    files = list(iter_inputs(paths))
    # every scan needs its patient: check them all before importing anything
    identities = {f: mesh_identity(f, patient_id, issuer, study_uid, patient_name)
                  for f in files if f.suffix.lower() in MESH_SUFFIXES}
    data_dir = Path(cfg.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    store = InstanceStore(data_dir)
    index = InstanceIndex(data_dir / INDEX_FILE)
    imported: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="dentfuse-import-") as tmp:
            for f in files:
                src = f
                if f in identities:
                    src = wrap_mesh(f, identities[f], Path(tmp))
                elif f.suffix.lower() == ".json" or not is_dicom_file(f):
                    if f.suffix.lower() != ".json":
                        skipped.append({"path": str(f), "reason": "neither a DICOM Part 10 file nor a STL/PLY/OBJ scan"})
                    continue
                try:
                    rec = ingest_file(src, store, index, calling_ae_title=calling_ae_title,
                                      duplicate_policy=cfg.node.duplicate_policy)
                except DicomNodeError as exc:
                    skipped.append({"path": str(f), "reason": str(exc)})
                    continue
                imported.append({"path": str(f), "sop_instance_uid": rec.sop_instance_uid,
                                 "series_instance_uid": rec.series_instance_uid, "patient_key": rec.patient_key,
                                 "kind": rec.kind, "modality": rec.modality, "stored": rec.path})
    finally:
        index.close()
    series = sorted({(i["patient_key"], i["series_instance_uid"], i["kind"], i["modality"]) for i in imported})
    return {"imported": imported, "skipped": skipped,
            "series": [{"patient_key": p, "series_instance_uid": s, "kind": k, "modality": m} for p, s, k, m in series]}


@click.command("import")
@common_options
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--patient-id", default=None, help="Patient ID for STL/PLY/OBJ scans (else from a sidecar JSON).")
@click.option("--issuer", default=None, help="Issuer of Patient ID for the scans.")
@click.option("--study-uid", default=None, help="Study Instance UID for the scans (default: a new study).")
@click.option("--patient-name", default=None, help="Patient name to write into the wrapped scan (optional).")
def import_cmd(cfg_opts: dict[str, Any], as_json: bool, paths: tuple[Path, ...], patient_id: str | None,
               issuer: str | None, study_uid: str | None, patient_name: str | None) -> None:
    """Import folders of DICOM files and STL/PLY/OBJ scans into the index, as if received.

    A running `dentfuse serve` on the same data directory plans fusions for them once
    their series are quiet (stability.quiet_period_s)."""
    cfg = build_config(cfg_opts)
    summary = import_paths(cfg, list(paths), patient_id=patient_id, issuer=issuer, study_uid=study_uid,
                           patient_name=patient_name)
    if as_json:
        emit_json(summary)
    else:
        console = Console()
        t = Table(title=f"imported into {cfg.data_dir}")
        for col in ("patient", "series UID", "kind", "modality", "instances"):
            t.add_column(col)
        for s in summary["series"]:
            n = sum(1 for i in summary["imported"] if i["series_instance_uid"] == s["series_instance_uid"])
            t.add_row(s["patient_key"], s["series_instance_uid"], s["kind"], s["modality"], str(n))
        console.print(t)
        for sk in summary["skipped"]:
            console.print(f"[yellow]skipped[/yellow] {sk['path']}: {sk['reason']}")
    if summary["skipped"] and not summary["imported"]:
        raise SystemExit(1)


# ------------------------------------------------------------------------------ status
def _ts(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds") if t else ""


def collect_status(cfg: Config, limit: int = 20) -> dict[str, Any]:
    """Everything ``dentfuse status`` shows, as plain data (reads the data directory only)."""
    data_dir = Path(cfg.data_dir)
    out: dict[str, Any] = {"data_dir": str(data_dir)}
    # node
    from dicom_node.server import INDEX_FILE

    idx_path = data_dir / INDEX_FILE
    series_rows: list[dict[str, Any]] = []
    if idx_path.is_file():
        from dicom_node.index import InstanceIndex
        from dicom_node.stability import StabilityMonitor

        from pipeline.inventory import IndexInventory
        from pipeline.planner import explain_series

        index = InstanceIndex(idx_path)
        monitor = StabilityMonitor(idx_path, cfg.stability)
        try:
            inventory = IndexInventory(index, monitor, require_stable=False)
            why: dict[str, str] = {}
            for pk in sorted({s.patient_key for s in index.series()}):
                why.update(explain_series(pk, inventory.stable_series(pk)))
            for s in index.series():
                series_rows.append({"patient_key": s.patient_key, "series_instance_uid": s.series_instance_uid,
                                    "modality": s.modality, "kind": s.kind, "instances": s.instance_count,
                                    "size_bytes": s.size_bytes, "last_received_at": s.last_received_at,
                                    "stable": monitor.is_stable(s.series_instance_uid),
                                    "planner": why.get(s.series_instance_uid, "")})
            out["pending_stability_events"] = len(monitor.pending_events())
        finally:
            monitor.close()
            index.close()
    out["series"] = series_rows
    # jobs
    from pipeline.bootstrap import JOBS_FILE, open_job_queue

    jobs_rows: list[dict[str, Any]] = []
    counts = {}
    if (data_dir / JOBS_FILE).is_file():
        q = open_job_queue(cfg)
        counts = q.counts()
        for j in q.list(limit=limit):
            jobs_rows.append({"job_id": j.job_id, "fusion_id": j.payload.get("fusion_id", ""), "kind": j.kind,
                              "rule": j.payload.get("rule", ""), "patient_key": j.patient_key, "state": j.state,
                              "stage": j.stage, "progress": round(j.progress, 2), "attempts": j.attempts,
                              "max_attempts": j.max_attempts, "error": j.error,
                              "verdict": j.result.get("verdict", ""), "updated_at": _ts(j.updated_at),
                              "stages": [[s, _ts(t)] for s, t in j.stages]})
        q.close()
    out["jobs"] = {"counts": counts, "recent": jobs_rows}
    # fusions and billing
    out["fusions"] = []
    out["outbox"] = {}
    if (data_dir / "billing").is_dir():
        try:
            from pipeline.bootstrap import build_billing, decision_or_none

            billing = build_billing(cfg)
        except Exception as exc:  # billing not initialised for this data dir
            log.debug("billing not available: %s", exc)
            billing = None
        if billing is not None:
            try:
                for j in jobs_rows:
                    d = decision_or_none(billing, j["fusion_id"]) if j["fusion_id"] else None
                    if d is None:
                        continue
                    out["fusions"].append({"fusion_id": d.fusion_id, "patient_key": d.patient_key,
                                           "verdict": j["verdict"], "code": d.code, "status": d.status,
                                           "reasons": list(d.reasons), "report_id": d.report_id})
                outbox = getattr(billing, "outbox", None)
                if outbox is not None:
                    counts_ob: dict[str, int] = {}
                    for row in outbox.rows():
                        counts_ob[row.state] = counts_ob.get(row.state, 0) + 1
                    out["outbox"] = counts_ob
            finally:
                closer = getattr(billing, "close", None)
                if closer:
                    closer()
    # forwarding
    from dicom_node.forward import queue_counts

    out["forward"] = queue_counts(data_dir)
    return out


@click.command("status")
@common_options
@click.option("--limit", default=20, show_default=True, help="How many recent jobs to show.")
def status(cfg_opts: dict[str, Any], as_json: bool, limit: int) -> None:
    """Queues, jobs with their stages, recent fusions and decisions, outbox, forwarding."""
    cfg = build_config(cfg_opts)
    st = collect_status(cfg, limit=limit)
    if as_json:
        emit_json(st)
        return
    console = Console()
    exists = Path(st["data_dir"]).is_dir()
    console.print(f"data directory: {st['data_dir']}" + ("" if exists else " (does not exist: nothing received yet)"))
    t = Table(title="received series")
    t.add_column("patient", overflow="fold")
    for col in ("series", "kind", "modality", "instances", "stable"):
        t.add_column(col, no_wrap=True)
    t.add_column("fusion input?", overflow="fold")
    for s in st["series"]:
        t.add_row(s["patient_key"], short_uid(s["series_instance_uid"]), s["kind"], s["modality"],
                  str(s["instances"]), "yes" if s["stable"] else "waiting", input_note(s["planner"]))
    console.print(t)
    c = st["jobs"]["counts"]
    console.print("jobs: " + (", ".join(f"{k} {v}" for k, v in c.items()) if c else "none"))
    t = Table(title="fusion jobs")
    for col in ("job", "fusion", "rule", "state", "stage", "tries", "verdict"):
        t.add_column(col, no_wrap=True)
    t.add_column("error", overflow="fold")
    for j in st["jobs"]["recent"]:
        t.add_row(str(j["job_id"]), j["fusion_id"], j["rule"], j["state"],
                  j["stage"] + (f" {int(j['progress'] * 100)}%" if j["state"] == "running" else ""),
                  f"{j['attempts']}/{j['max_attempts']}", j["verdict"], j["error"][:160])
    console.print(t)
    if st["fusions"]:
        t = Table(title="D0395 decisions")
        for col in ("fusion", "code", "status", "report"):
            t.add_column(col, no_wrap=True)
        t.add_column("first reason", overflow="fold")
        for f in st["fusions"]:
            t.add_row(f["fusion_id"], f["code"] or "-", f["status"], f["report_id"] or "-",
                      (f["reasons"][0] if f["reasons"] else "")[:160])
        console.print(t)
    if st["outbox"]:
        console.print("claim outbox: " + ", ".join(f"{k} {v}" for k, v in st["outbox"].items()))
    console.print("PACS forwarding: " + ", ".join(f"{k} {v}" for k, v in st["forward"].items()))


# ------------------------------------------------------------------------------ plan
def plan_for_patient(cfg: Config, patient_key: str, *, include_unstable: bool = False) -> list[dict[str, Any]]:
    """Plan (enqueue) the fusions of one patient from the index, as the serving planner
    would; returns the planned jobs (new or already known). Idempotent."""
    from dicom_node.index import InstanceIndex
    from dicom_node.server import INDEX_FILE
    from dicom_node.stability import StabilityMonitor
    from pipeline.bootstrap import job_spec_for, open_job_queue
    from pipeline.inventory import IndexInventory
    from pipeline.planner import FusionPlanRules, plan_fusions

    idx_path = Path(cfg.data_dir) / INDEX_FILE
    if not idx_path.is_file():
        raise click.ClickException(f"{cfg.data_dir} has no index yet; receive or import the patient's series first")
    index = InstanceIndex(idx_path)
    monitor = StabilityMonitor(idx_path, cfg.stability)
    queue = open_job_queue(cfg)
    try:
        inventory = IndexInventory(index, monitor, require_stable=not include_unstable)
        series = inventory.stable_series(patient_key)
        if not series:
            known = sorted({s.patient_key for s in index.series()})
            raise click.ClickException(
                f"no {'' if include_unstable else 'stable '}series for patient {patient_key!r} in {cfg.data_dir}"
                f" (patients: {', '.join(known) or 'none'}); use ID^ISSUER as `dentfuse status` shows it"
                + ("" if include_unstable else ", or --include-unstable"))
        rules = FusionPlanRules.from_settings(cfg.fusion)
        out = []
        for plan in plan_fusions(patient_key, series, rules):
            job, created = queue.enqueue(job_spec_for(cfg, inventory, plan))
            out.append({"job_id": job.job_id, "fusion_id": plan.fusion_id, "rule": plan.rule, "state": job.state,
                        "created": created, "fixed": plan.fixed.series_instance_uid,
                        "moving": plan.moving.series_instance_uid})
        return out
    finally:
        queue.close()
        monitor.close()
        index.close()


def run_jobs(cfg: Config, job_ids: list[int], timeout_s: float = 3600.0,
             on_poll: Any = None) -> list[dict[str, Any]]:
    """Run the given jobs here (worker processes + decision, report, PACS queueing) and wait."""
    from pipeline.bootstrap import Finisher, build_billing, fusions_dir, open_job_queue
    from pipeline.worker import WorkerPool

    queue = open_job_queue(cfg)
    billing = build_billing(cfg)
    forward = None
    if cfg.pacs.destinations:
        from dicom_node.forward import ForwardQueue

        forward = ForwardQueue(cfg.data_dir, cfg.pacs, cfg.node.ae_title)
    pool = WorkerPool(queue, fusions_dir(Path(cfg.data_dir)), Finisher(cfg, billing, forward).finalize,
                      workers=cfg.fusion.workers, poll_s=0.2)
    pool.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            jobs = [queue.get(j) for j in job_ids]
            if on_poll is not None:
                on_poll([j for j in jobs if j is not None])
            if all(j is not None and j.state in ("done", "failed", "needs_review") for j in jobs):
                break
            time.sleep(0.2)
    finally:
        pool.stop()
        billing.close()
        if forward is not None:
            forward.close()
    res = []
    for j in job_ids:
        job = queue.get(j)
        if job is not None:
            res.append({"job_id": job.job_id, "fusion_id": job.payload.get("fusion_id"), "rule": job.payload.get("rule"),
                        "state": job.state, "verdict": job.result.get("verdict", ""), "error": job.error})
    queue.close()
    return res


@click.command("plan")
@common_options
@click.argument("patient")
@click.option("--run", "run_now", is_flag=True, help="Run the fusions here and wait (else a running `dentfuse serve` runs them).")
@click.option("--include-unstable", is_flag=True, help="Also use series still inside their quiet period.")
def plan(cfg_opts: dict[str, Any], as_json: bool, patient: str, run_now: bool, include_unstable: bool) -> None:
    """Plan the fusions of one PATIENT (ID or ID^ISSUER) from what the index holds.

    The same rules as `dentfuse serve` (fusion.plan_*); already planned pairs are not planned
    again. With --run, the fusions, decisions and reports are made in this process."""
    cfg = build_config(cfg_opts)
    planned = plan_for_patient(cfg, patient, include_unstable=include_unstable)
    ran: list[dict[str, Any]] = []
    if run_now and planned:
        if as_json:
            ran = run_jobs(cfg, [p["job_id"] for p in planned])
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True)) as progress:
                tasks = {p["job_id"]: progress.add_task(f"{p['rule']} {p['fusion_id']}", total=1.0) for p in planned}

                def show(jobs: list[Any]) -> None:
                    for j in jobs:
                        final = j.state in ("done", "failed", "needs_review")
                        progress.update(tasks[j.job_id], completed=1.0 if final else j.progress,
                                        description=f"{j.payload.get('rule')} {j.payload.get('fusion_id')}: "
                                                    f"{j.state if final else j.stage}")

                ran = run_jobs(cfg, [p["job_id"] for p in planned], on_poll=show)
    if as_json:
        emit_json({"planned": planned, "ran": ran})
        return
    console = Console()
    if not planned:
        console.print(f"nothing to fuse for {patient}: it needs two 3D inputs that a rule pairs "
                      "(CBCT + scan, CBCT + CBCT, CBCT + MR)")
        return
    decisions: dict[str, Any] = {}
    if ran:
        from pipeline.bootstrap import build_billing, decision_or_none

        billing = build_billing(cfg)
        try:
            decisions = {p["fusion_id"]: decision_or_none(billing, p["fusion_id"]) for p in planned}
        finally:
            billing.close()
    t = Table(title=f"fusions planned for {patient}")
    for col in ("job", "fusion", "rule", "new?", "state", "D0395 decision"):
        t.add_column(col, no_wrap=True)
    t.add_column("error", overflow="fold")
    states = {r["job_id"]: r for r in ran}
    for p in planned:
        r = states.get(p["job_id"])
        d = decisions.get(p["fusion_id"])
        t.add_row(str(p["job_id"]), p["fusion_id"], p["rule"], "yes" if p["created"] else "known",
                  (r["state"] + (f" {r['verdict']}" if r["verdict"] else "")) if r else p["state"],
                  f"{d.code or 'none'} {d.status}" if d is not None else "-", (r or {}).get("error", ""))
    console.print(t)
    if not run_now:
        console.print("queued: a running `dentfuse serve` on this data directory runs them (or add --run)")
