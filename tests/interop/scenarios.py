"""What the collector interop tests send: the daemon's arrangement (an options refresh, then flow data),
and a collector restart driven through the Exporter over real UDP (the path `ipfixer run` takes)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ipfixer.export import Exporter, ExportSession, UdpTransport
from ipfixer.model import ETH_P_IP, ETH_P_IPV6, FlowRecord, records_to_batch
from ipfixer.templates import Template, load_templates

C = TypeVar("C")
RESTART_TRIES = 20  # batches sent to the stopped collector until the kernel reports ECONNREFUSED


def make_session(protocol: str, boot_ms: int, data: dict[int, Template] | None = None, **kw: Any) -> ExportSession:
    """The shipped templates: IPv4/IPv6 flows (unless `data` gives others), statistics, sampling, interface
    table; observation domain 7."""
    ts = load_templates()
    return ExportSession(
        protocol,  # type: ignore[arg-type]
        7,
        data if data is not None else {ETH_P_IP: ts["ipv4_flow"], ETH_P_IPV6: ts["ipv6_flow"]},
        [ts["options_exporter_stats"], ts["options_sampling"], ts["options_interfaces"]],
        boot_wall_ns=boot_ms * 1_000_000,
        **kw,
    )


def make_exporter(protocol: str, boot_ms: int, port: int, **kw: Any) -> Exporter:
    return Exporter([("c", make_session(protocol, boot_ms, **kw), UdpTransport("127.0.0.1", port))],
                    metering_process_id=4242)  # fmt: skip


SAMPLING = {"samplingInterval": 1, "samplingAlgorithm": 1, "samplingPacketInterval": 1, "samplingPacketSpace": 0}
INTERFACES = {3: "eth0", 4: "veth-ipfx-h1"}


def send_refresh_then_flows(
    exporter: Exporter, records: list[FlowRecord], now_ns: int, sampling: dict[str, int] | None = None
) -> None:
    """As the daemon does at start: one options refresh (all three roles), then the flows."""
    exporter.export_options_refresh(now_ns, sampling=sampling or SAMPLING, interfaces=INTERFACES, ignored_packets=3)
    exporter.export(records_to_batch(records), now_ns)
    assert exporter.stats["c"].error_count == 0, exporter.stats["c"].errors


def tagged(records: list[FlowRecord], tag: int) -> list[FlowRecord]:
    """The same flows with packets = tag + i, so each round is told apart at the collector."""
    return [dataclasses.replace(r, packets=tag + i) for i, r in enumerate(records)]


def restart_round(
    exporter: Exporter, records: list[FlowRecord], now_ns: int, stop: Callable[[], None], start: Callable[[], Any]
) -> Any:
    """Stop the collector, keep exporting until the kernel says ECONNREFUSED (bounded), start it again on
    the same port, export once more: returns the new collector.  The template refresh interval is long,
    so only the failure can make the next message carry the templates."""
    stop()
    st = exporter.stats["c"]
    for i in range(RESTART_TRIES):
        exporter.export(records_to_batch(tagged(records, 500 + 10 * i)), now_ns)
        if st.errors["ECONNREFUSED"]:
            break
        time.sleep(0.05)  # the ICMP port unreachable arrives asynchronously
    assert st.errors["ECONNREFUSED"] >= 1, st.errors
    collector = start()
    exporter.export(records_to_batch(tagged(records, 900)), now_ns)
    return collector


def restart_scenario(
    protocol: str, records: list[FlowRecord], base_ms: int, start: Callable[..., C],
    read: Callable[[C, int], list[int]], first_extra: int = 0,
) -> tuple[list[int], list[int], C]:
    """The whole restart test for a collector that reads while running: start(port=None) one, export the
    refresh and flows tagged 100.., restart it on its port (restart_round), export flows tagged 900...
    read(collector, n) gives the packet counts of the first n data records it decoded (`first_extra`: more
    to wait for in the first round, e.g. options records). Returns (first round, second round, second)."""
    first = start()
    port = first.port
    exporter = make_exporter(protocol, base_ms - 60_000, port, template_refresh_s=3600, template_refresh_messages=0)
    now_ns = base_ms * 1_000_000
    try:
        send_refresh_then_flows(exporter, tagged(records, 100), now_ns)
        before = read(first, 5 + first_extra)
        second = restart_round(exporter, records, now_ns, first.kill, lambda: start(port=port))
        after = read(second, 5)
    finally:
        exporter.close()
    return before, after, second
