"""The appliance's configuration: one YAML file, overridable from the environment, validated up front.

Every model forbids unknown keys (a typo must fail, not be silently ignored) and is frozen (the daemon
shares one Config between threads). `load_config` reports every problem at once, one line each, as
`<file>: <key.path>: <problem> (got <value>)`, and never lets a traceback reach the user.
Regenerate the checked-in schema with `python -m ipfixer.config --schema > config/ipfixer.schema.json`.
"""

from __future__ import annotations

import argparse
import fnmatch
import ipaddress
import json
import math
import os
import re
import reprlib
import socket
import sys
import threading
import time
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from ipfixer.errors import ConfigError, ConfigLimitError
from ipfixer.yamlbound import load_yaml_text, read_yaml_file

ENV_PREFIX = "IPFIXER_"
# IPFIXER_* variables that are not config overrides (so they are not "unknown key" errors).
ENV_RESERVED = frozenset({"IPFIXER_CONFIG", "IPFIXER_REQUIRE_KERNEL_TESTS"})

U32_MAX = 2**32 - 1

# The bounds on a config input (size, depth, nodes, aliases) are ipfixer.yamlbound's.
MAX_LISTED_ERRORS = 20  # the rest are counted, not listed

# ---------------------------------------------------------------------------------------------- types

_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """`30s`, `500ms`, `5m`, `1h`, `1m30s` or a bare number of seconds -> float seconds (> 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"invalid duration {value!r}")  # noqa: TRY004 - pydantic reports only ValueError
    if isinstance(value, str):
        text = value.strip().lower()
        if _DURATION_RE.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"invalid duration {value!r}") from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}")
    if seconds <= 0:
        raise ValueError("duration must be greater than 0")
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, for messages: 90.0 -> '1m30s'."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    out, rest = "", seconds
    for unit, size in (("h", 3600), ("m", 60)):
        if rest >= size:
            whole = int(rest // size)
            out += f"{whole}{unit}"
            rest -= whole * size
    if rest or not out:
        out += f"{rest:g}s"
    return out


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": r"^(\d+(\.\d+)?(ms|s|m|h))+$"},
                {"type": "number", "exclusiveMinimum": 0},
            ],
            "description": "duration: 30s, 500ms, 5m, 1h, 1m30s or a number of seconds",
        }
    ),
]
NonEmptyStr = Annotated[str, Field(min_length=1)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}\.?$){_LABEL}(?:\.{_LABEL})*\.?")
_HOST_PORT_RE = re.compile(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)")


def split_host_port(listen: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port); the one parser for metrics.listen and its users."""
    match = _HOST_PORT_RE.fullmatch(listen.strip())
    if not match:
        raise ValueError("must be host:port, e.g. 127.0.0.1:9478 or [::1]:9478")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    return host, port


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if ":" in value:
        raise ValueError("not an IP address or host name (the port goes in 'port')")
    if not _HOSTNAME_RE.fullmatch(value):
        raise ValueError("not an IP address or host name")
    if value.rstrip(".").rsplit(".", 1)[-1].isdigit():  # RFC 1123 2.1, RFC 3696 2: never a name's last label
        raise ValueError("not an IP address (an IPv4 address is 4 numbers 0-255) nor a host name")
    return value


RESOLVE_TIMEOUT_S = 5.0


