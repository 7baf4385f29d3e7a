"""Builds the Exporter (sessions + transports) and the template set from a validated Config.

Kept apart from the sans-I/O session: this is where collector names are resolved (UdpTransport)
and template files are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ipfixer.config import Config
from ipfixer.errors import ConfigError
from ipfixer.export.annotate import templates_use_vrf
from ipfixer.export.exporter import Exporter
from ipfixer.export.options import OptionsRole, interface_values, sampling_values as _sampling_values
from ipfixer.export.pacing import PacingParams
from ipfixer.export.session import ExportSession
from ipfixer.export.transport import UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6
from ipfixer.templates import DEFAULT_TEMPLATES_DIR, Template, load_templates

BIFLOW_TEMPLATES = {ETH_P_IP: "ipv4_biflow", ETH_P_IPV6: "ipv6_biflow"}  # for collectors with biflow: true
TUNNEL_TEMPLATES = {"ipv4_flow": "ipv4_tunnel_flow", "ipv6_flow": "ipv6_tunnel_flow"}  # tunnels.decap: true
VRF_OPTIONS_TEMPLATE = "options_vrfs"  # VRF id -> name, sent when a data template carries VRF ids
__all__ = ["build_exporter", "config_roles", "interface_values", "load_config_templates", "sampling_values"]


def config_roles(config: Config) -> dict[OptionsRole, str]:
    """The options template the config names for each role (templates.exporter_stats, ...)."""
    t = config.templates
    return {OptionsRole.STATS: t.exporter_stats, OptionsRole.SAMPLING: t.sampling, OptionsRole.INTERFACES: t.interfaces,
            OptionsRole.VRFS: VRF_OPTIONS_TEMPLATE}


def load_config_templates(config: Config) -> tuple[dict[int, Template], list[Template]]:
    """(data templates by ethertype, options templates) named by the config; ConfigError if one is missing."""
    tdir = Path(config.templates.directory) if config.templates.directory else DEFAULT_TEMPLATES_DIR
    templates = load_templates(tdir)
    t = config.templates
    ipv4, ipv6 = t.ipv4, t.ipv6
    if config.tunnels.decap:  # the default templates carry no tunnel: the tunnel pair instead (272/273)
        ipv4, ipv6 = TUNNEL_TEMPLATES.get(ipv4, ipv4), TUNNEL_TEMPLATES.get(ipv6, ipv6)
    chosen = {"ipv4": ipv4, "ipv6": ipv6, "exporter_stats": t.exporter_stats, "sampling": t.sampling,
              "interfaces": t.interfaces}
    missing = [f"templates.{key}: no template named {name!r} in {tdir} (got {name!r})"
               for key, name in chosen.items() if name not in templates]
    if missing:
        raise ConfigError("\n".join(missing))
    data = {ETH_P_IP: templates[ipv4], ETH_P_IPV6: templates[ipv6]}
    options = [templates[t.exporter_stats], templates[t.sampling], templates[t.interfaces]]
    if templates_use_vrf(data.values()) and VRF_OPTIONS_TEMPLATE in templates:  # VRF ids: names go with them
        options.append(templates[VRF_OPTIONS_TEMPLATE])
    return data, options


def build_exporter(config: Config, boot_wall_ns: int) -> Exporter:
    """One ExportSession and UdpTransport per configured collector."""
    data, options = load_config_templates(config)
    bi = biflow_templates(config) if any(c.biflow for c in config.collectors) else {}
    collectors: list[tuple[str, ExportSession, Any]] = []  # UdpTransport or export.files.FileTransport
    try:
        for c in config.collectors:
            to_file = c.transport == "file"
            once = c.transport != "udp"  # file, tcp, tls: templates once per file or connection, no refresh
            session = ExportSession(
                c.protocol,
                config.observation_domain_id,
                bi if c.biflow else data,
                options,
                max_message_size=c.max_message_size,
                template_refresh_s=0 if once else c.template_refresh,  # a file: templates once per file
                template_refresh_messages=0 if once else c.template_refresh_messages,
                boot_wall_ns=boot_wall_ns,
            )
            transport: Any
            if to_file:
                from ipfixer.export.files import FileTransport

                assert c.path is not None  # CollectorConfig requires it for transport: file
                transport = FileTransport(c.path, c.rotate_size, c.rotate_interval)
                transport.on_rotate = session.reset  # RFC 5655 8.1: each file starts with the templates
            elif c.transport in ("tcp", "tls"):
                from ipfixer.export.stream import from_config

                transport = from_config(c, session)  # RFC 7011 10.4 / 11
            else:
                pacing = None if c.pacing is None else PacingParams(
                    c.pacing.messages_per_s, c.pacing.bytes_per_s, c.pacing.burst, c.pacing.queue_messages,
                    c.max_message_size)
                transport = UdpTransport(c.address, c.port, pacing=pacing)
            collectors.append((c.name, session, transport))
    except BaseException:
        for _, _, transport in collectors:
            transport.close()
        raise
    return Exporter(collectors, options_roles=config_roles(config), sampling_interval=config.sampling.interval,
                    biflow=[c.name for c in config.collectors if c.biflow],
                    biflow_hold_ns=int(config.timeouts.idle * 1e9),  # a reverse uniflow expires within one idle timeout
                    # at most one waits per flow still held by the meter (bounded: ~250 bytes each)
                    biflow_max_held=min(config.cache.kernel_map_entries + config.cache.accounter_max_entries, 1 << 21))


def biflow_templates(config: Config) -> dict[int, Template]:
    """The RFC 5103 data templates of `biflow: true` collectors (templates/ipv4_biflow, ipv6_biflow)."""
    tdir = Path(config.templates.directory) if config.templates.directory else DEFAULT_TEMPLATES_DIR
    templates = load_templates(tdir)
    missing = [n for n in BIFLOW_TEMPLATES.values() if n not in templates]
    if missing:
        i = next(i for i, c in enumerate(config.collectors) if c.biflow)
        raise ConfigError(f"collectors.{i}.biflow: no template named {missing[0]!r} in {tdir} (got true)")
    return {ethertype: templates[name] for ethertype, name in BIFLOW_TEMPLATES.items()}


def sampling_values(config: Config) -> dict[str, Any]:
    """The sampling options record of a config (options.sampling_values)."""
    return _sampling_values(config.sampling.interval)
