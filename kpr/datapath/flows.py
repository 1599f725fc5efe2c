"""The tc path's tracked flows as the agent sees them: which ids they still name, ending UDP flows, and collecting
expired ones.

Reads ct4/ct6 in batches. Expiry mirrors ct_expired() in bpf/tc.c (bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is
time.monotonic_ns()). ct4/ct6 are plain hashes (a full table refuses new flows rather than evicting live ones), so
expired flows are deleted here (collect_expired): a flow's two entries together, once both are expired, each one
read again just before its delete so that a flow the datapath has just started on the same tuple is left alone (the
window left is the few microseconds between that read and the delete).
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from kpr.datapath import abi
from kpr.datapath.abi import CData
from kpr.datapath.writers import MapWriteError, MapWriter

_NSEC = 1_000_000_000


def ct_lifetime_ns(value: CData, proto: int) -> int:
    if value.flags & abi.CT_F_CLOSING:
        return abi.CT_CLOSING_LIFETIME_S * _NSEC
    lifetime = {abi.IPPROTO_TCP: abi.CT_TCP_LIFETIME_S, abi.IPPROTO_SCTP: abi.CT_SCTP_LIFETIME_S}
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
            if key.proto == abi.IPPROTO_UDP and (
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


@dataclass
class Collected:
    deleted: int = 0  # entries (a flow has two)
    kept: int = 0  # entries left, both families
    capacity: int = 0  # of the fuller family's map


def collect_expired(writer: MapWriter, now_ns: int | None = None) -> Collected:
    """Delete the tracked flows whose entries have all expired.

    A flow is one connection, as netfilter's conntrack sees it, though kpr keeps an entry per direction and the
    datapath marks only the direction a FIN or RST went (a client's RST never reaches the backend's entry). So a pair
    in which either entry is closing is over once both are idle past the closing lifetime. A reply entry sent to an
    address and port no original entry names (its original was replaced by a new flow on the same client tuple)
    translates nothing any more: it goes once idle past the closing lifetime too; one whose original exists but
    cannot be matched (its backend not in the maps) keeps its own lifetime. Without both rules such entries lived out
    the 6-hour TCP lifetime, holding conntrack room and masquerade ports (found by the chaos soak)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    closing_ns = abi.CT_CLOSING_LIFETIME_S * _NSEC
    out = Collected()
    for fam in ("4", "6"):
        name = f"ct{fam}"
        backends = {int(k.value): v for k, v in writer.items(f"backends{fam}")}
        entries = {bytes(k): (k, v) for k, v in writer.items(name)}
        paired: set[bytes] = set()
        # Where each original's replies go (the client, or the node address and port it was masqueraded to): a reply
        # entry sent nowhere an original names is an orphan, whatever the backends map says.
        reply_ends: set[tuple[Any, int]] = set()
        doomed: list[tuple[CData, int]] = []  # (key, the idle time past which it goes)
        for key, value in entries.values():
            if key.dir != abi.CT_ORIGINAL:
                continue
            snat = value.flags & abi.CT_F_SNAT
            reply_ends.add(_end(value.addr, value.port) if snat else _end(key.src, key.sport))
            reply = _reply_key(key, value, backends.get(value.backend_id))
            reply_raw = bytes(reply) if reply is not None else b""
            partner = entries.get(reply_raw)
            if partner is None:
                if ct_expired(value, key.proto, now):
                    doomed.append((key, ct_lifetime_ns(value, key.proto)))
                continue
            paired.add(reply_raw)
            if (value.flags | partner[1].flags) & abi.CT_F_CLOSING:
                lifetime = closing_ns
            else:
                lifetime = ct_lifetime_ns(value, key.proto)
            if _idle_past(value, now, lifetime) and _idle_past(partner[1], now, lifetime):
                doomed += [(key, lifetime), (partner[0], lifetime)]
        for raw, (key, value) in entries.items():
            if key.dir != abi.CT_REPLY or raw in paired:
                continue
            orphan = _end(key.dst, key.dport) not in reply_ends
            lifetime = closing_ns if orphan else ct_lifetime_ns(value, key.proto)
            if _idle_past(value, now, lifetime):
                doomed.append((key, lifetime))
        deleted = 0
        for key, lifetime in doomed:
            current = writer.lookup(name, key)
            if current is None or not _idle_past(current, now, lifetime):
                continue  # gone meanwhile, or a new flow on the same tuple
            try:
                writer.delete(name, key)
                deleted += 1
            except MapWriteError:
                pass
        out.deleted += deleted
        out.kept += len(entries) - deleted
        out.capacity = max(out.capacity, writer.capacity(name))
    return out


def _end(addr: Any, port: int) -> tuple[Any, int]:
    """An address (a u32, or an IPv6 address's four words) and port, hashable."""
    return (addr if isinstance(addr, int) else tuple(addr), int(port))


def _idle_past(value: CData, now_ns: int, lifetime_ns: int) -> bool:
    """Idle for longer than lifetime_ns (a last_seen after `now`, refreshed meanwhile, is not idle)."""
    return now_ns > value.last_seen_ns and now_ns - value.last_seen_ns > lifetime_ns


def _reply_key(key: CData, value: CData, backend: CData | None) -> CData | None:
    """The REPLY entry of an ORIGINAL one: from the backend to the client, or to the node address:port used."""
    if backend is None:
        return None
    reply = type(key)()
    reply.src, reply.sport = backend.addr, backend.port
    if value.flags & abi.CT_F_SNAT:
        reply.dst, reply.dport = value.addr, value.port
    else:
        reply.dst, reply.dport = key.src, key.sport
    reply.proto, reply.dir = key.proto, abi.CT_REPLY
    return reply