def resolve_collectors(config: Config, source: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> None:
    """Resolve every collector name as the exporter will (UDP getaddrinfo), all at once, within timeout_s:
    ConfigError naming `collectors[i].address` for each that does not resolve, so `check` catches what
    `run` would refuse. Daemon threads: a resolver that never answers cannot keep the process alive."""
    results: dict[int, str | None] = {}
    threads = []

    def resolve(i: int, host: str, port: int) -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
            results[i] = None if infos else "resolves to no address"
        except (OSError, UnicodeError) as e:
            results[i] = f"does not resolve: {e.strerror if isinstance(e, socket.gaierror) else e}"

    for i, c in enumerate(config.collectors):
        if c.transport == "file":
            continue
        try:
            ipaddress.ip_address(c.address)
            continue
        except ValueError:
            pass
        t = threading.Thread(target=resolve, args=(i, c.address, c.port), daemon=True, name=f"resolve-{i}")
        t.start()
        threads.append((i, t))
    deadline = time.monotonic() + timeout_s
    errors = []
    for i, t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        problem = results.get(i, f"no answer from the resolver within {format_duration(timeout_s)}")
        if problem is not None:
            errors.append(f"{source}: collectors[{i}].address: {problem} (got {config.collectors[i].address!r})")
    if errors:
        raise ConfigError("\n".join(errors))


# --------------------------------------------------------------------------------------------- models


def _non_empty(value: tuple[Any, ...]) -> tuple[Any, ...]:
    # Checked after the items (not min_length): pydantic adds a bogus "too short" when an item is invalid.
    if not value:
        raise ValueError("must have at least 1 entry")
    return value


_MODEL = ConfigDict(extra="forbid", frozen=True)


class InterfacesConfig(BaseModel):
    """Which interfaces the meter attaches to; globs matched against interface names."""

    model_config = _MODEL

    include: tuple[NonEmptyStr, ...] = Field(
        default=("*",), json_schema_extra={"minItems": 1}, description="globs of interfaces to meter"
    )
    exclude: tuple[NonEmptyStr, ...] = Field(default=("lo",), description="globs removed from include")
    direction: Literal["ingress", "egress", "both"] = "both"

    @field_validator("include")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _non_empty(value)


class TlsConfig(BaseModel):
    """transport: tls (RFC 7011 11): how the Collector's certificate is verified, and ours (optional)."""

    model_config = _MODEL

    ca_file: Path | None = Field(default=None, description="CA certificates (PEM) to verify the collector; "
                                                           "null = the system's trust store")
    server_name: str | None = Field(default=None, description="name the certificate must carry; null = address")
    cert_file: Path | None = Field(default=None, description="client certificate (PEM), if the collector asks")
    key_file: Path | None = Field(default=None, description="its private key (PEM); null = in cert_file")

    @model_validator(mode="after")
    def _files(self) -> TlsConfig:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{key}: no such file (got {str(path)!r})")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file: needs cert_file")
        return self


Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PacingConfig(BaseModel):
    """UDP export pacing (export/pacing.py): messages over the rate wait in a bounded queue instead of
    going out in one burst a small collector socket buffer drops."""

    model_config = _MODEL

    messages_per_s: Rate | None = Field(default=None, description="at most this many messages per second")
    bytes_per_s: Rate | None = Field(default=None, description="at most this many UDP payload bytes per second")
    burst: StrictInt = Field(default=64, ge=1, le=1 << 20, description="messages sent back to back at most "
                             "(the byte budget holds burst * max_message_size)")
    queue_messages: StrictInt = Field(default=65536, ge=0, le=1 << 22, description="messages kept waiting at "
                                      "most (each up to max_message_size bytes); beyond, new ones are dropped "
                                      "and counted")

    @model_validator(mode="after")
    def _some_rate(self) -> PacingConfig:
        if self.messages_per_s is None and self.bytes_per_s is None:
            raise ValueError("set messages_per_s or bytes_per_s (or both)")
        return self


