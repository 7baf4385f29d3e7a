"""Builds the Exporter (sessions + transports) and the template set from a validated Config.

Kept apart from the sans-I/O session: this is where collector names are resolved (UdpTransport)
and template files are read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ipfixer.config import Config
from ipfixer.errors import ConfigError
from ipfixer.export.exporter import Exporter
from ipfixer.export.session import ExportSession
from ipfixer.export.transport import UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6
from ipfixer.templates import DEFAULT_TEMPLATES_DIR, Template, load_templates

SAMPLING_ALGORITHM_RANDOM = 2  # IANA samplingAlgorithm (35): 1 deterministic, 2 random


def load_config_templates(config: Config) -> tuple[dict[int, Template], list[Template]]:
    """(data templates by ethertype, options templates) named by the config; ConfigError if one is missing."""
    tdir = Path(config.templates.directory) if config.templates.directory else DEFAULT_TEMPLATES_DIR
    templates = load_templates(tdir)
    t = config.templates
    chosen = {"ipv4": t.ipv4, "ipv6": t.ipv6, "exporter_stats": t.exporter_stats, "sampling": t.sampling,
              "interfaces": t.interfaces}
    missing = [f"templates.{key}: no template named {name!r} in {tdir} (got {name!r})"
               for key, name in chosen.items() if name not in templates]
    if missing:
        raise ConfigError("\n".join(missing))
    data = {ETH_P_IP: templates[t.ipv4], ETH_P_IPV6: templates[t.ipv6]}
    options = [templates[t.exporter_stats], templates[t.sampling], templates[t.interfaces]]
    return data, options


def build_exporter(config: Config, boot_wall_ns: int) -> Exporter:
    """One ExportSession and UdpTransport per configured collector."""
    data, options = load_config_templates(config)
    collectors: list[tuple[str, ExportSession, UdpTransport]] = []
    try:
        for c in config.collectors:
            session = ExportSession(
                c.protocol,
                config.observation_domain_id,
                data,
                options,
                max_message_size=c.max_message_size,
                template_refresh_s=c.template_refresh,
                template_refresh_messages=c.template_refresh_messages,
                boot_wall_ns=boot_wall_ns,
            )
            collectors.append((c.name, session, UdpTransport(c.address, c.port)))
    except BaseException:
        for _, _, transport in collectors:
            transport.close()
        raise
    return Exporter(collectors)


def interface_values(names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Interface table options records: one per metered interface (ifindex -> interfaceName)."""
    return [{"ingressInterface": ifindex, "interfaceName": name} for ifindex, name in sorted(names.items())]


def sampling_values(config: Config) -> dict[str, Any]:
    """The sampling options record: 1-in-N random packet sampling (N = 1: every packet)."""
    n = config.sampling.interval
    return {
        "samplingInterval": n,
        "samplingAlgorithm": SAMPLING_ALGORITHM_RANDOM if n > 1 else 1,
        "samplingPacketInterval": 1,
        "samplingPacketSpace": n - 1,
    }
