"""NFLOG as the daemon's packet source, for kernels without eBPF: the same interface as ipfixer.sources.ebpf.Meter.

nftables rules in ipfixer's own table (`table inet ipfixer`, see ipfixer.sources.nflog_netlink) copy the
headers of every packet of the selected interfaces to an NFLOG group; NflogSource turns them into
RawPackets and an Accounter aggregates them into flows.

Accounter evict timeout: `timeouts.idle`, not `cache.accounter_evict_timeout`. Here the Accounter is
the whole flow cache (there is no kernel map behind it), so its timer decides how late a flow reaches
the collector, which is what timeouts.idle means to the user; accounter_evict_timeout tunes the eBPF
spill path, a side path whose flows are a small overflow. A flow longer than idle is split in
several records (flowEndReason 2), like the eBPF path splits at the active timeout.

Flows also end early: TCP FIN/RST and, with `enrichment.conntrack`, a conntrack DESTROY of their
connection evict that flow at the next drain with flowEndReason 3 (end of flow detected).

With `tunnels.decap`, the packets of the interfaces `tunnels.interfaces` names are decapsulated in
userspace (ipfixer.sources.packets.decapsulate, the kernel classifier's rules) and the Accounter keys
flows by their tunnel too; the rules then copy SNAPLEN_DECAP bytes, room for the tunnel headers.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Collection
from typing import Any

import numpy as np

from ipfixer.clock import Clock
from ipfixer.config import Config
from ipfixer.enrich.conntrack import ConnKey
from ipfixer.errors import IpfixerError
from ipfixer.flows.accounter import Accounter
from ipfixer.instance import NamespaceLock
from ipfixer.model import EndReason, FlowKey, RawPacket
from ipfixer.sources import SourceCounters
from ipfixer.sources.ebpf import interface_name
from ipfixer.sources.nflog_netlink import PREFIX_IN, PREFIX_OUT, TABLE, NflogSource, remove_nflog_rules

log = logging.getLogger("ipfixer.nflog")

TCP_FIN_RST = 0x01 | 0x04
SNAPLEN = 128  # headers only: IPv6 + extension headers + TCP fit
# tunnels.decap: outer IPv6 + UDP + VXLAN/Geneve (with up to 80 bytes of options) + inner Ethernet + tag +
# inner IPv6 + TCP. A packet whose tunnel or inner IP header lies beyond it is its outer flow (decap_kept_outer).
SNAPLEN_DECAP = 256
_NFT_GLOB = re.compile(r"^[A-Za-z0-9_.:@-]+\*?$")  # what nft's iifname string matching can express


class EndingAccounter(Accounter):
    """An Accounter that can also evict chosen flows (ended ones): Accounter.evict_where."""


def nft_ruleset(group: int, include: tuple[str, ...], exclude: tuple[str, ...], direction: str,
                snaplen: int = SNAPLEN) -> str:
    """The `table inet ipfixer` script: one log rule per hook, include globs as a set, excludes as `!=`
    (nft matches a trailing `*` as a prefix, also inside anonymous sets).

    Globs nft cannot express (only a trailing `*` is supported) fall back to logging every interface;
    the meter then filters by name in userspace, so the selection is the same either way.
    """
    exact = all(_NFT_GLOB.match(g) for g in (*include, *exclude))
    chains = []
    for hook, chain, prefix, dev, prio in (("prerouting", "nflog_in", PREFIX_IN, "iifname", -400),
                                           ("postrouting", "nflog_out", PREFIX_OUT, "oifname", 400)):  # fmt: skip
        if direction != "both" and (direction == "ingress") != (hook == "prerouting"):
            continue
        log_stmt = f'log prefix "{prefix}" group {group} snaplen {snaplen}'
        match = ""
        if exact:  # one rule, so a packet whose interface matches two globs is still logged once
            match = f"{dev} {_nft_set(include)} " + (f"{dev} != {_nft_set(exclude)} " if exclude else "")
        chains.append(f"    chain {chain} {{\n        type filter hook {hook} priority {prio}; policy accept;\n"
                      f"        {match}{log_stmt}\n    }}")  # fmt: skip
    return f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n" + "\n".join(chains) + "\n}\n"


def _nft_set(globs: tuple[str, ...]) -> str:
    return "{ " + ", ".join(f'"{g}"' for g in globs) + " }"


def _nft(script: str) -> None:
    res = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise IpfixerError(f"nft: installing table inet {TABLE} failed: {res.stderr.strip()}")


class NflogMeter:
    """nft `log group N` rules + NflogSource + Accounter, driven by the daemon like Meter."""

    def __init__(self, config: Config, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self._lock = NamespaceLock(config.lock_dir)
        self._source: NflogSource | None = None
        self._accounter: EndingAccounter | None = None
        self._selector: Any = None
        self._names: dict[int, str] = {}
        self._decap_of: dict[int, bool] = {}  # tunnels.interfaces matched per ifindex (per packet otherwise)
        self._pending: list[np.ndarray] = []
        self._destroyed: set[bytes] = set()
        self._installed = False

    def start(self) -> None:
        """Lock the namespace, install the rules, bind the NFLOG group; undone on failure."""
        cfg = self.config
        self._lock.acquire()
        try:
            self._apply_selection(cfg)
            self._source = NflogSource(cfg.enrichment.nflog_group, clock=self.clock, copy_range=self._snaplen(),
                                       decap=self._decapsulates if cfg.tunnels.decap else None)  # fmt: skip
            self._accounter = EndingAccounter(cfg.cache.accounter_max_entries, int(cfg.timeouts.idle * 1e9),
                                              self.clock, interface_name, tunnels=cfg.tunnels.decap)  # fmt: skip
        except BaseException:
            self.stop()
            raise

    def _apply_selection(self, cfg: Config) -> None:
        from ipfixer.sources.kernel.attach import InterfaceSelector

        i = cfg.interfaces
        self._selector = InterfaceSelector(tuple(i.include), tuple(i.exclude))
        self._names.clear()
        self._decap_of.clear()
        _nft(nft_ruleset(cfg.enrichment.nflog_group, tuple(i.include), tuple(i.exclude), i.direction,
                         self._snaplen()))  # fmt: skip
        self._installed = True

    def _snaplen(self) -> int:
        return SNAPLEN_DECAP if self.config.tunnels.decap else SNAPLEN

    def interfaces(self) -> list[str]:
        """Names of the interfaces of this namespace the rules select right now."""
        if self._selector is None:
            return []
        return sorted(name for _, name in socket.if_nameindex() if self._selector.matches(name))

    def _name(self, ifindex: int) -> str:
        name = self._names.get(ifindex)
        if name is None:
            name = interface_name(ifindex)
            if len(self._names) > 4096:
                self._names.clear()
                self._decap_of.clear()
            self._names[ifindex] = name
        return name

    def _selected(self, ifindex: int) -> bool:
        name = self._name(ifindex)
        return bool(name) and self._selector.matches(name)

    def _decapsulates(self, ifindex: int) -> bool:
        """tunnels.interfaces names this interface (the current config: it follows reloads)."""
        hit = self._decap_of.get(ifindex)
        if hit is None:
            name = self._name(ifindex)
            hit = self._decap_of[ifindex] = bool(name) and self.config.tunnels.decapsulates(name)
        return hit

    def poll(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for logged packets and account them (the daemon's idle wait)."""
        assert self._source is not None and self._accounter is not None
        pkts = self._source.poll(timeout_ms / 1000.0)
        self._account(pkts)

    def _account(self, pkts: list[RawPacket]) -> None:
        assert self._accounter is not None
        selected = [p for p in pkts if self._selected(p.key.ifindex)]
        self._pending.extend(self._accounter.account_all(selected))

    def drain(self, end_keys: Collection[bytes] = ()) -> list[np.ndarray]:
        """Flows due: ended ones (FIN/RST, and connections conntrack destroyed: `end_keys`, from the
        daemon's enrichment), full-cache and timer evictions."""
        assert self._accounter is not None
        self.poll(0)
        self._destroyed = set(end_keys)
        out, self._pending = self._pending, []
        ended = self._accounter.evict_where(self._ended, EndReason.END_OF_FLOW)
        self._destroyed.clear()
        if ended is not None:
            out.append(ended)
        due = self._accounter.evict_if_due()
        if due is not None:
            out.append(due)
        return out

    def _ended(self, key: FlowKey, tcp_flags: int) -> bool:
        if key.protocol == 6 and tcp_flags & TCP_FIN_RST:
            return True
        return bool(self._destroyed) and ConnKey(key.protocol, key.src_addr, key.dst_addr, key.src_port,
                                                 key.dst_port).packed() in self._destroyed  # fmt: skip

    def flush(self) -> list[np.ndarray]:
        """Every flow still held (shutdown): flowEndReason forced end."""
        out, self._pending = self._pending, []
        if self._source is not None and self._accounter is not None:
            self._account(self._source.poll(0.0))
            out.append(self._accounter.flush())
        return out

    def ignored_packets(self) -> int:
        """Packets logged but not accounted (not IP or too short to parse)."""
        return self._source.unparsed if self._source is not None else 0

    def counters(self) -> dict[str, int]:
        """Source and Accounter counters, for the final log line and stats."""
        if self._source is None or self._accounter is None:
            return {}
        return {"accounted": self._accounter.accounted_packets, "unparsed": self._source.unparsed,
                "evictions": self._accounter.evictions, **self._decap_counters()}

    def _decap_counters(self) -> dict[str, int]:
        """decap_* (the kernel's counter names) with tunnels.decap, else none."""
        if self._source is None or self._source.decap is None:
            return {}
        return self._source.decap_counts.as_dict()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: interface selection, direction and timeouts (group needs a restart)."""
        old, self.config = self.config, config
        if config.enrichment.nflog_group != old.enrichment.nflog_group:
            log.warning("enrichment.nflog_group changes only at restart; keeping %d", old.enrichment.nflog_group)
            config = config.model_copy(update={"enrichment": old.enrichment})
        if config.tunnels.decap != old.tunnels.decap:  # the Accounter's key layout is chosen at start
            log.warning("tunnels.decap changes only at restart; keeping %s", str(old.tunnels.decap).lower())
            tunnels = config.tunnels.model_copy(update={"decap": old.tunnels.decap})
            config = config.model_copy(update={"tunnels": tunnels})
        self.config = config
        self._apply_selection(config)
        if self._accounter is not None:
            self._accounter.evict_timeout_ns = int(config.timeouts.idle * 1e9)
            self._accounter.max_entries = config.cache.accounter_max_entries

    def source_counters(self) -> SourceCounters:
        """Unparsed packets count as malformed; no kernel counters on this path (observed follows export)
        except decap_* with tunnels.decap, named as the kernel's (ipfixer_classifier_packets_total)."""
        if self._source is None or self._accounter is None:
            return SourceCounters()
        return SourceCounters(malformed=self._source.unparsed, accounter_evictions=self._accounter.evictions,
                              classifier=self._decap_counters())

    def stop(self) -> None:
        """Remove table inet ipfixer, close the sockets, release the lock. Safe to call twice."""
        try:
            if self._source is not None:
                self._source.close()
                self._source = None
            if self._installed:
                remove_nflog_rules()
                self._installed = False
        finally:
            self._lock.release()