class CollectorConfig(BaseModel):
    """One export destination: UDP, TCP or TLS to address:port, or RFC 5655 IPFIX files (transport: file)."""

    model_config = _MODEL

    name: str = Field(default="", description="label in logs and metrics; default '<address>:<port>'")
    address: str = Field(default="", description="IP address or host name (resolved when the exporter starts); "
                                                 "required for udp, empty for file")
    port: Port = 4739
    transport: Literal["udp", "tcp", "tls", "file"] = Field(
        default="udp", description="udp; tcp or tls (RFC 7011 10.4, 11); or file: IPFIX files at path")
    reconnect_interval: Duration = Field(default=60.0, description="tcp/tls: least time between reconnect "
                                                                   "attempts (doubles while they fail)")
    buffer_messages: StrictInt = Field(default=4096, ge=0, description="tcp/tls: messages kept while the "
                                                                       "collector is unreachable")
    tls: TlsConfig | None = Field(default=None, description="transport: tls: certificate verification")
    path: Path | None = Field(default=None, description="file: where to write; rotated files are named "
                                                        "<stem>.<UTC time>.<n><suffix>")
    rotate_size: StrictInt = Field(default=0, ge=0, description="file: start a new file after this many bytes (0 = never)")
    rotate_interval: Duration | None = Field(default=None, description="file: start a new file this often (null = never)")
    protocol: Literal["ipfix", "netflow9"] = "ipfix"
    biflow: StrictBool = Field(default=False, description="RFC 5103 biflow records (both directions in one "
                               "record, reverse elements PEN 29305) instead of uniflows; IPFIX only")
    template_refresh: Duration = Field(default=30.0, description="resend templates at least this often")
    template_refresh_messages: StrictInt = Field(
        default=20, ge=0, description="...and every N messages (0 = off)"
    )
    max_message_size: StrictInt = Field(default=1452, ge=256, le=65507, description="bytes per UDP payload")
    pacing: PacingConfig | None = Field(default=None, description="udp: spread messages at a rate instead of "
                                        "bursts (null = off: every message sent at once)")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_host(value) if value else value

    @model_validator(mode="after")
    def _default_name(self) -> CollectorConfig:
        if self.biflow and self.protocol != "ipfix":
            raise ValueError(f"biflow: RFC 5103 reverse elements are enterprise elements, which NetFlow v9 "
                             f"cannot carry; use protocol: ipfix (got protocol {self.protocol!r})")
        if self.transport == "file":
            if self.path is None:
                raise ValueError("path: required with transport: file")
            if self.address:
                raise ValueError(f"address: a file collector has none (got {self.address!r})")
            if self.protocol != "ipfix":
                raise ValueError(f"protocol: IPFIX files (RFC 5655) hold IPFIX only (got {self.protocol!r})")
            if not self.name:
                object.__setattr__(self, "name", f"file:{self.path}")
            return self
        if not self.address:
            raise ValueError("address: required (an IP address or host name)")
        if self.path is not None or self.rotate_size or self.rotate_interval is not None:
            raise ValueError("path, rotate_size and rotate_interval are for transport: file only")
        if self.pacing is not None and self.transport != "udp":
            raise ValueError(f"pacing: only with transport: udp (got transport {self.transport!r})")
        if self.tls is not None and self.transport != "tls":
            raise ValueError(f"tls: only with transport: tls (got transport {self.transport!r})")
        if self.transport in ("tcp", "tls") and self.protocol != "ipfix":
            raise ValueError(f"protocol: over {self.transport} ipfixer exports IPFIX only (got {self.protocol!r})")
        if not self.name:
            host = f"[{self.address}]" if ":" in self.address else self.address
            scheme = "" if self.transport == "udp" else f"{self.transport}://"
            object.__setattr__(self, "name", f"{scheme}{host}:{self.port}")  # frozen: set once, while validating
        return self


class TimeoutsConfig(BaseModel):
    """Flow expiry: a flow is exported after `active` even if busy, or after `idle` without packets."""

    model_config = _MODEL

    active: Duration = 60.0
    idle: Duration = 15.0
    drain_interval: Duration = Field(default=1.0, description="how often the kernel flow map is drained")

    @field_validator("idle")
    @classmethod
    def _idle_le_active(cls, value: float, info: ValidationInfo) -> float:
        active = info.data.get("active")
        if active is not None and value > active:
            raise ValueError(f"must be <= timeouts.active ({format_duration(active)})")
        return value

    @field_validator("drain_interval")
    @classmethod
    def _drain_le_idle(cls, value: float, info: ValidationInfo) -> float:
        idle = info.data.get("idle")
        if idle is not None and value > idle:
            raise ValueError(f"must be <= timeouts.idle ({format_duration(idle)})")
        return value


class CacheConfig(BaseModel):
    """Sizes of the kernel flow map, the ring buffer and the userspace Accounter."""

    model_config = _MODEL

    kernel_map_entries: StrictInt = Field(default=65536, ge=16, le=16 * 1024 * 1024)
    ring_buffer_pages: StrictInt = Field(default=1024, ge=1, le=1 << 20, description="a power of two")
    accounter_max_entries: StrictInt = Field(default=10000, ge=1, le=16 * 1024 * 1024)
    accounter_evict_timeout: Duration = 5.0

    @field_validator("ring_buffer_pages")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("must be a power of two")
        return value


