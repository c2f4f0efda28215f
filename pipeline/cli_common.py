"""Shared pieces of the ``dentfuse`` command line: common options, config, output."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import click

from pipeline.config import Config, ConfigError, load_config


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config``, ``--data-dir``, ``--json`` and ``-v`` to a command.

    The wrapped command receives ``cfg_opts`` (a dict to pass to :func:`build_config`)
    and ``as_json`` instead of the raw options.
    """

    @click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                  default=None, help="TOML configuration file (default: $DENTFUSE_CONFIG).")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Data directory (default: $DENTFUSE_DATA_DIR or ~/.local/share/dentfuse).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
    @click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
    @functools.wraps(func)
    def wrapper(*args: Any, config_file: Path | None, data_dir: Path | None, as_json: bool,
                verbose: int, **kwargs: Any) -> Any:
        setup_logging(verbose)
        cfg_opts = {"config_file": config_file, "flags": {"data_dir": data_dir}}
        return func(*args, cfg_opts=cfg_opts, as_json=as_json, **kwargs)

    return wrapper


def build_config(cfg_opts: Mapping[str, Any], **flags: Any) -> Config:
    """Load the configuration, turning a :class:`ConfigError` into a clean CLI error."""
    merged = dict(cfg_opts.get("flags", {}))
    merged.update({k: v for k, v in flags.items() if v is not None})
    try:
        return load_config(cfg_opts.get("config_file"), flags=merged)
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def setup_logging(verbose: int = 0) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    if not any(getattr(h, "_dentfuse", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._dentfuse = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def short_uid(uid: str, keep: int = 10) -> str:
    """A UID shortened for a human table (the full value is in ``--json``)."""
    return uid if len(uid) <= keep + 1 else "\u2026" + uid[-keep:]


def input_note(planner: str) -> str:
    """One short cell saying whether a series is a fusion input (full text in ``--json``)."""
    if planner == "input":
        return "yes"
    low = planner.lower()
    if low.startswith("2d"):
        return "no: 2D image (rule 1)"
    if low.startswith("duplicate of series"):
        words = planner.split()
        return f"no: copy of {short_uid(words[3]) if len(words) > 3 else 'another series'}"
    return planner
