"""The tc path's tracked flows as the agent sees them: which ids they still name, and ending UDP flows.

Reads ct4/ct6 in batches. Expiry mirrors ct_expired() in bpf/tc.c (bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is
time.monotonic_ns()). Expired entries are not deleted here: the datapath replaces them itself when their tuple is
used again, and a delete racing with that replacement would take a new flow's entry.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from kpr.datapath import abi
from kpr.datapath.abi import CData
from kpr.datapath.writers import MapWriteError, MapWriter

_NSEC = 1_000_000_000
IPPROTO_SCTP = 132  # socket.IPPROTO_SCTP exists only where Python was built with SCTP headers


def ct_lifetime_ns(value: CData, proto: int) -> int:
    if value.flags & abi.CT_F_CLOSING:
        return abi.CT_CLOSING_LIFETIME_S * _NSEC
    lifetime = {socket.IPPROTO_TCP: abi.CT_TCP_LIFETIME_S, IPPROTO_SCTP: abi.CT_SCTP_LIFETIME_S}
    return lifetime.get(proto, abi.CT_UDP_LIFETIME_S) * _NSEC


def ct_expired(value: CData, proto: int, now_ns: int) -> bool:
    """Mirrors ct_expired() in bpf/tc.c."""
    return now_ns > value.last_seen_ns and now_ns - value.last_seen_ns > ct_lifetime_ns(value, proto)


@dataclass
class FlowScan:
    backends_in_use: set[int] = field(default_factory=set)  # named by a live (unexpired) flow
    rev_nats_in_use: set[int] = field(default_factory=set)
    udp_flows_ended: int = 0  # entries deleted (a flow has two: original and reply)
    flows: int = 0  # live entries seen
    next_expiry_ns: int | None = None  # the earliest a live flow naming one of `watch_*` can expire, if idle


def scan_flows(
    writer: MapWriter,
    end_udp_backends: Collection[int] = (),
    end_udp_frontends: Collection[int] = (),
    now_ns: int | None = None,
    watch_backends: Collection[int] = (),
    watch_frontends: Collection[int] = (),
) -> FlowScan:
    """Delete the UDP flows of the given backends and frontends (kube-proxy's conntrack cleanup), and report which
    backend and rev_nat ids the remaining live flows name, and when the first flow naming a watched one may expire."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    scan = FlowScan()
    for name in ("ct4", "ct6"):
        for key, value in writer.items(name):
            if key.proto == socket.IPPROTO_UDP and (
                value.backend_id in end_udp_backends or value.rev_nat_id in end_udp_frontends
            ):
                try:
                    writer.delete(name, key)
                    scan.udp_flows_ended += 1
                except MapWriteError:
                    pass  # the datapath re-picks for a backend that no longer serves anyway
                continue
            if ct_expired(value, key.proto, now):
                continue
            scan.flows += 1
            scan.backends_in_use.add(value.backend_id)
            scan.rev_nats_in_use.add(value.rev_nat_id)
            if value.backend_id in watch_backends or value.rev_nat_id in watch_frontends:
                expiry = value.last_seen_ns + ct_lifetime_ns(value, key.proto)
                scan.next_expiry_ns = expiry if scan.next_expiry_ns is None else min(scan.next_expiry_ns, expiry)
    return scan
