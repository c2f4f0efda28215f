"""The fusion report: a PDF (the claim attachment) and an HTML page per fusion.

Contents: patient and study ids (never names or birth dates), the inputs (modality,
dates, UIDs, content hashes), method and software versions, the quality metrics against
their thresholds, the QA pictures, the D0395 decision with every rule's outcome and
reason, the companion codes suggested, the clinical rationale once documented, and the
ledger entries of the fusion.

Versions: every report is ``<fusion_id>-R<n>``; a new version is written when something
it shows changes (documentation added), never overwriting an earlier one, because each
version's sha256 is in the ledger. The report id is the claim attachment control number
(X12 PWK06, FHIR DocumentReference identifier).
"""

from __future__ import annotations

import base64
import hashlib
import html
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from fusion.records import FusionResult

REPORT_ID_RE = re.compile(r"^(?P<fusion>[A-Za-z0-9._-]+)-R(?P<version>\d+)$")


@dataclass(frozen=True)
class LedgerRef:
    """A ledger entry the report cites."""

    seq: int
    kind: str
    hash: str
    at: str = ""


@dataclass(frozen=True)
class FusionReport:
    report_id: str  # also the claim attachment control number
    version: int
    pdf_path: Path
    html_path: Path
    pdf_sha256: str
    html_sha256: str


def report_id_for(fusion_id: str, version: int) -> str:
    return f"{fusion_id}-R{version}"


def existing_versions(report_dir: Path, fusion_id: str) -> list[int]:
    out = []
    if report_dir.is_dir():
        for p in report_dir.glob(f"{fusion_id}-R*.pdf"):
            m = REPORT_ID_RE.match(p.stem)
            if m and m["fusion"] == fusion_id:
                out.append(int(m["version"]))
    return sorted(out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fmt(v: Any, nd: int = 3) -> str:
    if isinstance(v, float):
        return f"{v:.{nd}f}" if abs(v) < 1e5 else f"{v:.3g}"
    return str(v)


def _date(d: str) -> str:
    d = (d or "").strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:8]}" if len(d) == 8 and d.isdigit() else (d or "unknown")


def _status_words(status: str) -> str:
    return {
        "not_eligible": "Not eligible",
        "needs_review": "Needs review",
        "needs_documentation": "Needs documentation (rationale missing)",
        "ready_to_bill": "Ready to bill",
        "exported": "Exported to the claim system",
    }.get(status, status)


def _sections(result: FusionResult, decision: Any | None, ledger: Sequence[LedgerRef],
              report_id: str, generated_at: str) -> dict[str, Any]:
    """The report's content as plain data, shared by the PDF and the HTML writer."""
    studies = sorted({i.study_instance_uid for i in result.inputs if i.study_instance_uid})
    header = [
        ("Report (attachment control number)", report_id),
        ("Fusion id", result.fusion_id),
        ("Patient id", result.patient_key),
        ("Study UID(s)", ", ".join(studies) or "-"),
        ("Purpose", result.purpose),
        ("Verdict", f"{result.verdict}" + (f" - {'; '.join(result.reasons)}" if result.reasons else "")),
        ("Fusion created", result.created_at or "-"),
        ("Operator / calling AE", result.operator or "-"),
        ("Report generated", generated_at),
    ]
    inputs = []
    for i in result.inputs:
        inputs.append({
            "role": i.role, "kind": i.kind, "modality": i.modality, "date": _date(i.acquisition_date),
            "study": i.study_instance_uid or "-", "series": i.series_instance_uid or "-",
            "frame": i.frame_of_reference_uid or "-",
            "instances": str(len(i.sop_instance_uids)) if i.sop_instance_uids else "-",
            "geometry": (" x ".join(str(s) for s in i.shape) + (" @ " + " x ".join(f"{s:.3g}" for s in i.spacing_mm) + " mm"
                         if i.spacing_mm else "")) if i.shape else "-",
            "sha256": i.content_sha256 or "-",
        })
    method = [("Method", result.method), ("Seed", str(result.seed))]
    method += [(f"Software: {k}", str(v)) for k, v in sorted(result.software_versions.items())]
    params = [(k, _fmt(v)) for k, v in sorted(result.parameters.items())]
    checks = [{"name": q.name, "value": _fmt(q.value), "rule": f"{q.comparison} {_fmt(q.threshold)}",
               "passed": "pass" if q.passed else ("FAIL" if q.severity == "reject" else "REVIEW"),
               "description": q.description} for q in result.quality_checks]
    metrics = [(k, _fmt(v, 4)) for k, v in sorted(result.metrics.items())]
    m = result.transform_moving_to_fixed
    transform = [" ".join(f"{v:10.5f}" for v in row) for row in m]
    qa = [Path(o.path) for o in result.outputs if o.kind == "qa_png" and Path(o.path).is_file()]
    outputs = [{"kind": o.kind, "file": Path(o.path).name, "sha256": o.sha256,
                "series": o.series_instance_uid or "-"} for o in result.outputs]
    dec: dict[str, Any] | None = None
    if decision is not None:
        dec = {
            "code": decision.code or "none",
            "label": getattr(decision, "code_label", "") or "",
            "status": _status_words(decision.status),
            "reasons": list(decision.reasons),
            "rules": [{"id": r.rule_id, "title": r.title, "passed": "pass" if r.passed else "FAIL",
                       "reason": r.reason} for r in decision.rules],
            "companions": [{"code": c.code, "label": c.label, "reason": c.reason} for c in decision.companions],
            "rationale": decision.rationale or "",
            "clinician": decision.clinician or "",
            "duplicate_of": getattr(decision, "duplicate_of", "") or "",
            "decided_at": decision.decided_at or "",
        }
    ledger_rows = [{"seq": str(e.seq), "kind": e.kind, "hash": e.hash[:16], "at": e.at} for e in ledger]
    return {"header": header, "inputs": inputs, "method": method, "params": params, "checks": checks,
            "metrics": metrics, "transform": transform, "frames": (result.moving_frame_of_reference_uid,
                                                                    result.fixed_frame_of_reference_uid),
            "qa": qa, "outputs": outputs, "decision": dec, "ledger": ledger_rows}


