"""Metrics: a private registry, served over real HTTP on 127.0.0.1 and read back with `scrape`."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest

from ipfixer.errors import ConfigError, IpfixerError
from ipfixer.metrics import Metrics, parse, sample_key, scrape


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    metrics = Metrics(collectors=["local"])
    listen = f"127.0.0.1:{free_port()}"
    metrics.start_http(listen)
    try:
        yield metrics, listen
    finally:
        metrics.stop_http()


def test_scrape_over_http(served: tuple[Metrics, str]) -> None:
    m, listen = served
    m.packets_observed.labels("ingress").inc(10)
    m.octets_observed.labels("ingress").inc(1500)
    m.flows_exported.inc(3)
    m.collector_records.labels("local").inc(3)
    m.collector_messages.labels("local").inc()
    m.collector_bytes.labels("local").inc(200)
    m.collector_errors.labels("remote").inc()
    m.template_refreshes.labels("local").inc(2)
    m.kernel_map_fill_ratio.set(0.25)
    m.overflow_packets.inc(4)
    m.ringbuf_losses.inc(5)
    m.accounter_evictions.inc(6)
    m.drain_duration.observe(0.003)
    m.malformed_packets.inc(7)
    m.conntrack_enrichments.inc(8)

    values = scrape(f"http://{listen}/metrics")
    assert values == scrape(listen)  # a bare metrics.listen works too
    expected = {
        'ipfixer_packets_observed_total{direction="ingress"}': 10,
        'ipfixer_packets_observed_total{direction="egress"}': 0,
        'ipfixer_octets_observed_total{direction="ingress"}': 1500,
        "ipfixer_flows_exported_total": 3,
        'ipfixer_collector_records_total{collector="local"}': 3,
        'ipfixer_collector_messages_total{collector="local"}': 1,
        'ipfixer_collector_bytes_total{collector="local"}': 200,
        'ipfixer_collector_errors_total{collector="local"}': 0,
        'ipfixer_collector_errors_total{collector="remote"}': 1,
        'ipfixer_template_refreshes_total{collector="local"}': 2,
        "ipfixer_kernel_map_fill_ratio": 0.25,
        "ipfixer_overflow_packets_total": 4,
        "ipfixer_ringbuf_losses_total": 5,
        "ipfixer_accounter_evictions_total": 6,
        "ipfixer_drain_duration_seconds_count": 1,
        "ipfixer_drain_duration_seconds_sum": 0.003,
        'ipfixer_drain_duration_seconds_bucket{le="0.005"}': 1,
        'ipfixer_drain_duration_seconds_bucket{le="0.0025"}': 0,
        "ipfixer_malformed_packets_total": 7,
        "ipfixer_conntrack_enrichments_total": 8,
    }
    for key, value in expected.items():
        assert values[key] == pytest.approx(value), key
    assert all(k.startswith("ipfixer_") for k in values)
    assert not any("_created" in k for k in values)


def test_render_matches_what_is_served(served: tuple[Metrics, str]) -> None:
    m, listen = served
    m.flows_exported.inc(2)
    assert parse(m.render().decode()) == scrape(listen)


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    a.flows_exported.inc()
    assert parse(a.render().decode())["ipfixer_flows_exported_total"] == 1
    assert parse(b.render().decode())["ipfixer_flows_exported_total"] == 0


def test_http_address_and_stop(served: tuple[Metrics, str]) -> None:
    m, listen = served
    assert m.http_address == ("127.0.0.1", int(listen.rsplit(":", 1)[1]))
    m.stop_http()
    assert m.http_address is None
    with pytest.raises(IpfixerError, match="cannot scrape"):
        scrape(listen, timeout=2)


def test_port_in_use_is_a_config_error(served: tuple[Metrics, str]) -> None:
    _, listen = served
    with pytest.raises(ConfigError, match=f"metrics.listen: cannot listen on {listen}"):
        Metrics().start_http(listen)


def test_bad_listen_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="metrics.listen: must be host:port"):
        Metrics().start_http("9478")


def test_scrape_refuses_other_schemes() -> None:
    with pytest.raises(IpfixerError, match="only http"):
        scrape("file:///etc/passwd")


def test_sample_key_sorts_and_escapes() -> None:
    assert sample_key("x", {}) == "x"
    assert sample_key("x", {"b": "2", "a": 'q"'}) == 'x{a="q\\"",b="2"}'


def test_count_flows_by_direction() -> None:
    from ipfixer.model import FLOW_DTYPE

    m = Metrics()
    batch = np.zeros(3, dtype=FLOW_DTYPE)
    batch["direction"] = [0, 1, 0]
    batch["packets"] = [2, 3, 4]
    batch["octets"] = [100, 200, 300]
    m.count_flows(batch)
    m.count_flows(batch[:0])
    m.count_enriched(2)
    m.observe_drain(0.01)
    v = parse(m.render().decode())
    assert v["ipfixer_flows_exported_total"] == 3
    assert v['ipfixer_packets_observed_total{direction="ingress"}'] == 6
    assert v['ipfixer_packets_observed_total{direction="egress"}'] == 3
    assert v['ipfixer_octets_observed_total{direction="ingress"}'] == 400
    assert v["ipfixer_conntrack_enrichments_total"] == 2
    assert v["ipfixer_drain_duration_seconds_count"] == 1


def _exporter(**stats: int) -> SimpleNamespace:
    errors = stats.pop("errors", 0)
    refreshes = stats.pop("refreshes", 0)
    st = SimpleNamespace(error_count=errors, **stats)
    session = SimpleNamespace(stats=SimpleNamespace(template_refreshes=refreshes))
    return SimpleNamespace(collectors=[SimpleNamespace(name="c1", stats=st, session=session)])


def test_update_exporter_counts_deltas_and_survives_a_reload() -> None:
    m = Metrics()
    old = _exporter(records=10, messages=2, bytes=500, errors=1, refreshes=1)
    m.update_exporter(old)
    old.collectors[0].stats.records = 15
    m.update_exporter(old)
    m.update_exporter(old)
    new = _exporter(records=4, messages=1, bytes=100, errors=0, refreshes=1)  # reload: totals restart
    m.update_exporter(new)
    v = parse(m.render().decode())
    assert v['ipfixer_collector_records_total{collector="c1"}'] == 19
    assert v['ipfixer_collector_messages_total{collector="c1"}'] == 3
    assert v['ipfixer_collector_bytes_total{collector="c1"}'] == 600
    assert v['ipfixer_collector_errors_total{collector="c1"}'] == 1
    assert v['ipfixer_template_refreshes_total{collector="c1"}'] == 2


def test_kernel_counters_drive_observed_and_classifier_series() -> None:
    """With a live meter (observed_live), packets/octets_observed follow the kernel's counters and
    exported flows do not count them a second time; every other counter has its own series."""
    from ipfixer.model import FLOW_DTYPE

    m = Metrics()
    m.observed_live = True
    m.count_classifier({"observed_packets_ingress": 7, "observed_octets_ingress": 700, "observed_packets_egress": 0,
                        "observed_octets_egress": 0, "non_ip": 2, "fragment": 0, "bad_length": 3})
    m.count_classifier({"observed_packets_ingress": 1, "observed_octets_ingress": 50, "non_ip": 1})
    batch = np.zeros(2, dtype=FLOW_DTYPE)
    batch["packets"] = [5, 3]
    batch["octets"] = [500, 250]
    m.count_flows(batch)
    v = parse(m.render().decode())
    assert v['ipfixer_packets_observed_total{direction="ingress"}'] == 8
    assert v['ipfixer_octets_observed_total{direction="ingress"}'] == 750
    assert v['ipfixer_packets_observed_total{direction="egress"}'] == 0
    assert v["ipfixer_flows_exported_total"] == 2
    assert v['ipfixer_classifier_packets_total{counter="non_ip"}'] == 3
    assert v['ipfixer_classifier_packets_total{counter="fragment"}'] == 0  # exists before its first event
    assert v['ipfixer_classifier_packets_total{counter="bad_length"}'] == 3
    assert not any("observed_packets" in k for k in v if k.startswith("ipfixer_classifier"))
