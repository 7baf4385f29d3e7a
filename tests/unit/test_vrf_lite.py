"""VRF-lite (issue 16 on kernels without CONFIG_NET_VRF): an interface's VRF is the routing table its
input-interface policy rule sends it to. Rules as the kernel reports them (a namespace this test makes,
real `ip rule`), which rules count, l3mdev VRFs first, and iproute2's rt_tables names read boundedly."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from ipfixer.lab import Namespaces, ip
from ipfixer.sources.kernel.vrf import LinkFacts, RuleFacts, VrfWatcher, read_table_names, rule_facts, vrf_table


def test_only_interface_rules_to_a_table_count_first_priority_wins() -> None:
    links = [LinkFacts(2, "eth1"), LinkFacts(3, "eth2"), LinkFacts(4, "eth3"), LinkFacts(5, "eth4", master=9),
             LinkFacts(9, "vrf-red", vrf_table=100)]
    rules = [RuleFacts("eth1", 10, 200), RuleFacts("eth1", 20, 100),  # priority 100 is looked at first
             RuleFacts("eth2", 254, 50), RuleFacts("eth2", 30, 60),  # main is no VRF: the next rule is
             RuleFacts("eth4", 40, 1),  # in an l3mdev VRF already: that one
             RuleFacts("ethX", 50, 1)]  # no such interface (yet)
    t = vrf_table(links, rules, {20: "blue"})
    assert dict(t.table_of) == {2: 20, 3: 30, 5: 100, 9: 100}
    assert dict(t.names) == {100: "vrf-red", 20: "blue", 30: "table30"}


@pytest.mark.root
def test_rules_read_from_the_kernel_and_followed_by_events() -> None:
    with Namespaces() as spaces:
        ns = spaces.add(tag="vl")
        for dev in ("ipfxvla", "ipfxvlb", "ipfxvlc"):
            ip("-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p")
        ip("-n", ns, "rule", "add", "iif", "ipfxvla", "lookup", "10", "pref", "100")
        ip("-n", ns, "-6", "rule", "add", "iif", "ipfxvla", "lookup", "10", "pref", "100")
        ip("-n", ns, "rule", "add", "iif", "ipfxvlb", "from", "10.0.0.0/8", "lookup", "20")  # a policy
        ip("-n", ns, "rule", "add", "iif", "ipfxvlb", "fwmark", "7", "lookup", "21")  # a policy
        ip("-n", ns, "rule", "add", "iif", "ipfxvlc", "unreachable")  # no table
        with IPRoute(netns=ns) as ipr:
            facts = [f for fam in (socket.AF_INET, socket.AF_INET6) for m in ipr.get_rules(family=fam)
                     if (f := rule_facts(m)) is not None]
            index = {str(m.get_attr("IFLA_IFNAME")): int(m["index"]) for m in ipr.get_links()}
        assert facts == [RuleFacts("ipfxvla", 10, 100), RuleFacts("ipfxvla", 10, 100)]
        w = VrfWatcher(netns=ns)
        try:
            assert dict(w.table.table_of) == {index["ipfxvla"]: 10}
            ip("-n", ns, "rule", "add", "iif", "ipfxvlb", "lookup", "30", "pref", "50")
            ip("-n", ns, "rule", "del", "iif", "ipfxvla", "lookup", "10", "pref", "100")
            ip("-n", ns, "-6", "rule", "del", "iif", "ipfxvla", "lookup", "10", "pref", "100")
            assert w.poll() is True
            assert dict(w.table.table_of) == {index["ipfxvlb"]: 30} and dict(w.table.names) == {30: "table30"}
            assert w.poll() is False  # no event since
        finally:
            w.close()


def test_table_names_from_files_and_a_conf_directory(tmp_path: Path) -> None:
    main = tmp_path / "rt_tables"
    main.write_text("# reserved\n255\tlocal\n254 main\n10 blue # tenant\n0x14 red\nbogus line\n30\n")
    d = tmp_path / "rt_tables.d"
    d.mkdir()
    (d / "a.conf").write_text("40 green\n10 blue-again\n")
    (d / "ignored.txt").write_text("50 nope\n")
    assert read_table_names([main, d]) == {255: "local", 254: "main", 10: "blue-again", 20: "red", 40: "green"}
    assert read_table_names([tmp_path / "missing"]) == {}


def test_hostile_table_files_are_bounded(tmp_path: Path) -> None:
    huge = tmp_path / "rt_tables"
    with open(huge, "wb") as f:
        f.write(b"10 " + b"x" * 5000 + b"\n")
        f.write(b"\xff\xfe garbage \x00\n" * 1000)
        f.write(b"11 later\n" * 200_000)  # past the first MiB: not read
    names = read_table_names([huge])
    assert len(names[10]) == 64 and 11 in names  # names cut to 64 characters; 11 is within the first MiB
    assert read_table_names([tmp_path]) == {}  # a directory without *.conf
    odd = tmp_path / "odd"
    odd.write_text("010 octal-looking\n" + "9" * 5000 + " long\n99999999999 too-big\n0x1F hex\n")
    assert read_table_names([odd]) == {10: "octal-looking", 31: "hex"}
    d = tmp_path / "rt_tables.d"
    d.mkdir()
    os.mkfifo(d / "blocked.conf")  # would block a plain open() forever
    (d / "ok.conf").write_text("7 seven\n")
    assert read_table_names([d]) == {7: "seven"}
