"""The Exporting Process: flow columns -> element values (mapping), messages (session), UDP (transport),
fan-out to collectors (exporter)."""

from ipfixer.export.exporter import CollectorStats, Exporter
from ipfixer.export.mapping import ELEMENT_COLUMNS, check_mapped, flow_columns, flow_values
from ipfixer.export.session import ExportSession, Message, SessionStats, netflow9_template
from ipfixer.export.transport import UdpTransport

__all__ = [
    "ELEMENT_COLUMNS", "CollectorStats", "ExportSession", "Exporter", "Message", "SessionStats",
    "UdpTransport", "check_mapped", "flow_columns", "flow_values", "netflow9_template",
]  # fmt: skip
