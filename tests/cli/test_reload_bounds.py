"""A YAML bomb sent as a SIGHUP reload (issue 10.3): refused at once, the running config kept, every
packet still counted exactly (it used to stall export for 43 s)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from ipfixer.lab import Lab, start_ipfixer, stop_ipfixer, unique_name
from tests.cli.helpers import UdpCollector, cli_env, totals_by_flow, write_config
from tests.unit.test_config_bounds import billion_laughs

pytestmark = pytest.mark.root


def test_yaml_bomb_reload_is_refused_and_counting_goes_on(tmp_path: Path) -> None:
    lab = Lab(ns_a=unique_name("h4A"), ns_b=unique_name("h4B"), veth_a=unique_name("h4a"), veth_b=unique_name("h4b"))
    with lab:
        coll = UdpCollector(netns=lab.ns_a)
        log = tmp_path / "ipfixer.log"
        cfg = write_config(tmp_path / "ipfixer.yaml", [{"address": "127.0.0.1", "port": coll.port}],
                           interfaces={"include": [lab.veth_a], "exclude": []}, lock_dir=str(tmp_path / "lock"),
                           timeouts={"active": "60s", "idle": "30s", "drain_interval": "500ms"})
        good = cfg.read_text()
        proc = start_ipfixer(lab.ns_a, cfg, log, env=cli_env())
        try:
            lab.send_udp(lab.ns_b, lab.v4_a, 40031, 9031, [20] * 4)
            cfg.write_text(good + billion_laughs())
            sent_at = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            deadline = sent_at + 5.0  # the bomb took 43 s before
            while b"reload rejected" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.05)
            text = log.read_text()
            assert "reload rejected" in text, text
            assert f"{cfg}: YAML nodes (aliases expanded)" in text
            lab.send_udp(lab.ns_b, lab.v4_a, 40032, 9032, [30] * 6)
            assert proc.poll() is None
        finally:
            rc = stop_ipfixer(proc)
        coll.receive(5, until_idle=1.0)
        coll.close()
    assert rc == 0, log.read_text()
    flows = totals_by_flow(coll.flow_records())
    assert flows[(lab.v4_b, lab.v4_a, 40031, 9031, 17)] == [4, 4 * 48]
    assert flows[(lab.v4_b, lab.v4_a, 40032, 9032, 17)] == [6, 6 * 58]
