"""``dentfuse ledger verify|show``, ``dentfuse events``, ``dentfuse document`` and ``dentfuse review``."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline.cli_common import build_config, common_options, emit_json

log = logging.getLogger(__name__)


def _open_ledger(data_dir: Path) -> Any:
    from billing_hooks.ledger import Ledger
    from billing_hooks.service import ledger_path

    path = ledger_path(data_dir)
    if not path.is_file():
        raise click.ClickException(f"no ledger at {path}; check --data-dir (nothing has been recorded there yet)")
    return Ledger(path, base_dir=Path(data_dir))


def _require_decided(data_dir: Path, fusion_id: str) -> None:
    """Stop with a clear error unless ``fusion_id`` has a decision in the ledger."""
    led = _open_ledger(data_dir)
    try:
        known = bool(led.entries(fusion_id=fusion_id, kind="decision"))
    finally:
        led.close()
    if not known:
        raise click.ClickException(f"fusion {fusion_id!r} is not in the ledger of {data_dir}; see `dentfuse events`")


@click.group()
def ledger() -> None:
    """The tamper-evident provenance ledger (fusions, decisions, documentation, exports, deliveries)."""


@ledger.command("verify")
@common_options
@click.option("--no-files", is_flag=True, help="Check the hash chain only, not the referenced files.")
def verify(cfg_opts: dict[str, Any], as_json: bool, no_files: bool) -> None:
    """Re-compute the hash chain and every referenced file's SHA-256; exit 1 at the first
    broken entry."""
    cfg = build_config(cfg_opts)
    led = _open_ledger(cfg.data_dir)
    try:
        report = led.verify(check_files=not no_files)
    finally:
        led.close()
    first = report.first_broken
    if as_json:
        emit_json({"ok": report.ok, "entries": report.entries, "files_checked": report.files_checked,
                   "first_broken": None if first is None else {"seq": first.seq, "problem": first.what},
                   "problems": [{"seq": p.seq, "problem": p.what} for p in report.problems]})
    elif report.ok:
        click.echo(f"ledger OK: {report.entries} entries, {report.files_checked} files verified")
    else:
        click.echo(f"ledger BROKEN at entry {first.seq}: {first.what}", err=True)  # type: ignore[union-attr]
        for p in report.problems[1:]:
            click.echo(f"  also entry {p.seq}: {p.what}", err=True)
    if not report.ok:
        sys.exit(1)


@ledger.command("show")
@common_options
@click.argument("seq", type=int)
def show(cfg_opts: dict[str, Any], as_json: bool, seq: int) -> None:
    """Print one ledger entry in full."""
    cfg = build_config(cfg_opts)
    led = _open_ledger(cfg.data_dir)
    try:
        rows = led.query("SELECT entry, hash FROM ledger WHERE seq = ?", (seq,))
        row = rows[0] if rows else None
    finally:
        led.close()
    if row is None:
        raise click.ClickException(f"no ledger entry {seq}")
    entry = json.loads(row[0])
    entry["hash"] = row[1]
    emit_json(entry)


def _summary(kind: str, ev: dict[str, Any]) -> str:
    if kind == "decision":
        failed = [r["rule_id"] for r in ev.get("rules", []) if not r.get("passed")]
        return f"{ev.get('status')} {ev.get('code') or '-'}" + (f" (failed: {', '.join(failed)})" if failed else "")
    if kind == "fusion_recorded":
        r = ev.get("result", {})
        return f"{r.get('method')} {r.get('verdict')}, {len(r.get('inputs', []))} inputs, operator {ev.get('operator') or '-'}"
    if kind == "documentation":
        return f"rationale by {ev.get('clinician')}"
    if kind == "review":
        return f"registration {'accepted' if ev.get('accepted') else 'rejected'} by {ev.get('reviewer')}"
    if kind == "report_attached":
        return f"report {ev.get('report_id')}" + (" (after export)" if ev.get("after_export") else "")
    if kind == "exported":
        return f"claim {ev.get('claim_id')} {ev.get('code')} key {ev.get('idempotency_key')}"
    if kind == "delivered":
        return f"{ev.get('artifact')} to {ev.get('destination')} (attempt {ev.get('attempt')})"
    if kind in ("delivery_failed", "dead_letter", "export_blocked"):
        return str(ev.get("reason", ""))
    if kind == "duplicate_delivery":
        return "same fusion delivered again" + ("" if ev.get("same_content") else " (content differs)")
    return ""


def _parse_since(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a date or date-time (e.g. 2026-11-26 or 2026-11-26T09:00Z)")
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


@click.command()
@common_options
@click.option("--fusion-id", default=None, help="Only entries of this fusion.")
@click.option("--kind", default=None, help="Only entries of this kind (fusion_recorded, decision, documentation, "
                                           "report_attached, exported, delivered, delivery_failed, dead_letter, ...).")
@click.option("--since", default=None, help="Only entries recorded at or after this date/time (UTC).")
@click.option("--patient", default=None, help="Only entries of this patient key (ID or ID^ISSUER).")
def events(cfg_opts: dict[str, Any], as_json: bool, fusion_id: str | None, kind: str | None, since: str | None,
           patient: str | None) -> None:
    """List ledger entries, oldest first."""
    cfg = build_config(cfg_opts)
    since_dt = _parse_since(since)
    led = _open_ledger(cfg.data_dir)
    try:
        entries = led.entries(fusion_id=fusion_id, kind=kind, patient_key=patient, since=since_dt)
    finally:
        led.close()
    if as_json:
        emit_json([e.to_dict() for e in entries])
        return
    table = Table(title=f"dentfuse ledger ({len(entries)} entries)")
    table.add_column("seq", no_wrap=True, justify="right", min_width=len(str(entries[-1].seq)) if entries else 3)
    table.add_column("recorded (UTC)", no_wrap=True, min_width=19)
    table.add_column("kind", no_wrap=True, min_width=max((len(e.kind) for e in entries), default=4))
    table.add_column("fusion", no_wrap=True, min_width=max((len(e.fusion_id) for e in entries), default=6))
    table.add_column("summary", overflow="fold")
    for e in entries:  # the patient key is in --json and filterable with --patient
        table.add_row(str(e.seq), e.recorded_at[:19].replace("T", " "), e.kind, e.fusion_id,
                      _summary(e.kind, dict(e.event)))
    Console().print(table)


@click.command()
@common_options
@click.argument("fusion_id")
@click.option("--rationale", required=True, help="Why the fusion was clinically necessary (medical necessity).")
@click.option("--clinician", required=True, help="Name of the clinician documenting it.")
def document(cfg_opts: dict[str, Any], as_json: bool, fusion_id: str, rationale: str, clinician: str) -> None:
    """Attach the medical-necessity note to a fusion (rule 8); ledgered. When the fusion is
    otherwise eligible, its report is re-issued and the claim exported."""
    from billing_hooks.errors import BillingError

    cfg = build_config(cfg_opts)
    _require_decided(cfg.data_dir, fusion_id)
    try:
        from pipeline.bootstrap import document_fusion, fusions_dir
    except ImportError:  # billing alone: record the documentation without the report follow-up
        document_fusion = None  # type: ignore[assignment]
    else:
        if not (fusions_dir(cfg.data_dir) / fusion_id / "result.json").is_file():
            document_fusion = None  # type: ignore[assignment]  # no fusion folder: nothing to re-report
    try:
        if document_fusion is not None:
            decision = document_fusion(cfg, fusion_id, rationale, clinician)
        else:
            from billing_hooks.service import BillingHook

            with BillingHook.from_config(cfg) as hook:
                decision = hook.document(fusion_id, rationale=rationale, clinician=clinician)
    except (BillingError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json(decision.to_dict())
        return
    click.echo(f"fusion {fusion_id}: {decision.status.replace('_', ' ')} {decision.code or ''}".rstrip())
    for r in decision.reasons:
        click.echo(f"  - {r}")


@click.command()
@common_options
@click.argument("fusion_id")
@click.option("--accept", "verdict", flag_value="accept", help="The registration is correct (QA pictures checked).")
@click.option("--reject", "verdict", flag_value="reject", help="The registration is wrong: never bill this fusion.")
@click.option("--reviewer", required=True, help="Name of the person who reviewed the registration.")
@click.option("--note", required=True, help="What the review found, e.g. which QA pictures were checked.")
def review(cfg_opts: dict[str, Any], as_json: bool, fusion_id: str, verdict: str | None, reviewer: str,
           note: str) -> None:
    """Review a fusion whose registration was flagged (needs review): --accept lets it go
    on to documentation and billing and queues its outputs for the PACS; --reject records
    that it must never be billed. Ledgered; the report is re-issued."""
    from billing_hooks.errors import BillingError

    if verdict is None:
        raise click.UsageError("say --accept or --reject")
    cfg = build_config(cfg_opts)
    _require_decided(cfg.data_dir, fusion_id)
    from pipeline.bootstrap import fusions_dir, review_fusion

    if not (fusions_dir(cfg.data_dir) / fusion_id / "result.json").is_file():
        raise click.ClickException(f"fusion {fusion_id!r} has no folder {fusions_dir(cfg.data_dir) / fusion_id} "
                                   "with result.json; review it on the data directory that computed it")
    try:
        decision, queued = review_fusion(cfg, fusion_id, accepted=verdict == "accept", reviewer=reviewer, note=note)
    except (BillingError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        emit_json({**decision.to_dict(), "outputs_queued_for_pacs": queued})
        return
    click.echo(f"fusion {fusion_id}: registration {'accepted' if verdict == 'accept' else 'rejected'} by "
               f"{reviewer.strip()}; now {decision.status.replace('_', ' ')} {decision.code or ''}".rstrip())
    for r in decision.reasons:
        click.echo(f"  - {r}")
    if queued:
        click.echo(f"  {queued} output instance(s) queued for the PACS")
