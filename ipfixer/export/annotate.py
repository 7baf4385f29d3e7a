"""Columns filled at export time, not by the classifier: VRF ids and the sampling interval.

A Linux VRF is an l3mdev master device bound to a routing table (Documentation/networking/vrf.rst);
an interface belongs to the VRF it is enslaved to.  The classifier only knows the ifindex, so the VRF
table id of ingress_if / egress_if is looked up here, from the table the VRF watcher keeps
(ipfixer/sources/kernel/vrf.py), right before encoding: the BPF program and the kernel map stay untouched.
ingressVRFID (234) / egressVRFID (235) are 0 where the interface is in no VRF (or is unknown, as
egress_if is for an ingress-observed flow), as Cisco sends for the global table.

Pure over arrays: no netlink here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ipfixer.model import VrfTable
from ipfixer.templates import Template

VRF_ELEMENTS = frozenset({"ingressVRFID", "egressVRFID"})
VRFNAME_LENGTH = 16  # Linux IFNAMSIZ: a VRF is named by its master device


def templates_use_vrf(templates: Iterable[Template]) -> bool:
    """True when a data template carries ingressVRFID or egressVRFID (then the VRF table is followed)."""
    return any(f.element.name in VRF_ELEMENTS for t in templates for f in t.fields)


def vrf_ids(ifindex: np.ndarray, table_of: Mapping[int, int]) -> np.ndarray:
    """The VRF table id of each ifindex (0 for none), vectorised: a sorted lookup, no Python loop per row."""
    out = np.zeros(len(ifindex), dtype=np.uint32)
    if not table_of or not len(ifindex):
        return out
    keys = np.fromiter(sorted(table_of), dtype=np.int64, count=len(table_of))
    vals = np.fromiter((table_of[int(k)] for k in keys), dtype=np.uint32, count=len(keys))
    idx = ifindex.astype(np.int64)
    pos = np.minimum(np.searchsorted(keys, idx), len(keys) - 1)
    hit = keys[pos] == idx
    out[hit] = vals[pos[hit]]
    return out


def annotate(batch: np.ndarray, *, vrfs: VrfTable | None, sampling_interval: int) -> np.ndarray:
    """Fill a FLOW_DTYPE batch's export-time columns (in place, or in a copy of a read-only batch, which
    is returned): ingress_vrf/egress_vrf from ingress_if/egress_if (left as they are without a VRF
    table), sampling_interval (RFC 7270 samplingInterval: 1 = every packet)."""
    if not len(batch):
        return batch
    if not batch.flags.writeable:
        batch = batch.copy()
    batch["sampling_interval"] = max(1, int(sampling_interval))
    if vrfs is not None:
        batch["ingress_vrf"] = vrf_ids(batch["ingress_if"], vrfs.table_of)
        batch["egress_vrf"] = vrf_ids(batch["egress_if"], vrfs.table_of)
    return batch


def vrf_values(domain_id: int, names: Mapping[int, str]) -> list[dict[str, Any]]:
    """VRF table options records (templates/options_vrfs.yaml): one per VRF, table id -> name.

    Names longer than the fixed field are cut at a character boundary (a Linux name never is)."""
    out = []
    for table, name in sorted(names.items()):
        raw = name.encode("utf-8")[:VRFNAME_LENGTH]
        out.append({"observationDomainId": domain_id, "ingressVRFID": table,
                    "VRFname": raw.decode("utf-8", "ignore")})
    return out