class SamplingConfig(BaseModel):
    """Packet sampling, announced to collectors through the sampling options template."""

    model_config = _MODEL

    interval: StrictInt = Field(default=1, ge=1, le=U32_MAX, description="1 in N packets; 1 = unsampled")


class TunnelsConfig(BaseModel):
    """Tunnelled traffic on underlay interfaces (VXLAN, Geneve, GRE/GRETAP, IPIP/SIT/IPv6-in-IPv6)."""

    model_config = _MODEL

    decap: StrictBool = Field(
        default=False,
        description="meter the inner flow of one level of encapsulation, keyed also by the tunnel (VNI or "
                    "GRE key, outer addresses); false = the outer flow only. A compile-time flag: restart to change")
    interfaces: tuple[NonEmptyStr, ...] = Field(
        default=("*",), json_schema_extra={"minItems": 1},
        description="globs of the metered interfaces whose tunnels are decapsulated (the underlay); the others "
                    "meter outer flows only. Follows reloads and interfaces that come and go")

    @field_validator("interfaces")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _non_empty(value)

    def decapsulates(self, name: str) -> bool:
        """Whether packets seen on interface `name` are decapsulated."""
        return self.decap and any(fnmatch.fnmatchcase(name, g) for g in self.interfaces)


class TemplatesConfig(BaseModel):
    """Which template files describe the exported records."""

    model_config = _MODEL

    directory: Path | None = Field(default=None, description="null = the shipped templates/ directory")
    ipv4: NonEmptyStr = "ipv4_flow"
    ipv6: NonEmptyStr = "ipv6_flow"
    exporter_stats: NonEmptyStr = "options_exporter_stats"
    sampling: NonEmptyStr = "options_sampling"
    interfaces: NonEmptyStr = "options_interfaces"
    stats_interval: Duration = Field(
        default=60.0, description="how often the statistics options records are sent"
    )


class EnrichmentConfig(BaseModel):
    """Optional data added to flows."""

    model_config = _MODEL

    conntrack: StrictBool = False
    nat_events: StrictBool = False
    cgroups: StrictBool = False
    nflog_group: StrictInt = Field(default=5, ge=0, le=65535)
    # conntrack table kept by ipfixer (ipfixer/enrich/ctsync.py): its bound, how often it is re-dumped
    # (also after every event overrun), and the event socket's receive buffer
    conntrack_max_entries: StrictInt = Field(default=2_097_152, ge=1024, le=1 << 26)
    conntrack_resync_interval: Duration = Field(default=60.0, description="full conntrack re-dump period")
    conntrack_events_buffer: StrictInt = Field(
        default=16 << 20, ge=4096, le=1 << 30, description="bytes; events beyond it overrun (then a resync)"
    )


class MetricsConfig(BaseModel):
    """The Prometheus endpoint."""

    model_config = _MODEL

    listen: str | None = Field(default="127.0.0.1:9478", description="host:port, or null to disable")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            split_host_port(value)
        return value


