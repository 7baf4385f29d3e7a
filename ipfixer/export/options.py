"""The Options Data Records ipfixer sends (RFC 7011 4): exporter statistics, sampling, interface table.

Which template carries which record is the role the config names (`templates.exporter_stats`,
`templates.sampling`, `templates.interfaces`), never guessed from the fields a template has.  The
records of one refresh travel together in one message of their own (see ExportSession.options_messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

SAMPLING_ALGORITHM_DETERMINISTIC = 1  # IANA samplingAlgorithm (35): 1 deterministic, 2 random
SAMPLING_ALGORITHM_RANDOM = 2


class OptionsRole(StrEnum):
    """What an options template is for; the values are the config keys under `templates`."""

    STATS = "exporter_stats"
    SAMPLING = "sampling"
    INTERFACES = "interfaces"
    VRFS = "vrfs"  # VRF table (templates/options_vrfs.yaml), sent when the data templates carry VRF ids


# The shipped templates for each role (templates/options_*.yaml), used when no config names them.
DEFAULT_ROLES: Mapping[OptionsRole, str] = {
    OptionsRole.STATS: "options_exporter_stats",
    OptionsRole.SAMPLING: "options_sampling",
    OptionsRole.INTERFACES: "options_interfaces",
    OptionsRole.VRFS: "options_vrfs",
}


def stats_values(
    *, domain_id: int, metering_process_id: int, messages: int, flow_records: int, octets: int, not_sent: int,
    ignored_packets: int, ignored_octets: int, boot_wall_ns: int,
) -> dict[str, Any]:
    """Exporting / Metering Process statistics (RFC 7011 4.1, 4.2), keyed by IANA element name."""
    return {
        "observationDomainId": domain_id,
        "meteringProcessId": metering_process_id,
        "exportedMessageTotalCount": messages,
        "exportedFlowRecordTotalCount": flow_records,
        "exportedOctetTotalCount": octets,
        "notSentFlowTotalCount": not_sent,
        "ignoredPacketTotalCount": ignored_packets,
        "ignoredOctetTotalCount": ignored_octets,
        "systemInitTimeMilliseconds": boot_wall_ns // 1_000_000,
    }


def sampling_values(interval: int) -> dict[str, Any]:
    """The sampling record: 1-in-N random packet sampling (N = 1: every packet, deterministic)."""
    return {
        "samplingInterval": interval,
        "samplingAlgorithm": SAMPLING_ALGORITHM_RANDOM if interval > 1 else SAMPLING_ALGORITHM_DETERMINISTIC,
        "samplingPacketInterval": 1,
        "samplingPacketSpace": interval - 1,
    }


def interface_values(names: Mapping[int, str]) -> list[dict[str, Any]]:
    """Interface table records: one per metered interface (ifindex -> interfaceName)."""
    return [{"ingressInterface": ifindex, "interfaceName": name} for ifindex, name in sorted(names.items())]
