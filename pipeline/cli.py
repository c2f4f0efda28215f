"""The ``dentfuse`` command line. Subcommands live in their own modules and are
imported only when used, so ``dentfuse --help`` stays fast."""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline.cli_common import build_config, common_options, emit_json

# name -> "module:attribute"
LAZY_COMMANDS: dict[str, str] = {
    "serve": "pipeline.cli_serve:serve",
    "demo": "pipeline.cli_demo:demo",
    "import": "pipeline.cli_jobs:import_cmd",
    "fuse": "pipeline.cli_fuse:fuse",
    "status": "pipeline.cli_jobs:status",
    "plan": "pipeline.cli_jobs:plan",
    "events": "pipeline.cli_billing:events",
    "ledger": "pipeline.cli_billing:ledger",
    "document": "pipeline.cli_billing:document",
    "review": "pipeline.cli_billing:review",
    "node": "pipeline.cli_node:node",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(super().list_commands(ctx))
        for name, target in LAZY_COMMANDS.items():
            if importlib.util.find_spec(target.split(":")[0]) is not None:
                names.add(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is not None:
            return cmd
        target = LAZY_COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        if importlib.util.find_spec(module_name) is None:
            return None
        return getattr(importlib.import_module(module_name), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dentfuse")
def main() -> None:
    """dentfuse: receive CBCT volumes and intraoral scans, fuse them, and record D0395
    evidence honestly."""


@main.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@common_options
def config_show(cfg_opts: dict[str, Any], as_json: bool) -> None:
    """Print every setting, its value and where it came from."""
    cfg = build_config(cfg_opts)
    flat = cfg.flat()
    if as_json:
        emit_json({k: {"value": _plain(v), "source": cfg.source_of(k)} for k, v in flat.items()})
        return
    table = Table(title="dentfuse configuration")
    table.add_column("key")
    table.add_column("value")
    table.add_column("source")
    for k, v in flat.items():
        table.add_row(k, str(_plain(v)), cfg.source_of(k))
    Console().print(table)


def _plain(v: Any) -> Any:
    import dataclasses
    from pathlib import Path

    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    return v


if __name__ == "__main__":  # pragma: no cover
    main()