# ------------------------------------------------------------------------------- HTML
def _html(data: dict[str, Any], title: str) -> str:
    e = html.escape

    def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
        h = "".join(f"<th>{e(x)}</th>" for x in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"

    def kv(rows: Sequence[tuple[str, str]]) -> str:
        return "<table class='kv'>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>"

    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:left;vertical-align:top;word-break:break-all}"
             ".kv th{background:#f2f2f2;width:16em}.FAIL{color:#b00;font-weight:bold}.pass{color:#070}"
             "pre{background:#f6f6f6;padding:.5em}img{max-width:100%;border:1px solid #ccc;margin:.3em 0}</style>"
             "</head><body>", f"<h1>{e(title)}</h1>", kv(data["header"])]
    parts.append("<h2>Inputs</h2>")
    parts.append(table(["role", "kind", "modality", "date", "study UID", "series UID", "frame of reference",
                        "instances", "geometry", "content sha256"],
                       [[i["role"], i["kind"], i["modality"], i["date"], i["study"], i["series"], i["frame"],
                         i["instances"], i["geometry"], i["sha256"]] for i in data["inputs"]]))
    parts.append("<h2>Method and software</h2>" + kv(data["method"]))
    if data["params"]:
        parts.append("<h3>Parameters</h3>" + kv(data["params"]))
    parts.append("<h2>Quality against thresholds</h2>")
    parts.append(table(["check", "measured", "threshold", "outcome", "meaning"],
                       [[c["name"], c["value"], c["rule"], c["passed"], c["description"]] for c in data["checks"]]))
    parts.append("<h3>Metrics</h3>" + kv(data["metrics"]))
    mv, fx = data["frames"]
    parts.append(f"<h3>Transform (moving frame {e(mv)} to fixed frame {e(fx)}, LPS mm)</h3>"
                 f"<pre>{e(chr(10).join(data['transform']))}</pre>")
    if data["qa"]:
        parts.append("<h2>QA pictures</h2>")
        for p in data["qa"]:
            b64 = base64.b64encode(p.read_bytes()).decode("ascii")
            parts.append(f"<figure><img alt='{e(p.name)}' src='data:image/png;base64,{b64}'>"
                         f"<figcaption>{e(p.name)}</figcaption></figure>")
    dec = data["decision"]
    parts.append("<h2>D0395 decision</h2>")
    if dec is None:
        parts.append("<p>No billing decision recorded yet.</p>")
    else:
        parts.append(kv([("Code", f"{dec['code']} {dec['label']}".strip()), ("Status", dec["status"]),
                         ("Decided", dec["decided_at"] or "-")]
                        + ([("Already claimed by fusion", dec["duplicate_of"])] if dec["duplicate_of"] else [])))
        parts.append("<ul>" + "".join(f"<li>{e(r)}</li>" for r in dec["reasons"]) + "</ul>")
        parts.append(table(["rule", "title", "outcome", "reason"],
                           [[r["id"], r["title"], r["passed"], r["reason"]] for r in dec["rules"]]))
        parts.append("<h3>Companion codes suggested (to confirm; not billed automatically)</h3>")
        parts.append(table(["code", "label", "why"], [[c["code"], c["label"], c["reason"]] for c in dec["companions"]])
                     if dec["companions"] else "<p>None.</p>")
        parts.append("<h3>Clinical rationale (medical necessity)</h3>")
        parts.append(f"<p>{e(dec['rationale'])}</p><p>Documented by: {e(dec['clinician'])}</p>"
                     if dec["rationale"] else "<p>Not documented yet.</p>")
    parts.append("<h2>Outputs</h2>")
    parts.append(table(["kind", "file", "series UID", "sha256"],
                       [[o["kind"], o["file"], o["series"], o["sha256"]] for o in data["outputs"]]))
    parts.append("<h2>Ledger entries</h2>")
    parts.append(table(["seq", "kind", "time", "entry hash"],
                       [[r["seq"], r["kind"], r["at"], r["hash"]] for r in data["ledger"]])
                 if data["ledger"] else "<p>None yet.</p>")
    parts.append("<p><small>Procedure codes are shown with short labels of our own; CDT is (c) the American "
                 "Dental Association.</small></p></body></html>")
    return "".join(parts)