class Config(BaseModel):
    """The whole configuration file."""

    model_config = _MODEL

    observation_domain_id: StrictInt = Field(default=1, ge=0, le=U32_MAX)
    source: Literal["ebpf", "nflog"] = "ebpf"
    interfaces: InterfacesConfig = InterfacesConfig()  # frozen: one shared default is safe
    collectors: tuple[CollectorConfig, ...] = Field(json_schema_extra={"minItems": 1})
    timeouts: TimeoutsConfig = TimeoutsConfig()  # frozen: one shared default is safe
    cache: CacheConfig = CacheConfig()  # frozen: one shared default is safe
    sampling: SamplingConfig = SamplingConfig()  # frozen: one shared default is safe
    templates: TemplatesConfig = TemplatesConfig()  # frozen: one shared default is safe
    tunnels: TunnelsConfig = TunnelsConfig()  # frozen: one shared default is safe
    enrichment: EnrichmentConfig = EnrichmentConfig()  # frozen: one shared default is safe
    metrics: MetricsConfig = MetricsConfig()  # frozen: one shared default is safe
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    lock_dir: Path = Field(default=Path("/run/ipfixer"), description="where the instance lock lives")
    control_socket: Path | None = Field(
        default=None, description="unix socket of `ipfixer ctl` (root only); null = "
                                  "<lock_dir>/ctl-netns-<inode>.sock, one per network namespace")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("collectors")
    @classmethod
    def _unique(cls, value: tuple[CollectorConfig, ...]) -> tuple[CollectorConfig, ...]:
        _non_empty(value)
        endpoints: dict[tuple[str, int | str], int] = {}
        names: dict[str, int] = {}
        for i, c in enumerate(value):
            where = (f"{c.transport}:{c.address}", c.port) if c.transport != "file" else ("file", str(c.path))
            if where in endpoints:
                raise ValueError(f"collectors {endpoints[where]} and {i} are both {c.name}")
            if c.name in names:
                raise ValueError(f"collectors {names[c.name]} and {i} have the same name {c.name!r}")
            endpoints[where] = i
            names[c.name] = i
        return value


def config_schema() -> dict[str, Any]:
    """The JSON schema of the file (editors, `ipfixer config schema`)."""
    return Config.model_json_schema()


# --------------------------------------------------------------------------------------------- errors

Loc = tuple[str | int, ...]


def format_loc(loc: Sequence[str | int]) -> str:
    """('collectors', 0, 'port') -> 'collectors[0].port'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_REPR = reprlib.Repr()  # keyword arguments only from Python 3.12
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring = 3, 4, 4, 4, 80


def _short_repr(value: Any, limit: int = 80) -> str:
    # reprlib for containers: a bad value may be a 100,000-node structure; repr() of it all is not needed
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _problem(err: Mapping[str, Any]) -> str:
    kind, ctx, msg = err["type"], err.get("ctx") or {}, str(err["msg"])
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        return "must be one of " + ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    if kind in ("value_error", "assertion_error"):
        return re.sub(r"^(Value|Assertion) error, ", "", msg)
    bounds = {"greater_than_equal": ">= {ge}", "less_than_equal": "<= {le}", "greater_than": "> {gt}",
              "less_than": "< {lt}"}
    if kind in bounds:
        return "must be " + bounds[kind].format(**ctx)
    simple = {
        "int_type": "must be an integer", "int_parsing": "must be an integer",
        "int_from_float": "must be an integer", "bool_type": "must be true or false",
        "bool_parsing": "must be true or false", "string_type": "must be a string",
        "string_too_short": "must not be empty",
        "list_type": "must be a list", "tuple_type": "must be a list",
        "model_type": "must be a mapping", "dict_type": "must be a mapping",
        "model_attributes_type": "must be a mapping", "path_type": "must be a path",
    }
    if kind in simple:
        return simple[kind]
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must have at least {n} {'entry' if n == 1 else 'entries'}"
    return msg


def format_validation_error(
    error: ValidationError, source: str, origins: Mapping[Loc, str] | None = None, limit: int | None = None
) -> list[str]:
    """One line per pydantic error (the first `limit` of them); a value that came from an environment
    variable names the variable."""
    lines = []
    for err in error.errors()[:limit]:
        loc = tuple(err["loc"])
        where = source
        for origin, var in (origins or {}).items():
            if loc[: len(origin)] == origin:
                where = var
        line = f"{where}: {format_loc(loc)}: {_problem(err)}"
        if err["type"] != "missing":
            line += f" (got {_short_repr(err.get('input'))})"
        lines.append(line)
    return lines


# ------------------------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path, "a config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values (got {type(data).__name__})")
    return data


def _inner_model(annotation: Any) -> tuple[type[BaseModel] | None, bool, bool]:
    """(sub-model, is a sequence of it, is string-like) for a field annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (tuple, list) and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], True, False
    if origin in (typing.Union, types.UnionType):
        stringy = all(_inner_model(a)[2] for a in args if a is not type(None))
        return None, False, stringy
    return None, False, annotation in (str, Path) or origin is Literal


