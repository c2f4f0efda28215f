"""``dentfuse node``: what the node holds, and talking to the PACS.

- ``node ls``: patients, studies or series in the index (kind, modality, counts, sizes,
  first/last received);
- ``node forward``: queue files or indexed series for a configured PACS destination and
  deliver them (the same persistent queue the serve command runs);
- ``node query``: C-FIND a PACS (studies of a patient, series of a study, prior 3D series);
- ``node retrieve``: C-GET or C-MOVE series into our store and index.

A PACS is named by its configured destination name (``[pacs] destinations``) or written
inline as ``AETITLE@host:port``.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import click
from rich.console import Console
from rich.table import Table

from pipeline.cli_common import build_config, common_options, emit_json
from pipeline.bootstrap import build_forward_queue, scu_timeouts, scu_tls
from pipeline.config import Config

INDEX_DB = "index.sqlite"


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _when(iso: str) -> str:
    """``2026-11-26T20:57:21.672989+00:00`` -> ``2026-11-26 20:57:21`` (UTC)."""
    return iso.replace("T", " ")[:19] if iso else ""


def _print_table(title: str, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    """A table; UID columns fold, the others stay on one line. Piped output is not
    squeezed to 80 columns."""
    table = Table(title=title)
    for c in columns:
        uid_like = c in ("study", "series", "sop instance", "last error") or c.endswith("uid")
        table.add_column(c, overflow="fold" if uid_like else "ellipsis", no_wrap=not uid_like)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    console = Console()
    if not console.is_terminal:
        console = Console(width=250)
    console.print(table)


def _destination(cfg: Config, text: str) -> Any:
    from dicom_node.settings import PacsDestination

    for d in cfg.pacs.destinations:
        if d.name == text:
            return d
    m = re.fullmatch(r"([^@]{1,16})@([\w.:-]+?):(\d{1,5})", text.strip())
    if m:
        return PacsDestination(name=f"{m[1]}@{m[2]}:{m[3]}", ae_title=m[1], host=m[2], port=int(m[3]))
    known = ", ".join(d.name for d in cfg.pacs.destinations) or "none configured"
    raise click.BadParameter(
        f"{text!r} is neither a configured PACS destination ({known}) nor AETITLE@host:port",
        param_hint="PACS",
    )


def _index(cfg: Config) -> Any:
    from dicom_node.index import InstanceIndex

    db = cfg.data_dir / INDEX_DB
    if not db.is_file():
        raise click.ClickException(
            f"no index at {db}: nothing has been received into this data directory yet "
            "(run dentfuse serve or dentfuse import, or pass --data-dir)"
        )
    return InstanceIndex(db)


@click.group()
def node() -> None:
    """What the DICOM node holds, and talking to the PACS."""


# -- ls ----------------------------------------------------------------------------------
@node.command("ls")
@click.option("--level", type=click.Choice(["patients", "studies", "series"]), default="series",
              show_default=True, help="What to list.")
@click.option("--patient", "patient_key", default=None, help="Only this patient key (PatientID or ID^Issuer).")
@click.option("--study", "study_uid", default=None, help="Only series of this study.")
@common_options
def ls_cmd(cfg_opts: dict[str, Any], as_json: bool, level: str, patient_key: str | None,
           study_uid: str | None) -> None:
    """List patients, studies or series in the index (series: their study with --json or
    --level studies)."""
    cfg = build_config(cfg_opts)
    index = _index(cfg)
    try:
        if level == "patients":
            pats = [p for p in index.patients() if patient_key is None or p.patient_key == patient_key]
            if as_json:
                emit_json([p.__dict__ for p in pats])
                return
            _print_table(f"patients in {cfg.data_dir}",
                         ["patient", "studies", "instances", "first received", "last received"],
                         [(p.patient_key, p.study_count, p.instance_count, _when(p.first_received_at),
                           _when(p.last_received_at)) for p in pats])
        elif level == "studies":
            studies = index.studies(patient_key)
            if as_json:
                emit_json([s.__dict__ for s in studies])
                return
            _print_table(f"studies in {cfg.data_dir}",
                         ["patient", "study", "series", "instances", "size", "first received", "last received"],
                         [(s.patient_key, s.study_instance_uid, s.series_count, s.instance_count,
                           _human_size(s.size_bytes), _when(s.first_received_at), _when(s.last_received_at))
                          for s in studies])
        else:
            series = index.series(study_instance_uid=study_uid, patient_key=None if study_uid else patient_key)
            if patient_key and study_uid:
                series = [s for s in series if s.patient_key == patient_key]
            if as_json:
                emit_json([s.__dict__ for s in series])
                return
            _print_table(f"series in {cfg.data_dir}",
                         ["patient", "series", "kind", "modality", "instances", "size",
                          "first received", "last received"],
                         [(s.patient_key, s.series_instance_uid, s.kind, s.modality,
                           s.instance_count, _human_size(s.size_bytes), _when(s.first_received_at),
                           _when(s.last_received_at)) for s in series])
    finally:
        index.close()


# -- forward -------------------------------------------------------------------------------
def _dicom_files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            out.append(p)
    return out


@node.command("forward")
@click.argument("destination")
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--series", "series_uids", multiple=True, help="Queue every instance of this indexed series.")
@click.option("--study", "study_uids", multiple=True, help="Queue every instance of this indexed study.")
@click.option("--retry-dead", is_flag=True, help="Give dead jobs for this destination a fresh attempt budget.")
@click.option("--no-run", is_flag=True, help="Only queue; the serve command's queue thread delivers.")
@click.option("--wait", "wait_s", type=float, default=0.0, show_default=True,
              help="Keep retrying due jobs for up to this many seconds (backoff applies).")
@common_options
def forward_cmd(cfg_opts: dict[str, Any], as_json: bool, destination: str, paths: tuple[Path, ...],
                series_uids: tuple[str, ...], study_uids: tuple[str, ...], retry_dead: bool, no_run: bool,
                wait_s: float) -> None:
    """Queue files (or indexed series/studies) for a configured PACS DESTINATION and deliver them.

    Exits with status 1 when queued jobs remain undelivered (pending or dead; with
    --no-run only dead ones count).
    """
    from dicom_node.audit import AuditTrail
    from dicom_node.forward import ForwardError

    cfg = build_config(cfg_opts)
    if destination not in {d.name for d in cfg.pacs.destinations}:
        known = ", ".join(d.name for d in cfg.pacs.destinations) or "none configured"
        raise click.BadParameter(f"unknown destination {destination!r} (configured: {known}); "
                                 "the queue only sends to configured destinations", param_hint="DESTINATION")
    files = _dicom_files(paths)
    if series_uids or study_uids:
        index = _index(cfg)
        try:
            for uid in series_uids:
                inst = index.instances(series_instance_uid=uid)
                if not inst:
                    raise click.ClickException(f"series {uid} is not in the index of {cfg.data_dir}")
                files.extend(Path(i.path) for i in inst)
            for uid in study_uids:
                inst = index.instances(study_instance_uid=uid)
                if not inst:
                    raise click.ClickException(f"study {uid} is not in the index of {cfg.data_dir}")
                files.extend(Path(i.path) for i in inst)
        finally:
            index.close()
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    trail = AuditTrail(cfg.data_dir / INDEX_DB)
    try:
        queue = build_forward_queue(cfg, trail)
    except ForwardError as exc:
        trail.close()
        raise click.ClickException(str(exc)) from None
    try:
        job_ids: list[int] = []
        for f in files:
            try:
                job_ids.append(queue.enqueue(f, destination))
            except ForwardError as exc:
                raise click.ClickException(str(exc)) from None
        revived = queue.retry_dead(destination) if retry_dead else 0
        delivered = attempted = 0
        if not no_run:
            deadline = time.monotonic() + max(0.0, wait_s)
            while True:
                report = queue.run_once()
                delivered += report.delivered
                attempted += report.attempted
                counts = queue.counts(destination)
                if counts["pending"] == 0 or time.monotonic() >= deadline:
                    break
                nxt = queue.next_due_at()
                pause = 0.5 if nxt is None else max(0.05, nxt - time.time())
                time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        counts = queue.counts(destination)
        jobs = [queue.job(j) for j in sorted(set(job_ids))]
        failed = [j for j in jobs if j.state != "done"]
        result = {"destination": destination, "queued": len(set(job_ids)), "revived": revived,
                  "attempted": attempted, "delivered": delivered, "counts": counts,
                  "undelivered": [{"job": j.id, "sop_instance_uid": j.sop_instance_uid, "state": j.state,
                                   "attempts": j.attempts, "last_error": j.last_error} for j in failed]}
        if as_json:
            emit_json(result)
        else:
            click.echo(f"{destination}: queued {result['queued']}, delivered {delivered} now; "
                       f"queue: {counts['pending']} pending, {counts['done']} done, {counts['dead']} dead")
            for j in failed[:20]:
                click.echo(f"  job {j.id} {j.state} after {j.attempts} attempt(s): {j.last_error}", err=True)
        if no_run:
            if any(j.state == "dead" for j in failed):
                raise SystemExit(1)
        elif failed or (not job_ids and counts["pending"] + counts["dead"]):
            raise SystemExit(1)
    finally:
        queue.close()
        trail.close()


@node.command("queue")
@click.option("--state", type=click.Choice(["pending", "done", "dead"]), default=None,
              help="Only jobs in this state (default: pending and dead).")
@click.option("--destination", default=None, help="Only jobs for this destination.")
@click.option("--limit", type=int, default=200, show_default=True)
@common_options
def queue_cmd(cfg_opts: dict[str, Any], as_json: bool, state: str | None, destination: str | None,
              limit: int) -> None:
    """Show the PACS forwarding queue: counts, and the jobs still pending or dead with
    their last error (revive dead ones with ``node forward DEST --retry-dead``)."""
    from dicom_node.forward import DB_NAME, ForwardError, ForwardQueue

    cfg = build_config(cfg_opts)
    if not (cfg.data_dir / DB_NAME).is_file():
        raise click.ClickException(f"no forwarding queue in {cfg.data_dir} (nothing was ever queued)")
    try:
        queue = ForwardQueue(cfg.data_dir, cfg.pacs, cfg.node.ae_title)
    except ForwardError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        counts = queue.counts(destination)
        states = [state] if state else ["pending", "dead"]
        jobs = [j for s in states for j in queue.jobs(state=s, destination=destination, limit=limit)]
    finally:
        queue.close()
    if as_json:
        emit_json({"counts": counts, "jobs": [j.to_dict() for j in jobs]})
        return
    click.echo(", ".join(f"{k} {v}" for k, v in counts.items()))
    if jobs:
        _print_table("forwarding jobs", ["job", "destination", "state", "attempts", "next attempt", "sop instance",
                                         "last error"],
                     [(j.id, j.destination, j.state, j.attempts,
                       _when(datetime.fromtimestamp(j.next_attempt_at, timezone.utc).isoformat())
                       if j.state == "pending" else "", j.sop_instance_uid, j.last_error or "") for j in jobs])


# -- query -------------------------------------------------------------------------------
@node.command("query")
@click.argument("pacs")
@click.option("--patient-id", required=True,
              help="PatientID to query, or a patient key ID^ISSUER (required: no whole-PACS queries).")
@click.option("--study", "study_uid", default=None, help="List the series of this study.")
@click.option("--priors", is_flag=True, help="List the patient's 3D series (CT, MR, 3D classes).")
@click.option("--model", type=click.Choice(["study", "patient"]), default="study", show_default=True,
              help="Query/retrieve information model (Study Root or Patient Root).")
@common_options
def query_cmd(cfg_opts: dict[str, Any], as_json: bool, pacs: str, patient_id: str, study_uid: str | None,
              priors: bool, model: str) -> None:
    """C-FIND a PACS: studies of a patient, series of a study, or prior 3D series."""
    from dicom_node.qr import PacsClient, split_patient_key
    from dicom_node.scu import PacsError

    cfg = build_config(cfg_opts)
    client = PacsClient(cfg.node.ae_title, _destination(cfg, pacs), model=model,
                        timeouts=scu_timeouts(cfg), tls=scu_tls(cfg))
    patient_id, issuer = split_patient_key(patient_id)
    try:
        if priors or study_uid:
            series = (client.find_prior_3d_series(patient_id, issuer_of_patient_id=issuer) if priors
                      else client.find_series(study_uid or "", patient_id=patient_id))
            if as_json:
                emit_json([s.to_dict() for s in series])
                return
            _print_table(f"series on {pacs}", ["study", "series", "modality", "3D", "instances", "description"],
                         [(s.study_instance_uid, s.series_instance_uid, s.modality, "yes" if s.is_3d else "no",
                           s.number_of_instances if s.number_of_instances is not None else "?",
                           s.series_description) for s in series])
            return
        # a bare ID lists every issuer's studies (issuer shown); ID^ISSUER only that issuer's
        studies = client.find_studies(patient_id, issuer_of_patient_id=issuer or None)
        if as_json:
            emit_json([s.to_dict() for s in studies])
            return
        _print_table(f"studies of {patient_id} on {pacs}",
                     ["study", "issuer", "date", "modalities", "series", "instances", "description"],
                     [(s.study_instance_uid, s.issuer_of_patient_id, s.study_date, "/".join(s.modalities_in_study),
                       s.number_of_series if s.number_of_series is not None else "?",
                       s.number_of_instances if s.number_of_instances is not None else "?",
                       s.study_description) for s in studies])
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None


# -- retrieve ------------------------------------------------------------------------------
@node.command("retrieve")
@click.argument("pacs")
@click.option("--study", "study_uid", default=None, help="Study of the series to retrieve.")
@click.option("--series", "series_uids", multiple=True, help="Series to retrieve (repeatable).")
@click.option("--priors", is_flag=True, help="Retrieve every prior 3D series of --patient-id.")
@click.option("--patient-id", default=None,
              help="PatientID or ID^ISSUER (needed with --priors and the patient model).")
@click.option("--method", type=click.Choice(["get", "move"]), default="get", show_default=True,
              help="C-GET (on our association) or C-MOVE (to our listener: dentfuse serve must run).")
@click.option("--move-destination", default=None,
              help="AE title the PACS sends to with C-MOVE (default: our node.ae_title).")
@click.option("--model", type=click.Choice(["study", "patient"]), default="study", show_default=True)
@common_options
def retrieve_cmd(cfg_opts: dict[str, Any], as_json: bool, pacs: str, study_uid: str | None,
                 series_uids: tuple[str, ...], priors: bool, patient_id: str | None, method: str,
                 move_destination: str | None, model: str) -> None:
    """Retrieve series from a PACS into our store and index (C-GET or C-MOVE).

    C-MOVE needs the PACS to know our AE title, host and port, and our listener
    (dentfuse serve) to accept the PACS's AE title (node.allowed_calling_ae_titles).
    Exits with status 1 when an instance the PACS listed was not received.
    """
    from dicom_node.audit import AuditTrail
    from dicom_node.index import InstanceIndex
    from dicom_node.qr import PacsClient, RetrievedStoreHandler, split_patient_key
    from dicom_node.scu import PacsError
    from dicom_node.storage import InstanceStore

    cfg = build_config(cfg_opts)
    if priors and not patient_id:
        raise click.UsageError("--priors needs --patient-id")
    issuer = ""
    if patient_id:
        patient_id, issuer = split_patient_key(patient_id)
    if not priors and not (study_uid and series_uids):
        raise click.UsageError("give --study and --series, or --priors --patient-id")
    client = PacsClient(cfg.node.ae_title, _destination(cfg, pacs), model=model,
                        timeouts=scu_timeouts(cfg), tls=scu_tls(cfg))
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    index = InstanceIndex(cfg.data_dir / INDEX_DB)
    trail = AuditTrail(cfg.data_dir / INDEX_DB)
    results = []
    try:
        if priors:
            assert patient_id is not None
            targets = [(s.study_instance_uid, s.series_instance_uid)
                       for s in client.find_prior_3d_series(patient_id, issuer_of_patient_id=issuer)]
        else:
            assert study_uid is not None
            targets = [(study_uid, s) for s in series_uids]

        def have(uid: str) -> bool:
            return index.get(uid) is not None

        for study, series in targets:
            if method == "move":
                res = client.move_series(study, series, move_destination or cfg.node.ae_title,
                                         have_instance=have, patient_id=patient_id)
            else:
                store = InstanceStore(cfg.data_dir)
                handler = RetrievedStoreHandler(store, index, duplicate_policy=cfg.node.duplicate_policy,
                                                audit=trail)
                res = client.get_series(study, series, handler, have_instance=have, patient_id=patient_id)
            results.append(res)
    except PacsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        index.close()
        trail.close()
    if as_json:
        emit_json([r.to_dict() for r in results])
    else:
        _print_table(f"retrieved from {pacs} ({method.upper()})",
                     ["series", "status", "expected", "received", "missing", "failed"],
                     [(r.series_instance_uid, f"0x{r.status:04X}", len(r.expected), len(r.received),
                       len(r.missing), len(r.failed)) for r in results])
    if any(not r.ok for r in results):
        raise SystemExit(1)
