"""One frozen configuration, built once from a TOML file, the environment and flags.

Precedence (lowest to highest): built-in defaults, the TOML file, ``DENTFUSE_*``
environment variables, command-line flags. Every leaf value remembers where it came
from, so ``dentfuse config show`` can say why a value is what it is.

Keys are dotted paths into the nested dataclasses below, e.g. ``node.port`` is the
``port`` key of the ``[node]`` table and the environment variable ``DENTFUSE_NODE_PORT``.
A few short aliases exist for the common ones (``DENTFUSE_DATA_DIR``, ``DENTFUSE_PORT``,
``DENTFUSE_AE_TITLE``). ``DENTFUSE_CONFIG`` names the TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from billing_hooks.policy import DeliverySettings, PayerPolicy
from dicom_node.settings import NodeSettings, PacsDestination, PacsSettings, StabilitySettings
from fusion.gates import SurfaceGateThresholds, VolumeGateThresholds


class ConfigError(Exception):
    """The configuration cannot be built; the message names the key and its source."""


_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash, <= 16


@dataclass(frozen=True)
class FusionSettings:
    seed: int = 0
    workers: int = 1  # fusion worker processes
    job_max_attempts: int = 3
    cbct_cbct_max_interval_days: int = 3650  # plan CBCT + CBCT fusions within this period
    plan_cbct_scan: bool = True
    plan_cbct_cbct: bool = True
    plan_cbct_mr: bool = True
    volume_gate: VolumeGateThresholds = field(default_factory=VolumeGateThresholds)
    surface_gate: SurfaceGateThresholds = field(default_factory=SurfaceGateThresholds)


@dataclass(frozen=True)
class BillingSettings:
    policy: PayerPolicy = field(default_factory=PayerPolicy)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    provider_npi: str = "1234567893"  # billing provider NPI used in exports (configure per clinic)
    provider_name: str = "DENTFUSE CLINIC"
    payer_id: str = "PAYER01"
    payer_name: str = "DENTAL PAYER"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "dentfuse"


@dataclass(frozen=True)
class Config:
    """The effective configuration. Build with :func:`load_config`."""

    data_dir: Path = field(default_factory=default_data_dir)
    log_level: str = "INFO"
    node: NodeSettings = field(default_factory=NodeSettings)
    stability: StabilitySettings = field(default_factory=StabilitySettings)
    pacs: PacsSettings = field(default_factory=PacsSettings)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    billing: BillingSettings = field(default_factory=BillingSettings)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def source_of(self, key: str) -> str:
        return self.sources.get(key, "default")

    def flat(self) -> dict[str, Any]:
        """Every leaf key with its effective value (dotted keys)."""
        out: dict[str, Any] = {}
        for key, _tp in _leaves(Config):
            out[key] = _get(self, key)
        return out


ENV_ALIASES = {
    "DENTFUSE_DATA_DIR": "data_dir",
    "DENTFUSE_PORT": "node.port",
    "DENTFUSE_AE_TITLE": "node.ae_title",
    "DENTFUSE_BIND_ADDRESS": "node.bind_address",
    "DENTFUSE_LOG_LEVEL": "log_level",
}
_NOT_CONFIG_ENV = {"DENTFUSE_CONFIG", "DENTFUSE_REQUIRE_PEERS"}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "sources":
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if _is_dataclass_type(tp) and tp is not PacsDestination:
            out.extend(_leaves(tp, key + "."))
        else:
            out.append((key, tp))
    return out


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def env_name(key: str) -> str:
    return "DENTFUSE_" + key.replace(".", "_").upper()


def _parse_destination(text: str, where: str) -> PacsDestination:
    # NAME=AETITLE@host:port[+tls]
    m = re.fullmatch(r"\s*([\w.-]+)=([^@]{1,16})@([\w.:-]+?):(\d{1,5})(\+tls)?\s*", text)
    if not m:
        raise ConfigError(
            f"{where}: cannot read PACS destination {text!r}; write NAME=AETITLE@host:port (optionally +tls)"
        )
    return PacsDestination(name=m[1], ae_title=m[2], host=m[3], port=int(m[4]), tls=bool(m[5]))


def _coerce(key: str, tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML/env/flag value to the field's type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    from_text = isinstance(value, str) and where.startswith(("environment", "flag"))
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if from_text and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if from_text and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise TypeError
        if tp is int:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return value
            if from_text:
                return int(value.strip())
            raise TypeError
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, (int, float)):
                return float(value)
            if from_text:
                return float(value.strip())
            raise TypeError
        if tp is str:
            if isinstance(value, str):
                return value
            raise TypeError
        if tp is Path:
            if isinstance(value, (str, Path)) and str(value).strip():
                return Path(str(value)).expanduser()
            raise TypeError
        if origin is tuple and args and args[0] is PacsDestination:
            if isinstance(value, str):
                return tuple(_parse_destination(p, where) for p in value.split(",") if p.strip())
            if isinstance(value, list):
                dests = []
                for i, item in enumerate(value):
                    if isinstance(item, PacsDestination):
                        dests.append(item)
                        continue
                    if not isinstance(item, dict):
                        raise TypeError
                    allowed = {f.name for f in dataclasses.fields(PacsDestination)}
                    unknown = set(item) - allowed
                    if unknown:
                        raise ConfigError(
                            f"{where}: unknown key(s) {sorted(unknown)} in {key}[{i}]; allowed: {sorted(allowed)}"
                        )
                    missing = {"name", "ae_title", "host", "port"} - set(item)
                    if missing:
                        raise ConfigError(f"{where}: {key}[{i}] is missing {sorted(missing)}")
                    dests.append(
                        PacsDestination(
                            name=_coerce(f"{key}[{i}].name", str, item["name"], where),
                            ae_title=_coerce(f"{key}[{i}].ae_title", str, item["ae_title"], where),
                            host=_coerce(f"{key}[{i}].host", str, item["host"], where),
                            port=_coerce(f"{key}[{i}].port", int, item["port"], where),
                            tls=_coerce(f"{key}[{i}].tls", bool, item.get("tls", False), where),
                        )
                    )
                return tuple(dests)
            raise TypeError
        if origin is tuple:
            if isinstance(value, str) and from_text:
                items: list[Any] = [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, (list, tuple)):
                items = list(value)
            else:
                raise TypeError
            if not all(isinstance(v, str) for v in items):
                raise TypeError
            return tuple(items)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}: {key} must be {_describe(tp)}, got {value!r} ({type(value).__name__})"
        ) from None
    raise ConfigError(f"{where}: {key} has unsupported type {tp}")  # pragma: no cover


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is PacsDestination:
        return "a list of {name, ae_title, host, port} tables"
    if typing.get_origin(tp) is tuple:
        return "a list of strings"
    return str(tp)


def _flatten_toml(data: Mapping[str, Any], leaf_types: Mapping[str, Any], path: Path, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in leaf_types:
            out[key] = v
        elif isinstance(v, dict) and any(lk.startswith(key + ".") for lk in leaf_types):
            out.update(_flatten_toml(v, leaf_types, path, key + "."))
        else:
            section = prefix.rstrip(".") or "top level"
            near = sorted(lk for lk in leaf_types if lk.startswith(prefix))[:12]
            raise ConfigError(
                f"{path}: unknown key {key!r} (in {section}); known keys there: {', '.join(near)}"
            )
    return out


def _validate(cfg: Config) -> None:
    src = cfg.source_of
    if not _AE_RE.match(cfg.node.ae_title) or cfg.node.ae_title.strip() == "":
        raise ConfigError(
            f"{src('node.ae_title')}: node.ae_title {cfg.node.ae_title!r} is not a valid AE title (1-16 printable characters, no backslash)"
        )
    for aet in cfg.node.allowed_calling_ae_titles:
        if not _AE_RE.match(aet):
            raise ConfigError(f"{src('node.allowed_calling_ae_titles')}: {aet!r} is not a valid AE title")
    if not 0 <= cfg.node.port <= 65535:
        raise ConfigError(f"{src('node.port')}: node.port {cfg.node.port} is outside 0-65535")
    if cfg.node.duplicate_policy not in ("keep_first", "keep_newest"):
        raise ConfigError(
            f"{src('node.duplicate_policy')}: node.duplicate_policy must be keep_first or keep_newest, "
            f"got {cfg.node.duplicate_policy!r}"
        )
    if bool(cfg.node.tls_certificate) != bool(cfg.node.tls_private_key):
        raise ConfigError("node.tls_certificate and node.tls_private_key must be given together")
    if cfg.stability.quiet_period_s < 0:
        raise ConfigError(f"{src('stability.quiet_period_s')}: stability.quiet_period_s must be >= 0")
    if cfg.fusion.workers < 1:
        raise ConfigError(f"{src('fusion.workers')}: fusion.workers must be at least 1")
    names = [d.name for d in cfg.pacs.destinations]
    if len(set(names)) != len(names):
        raise ConfigError(f"{src('pacs.destinations')}: PACS destination names must be unique, got {names}")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{src('log_level')}: log_level must be DEBUG, INFO, WARNING or ERROR")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "sources":
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if _is_dataclass_type(tp) and tp is not PacsDestination:
            kwargs[f.name] = _build(tp, values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    return cls(**kwargs)


def load_config(
    config_file: Path | str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration.

    Parameters
    ----------
    config_file:
        TOML file; when None, ``DENTFUSE_CONFIG`` is used if set, else no file.
    flags:
        ``{dotted_key: value}`` from the command line (highest precedence). Values may
        be text (converted) or already typed. ``None`` values are ignored.
    environ:
        The environment to read ``DENTFUSE_*`` from (default ``os.environ``).

    Raises
    ------
    ConfigError
        Unknown key, wrong type or invalid value; the message names the key and source.
    """
    env = dict(os.environ if environ is None else environ)
    leaf_types = dict(_leaves(Config))
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    path = config_file if config_file is not None else env.get("DENTFUSE_CONFIG") or None
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist; create it or drop --config/DENTFUSE_CONFIG")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        for key, raw in _flatten_toml(data, leaf_types, path).items():
            where = f"file {path}"
            values[key] = _coerce(key, leaf_types[key], raw, where)
            sources[key] = where

    env_keys = {env_name(k): k for k in leaf_types}
    env_keys.update(ENV_ALIASES)
    for name, raw in sorted(env.items()):
        if not name.startswith("DENTFUSE_") or name in _NOT_CONFIG_ENV:
            continue
        key = env_keys.get(name)
        if key is None:
            raise ConfigError(
                f"environment variable {name} is not a dentfuse setting; unset it or use one of "
                f"{', '.join(sorted(list(ENV_ALIASES)[:3]))}, DENTFUSE_<SECTION>_<KEY>"
            )
        where = f"environment {name}"
        values[key] = _coerce(key, leaf_types[key], raw, where)
        sources[key] = where

    for key, raw in (flags or {}).items():
        if raw is None:
            continue
        if key not in leaf_types:
            raise ConfigError(f"flag sets unknown key {key!r}")
        where = "flag"
        values[key] = _coerce(key, leaf_types[key], raw, where)
        sources[key] = where

    try:
        built = _build(Config, values)
    except TypeError as exc:  # pragma: no cover - guarded by _leaves
        raise ConfigError(str(exc)) from None
    cfg = dataclasses.replace(built, sources=types.MappingProxyType(sources))
    _validate(cfg)
    return cfg