def _resolve_env_key(parts: list[str]) -> tuple[Loc, str | None, bool]:
    """Map the lower-cased pieces of a variable name onto Config: (loc, problem, value is string-like)."""
    model: type[BaseModel] | None = Config
    loc: list[str | int] = []
    stringy = False
    i = 0
    while i < len(parts):
        part = parts[i]
        if model is None or part not in model.model_fields:
            return (*loc, part), "unknown key", False
        loc.append(part)
        model, is_seq, stringy = _inner_model(model.model_fields[part].annotation)
        if is_seq and i + 1 < len(parts):
            i += 1
            if not parts[i].isdigit():
                return (*loc, parts[i]), "expected a list index", False
            loc.append(int(parts[i]))
        i += 1
    return tuple(loc), None, stringy


def _env_value(raw: str, stringy: bool, var: str) -> Any:
    if stringy:  # keep '::1', 'no', '12:30' as written; only null clears an optional string
        return None if raw.strip().lower() in ("null", "~") else raw
    try:
        return load_yaml_text(raw, var)  # the same bounds as a file: a variable can hold a YAML bomb too
    except ConfigLimitError:
        raise
    except ConfigError:
        return raw


def _set_loc(data: dict[str, Any], loc: Loc, value: Any) -> str | None:
    """Set data at loc, creating mappings on the way; the problem if a list index does not exist."""
    node: Any = data
    for depth, key in enumerate(loc):
        last = depth == len(loc) - 1
        if isinstance(key, int):
            if not isinstance(node, list) or key >= len(node):
                count = len(node) if isinstance(node, list) else 0
                return f"no entry [{key}] to override (the file has {count})"
        elif not isinstance(node, dict):
            return "cannot override inside a value that is not a mapping"
        if last:
            node[key] = value
        else:
            if isinstance(key, str) and not isinstance(node.get(key), (dict, list)):
                node[key] = {}
            node = node[key]
    return None


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> tuple[dict[Loc, str], list[str]]:
    """Apply IPFIXER_A__B=value to data in place: ({loc: variable}, error lines)."""
    origins: dict[Loc, str] = {}
    errors: list[str] = []
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in ENV_RESERVED:
            continue
        raw = env[var]
        loc, problem, stringy = _resolve_env_key(var[len(ENV_PREFIX):].lower().split("__"))
        if problem is None:
            problem = _set_loc(data, loc, _env_value(raw, stringy, var))
        if problem is not None:
            errors.append(f"{var}: {format_loc(loc)}: {problem} (got {_short_repr(raw)})")
        else:
            origins[loc] = var
    return origins, errors


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, override from the environment, validate; ConfigError lists every problem at once."""
    path = Path(path)
    data = _read_yaml(path)
    origins, errors = apply_env_overrides(data, os.environ if env is None else env)
    templates = data.get("templates")
    if isinstance(templates, dict) and isinstance(templates.get("directory"), str):
        # a relative template directory is relative to the config file, not to the daemon's cwd
        templates["directory"] = str(path.parent / templates["directory"])
    total = len(errors)
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        total += e.error_count()
        errors += format_validation_error(e, str(path), origins, limit=max(0, MAX_LISTED_ERRORS - len(errors)))
        config = None
    if total > MAX_LISTED_ERRORS:
        errors = errors[:MAX_LISTED_ERRORS]
        errors.append(f"{path}: ... and {total - MAX_LISTED_ERRORS:,} more errors "
                      f"({total:,} in all; the first {MAX_LISTED_ERRORS} are listed)")
    if errors:
        raise ConfigError("\n".join(errors))
    assert config is not None
    return config


def main(argv: list[str] | None = None) -> int:
    """`python -m ipfixer.config --schema` prints the JSON schema; `--check FILE` validates a file."""
    parser = argparse.ArgumentParser(prog="python -m ipfixer.config", description=main.__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--schema", action="store_true", help="print the JSON schema")
    group.add_argument("--check", metavar="FILE", help="validate FILE (with IPFIXER_* overrides)")
    args = parser.parse_args(argv)
    if args.schema:
        sys.stdout.write(json.dumps(config_schema(), indent=2, sort_keys=True) + "\n")
        return 0
    try:
        load_config(args.check)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    print(f"{args.check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
