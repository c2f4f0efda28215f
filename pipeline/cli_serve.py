"""``dentfuse serve``: run the DICOM listener and the stability monitor until SIGINT/SIGTERM.

The wiring lives in :func:`run_serve` so the pipeline can add its fusion workers to the
same process (start them in ``on_started``, stop them after the node has stopped).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import click

from pipeline.cli_common import build_config, common_options, emit_json
from pipeline.config import Config

LOG = logging.getLogger(__name__)


def run_serve(cfg: Config, stop_event: threading.Event | None = None,
              on_started: Callable[[Any], None] | None = None,
              on_received: Callable[[Any], None] | None = None) -> int:
    """Build the node from ``cfg`` and serve until a signal or ``stop_event``.

    Parameters
    ----------
    cfg:
        The effective configuration (``node``, ``stability``, ``data_dir``).
    stop_event:
        Set it to stop (tests, embedding); SIGINT/SIGTERM also stop when run in the main thread.
    on_started:
        Called with the started :class:`~dicom_node.server.DicomNode` (start workers here).
    on_received:
        Passed to the node: called for each new durable instance.

    Returns
    -------
    int
        Process exit code (0 after a clean shutdown).
    """
    from dicom_node.errors import DicomNodeError
    from dicom_node.server import DicomNode, serve_forever

    try:
        node = DicomNode(cfg.node, cfg.stability, cfg.data_dir, on_received=on_received)
        return serve_forever(node, stop_event=stop_event, on_started=on_started)
    except DicomNodeError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("serve")
@common_options
@click.option("--port", type=int, default=None, help="TCP port to listen on (default: node.port; 0 = any free port).")
@click.option("--ae-title", default=None, help="Our AE title (default: node.ae_title).")
@click.option("--bind", "bind_address", default=None, help="Address to bind (default: node.bind_address).")
def serve(cfg_opts: dict[str, Any], as_json: bool, port: int | None, ae_title: str | None,
          bind_address: str | None) -> None:
    """Receive DICOM (C-ECHO, C-STORE) into the data directory, fuse, decide, report and
    forward until stopped (SIGINT/SIGTERM)."""
    cfg = build_config(cfg_opts, **{"node.port": port, "node.ae_title": ae_title,
                                    "node.bind_address": bind_address})

    def announce(node: Any) -> None:
        info = {"ae_title": cfg.node.ae_title, "bind_address": cfg.node.bind_address,
                "port": node.port, "data_dir": str(cfg.data_dir)}
        if as_json:
            emit_json({"event": "listening", **info})
        else:
            click.echo(f"dentfuse listening as {info['ae_title']} on {info['bind_address']}:{info['port']} "
                       f"(data: {info['data_dir']}); Ctrl-C to stop", err=True)

    from pipeline.bootstrap import run_app

    # the listener plus the fusion workers, billing hook, claim outbox and PACS forwarding
    code = run_app(cfg, on_started=lambda app: announce(app.node))
    if not as_json:
        click.echo("dentfuse stopped cleanly", err=True)
    raise SystemExit(code)
