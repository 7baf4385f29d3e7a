"""The Exporting Process: flow columns -> element values (mapping), protocol differences (dialect),
records packed into messages (builder), sequence/refresh rules (session), options records by role
(options), UDP (transport), fan-out to collectors (exporter)."""

from ipfixer.export.dialect import Dialect, IpfixDialect, Netflow9Dialect, netflow9_template
from ipfixer.export.exporter import CollectorStats, Exporter
from ipfixer.export.mapping import ELEMENT_COLUMNS, check_mapped, flow_columns, flow_values
from ipfixer.export.options import OptionsRole
from ipfixer.export.session import ExportSession, Message, SessionStats
from ipfixer.export.transport import UdpTransport

__all__ = [
    "ELEMENT_COLUMNS", "CollectorStats", "Dialect", "ExportSession", "Exporter", "IpfixDialect", "Message",
    "Netflow9Dialect", "OptionsRole", "SessionStats", "UdpTransport", "check_mapped", "flow_columns",
    "flow_values", "netflow9_template",
]  # fmt: skip
