"""Config loading: the shipped files load, every mistake is reported (all at once) with key path and value."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import given, strategies as st

from ipfixer.config import (
    CollectorConfig,
    Config,
    ConfigError,
    config_schema,
    format_duration,
    load_config,
    parse_duration,
    split_host_port,
)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = ROOT / "config" / "ipfixer.yaml"
SCHEMA = ROOT / "config" / "ipfixer.schema.json"


def base() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(DEFAULT.read_text()))


def write(tmp_path: Path, data: Any, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(path: Path, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={} if env is None else env)
    return str(info.value)


# ------------------------------------------------------------------------------------------ good files


def test_default_config_loads_with_documented_values() -> None:
    cfg = load_config(DEFAULT, env={})
    assert cfg.observation_domain_id == 1
    assert cfg.source == "ebpf"
    assert cfg.interfaces.include == ("*",) and cfg.interfaces.exclude == ("lo",)
    assert cfg.interfaces.direction == "both"
    (col,) = cfg.collectors
    assert (col.name, col.address, col.port, col.protocol) == ("local", "127.0.0.1", 4739, "ipfix")
    assert col.template_refresh == 30.0 and col.template_refresh_messages == 20
    assert col.max_message_size == 1452
    assert (cfg.timeouts.active, cfg.timeouts.idle, cfg.timeouts.drain_interval) == (60.0, 15.0, 1.0)
    assert cfg.cache.kernel_map_entries == 65536 and cfg.cache.ring_buffer_pages == 1024
    assert cfg.cache.accounter_evict_timeout == 5.0
    assert cfg.sampling.interval == 1
    assert cfg.templates.directory is None and cfg.templates.stats_interval == 60.0
    assert cfg.enrichment.conntrack is False and cfg.enrichment.nflog_group == 5
    assert cfg.metrics.listen == "127.0.0.1:9478"
    assert cfg.log_level == "info"
    assert cfg.lock_dir == Path("/run/ipfixer")


def test_default_file_sets_every_key_and_matches_model_defaults() -> None:
    """The annotated file documents every key, and says what the code does without it."""
    data = base()
    assert set(data) == set(Config.model_fields)
    defaults = Config.model_validate({"collectors": data["collectors"]})
    for key, value in data.items():
        if isinstance(value, dict):
            assert set(value) == set(type(getattr(defaults, key)).model_fields), key
    assert set(data["collectors"][0]) == set(CollectorConfig.model_fields)
    from_file = Config.model_validate(data)
    from_defaults = Config.model_validate({"collectors": data["collectors"]})
    assert from_file == from_defaults


@pytest.mark.parametrize("name", ["netflow9-two-collectors.yaml", "router-nat.yaml"])
def test_examples_load(name: str) -> None:
    cfg = load_config(ROOT / "config" / "examples" / name, env={})
    if name.startswith("netflow9"):
        assert [c.protocol for c in cfg.collectors] == ["netflow9", "netflow9"]
    else:
        assert cfg.enrichment.conntrack is True


def test_config_is_frozen() -> None:
    cfg = load_config(DEFAULT, env={})
    with pytest.raises(pydantic.ValidationError):
        cfg.log_level = "debug"  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        cfg.timeouts.active = 1.0  # type: ignore[misc]


def test_collector_name_defaults_to_address_port(tmp_path: Path) -> None:
    data = base()
    data["collectors"] = [{"address": "192.0.2.1", "port": 2055}, {"address": "2001:db8::1"}]
    cfg = load_config(write(tmp_path, data), env={})
    assert [c.name for c in cfg.collectors] == ["192.0.2.1:2055", "[2001:db8::1]:4739"]


def test_relative_template_directory_is_relative_to_the_file(tmp_path: Path) -> None:
    data = base()
    data["templates"]["directory"] = "tpl"
    cfg = load_config(write(tmp_path, data), env={})
    assert cfg.templates.directory == tmp_path / "tpl"


# ---------------------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    "text,seconds",
    [("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("1m30s", 90.0), (10, 10.0),
     (2.5, 2.5), ("45", 45.0), ("1h2m3s", 3723.0)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["fast", "", "10x", "s", "-5s", 0, -1, True, None, [1], "nan"])
def test_parse_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59))
def test_format_duration_round_trips(h: int, m: int, s: int) -> None:
    seconds = float(h * 3600 + m * 60 + s)
    if seconds:
        assert parse_duration(format_duration(seconds)) == seconds


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:9478") == ("127.0.0.1", 9478)
    assert split_host_port("[::1]:9478") == ("::1", 9478)
    assert split_host_port("localhost:80") == ("localhost", 80)
    for bad in ("localhost", "::1:80", "host:0", "host:99999", ":80"):
        with pytest.raises(ValueError):
            split_host_port(bad)


# ---------------------------------------------------------------------------------------------- errors


BAD_VALUES = [  # (key path, value) -> the message after "<path>: "
    pytest.param(("colectors",), "x", "colectors: unknown key (got 'x')", id="unknown_top_level_key"),
    pytest.param(("timeouts", "idle"), "fast", "timeouts.idle: invalid duration 'fast' (got 'fast')",
                 id="bad_duration"),
    pytest.param(("collectors", 0, "protocol"), "sflow",
                 "collectors[0].protocol: must be one of ipfix, netflow9 (got 'sflow')", id="bad_protocol"),
    pytest.param(("collectors",), [], "collectors: must have at least 1 entry (got [])", id="empty_collectors"),
    pytest.param(("timeouts", "idle"), "2m", "timeouts.idle: must be <= timeouts.active (1m) (got '2m')",
                 id="idle_greater_than_active"),
    pytest.param(("timeouts", "drain_interval"), 20,
                 "timeouts.drain_interval: must be <= timeouts.idle (15s) (got 20)",
                 id="drain_interval_greater_than_idle"),
]


@pytest.mark.parametrize(("keys", "value", "message"), BAD_VALUES)
def test_a_bad_value_is_named_with_its_key_path(tmp_path: Path, keys: tuple[Any, ...], value: Any,
                                                message: str) -> None:
    data = base()
    node: Any = data
    for k in keys[:-1]:
        node = node[k]
    node[keys[-1]] = value
    path = write(tmp_path, data)
    assert f"{path}: {message}" in error_of(path)


def test_unknown_nested_key(tmp_path: Path) -> None:
    data = base()
    data["timeouts"]["activ"] = "30s"
    data["collectors"][0]["prot"] = "ipfix"
    path = write(tmp_path, data)
    msg = error_of(path)
    assert f"{path}: timeouts.activ: unknown key (got '30s')" in msg
    assert f"{path}: collectors[0].prot: unknown key (got 'ipfix')" in msg


@pytest.mark.parametrize("port,problem", [(0, "must be >= 1"), (65536, "must be <= 65535"),
                                          ("4739", "must be an integer"), (True, "must be an integer")])
def test_port_out_of_range(tmp_path: Path, port: Any, problem: str) -> None:
    data = base()
    data["collectors"][0]["port"] = port
    path = write(tmp_path, data)
    assert f"{path}: collectors[0].port: {problem} (got {port!r})" in error_of(path)


def test_missing_collectors(tmp_path: Path) -> None:
    data = base()
    del data["collectors"]
    path = write(tmp_path, data)
    assert f"{path}: collectors: missing required key" in error_of(path)


def test_duplicate_collectors(tmp_path: Path) -> None:
    data = base()
    data["collectors"].append({"address": "127.0.0.1", "port": 4739, "name": "again"})
    path = write(tmp_path, data)
    assert "collectors: collectors 0 and 1 are both" in error_of(path)


@pytest.mark.parametrize(
    "section,key,value,problem",
    [
        ("cache", "ring_buffer_pages", 48, "must be a power of two"),
        ("cache", "kernel_map_entries", 8, "must be >= 16"),
        ("interfaces", "include", [], "must have at least 1 entry"),
        ("interfaces", "direction", "sideways", "must be one of ingress, egress, both"),
        ("metrics", "listen", "9478", "must be host:port"),
        ("enrichment", "conntrack", "maybe", "must be true or false"),
        ("sampling", "interval", 0, "must be >= 1"),
    ],
)
def test_other_field_checks(tmp_path: Path, section: str, key: str, value: Any, problem: str) -> None:
    data = base()
    data[section][key] = value
    path = write(tmp_path, data)
    msg = error_of(path)
    assert f"{path}: {section}.{key}: {problem}" in msg and f"(got {value!r})" in msg


def test_collector_address_with_port_is_explained(tmp_path: Path) -> None:
    data = base()
    data["collectors"][0]["address"] = "10.0.0.1:2055"
    path = write(tmp_path, data)
    assert "collectors[0].address: not an IP address or host name (the port goes in 'port')" in error_of(path)


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    data = base()
    data["bogus"] = 1
    data["timeouts"]["idle"] = "fast"
    data["collectors"][0]["protocol"] = "sflow"
    data["collectors"][0]["port"] = 99999
    data["log_level"] = "loud"
    path = write(tmp_path, data)
    lines = error_of(path).splitlines()
    assert len(lines) == 5
    assert all(line.startswith(f"{path}: ") for line in lines)
    joined = "\n".join(lines)
    for part in (
        "bogus: unknown key",
        "timeouts.idle: invalid duration",
        "collectors[0].protocol:",
        "collectors[0].port: must be <= 65535",
        "log_level: must be one of debug, info, warning, error",
    ):
        assert part in joined


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: info\ntimeouts: [1\nsource: ebpf\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3:7: YAML syntax error")


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: info\nlog_level: debug\n")
    assert error_of(path).startswith(f"{path}:2:1: YAML syntax error") and "duplicate key 'log_level'" in (
        error_of(path)
    )


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of(path) == f"{path}: cannot read config file: No such file or directory"


def test_file_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert error_of(path) == f"{path}: must be a mapping of keys to values (got list)"


# ------------------------------------------------------------------------------------------------- env


def test_env_overrides(tmp_path: Path) -> None:
    env = {
        "IPFIXER_TIMEOUTS__ACTIVE": "30s",
        "ipfixer_log_level": "DEBUG",
        "IPFIXER_Enrichment__Conntrack": "true",
        "IPFIXER_METRICS__LISTEN": "[::1]:9100",
        "IPFIXER_TEMPLATES__IPV4": "no",  # a string field keeps the text (YAML would read False)
        "IPFIXER_REQUIRE_KERNEL_TESTS": "1",  # reserved: not an override
        "PATH": "/usr/bin",
    }
    cfg = load_config(DEFAULT, env=env)
    assert cfg.timeouts.active == 30.0
    assert cfg.log_level == "debug"
    assert cfg.enrichment.conntrack is True
    assert cfg.metrics.listen == "[::1]:9100"
    assert cfg.templates.ipv4 == "no"


def test_env_override_whole_list_and_list_item() -> None:
    env = {"IPFIXER_COLLECTORS": '[{"address": "10.0.0.9", "port": 2055, "protocol": "netflow9"}]'}
    (col,) = load_config(DEFAULT, env=env).collectors
    assert (col.name, col.address, col.port, col.protocol) == ("10.0.0.9:2055", "10.0.0.9", 2055, "netflow9")
    assert load_config(DEFAULT, env={"IPFIXER_COLLECTORS__0__PORT": "2055"}).collectors[0].port == 2055
    assert load_config(DEFAULT, env={"IPFIXER_METRICS__LISTEN": "null"}).metrics.listen is None


@pytest.mark.parametrize(
    "var,line",
    [
        ("IPFIXER_TIMEOUTS__ACTIV", "IPFIXER_TIMEOUTS__ACTIV: timeouts.activ: unknown key (got '30s')"),
        ("IPFIXER_NOPE", "IPFIXER_NOPE: nope: unknown key (got '30s')"),
        ("IPFIXER_LOG_LEVEL__X", "IPFIXER_LOG_LEVEL__X: log_level.x: unknown key (got '30s')"),
        ("IPFIXER_COLLECTORS__3__PORT", "IPFIXER_COLLECTORS__3__PORT: collectors[3].port: no entry [3]"),
    ],
)
def test_env_override_unknown_key(var: str, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, env={var: "30s"})
    assert line in str(info.value)


def test_env_override_bad_value_names_the_variable() -> None:
    env = {"IPFIXER_TIMEOUTS__IDLE": "fast", "IPFIXER_COLLECTORS__0__PROTOCOL": "sflow"}
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT, env=env)
    msg = str(info.value)
    assert "IPFIXER_TIMEOUTS__IDLE: timeouts.idle: invalid duration 'fast' (got 'fast')" in msg
    assert "IPFIXER_COLLECTORS__0__PROTOCOL: collectors[0].protocol: must be one of ipfix, netflow9" in msg


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPFIXER_SAMPLING__INTERVAL", "100")
    assert load_config(DEFAULT).sampling.interval == 100


# ---------------------------------------------------------------------------------------------- schema


def test_schema_file_is_up_to_date() -> None:
    assert json.loads(SCHEMA.read_text()) == config_schema(), (
        "regenerate: python -m ipfixer.config --schema > config/ipfixer.schema.json"
    )


def test_schema_cli_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ipfixer.config", "--schema"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    assert out == SCHEMA.read_text()
    assert json.loads(out)["additionalProperties"] is False
