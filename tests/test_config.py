"""Configuration: precedence, sources, and clear errors for unknown keys / wrong types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import ConfigError, PacsDestination, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "dentfuse.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_defaults_without_file_or_env() -> None:
    cfg = load_config(None, environ={})
    assert cfg.node.ae_title == "DENTFUSE"
    assert cfg.stability.quiet_period_s == 60.0
    assert cfg.node.duplicate_policy == "keep_first"
    assert cfg.source_of("node.port") == "default"


def test_precedence_file_then_env_then_flag(tmp_path: Path) -> None:
    f = write(tmp_path, '[node]\nport = 4242\nae_title = "FROMFILE"\n[stability]\nquiet_period_s = 5\n')
    env = {"DENTFUSE_NODE_PORT": "5353", "DENTFUSE_DATA_DIR": str(tmp_path / "env-data")}
    cfg = load_config(f, flags={"node.ae_title": "FROMFLAG", "data_dir": None}, environ=env)
    assert cfg.node.port == 5353 and cfg.source_of("node.port") == "environment DENTFUSE_NODE_PORT"
    assert cfg.node.ae_title == "FROMFLAG" and cfg.source_of("node.ae_title") == "flag"
    assert cfg.stability.quiet_period_s == 5.0 and cfg.source_of("stability.quiet_period_s") == f"file {f}"
    assert cfg.data_dir == tmp_path / "env-data"
    # a flag beats the environment for the same key
    cfg2 = load_config(f, flags={"data_dir": tmp_path / "flag-data"}, environ=env)
    assert cfg2.data_dir == tmp_path / "flag-data"


def test_nested_gate_policy_and_destinations(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "[fusion.volume_gate]\nmin_overlap_fraction = 0.3\n"
        "[billing.policy]\nsurface_scans_count_as_3d = false\nsuggest_companion_codes = [\"D0367\"]\n"
        "[[pacs.destinations]]\nname = \"main\"\nae_title = \"ORTHANC\"\nhost = \"127.0.0.1\"\nport = 4242\n",
    )
    cfg = load_config(f, environ={"DENTFUSE_NODE_ALLOWED_CALLING_AE_TITLES": "CBCT1, PACS"})
    assert cfg.fusion.volume_gate.min_overlap_fraction == 0.3
    assert cfg.billing.policy.surface_scans_count_as_3d is False
    assert cfg.billing.policy.suggest_companion_codes == ("D0367",)
    assert cfg.pacs.destinations == (PacsDestination("main", "ORTHANC", "127.0.0.1", 4242),)
    assert cfg.node.allowed_calling_ae_titles == ("CBCT1", "PACS")
    env = {"DENTFUSE_PACS_DESTINATIONS": "a=PACSA@127.0.0.1:104,b=PACSB@localhost:11112+tls"}
    cfg2 = load_config(None, environ=env)
    assert [d.name for d in cfg2.pacs.destinations] == ["a", "b"] and cfg2.pacs.destinations[1].tls


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    f = write(tmp_path, "[node]\nprot = 1\n")
    with pytest.raises(ConfigError, match=r"dentfuse\.toml: unknown key 'node\.prot'"):
        load_config(f, environ={})
    f2 = write(tmp_path, "[nodes]\nport = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'nodes'"):
        load_config(f2, environ={})


def test_wrong_type_names_key_and_source(tmp_path: Path) -> None:
    f = write(tmp_path, '[node]\nport = "eleven"\n')
    with pytest.raises(ConfigError, match=r"file .*dentfuse\.toml: node\.port must be an integer"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match=r"environment DENTFUSE_STABILITY_QUIET_PERIOD_S: .*must be a number"):
        load_config(None, environ={"DENTFUSE_STABILITY_QUIET_PERIOD_S": "soon"})
    f3 = write(tmp_path, "[billing.policy]\nsurface_scans_count_as_3d = 1\n")
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(f3, environ={})


def test_invalid_values_and_unknown_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate_policy"):
        load_config(None, environ={"DENTFUSE_NODE_DUPLICATE_POLICY": "keep_all"})
    with pytest.raises(ConfigError, match="not a valid AE title"):
        load_config(None, environ={"DENTFUSE_AE_TITLE": "THIS_AE_TITLE_IS_TOO_LONG"})
    with pytest.raises(ConfigError, match="DENTFUSE_NODE_PROT is not a dentfuse setting"):
        load_config(None, environ={"DENTFUSE_NODE_PROT": "1"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[node\n"), environ={})


def test_config_show_cli_reports_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(__import__("os").environ):
        if k.startswith("DENTFUSE_") and k != "DENTFUSE_REQUIRE_PEERS":
            monkeypatch.delenv(k)
    f = write(tmp_path, "[node]\nport = 4343\n")
    monkeypatch.setenv("DENTFUSE_AE_TITLE", "ENVAE")
    res = CliRunner().invoke(main, ["config", "show", "--config", str(f), "--data-dir", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["node.port"] == {"value": 4343, "source": f"file {f}"}
    assert data["node.ae_title"]["source"] == "environment DENTFUSE_AE_TITLE"
    assert data["data_dir"] == {"value": str(tmp_path), "source": "flag"}
    res2 = CliRunner().invoke(main, ["config", "show", "--config", str(write(tmp_path, "[node]\nport = []\n"))])
    assert res2.exit_code != 0 and "node.port must be an integer" in res2.output


def test_version_and_help() -> None:
    runner = CliRunner()
    assert "dentfuse, version" in runner.invoke(main, ["--version"]).output
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "config" in res.output


def test_every_subcommand_has_working_help() -> None:
    """Every command the CLI lists loads and answers --help (no stale lazy entries)."""
    from pipeline.cli import LAZY_COMMANDS

    runner = CliRunner()
    listed = runner.invoke(main, ["--help"]).output
    for name in LAZY_COMMANDS:
        assert name in listed, f"dentfuse {name} is not listed"
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, f"dentfuse {name} --help failed: {res.output}"
        assert "Usage:" in res.output