# -------------------------------------------------------------------------------- PDF
def _pdf(path: Path, data: dict[str, Any], title: str) -> None:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, Preformatted, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    # wordWrap="CJK" breaks long UIDs and hashes anywhere instead of running out of the cell
    small = styles["BodyText"].clone("small", fontSize=7.5, leading=9, wordWrap="CJK")
    e = html.escape
    width = A4[0] - 30 * mm

    def P(text: str) -> Paragraph:
        return Paragraph(e(str(text)), small)

    def table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]],
              widths: Sequence[float] | None = None) -> Table:
        head = [[P(h) for h in headers]] if headers else []
        data_rows = head + [[P(c) for c in r] for r in rows]
        t = Table(data_rows, colWidths=[w * width for w in widths] if widths else None, repeatRows=len(head))
        style = [("GRID", (0, 0), (-1, -1), 0.3, colors.grey), ("VALIGN", (0, 0), (-1, -1), "TOP")]
        style.append(("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke) if headers
                     else ("BACKGROUND", (0, 0), (0, -1), colors.whitesmoke))
        t.setStyle(TableStyle(style))
        return t

    def kv(rows: Sequence[tuple[str, str]]) -> Table:
        return table(None, rows, [0.3, 0.7])

    story: list[Any] = [Paragraph(e(title), styles["Title"]), kv(data["header"]), Spacer(1, 4 * mm)]
    story += [Paragraph("Inputs", styles["Heading2"]),
              table(["role", "kind / modality", "date", "series UID", "frame", "geometry", "content sha256"],
                    [[i["role"], f"{i['kind']} / {i['modality']}", i["date"], i["series"], i["frame"], i["geometry"],
                      i["sha256"]] for i in data["inputs"]], [0.07, 0.1, 0.09, 0.2, 0.2, 0.14, 0.2])]
    story += [Paragraph("Method and software", styles["Heading2"]), kv(data["method"])]
    if data["params"]:
        story += [Spacer(1, 2 * mm), kv(data["params"])]
    story += [Paragraph("Quality against thresholds", styles["Heading2"]),
              table(["check", "measured", "threshold", "outcome", "meaning"],
                    [[c["name"], c["value"], c["rule"], c["passed"], c["description"]] for c in data["checks"]],
                    [0.22, 0.12, 0.12, 0.1, 0.44])]
    if data["metrics"]:
        story += [Spacer(1, 2 * mm), kv(data["metrics"])]
    mv, fx = data["frames"]
    story += [Paragraph(e(f"Transform, moving frame {mv} to fixed frame {fx} (LPS mm)"), small),
              Preformatted("\n".join(data["transform"]), small)]
    dec = data["decision"]
    story.append(Paragraph("D0395 decision", styles["Heading2"]))
    if dec is None:
        story.append(P("No billing decision recorded yet."))
    else:
        rows = [("Code", f"{dec['code']} {dec['label']}".strip()), ("Status", dec["status"]),
                ("Decided", dec["decided_at"] or "-")]
        if dec["duplicate_of"]:
            rows.append(("Already claimed by fusion", dec["duplicate_of"]))
        rows += [("Reason", r) for r in dec["reasons"]]
        story += [kv(rows), Spacer(1, 2 * mm),
                  table(["rule", "title", "outcome", "reason"],
                        [[r["id"], r["title"], r["passed"], r["reason"]] for r in dec["rules"]],
                        [0.15, 0.22, 0.07, 0.56])]
        story.append(Paragraph("Companion codes suggested (to confirm, not billed automatically)", styles["Heading3"]))
        story.append(table(["code", "label", "why"], [[c["code"], c["label"], c["reason"]] for c in dec["companions"]],
                           [0.1, 0.35, 0.55]) if dec["companions"] else P("None."))
        story.append(Paragraph("Clinical rationale (medical necessity)", styles["Heading3"]))
        story.append(P(f"{dec['rationale']} (documented by {dec['clinician']})" if dec["rationale"]
                       else "Not documented yet."))
    story += [Paragraph("Outputs", styles["Heading2"]),
              table(["kind", "file", "sha256"], [[o["kind"], o["file"], o["sha256"]] for o in data["outputs"]],
                    [0.18, 0.37, 0.45])]
    story += [Paragraph("Ledger entries", styles["Heading2"]),
              table(["seq", "kind", "time", "entry hash"], [[r["seq"], r["kind"], r["at"], r["hash"]] for r in data["ledger"]],
                    [0.1, 0.3, 0.3, 0.3]) if data["ledger"] else P("None yet.")]
    if data["qa"]:
        story.append(Paragraph("QA pictures", styles["Heading2"]))
        from PIL import Image as PILImage

        for p in data["qa"]:
            with PILImage.open(p) as im:
                w, h = im.size
            scale = min(width / w, (110 * mm) / h)
            story += [Image(str(p), width=w * scale, height=h * scale), P(p.name)]
    story.append(P("Procedure codes are shown with short labels of our own; CDT is (c) the American Dental Association."))
    doc = SimpleDocTemplate(str(path), pagesize=A4, leftMargin=15 * mm, rightMargin=15 * mm, topMargin=15 * mm,
                            bottomMargin=15 * mm, title=title, author="dentfuse", invariant=True)
    doc.build(story)


def write_report(result: FusionResult, decision: Any | None, report_dir: Path, *, version: int | None = None,
                 ledger: Sequence[LedgerRef] = (), generated_at: str | None = None) -> FusionReport:
    """Write ``<fusion_id>-R<version>.pdf`` and ``.html`` into ``report_dir``.

    Parameters
    ----------
    result:
        The fusion.
    decision:
        Its :class:`billing_hooks.decision.BillingDecision`, or None when not decided yet.
    report_dir:
        Folder for the report files (created).
    version:
        Report version; default: one more than the highest existing version.
    ledger:
        The ledger entries of this fusion to cite.

    Returns
    -------
    FusionReport with both paths and their sha256 (the PDF's goes to the ledger).
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    if version is None:
        version = (existing_versions(report_dir, result.fusion_id) or [0])[-1] + 1
    report_id = report_id_for(result.fusion_id, version)
    pdf_path = report_dir / f"{report_id}.pdf"
    html_path = report_dir / f"{report_id}.html"
    if pdf_path.exists():
        raise FileExistsError(f"report {pdf_path} exists; reports are never overwritten (its hash is in the "
                              "ledger): write the next version")
    generated_at = generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    data = _sections(result, decision, ledger, report_id, generated_at)
    title = f"dentfuse fusion report {report_id}"
    tmp_pdf = pdf_path.with_suffix(".pdf.tmp")
    _pdf(tmp_pdf, data, title)
    os.replace(tmp_pdf, pdf_path)
    tmp_html = html_path.with_suffix(".html.tmp")
    tmp_html.write_text(_html(data, title), encoding="utf-8")
    os.replace(tmp_html, html_path)
    return FusionReport(report_id=report_id, version=version, pdf_path=pdf_path, html_path=html_path,
                        pdf_sha256=_sha256(pdf_path), html_sha256=_sha256(html_path))
