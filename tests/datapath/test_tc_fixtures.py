"""Packet fixtures for the tc programs: crafted frames through kpr's real programs with BPF_PROG_TEST_RUN.

One row per case: the frame in, the program, the verdict, and what comes out (exact bytes, built independently by
tests/datapath/packets.py). Every frame a program passes on or redirects is checked by an independent checksum and
length verifier. The programs are compiled from the working tree's bpf/tc.c at test time (tests/datapath/tc_fixture.py)
and run inside a lab node's namespace; nothing is attached to any device and nothing is sent.

Rows marked `DIFFERENT FROM KUBE-PROXY` assert what tc.c does today where kube-proxy (iptables/nftables with netfilter
conntrack) behaves otherwise; the reason is given on the row.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kpr.datapath import abi
from kpr.datapath.bpfsys import BpfError
from kpr.datapath.loader import DatapathSettings
from kpr.datapath.testrun import (
    BPF_F_TEST_SKB_CHECKSUM_COMPLETE,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    ProgRun,
    SkBuff,
    prog_test_run,
    skb_context,
)
from kpr.lab import layout
from kpr.model.types import Backend, Frontend, FrontendKind, ServiceKey
from tests.datapath import packets as P
from tests.datapath.tc_fixture import FlowKey, TcHarness, tc_harness

pytestmark = pytest.mark.datapath

# ---- the node, its clients and its services ----

NODE4, NODE6 = "172.16.0.1", "fd00:16::1"  # lab node1's eth0: NodePorts listen here, masquerading uses it
CLIENT4, CLIENT6 = "172.16.0.201", "fd00:16::c9"  # an external client on the underlay (allowed by the source ranges)
BLOCKED4, BLOCKED6 = "172.16.0.202", "fd00:16::ca"  # another one, outside loadBalancerSourceRanges
POD4, POD6 = "10.244.1.20", "fd00:244:1::14"  # a pod on node1 (the client of the kpr_pod_in* rows)
LOCAL4, LOCAL6 = "10.244.1.10", "fd00:244:1::a"  # a backend pod on node1
REMOTE4, REMOTE6 = "10.244.2.10", "fd00:244:2::a"  # a backend pod on node2 (routed via node2)
NOROUTE4 = "10.244.9.10"  # a backend on a node this one has no route to
LB4, LB6 = "172.16.100.4", "fd00:100::4"  # a LoadBalancer IP with loadBalancerSourceRanges
CIP4, CIP6 = "10.96.0.10", "fd00:96::a"  # a ClusterIP
CIP_REMOTE4, CIP_REMOTE6 = "10.96.0.11", "fd00:96::b"  # a ClusterIP whose endpoint is on node2
CIP_LOCAL4 = "10.96.0.12"  # a ClusterIP with internalTrafficPolicy=Local, its endpoint on node2
OTHER_POD4, OTHER_POD6 = "10.244.2.20", "fd00:244:2::14"  # a pod on node2, a client routed to node1
CLUSTER_CIDRS = DatapathSettings(cluster_cidrs=layout.CLUSTER_CIDRS)  # --cluster-cidr
EXTERNAL_CLUSTER_IP = DatapathSettings(external_cluster_ip=True)  # --external-cluster-ip
OTHER4, OTHER6 = "192.0.2.55", "2001:db8::55"  # an address kpr knows nothing about
ROUTER4, ROUTER6 = "10.244.2.1", "fd00:244:2::1"  # node2's bridge: where a packet toward its pods may be too big

NP_TCP, NP_UDP = 30080, 30053  # NodePort, node-local backend
REMOTE_TCP, REMOTE_UDP = 30081, 30054  # NodePort, backend on node2 (masqueraded)
EMPTY_TCP, EMPTY_UDP = 30090, 30091  # NodePort, no endpoints at all (reject)
LOCAL_POLICY = 30085  # NodePort, externalTrafficPolicy=Local, endpoints on node2 only (drop)
NOROUTE_TCP = 30086  # NodePort whose backend is on an unroutable node
TARGET_TCP, TARGET_UDP = 8080, 5353
NP_SCTP, REMOTE_SCTP, EMPTY_SCTP, TARGET_SCTP = 30060, 30061, 30062, 3868  # NodePorts as above; Diameter's port

SNAT_PORTS = range(abi.SNAT_PORT_MIN, abi.SNAT_PORT_MAX + 1)


def _svc(name: str) -> ServiceKey:
    return ServiceKey("default", name)


def _frontends() -> list[Frontend]:
    out = []
    for node, local, remote, lb, cip, cip_remote, client in (
        (NODE4, LOCAL4, REMOTE4, LB4, CIP4, CIP_REMOTE4, CLIENT4),
        (NODE6, LOCAL6, REMOTE6, LB6, CIP6, CIP_REMOTE6, CLIENT6),
    ):
        local_tcp, local_udp = (
            Backend(local, TARGET_TCP, "TCP", node_local=True),
            Backend(local, TARGET_UDP, "UDP", True),
        )
        remote_tcp, remote_udp = Backend(remote, TARGET_TCP, "TCP"), Backend(remote, TARGET_UDP, "UDP")
        np = FrontendKind.NODE_PORT
        out += [
            Frontend(_svc("np"), "http", np, node, NP_TCP, "TCP", (local_tcp,)),
            Frontend(_svc("np"), "dns", np, node, NP_UDP, "UDP", (local_udp,)),
            Frontend(_svc("remote"), "http", np, node, REMOTE_TCP, "TCP", (remote_tcp,)),
            Frontend(_svc("remote"), "dns", np, node, REMOTE_UDP, "UDP", (remote_udp,)),
            Frontend(_svc("empty"), "http", np, node, EMPTY_TCP, "TCP", ()),
            Frontend(_svc("empty"), "dns", np, node, EMPTY_UDP, "UDP", ()),
            Frontend(_svc("np"), "diameter", np, node, NP_SCTP, "SCTP", (Backend(local, TARGET_SCTP, "SCTP", True),)),
            Frontend(
                _svc("remote"), "diameter", np, node, REMOTE_SCTP, "SCTP", (Backend(remote, TARGET_SCTP, "SCTP"),)
            ),
            Frontend(_svc("empty"), "diameter", np, node, EMPTY_SCTP, "SCTP", ()),
            # externalTrafficPolicy=Local, the only endpoint on node2: external clients see none, pods see it
            Frontend(
                _svc("local"),
                "http",
                np,
                node,
                LOCAL_POLICY,
                "TCP",
                (),
                internal_backends=(remote_tcp,),
                empty_drop=True,
            ),
            Frontend(
                _svc("ranged"),
                "http",
                FrontendKind.LOAD_BALANCER,
                lb,
                80,
                "TCP",
                (local_tcp,),
                source_ranges=(str(ipaddress.ip_network(client)),),
            ),
            Frontend(_svc("cip"), "http", FrontendKind.CLUSTER_IP, cip, 80, "TCP", (local_tcp,)),
            Frontend(_svc("cip-remote"), "http", FrontendKind.CLUSTER_IP, cip_remote, 80, "TCP", (remote_tcp,)),
        ]
    out.append(Frontend(_svc("noroute"), "http", np, NODE4, NOROUTE_TCP, "TCP", (Backend(NOROUTE4, 8080, "TCP"),)))
    out.append(Frontend(_svc("cip-local"), "http", FrontendKind.CLUSTER_IP, CIP_LOCAL4, 80, "TCP", (), empty_drop=True))
    return out


FRONTENDS = _frontends()
FRONTEND_ADDRESSES = {(f.addr, f.port, {"TCP": P.TCP, "UDP": P.UDP, "SCTP": P.SCTP}[f.protocol]) for f in FRONTENDS}


@pytest.fixture(scope="module")
def tc() -> Iterator[TcHarness]:
    with tc_harness() as harness:
        harness.sync(FRONTENDS)
        yield harness


# ---- frames ----


def syn(src: str, sport: int, dst: str, dport: int, **kw: Any) -> bytes:
    return P.packet(src, dst, P.Tcp(sport, dport, **kw))


def seg(src: str, sport: int, dst: str, dport: int, flags: int, **kw: Any) -> bytes:
    kw.setdefault("seq", 2000)
    kw.setdefault("ack", 7000 if flags & P.ACK else 0)
    return P.packet(src, dst, P.Tcp(sport, dport, flags=flags, **kw))


def udp(src: str, sport: int, dst: str, dport: int, **kw: Any) -> bytes:
    return P.packet(src, dst, P.Udp(sport, dport, **kw))


def sctp(src: str, sport: int, dst: str, dport: int, **kw: Any) -> bytes:
    return P.packet(src, dst, P.Sctp(sport, dport, **kw))


def _assert_closing(h: TcHarness, key: FlowKey) -> None:
    assert h.flows()[key].closing


def reply(flags: int = P.SYN | P.ACK, step: int = 0) -> Callable[[list[ProgRun]], bytes]:
    """The answer to what an earlier step put out (its destination answers its source)."""

    def make(prev: list[ProgRun]) -> bytes:
        p = P.parse(prev[step].data)
        if p.proto == P.SCTP:
            return P.packet(p.dst, p.src, P.Sctp(p.dport, p.sport, chunk=2))  # INIT ACK
        if p.proto == P.UDP:
            return P.packet(p.dst, p.src, P.Udp(p.dport, p.sport, payload=b"answer"))
        return P.packet(p.dst, p.src, P.Tcp(p.dport, p.sport, flags=flags, seq=9000, ack=(p.seq + 1) & 0xFFFFFFFF))

    return make


def bad_checksum(frame: bytes) -> bytes:
    out = bytearray(frame)
    p = P.parse(frame)
    off = p.l4_off + (16 if p.proto == P.TCP else 6)
    out[off + 1] ^= 0x5A
    return bytes(out)


def other_ethertype(frame: bytes) -> bytes:
    return frame[:12] + b"\x88\xb5" + frame[14:]  # IEEE 802 local experimental ethertype


def icmp_error_about(
    outer_src: str,
    outer_dst: str,
    inner: bytes,
    type_: int = 3,
    code: int = 4,
    *,
    quoted_l4: int = 8,
    mtu: int = 1400,
    ident: int = 0x1234,
) -> bytes:
    """An ICMP or ICMPv6 error from outer_src to outer_dst quoting the IP header and `quoted_l4` bytes of `inner`
    (a whole frame). Defaults: Fragmentation Needed; ICMPv6 type 2 is Packet Too Big (both carry `mtu`)."""
    p = P.parse(inner)
    quoted = inner[P.ETH_HLEN : p.l4_off + quoted_l4]
    too_big = ((type_, code) == (3, 4) and ":" not in outer_src) or (type_ == 2 and ":" in outer_src)
    rest = mtu.to_bytes(4, "big") if too_big else b"\0\0\0\0"
    return P.packet(outer_src, outer_dst, P.Icmp(type_, code, rest=rest, payload=quoted), ident=ident)


# A data segment of an established flow to node2's backend, bigger than node1's eth0 (MTU 1500), with and without DF.
_BIG_SEGMENT = {"flags": P.ACK, "seq": 1001, "ack": 9001, "payload": b"z" * 1600}
BIG_DF = P.packet(CLIENT4, NODE4, P.Tcp(40095, REMOTE_TCP, **_BIG_SEGMENT), frag=0x4000)
BIG_NO_DF = P.packet(CLIENT4, NODE4, P.Tcp(40095, REMOTE_TCP, **_BIG_SEGMENT))
BIG6 = P.packet(CLIENT6, NODE6, P.Tcp(40095, REMOTE_TCP, **_BIG_SEGMENT))


# ---- expectations ----

Frame = bytes | Callable[[list[ProgRun]], bytes]
Addr = tuple[str, int] | Callable[[list[ProgRun], ProgRun], tuple[str, int]]


def same_snat_as(step: int) -> Callable[[list[ProgRun], ProgRun], tuple[str, int]]:
    def addr(prev: list[ProgRun], out: ProgRun) -> tuple[str, int]:
        p = P.parse(prev[step].data)
        return p.src, p.sport

    return addr


def masqueraded(node: str) -> Callable[[list[ProgRun], ProgRun], tuple[str, int]]:
    """The node address with whatever masquerade port the program chose (it must be in kpr's SNAT range)."""

    def addr(prev: list[ProgRun], out: ProgRun) -> tuple[str, int]:
        port = P.parse(out.data).sport
        assert port in SNAT_PORTS, f"masquerade port {port} outside {SNAT_PORTS}"
        return node, port

    return addr


@dataclass(frozen=True)
class Unchanged:
    """The frame comes out exactly as it went in."""

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        assert out.data.hex() == frame.hex()


@dataclass(frozen=True)
class Nat:
    """The frame with its destination and/or source rewritten, checksums exactly as right (or wrong) as they were.
    MAC addresses are only compared when the packet goes up the stack (a redirect may fill in the next hop's)."""

    dst: Addr | None = None
    src: Addr | None = None

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        dst = self.dst(prev, out) if callable(self.dst) else self.dst
        src = self.src(prev, out) if callable(self.src) else self.src
        want = P.rewritten(frame, src=src, dst=dst)
        got = out.data
        if out.retval == TC_ACT_REDIRECT:
            want, got = want[12:], got[12:]
        assert got.hex() == want.hex(), f"{P.parse(out.data)} != {P.parse(want)}"


@dataclass(frozen=True)
class Reset:
    """A TCP reset to the client, built in place of the frame (RFC 793 sequence numbers, MACs swapped)."""

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        assert out.data.hex() == P.tcp_reset_for(frame).hex(), f"{P.parse(out.data)}"


@dataclass(frozen=True)
class PortUnreachable:
    """An ICMP (v4: 3/3, v6: 1/4) port unreachable to the client quoting the frame's IP header + 8 bytes."""

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        assert out.data.hex() == P.port_unreachable_for(frame).hex()


@dataclass(frozen=True)
class Exactly:
    """These bytes, built from the earlier steps' output (MACs not compared when redirected)."""

    make: Callable[[list[ProgRun]], bytes]

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        want, got = self.make(prev), out.data
        if out.retval == TC_ACT_REDIRECT:
            want, got = want[12:], got[12:]
        assert got.hex() == want.hex(), f"{P.parse(out.data)} != {P.parse(want)}"


@dataclass(frozen=True)
class AnyOutput:
    """Dropped after the program had started rewriting: what is left of the frame does not matter."""

    def check(self, frame: bytes, out: ProgRun, prev: list[ProgRun]) -> None:
        pass


Expect = Unchanged | Nat | Exactly | Reset | PortUnreachable | AnyOutput
FlowCheck = Callable[[TcHarness, bytes, ProgRun], None]


@dataclass(frozen=True)
class Case:
    id: str
    program: str
    frame: Frame
    verdict: int
    expect: Expect
    before: tuple[tuple[str, Frame], ...] = ()  # steps run first, on a conntrack emptied for the row
    counters: Mapping[str, int] = field(default_factory=dict)  # exact deltas of the last step; all others stay
    flows: FlowCheck | None = None
    settings: DatapathSettings = field(default_factory=DatapathSettings)  # the agent's flags, in the config map


def flows_of_new_local_flow(client: str, cport: int, node: str, nport: int, backend: str, bport: int) -> FlowCheck:
    def check(h: TcHarness, frame: bytes, out: ProgRun) -> None:
        flows = h.flows()
        original = flows[("original", client, cport, node, nport, P.TCP)]
        assert original.backend == (backend, bport) and original.nat is None and not original.closing
        answer = flows[("reply", backend, bport, client, cport, P.TCP)]
        assert answer.backend == (backend, bport) and answer.nat is None
        assert answer.rev_nat_id == original.rev_nat_id
        assert len(flows) == 2

    return check


def flows_of_masqueraded_flow(
    client: str, cport: int, node: str, nport: int, backend: str, proto: int, masquerade: str | None = None
) -> FlowCheck:
    """`node:nport` is what the client dialled; `masquerade` the node address used (the same for a NodePort)."""

    def check(h: TcHarness, frame: bytes, out: ProgRun) -> None:
        snat_port = P.parse(out.data).sport
        flows = h.flows()
        original = flows[("original", client, cport, node, nport, proto)]
        assert original.nat == (masquerade or node, snat_port)
        answer = flows[
            ("reply", backend, original.backend[1] if original.backend else -1, masquerade or node, snat_port, proto)
        ]
        assert answer.nat == (client, cport)  # the client to restore
        assert len(flows) == 2

    return check


def closing(client: str, cport: int, node: str, nport: int) -> FlowCheck:
    def check(h: TcHarness, frame: bytes, out: ProgRun) -> None:
        assert h.flows()[("original", client, cport, node, nport, P.TCP)].closing

    return check


def no_flows(h: TcHarness, frame: bytes, out: ProgRun) -> None:
    assert h.flows() == {}


def flow_count(n: int) -> FlowCheck:
    def check(h: TcHarness, frame: bytes, out: ProgRun) -> None:
        assert len(h.flows()) == n, h.flows()

    return check


NEW_FLOW = {"tc_ct_new": 1, "tc_dnat": 1}
NEW_MASQUERADED_FLOW = {"tc_ct_new": 1, "tc_dnat": 1, "tc_snat": 1}
OK, SHOT, REDIRECT = TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT


def _cases() -> list[Case]:
    c4, c6 = CLIENT4, CLIENT6
    rows = [
        # ---- a new flow to a node-local backend: DNAT only, handed to the stack ----
        Case(
            "syn-nodeport-local",
            "kpr_tc_in4",
            syn(c4, 40000, NODE4, NP_TCP),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
            flows=flows_of_new_local_flow(c4, 40000, NODE4, NP_TCP, LOCAL4, TARGET_TCP),
        ),
        Case(
            "syn-nodeport-local-v6",
            "kpr_tc_in6",
            syn(c6, 40000, NODE6, NP_TCP),
            OK,
            Nat(dst=(LOCAL6, TARGET_TCP)),
            counters=NEW_FLOW,
            flows=flows_of_new_local_flow(c6, 40000, NODE6, NP_TCP, LOCAL6, TARGET_TCP),
        ),
        Case(
            "syn-with-payload-nodeport-local",  # TCP fast open style: data on the SYN
            "kpr_tc_in4",
            syn(
                c4, 40001, NODE4, NP_TCP, payload=b"GET / HTTP/1.0\r\n\r\n", options=b"\x02\x04\x05\xb4\x01\x01\x04\x02"
            ),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        # ---- its reply, at egress: shown as coming from the frontend ----
        Case(
            "synack-reply-egress",
            "kpr_tc_out4",
            reply(),
            OK,
            Nat(src=(NODE4, NP_TCP)),
            before=(("kpr_tc_in4", syn(c4, 40002, NODE4, NP_TCP)),),
            counters={"tc_revnat": 1},
        ),
        Case(
            "synack-reply-egress-v6",
            "kpr_tc_out6",
            reply(),
            OK,
            Nat(src=(NODE6, NP_TCP)),
            before=(("kpr_tc_in6", syn(c6, 40002, NODE6, NP_TCP)),),
            counters={"tc_revnat": 1},
        ),
        Case(
            "egress-of-no-tracked-flow",
            "kpr_tc_out4",
            seg(LOCAL4, TARGET_TCP, c4, 40003, P.SYN | P.ACK),
            OK,
            Unchanged(),
        ),
        # ---- later packets of a tracked flow ----
        Case(
            "ack-of-tracked-flow",
            "kpr_tc_in4",
            seg(c4, 40004, NODE4, NP_TCP, P.ACK),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            before=(("kpr_tc_in4", syn(c4, 40004, NODE4, NP_TCP)),),
            counters={"tc_dnat": 1},
        ),
        Case(
            "ack-of-tracked-flow-v6",
            "kpr_tc_in6",
            seg(c6, 40004, NODE6, NP_TCP, P.ACK | P.PSH, payload=b"data"),
            OK,
            Nat(dst=(LOCAL6, TARGET_TCP)),
            before=(("kpr_tc_in6", syn(c6, 40004, NODE6, NP_TCP)),),
            counters={"tc_dnat": 1},
        ),
        Case(
            "fin-of-tracked-flow",
            "kpr_tc_in4",
            seg(c4, 40005, NODE4, NP_TCP, P.FIN | P.ACK),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            before=(("kpr_tc_in4", syn(c4, 40005, NODE4, NP_TCP)),),
            counters={"tc_dnat": 1},
            flows=closing(c4, 40005, NODE4, NP_TCP),
        ),
        Case(
            "rst-of-tracked-flow",
            "kpr_tc_in4",
            seg(c4, 40006, NODE4, NP_TCP, P.RST),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            before=(("kpr_tc_in4", syn(c4, 40006, NODE4, NP_TCP)),),
            counters={"tc_dnat": 1},
            flows=closing(c4, 40006, NODE4, NP_TCP),
        ),
        Case(
            "syn-reusing-a-closed-tuple-picks-again",
            "kpr_tc_in4",
            syn(c4, 40007, NODE4, NP_TCP, seq=555555),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            before=(
                ("kpr_tc_in4", syn(c4, 40007, NODE4, NP_TCP)),
                ("kpr_tc_in4", seg(c4, 40007, NODE4, NP_TCP, P.FIN | P.ACK)),
            ),
            counters={"tc_ct_stale": 1, "tc_ct_new": 1, "tc_dnat": 1},
        ),
        Case(
            "retransmitted-syn-of-tracked-flow",
            "kpr_tc_in4",
            syn(c4, 40008, NODE4, NP_TCP),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            before=(("kpr_tc_in4", syn(c4, 40008, NODE4, NP_TCP)),),
            counters={"tc_dnat": 1},
        ),
        # ---- a backend on another node: DNAT + SNAT to the node address, redirected out ----
        Case(
            "syn-nodeport-remote",
            "kpr_tc_in4",
            syn(c4, 40010, NODE4, REMOTE_TCP),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_TCP), src=masqueraded(NODE4)),
            counters=NEW_MASQUERADED_FLOW,
            flows=flows_of_masqueraded_flow(c4, 40010, NODE4, REMOTE_TCP, REMOTE4, P.TCP),
        ),
        Case(
            "syn-nodeport-remote-v6",
            "kpr_tc_in6",
            syn(c6, 40010, NODE6, REMOTE_TCP),
            REDIRECT,
            Nat(dst=(REMOTE6, TARGET_TCP), src=masqueraded(NODE6)),
            counters=NEW_MASQUERADED_FLOW,
            flows=flows_of_masqueraded_flow(c6, 40010, NODE6, REMOTE_TCP, REMOTE6, P.TCP),
        ),
        Case(
            "ack-of-masqueraded-flow-keeps-its-port",
            "kpr_tc_in4",
            seg(c4, 40011, NODE4, REMOTE_TCP, P.ACK),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_TCP), src=same_snat_as(0)),
            before=(("kpr_tc_in4", syn(c4, 40011, NODE4, REMOTE_TCP)),),
            counters={"tc_dnat": 1},
        ),
        Case(
            "synack-of-masqueraded-flow-comes-back-to-the-client",
            "kpr_tc_in4",
            reply(),
            REDIRECT,
            Nat(src=(NODE4, REMOTE_TCP), dst=(c4, 40012)),
            before=(("kpr_tc_in4", syn(c4, 40012, NODE4, REMOTE_TCP)),),
            counters={"tc_revnat": 1},
        ),
        Case(
            "synack-of-masqueraded-flow-comes-back-to-the-client-v6",
            "kpr_tc_in6",
            reply(),
            REDIRECT,
            Nat(src=(NODE6, REMOTE_TCP), dst=(c6, 40012)),
            before=(("kpr_tc_in6", syn(c6, 40012, NODE6, REMOTE_TCP)),),
            counters={"tc_revnat": 1},
        ),
        Case(
            "egress-leaves-masqueraded-flows-alone",  # their replies are handled at ingress
            "kpr_tc_out4",
            seg(REMOTE4, TARGET_TCP, NODE4, 61000, P.SYN | P.ACK),
            OK,
            Unchanged(),
            before=(("kpr_tc_in4", syn(c4, 40013, NODE4, REMOTE_TCP)),),
        ),
        Case(
            "remote-backend-without-a-route-is-dropped",  # the flow was recorded and rewritten before the lookup
            "kpr_tc_in4",
            syn(c4, 40014, NODE4, NOROUTE_TCP),
            SHOT,
            AnyOutput(),
            counters={**NEW_MASQUERADED_FLOW, "tc_drop_fib": 1},
        ),
        # ---- UDP ----
        Case(
            "udp-nodeport-local",
            "kpr_tc_in4",
            udp(c4, 50000, NODE4, NP_UDP),
            OK,
            Nat(dst=(LOCAL4, TARGET_UDP)),
            counters=NEW_FLOW,
        ),
        Case(
            "udp-nodeport-local-v6",
            "kpr_tc_in6",
            udp(c6, 50000, NODE6, NP_UDP),
            OK,
            Nat(dst=(LOCAL6, TARGET_UDP)),
            counters=NEW_FLOW,
        ),
        Case(
            "udp-without-checksum-stays-without",
            "kpr_tc_in4",
            udp(c4, 50001, NODE4, NP_UDP, zero_checksum=True),
            OK,
            Nat(dst=(LOCAL4, TARGET_UDP)),
            counters=NEW_FLOW,
        ),
        Case(
            "udp-reply-egress",
            "kpr_tc_out4",
            reply(),
            OK,
            Nat(src=(NODE4, NP_UDP)),
            before=(("kpr_tc_in4", udp(c4, 50002, NODE4, NP_UDP)),),
            counters={"tc_revnat": 1},
        ),
        Case(
            "udp-nodeport-remote",
            "kpr_tc_in4",
            udp(c4, 50003, NODE4, REMOTE_UDP),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_UDP), src=masqueraded(NODE4)),
            counters=NEW_MASQUERADED_FLOW,
            flows=flows_of_masqueraded_flow(c4, 50003, NODE4, REMOTE_UDP, REMOTE4, P.UDP),
        ),
        Case(
            "udp-reply-of-masqueraded-flow-v6",
            "kpr_tc_in6",
            reply(),
            REDIRECT,
            Nat(src=(NODE6, REMOTE_UDP), dst=(c6, 50004)),
            before=(("kpr_tc_in6", udp(c6, 50004, NODE6, REMOTE_UDP)),),
            counters={"tc_revnat": 1},
        ),
        # ---- TCP segments of no tracked flow to a frontend that has backends: answered with a reset ----
        # DIFFERENT FROM KUBE-PROXY (mostly in who answers): netfilter's loose TCP tracking (nf_conntrack_tcp_loose=1)
        # picks a mid-stream segment up as a new connection and DNATs it to an endpoint, whose stack resets it; kpr
        # resets it at the node (tail call kpr_tc_rej4, counter tc_reset_untracked). The client sees a reset either
        # way; for a SYN+ACK, netfilter would find the segment INVALID instead.
        Case(
            "ack-of-no-tracked-flow-is-reset",
            "kpr_tc_in4",
            seg(c4, 40020, NODE4, NP_TCP, P.ACK, payload=b"late data"),
            REDIRECT,
            Reset(),
            counters={"tc_reset_untracked": 1, "tc_reject_tcp": 1},
            flows=no_flows,
        ),
        Case(
            "ack-of-no-tracked-flow-is-reset-v6",
            "kpr_tc_in6",
            seg(c6, 40020, NODE6, NP_TCP, P.ACK),
            REDIRECT,
            Reset(),
            counters={"tc_reset_untracked": 1, "tc_reject_tcp": 1},
            flows=no_flows,
        ),
        Case(
            "synack-to-a-frontend-is-reset",
            "kpr_tc_in4",
            seg(c4, 40021, NODE4, NP_TCP, P.SYN | P.ACK),
            REDIRECT,
            Reset(),
            counters={"tc_reset_untracked": 1, "tc_reject_tcp": 1},
        ),
        Case(
            "fin-without-ack-of-no-tracked-flow-is-reset",  # no ACK: the reset acknowledges seq + 1 (the FIN)
            "kpr_tc_in4",
            seg(c4, 40022, NODE4, NP_TCP, P.FIN),
            REDIRECT,
            Reset(),
            counters={"tc_reset_untracked": 1, "tc_reject_tcp": 1},
        ),
        Case(
            "rst-of-no-tracked-flow-is-dropped",  # never answer a reset
            "kpr_tc_in4",
            seg(c4, 40023, NODE4, NP_TCP, P.RST | P.ACK),
            SHOT,
            Unchanged(),
            counters={"tc_reset_untracked": 1, "tc_drop_reset": 1},
        ),
        # ---- frontends without any endpoint: kube-proxy's REJECT ----
        Case(
            "tcp-syn-to-frontend-without-backends-is-reset",
            "kpr_tc_in4",
            syn(c4, 40030, NODE4, EMPTY_TCP),
            REDIRECT,
            Reset(),
            counters={"tc_reject_tcp": 1},
            flows=no_flows,
        ),
        Case(
            "tcp-syn-to-frontend-without-backends-is-reset-v6",
            "kpr_tc_in6",
            syn(c6, 40030, NODE6, EMPTY_TCP),
            REDIRECT,
            Reset(),
            counters={"tc_reject_tcp": 1},
        ),
        Case(
            "tcp-syn-with-data-to-frontend-without-backends",  # the reset acknowledges the SYN and its data
            "kpr_tc_in4",
            syn(c4, 40031, NODE4, EMPTY_TCP, payload=b"x" * 100, seq=0xFFFFFFF0),
            REDIRECT,
            Reset(),
            counters={"tc_reject_tcp": 1},
        ),
        Case(
            "tcp-ack-to-frontend-without-backends",  # with an ACK: the reset's seq is that ACK
            "kpr_tc_in4",
            seg(c4, 40032, NODE4, EMPTY_TCP, P.ACK | P.PSH, payload=b"abc"),
            REDIRECT,
            Reset(),
            counters={"tc_reject_tcp": 1},
        ),
        Case(
            "tcp-rst-to-frontend-without-backends-gets-no-answer",
            "kpr_tc_in4",
            seg(c4, 40033, NODE4, EMPTY_TCP, P.RST),
            SHOT,
            Unchanged(),
            counters={"tc_drop_reset": 1},
        ),
        Case(
            "tcp-rst-to-frontend-without-backends-gets-no-answer-v6",
            "kpr_tc_in6",
            seg(c6, 40033, NODE6, EMPTY_TCP, P.RST | P.ACK),
            SHOT,
            Unchanged(),
            counters={"tc_drop_reset": 1},
        ),
        Case(
            "udp-to-frontend-without-backends-is-port-unreachable",
            "kpr_tc_in4",
            udp(c4, 50030, NODE4, EMPTY_UDP, payload=b"q" * 40),
            REDIRECT,
            PortUnreachable(),
            counters={"tc_reject_udp": 1},
            flows=no_flows,
        ),
        Case(
            "udp-to-frontend-without-backends-is-port-unreachable-v6",
            "kpr_tc_in6",
            udp(c6, 50030, NODE6, EMPTY_UDP),
            REDIRECT,
            PortUnreachable(),
            counters={"tc_reject_udp": 1},
        ),
        Case(
            "pod-to-frontend-without-backends-is-reset",
            "kpr_pod_in4",
            syn(POD4, 40034, NODE4, EMPTY_TCP),
            REDIRECT,
            Reset(),
            counters={"tc_reject_tcp": 1},
        ),
        # ---- policies ----
        Case(
            "local-policy-without-local-backend-drops",
            "kpr_tc_in4",
            syn(c4, 40040, NODE4, LOCAL_POLICY),
            SHOT,
            Unchanged(),
            counters={"tc_drop_no_local": 1},
            flows=no_flows,
        ),
        Case(
            "local-policy-without-local-backend-drops-v6",
            "kpr_tc_in6",
            syn(c6, 40040, NODE6, LOCAL_POLICY),
            SHOT,
            Unchanged(),
            counters={"tc_drop_no_local": 1},
        ),
        Case(
            "local-policy-from-a-pod-uses-every-backend",  # the internal scope: DNAT to node2's pod, no masquerade
            "kpr_pod_in4",
            syn(POD4, 40041, NODE4, LOCAL_POLICY),
            OK,
            Nat(dst=(REMOTE4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        # detect-local (--cluster-cidr): a pod of another node is a pod too (kube-proxy's "pod traffic for external
        # destinations" goes to the cluster policy chain): every endpoint, masqueraded as node2's pod is remote
        Case(
            "local-policy-from-a-pod-of-another-node-with-a-cluster-cidr",
            "kpr_tc_in4",
            syn(OTHER_POD4, 40042, NODE4, LOCAL_POLICY),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_TCP), src=masqueraded(NODE4)),
            counters=NEW_MASQUERADED_FLOW,
            settings=CLUSTER_CIDRS,
        ),
        Case(
            "local-policy-from-a-pod-of-another-node-with-a-cluster-cidr-v6",
            "kpr_tc_in6",
            syn(OTHER_POD6, 40042, NODE6, LOCAL_POLICY),
            REDIRECT,
            Nat(dst=(REMOTE6, TARGET_TCP), src=masqueraded(NODE6)),
            counters=NEW_MASQUERADED_FLOW,
            settings=CLUSTER_CIDRS,
        ),
        Case(
            "local-policy-from-a-pod-of-another-node-without-a-cluster-cidr-drops",
            "kpr_tc_in4",
            syn(OTHER_POD4, 40043, NODE4, LOCAL_POLICY),
            SHOT,
            Unchanged(),
            counters={"tc_drop_no_local": 1},
        ),
        Case(
            "local-policy-from-outside-the-cluster-cidr-drops",
            "kpr_tc_in6",
            syn(c6, 40043, NODE6, LOCAL_POLICY),
            SHOT,
            Unchanged(),
            counters={"tc_drop_no_local": 1},
            settings=CLUSTER_CIDRS,
        ),
        Case(
            "source-outside-load-balancer-source-ranges-drops",
            "kpr_tc_in4",
            syn(BLOCKED4, 40050, LB4, 80),
            SHOT,
            Unchanged(),
            counters={"tc_drop_source_range": 1},
            flows=no_flows,
        ),
        Case(
            "source-outside-load-balancer-source-ranges-drops-v6",
            "kpr_tc_in6",
            syn(BLOCKED6, 40050, LB6, 80),
            SHOT,
            Unchanged(),
            counters={"tc_drop_source_range": 1},
        ),
        Case(
            "source-inside-load-balancer-source-ranges",
            "kpr_tc_in4",
            syn(c4, 40051, LB4, 80),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        Case(
            "source-inside-load-balancer-source-ranges-v6",
            "kpr_tc_in6",
            syn(c6, 40051, LB6, 80),
            OK,
            Nat(dst=(LOCAL6, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        # ---- not kpr's: untouched ----
        Case("not-a-frontend", "kpr_tc_in4", syn(c4, 40060, NODE4, 22), OK, Unchanged(), flows=no_flows),
        Case("not-a-frontend-v6", "kpr_tc_in6", syn(c6, 40060, NODE6, 22), OK, Unchanged()),
        Case("unknown-destination", "kpr_tc_in4", udp(c4, 40061, OTHER4, 53), OK, Unchanged()),
        Case("frontend-port-other-protocol", "kpr_tc_in4", udp(c4, 40062, NODE4, NP_TCP), OK, Unchanged()),
        # DIFFERENT FROM KUBE-PROXY: kube-proxy DNATs ClusterIP traffic from anywhere in PREROUTING (and masquerades
        # it when it comes from outside the cluster CIDR), so a router with a route to the service CIDR via a node
        # reaches ClusterIPs; kpr's tc path leaves ClusterIPs to routing and the packet goes nowhere.
        Case("clusterip-from-outside", "kpr_tc_in4", syn(c4, 40063, CIP4, 80), OK, Unchanged(), flows=no_flows),
        Case("clusterip-from-outside-v6", "kpr_tc_in6", syn(c6, 40063, CIP6, 80), OK, Unchanged()),
        # --external-cluster-ip: served like an external frontend (a remote endpoint's flow masqueraded)
        Case(
            "clusterip-from-outside-with-external-cluster-ip",
            "kpr_tc_in4",
            syn(c4, 40065, CIP4, 80),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
            flows=flows_of_new_local_flow(c4, 40065, CIP4, 80, LOCAL4, TARGET_TCP),
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-from-outside-with-external-cluster-ip-v6",
            "kpr_tc_in6",
            syn(c6, 40065, CIP6, 80),
            OK,
            Nat(dst=(LOCAL6, TARGET_TCP)),
            counters=NEW_FLOW,
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-reply-from-a-local-backend-with-external-cluster-ip",
            "kpr_tc_out4",
            reply(),
            OK,
            Nat(src=(CIP4, 80)),
            before=(("kpr_tc_in4", syn(c4, 40066, CIP4, 80)),),
            counters={"tc_revnat": 1},
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-of-a-remote-endpoint-from-outside-is-masqueraded",
            "kpr_tc_in4",
            syn(c4, 40067, CIP_REMOTE4, 80),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_TCP), src=masqueraded(NODE4)),
            counters=NEW_MASQUERADED_FLOW,
            flows=flows_of_masqueraded_flow(c4, 40067, CIP_REMOTE4, 80, REMOTE4, P.TCP, masquerade=NODE4),
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-of-a-remote-endpoint-from-outside-is-masqueraded-v6",
            "kpr_tc_in6",
            syn(c6, 40067, CIP_REMOTE6, 80),
            REDIRECT,
            Nat(dst=(REMOTE6, TARGET_TCP), src=masqueraded(NODE6)),
            counters=NEW_MASQUERADED_FLOW,
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-reply-of-a-masqueraded-flow-comes-from-the-clusterip",
            "kpr_tc_in4",
            reply(),
            REDIRECT,
            Nat(src=(CIP_REMOTE4, 80), dst=(c4, 40069)),
            before=(("kpr_tc_in4", syn(c4, 40069, CIP_REMOTE4, 80)),),
            counters={"tc_revnat": 1},
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-with-internal-policy-local-and-no-local-endpoint-drops",  # kube-proxy: "has no local endpoints"
            "kpr_tc_in4",
            syn(c4, 40068, CIP_LOCAL4, 80),
            SHOT,
            Unchanged(),
            counters={"tc_drop_no_local": 1},
            settings=EXTERNAL_CLUSTER_IP,
        ),
        Case(
            "clusterip-from-a-chained-pod",
            "kpr_pod_in4",
            syn(POD4, 40064, CIP4, 80),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        Case(
            "clusterip-from-a-chained-pod-v6",
            "kpr_pod_in6",
            syn(POD6, 40064, CIP6, 80),
            OK,
            Nat(dst=(LOCAL6, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        Case(
            "icmp-echo-to-the-node",
            "kpr_tc_in4",
            P.packet(c4, NODE4, P.Icmp(8, 0, b"\0\1\0\1", b"ping")),
            OK,
            Unchanged(),
        ),
        Case(
            "icmpv6-echo-to-the-node",
            "kpr_tc_in6",
            P.packet(c6, NODE6, P.Icmp(128, 0, b"\0\1\0\1", b"ping")),
            OK,
            Unchanged(),
        ),
        # ---- malformed or unusual headers to a frontend: left to the stack, never translated ----
        # The kernel refuses to test-run an IPv4 (IPv6) frame shorter than 20 (40) bytes after the Ethernet header
        # (EINVAL), though such frames do reach tc ingress. The programs never look at the ethertype (the tc filter
        # matches it), so the same bytes under an experimental ethertype exercise their own bounds check.
        Case(
            "truncated-ipv4-header",
            "kpr_tc_in4",
            other_ethertype(syn(c4, 40070, NODE4, NP_TCP)[: P.ETH_HLEN + 12]),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-ipv6-header",
            "kpr_tc_in6",
            other_ethertype(syn(c6, 40070, NODE6, NP_TCP)[: P.ETH_HLEN + 39]),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-tcp-header-before-the-ports",
            "kpr_tc_in4",
            syn(c4, 40071, NODE4, NP_TCP)[: P.ETH_HLEN + 20 + 3],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-tcp-header-before-the-flags",
            "kpr_tc_in4",
            syn(c4, 40072, NODE4, NP_TCP)[: P.ETH_HLEN + 20 + 13],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        # A TCP or UDP header cut short anywhere before its end (here: after the flags, in the checksum, after it)
        # is left to the stack untouched and untracked. (Once, one cut between the flags and the end of the checksum
        # was tracked, then dropped when the checksum update failed past the end, leaking the flow: these rows.)
        Case(
            "truncated-tcp-header-before-the-checksum",
            "kpr_tc_in4",
            syn(c4, 40073, NODE4, NP_TCP)[: P.ETH_HLEN + 20 + 16],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-udp-header-before-the-checksum",
            "kpr_tc_in4",
            udp(c4, 50073, NODE4, REMOTE_UDP)[: P.ETH_HLEN + 20 + 6],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-tcp-header-after-the-checksum",
            "kpr_tc_in4",
            syn(c4, 40076, NODE4, NP_TCP)[: P.ETH_HLEN + 20 + 19],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "truncated-udp-header-v6",
            "kpr_tc_in6",
            udp(c6, 50070, NODE6, NP_UDP)[: P.ETH_HLEN + 40 + 3],
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        # DIFFERENT FROM KUBE-PROXY (the next three): netfilter translates packets with IPv4 options and, after
        # defragmenting, fragmented datagrams; kpr leaves both to the stack untranslated, so a NodePort flow whose
        # UDP datagrams fragment (DNS over UDP with EDNS, large syslog, QUIC without PMTU care) is not served.
        Case(
            "ipv4-options-to-a-frontend",
            "kpr_tc_in4",
            P.packet(c4, NODE4, P.Tcp(40074, NP_TCP), ip_options=b"\x94\x04\0\0"),  # Router Alert
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "first-fragment-to-a-frontend",
            "kpr_tc_in4",
            P.ipv4_raw(c4, NODE4, P.UDP, udp(c4, 50071, NODE4, NP_UDP)[P.ETH_HLEN + 20 :] + b"z" * 3, frag=0x2000),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "later-fragment-to-a-frontend",
            "kpr_tc_in4",
            P.ipv4_raw(c4, NODE4, P.UDP, b"\x75\x3f" + bytes([NP_UDP >> 8, NP_UDP & 0xFF]) + b"rest", frag=185),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        # DIFFERENT FROM KUBE-PROXY: netfilter skips IPv6 extension headers (ipv6_skip_exthdr) and translates; kpr
        # reads the next header right after the fixed header and leaves the packet untranslated.
        Case(
            "ipv6-hop-by-hop-header-before-tcp",
            "kpr_tc_in6",
            P.packet(c6, NODE6, P.Tcp(40075, NP_TCP), ipv6_hbh=True),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "ipv6-fragment-header-to-a-frontend",
            "kpr_tc_in6",
            P.ipv6_raw(
                c6, NODE6, P.FRAGMENT, bytes([P.UDP, 0, 0, 1, 0, 0, 0, 7]) + udp(c6, 50075, NODE6, NP_UDP)[-13:]
            ),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        # ---- ICMP errors about translated flows (netfilter's RELATED) ----
        # An error quotes the packet it is about as it was where the error arose, on the wrong side of the
        # translation; it is translated back (outer and quoted headers, every checksum) and sent to the other end:
        # path MTU discovery and unreachables work through a NodePort, as with kube-proxy.
        Case(  # a router near the client: a reply of node1's backend was too big
            "icmp-frag-needed-about-a-reply-reaches-the-local-backend",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(c4, NODE4, P.rewritten(reply()(prev), src=(NODE4, NP_TCP))),
            OK,
            Exactly(lambda prev: icmp_error_about(c4, LOCAL4, reply()(prev))),
            before=(("kpr_tc_in4", syn(c4, 40080, NODE4, NP_TCP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(
            "icmpv6-packet-too-big-about-a-reply-reaches-the-local-backend",
            "kpr_tc_in6",
            lambda prev: icmp_error_about(c6, NODE6, P.rewritten(reply()(prev), src=(NODE6, NP_TCP)), 2, 0),
            OK,
            Exactly(lambda prev: icmp_error_about(c6, LOCAL6, reply()(prev), 2, 0)),
            before=(("kpr_tc_in6", syn(c6, 40080, NODE6, NP_TCP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(  # the backend answers a datagram with port unreachable: the client hears it from the NodePort
            "icmp-port-unreachable-from-a-local-backend-comes-from-the-frontend",
            "kpr_tc_out4",
            lambda prev: icmp_error_about(LOCAL4, c4, prev[0].data, 3, 3),
            OK,
            Exactly(lambda prev: icmp_error_about(NODE4, c4, udp(c4, 50080, NODE4, NP_UDP), 3, 3)),
            before=(("kpr_tc_in4", udp(c4, 50080, NODE4, NP_UDP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(
            "icmpv6-port-unreachable-from-a-local-backend-comes-from-the-frontend",
            "kpr_tc_out6",
            lambda prev: icmp_error_about(LOCAL6, c6, prev[0].data, 1, 4),
            OK,
            Exactly(lambda prev: icmp_error_about(NODE6, c6, udp(c6, 50080, NODE6, NP_UDP), 1, 4)),
            before=(("kpr_tc_in6", udp(c6, 50080, NODE6, NP_UDP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(  # a router toward node2: what node1 masqueraded on was too big; the client hears it from the NodePort
            "icmp-frag-needed-about-a-masqueraded-packet-reaches-the-client",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(ROUTER4, NODE4, prev[0].data),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE4, c4, syn(c4, 40081, NODE4, REMOTE_TCP))),
            before=(("kpr_tc_in4", syn(c4, 40081, NODE4, REMOTE_TCP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(
            "icmpv6-packet-too-big-about-a-masqueraded-packet-reaches-the-client",
            "kpr_tc_in6",
            lambda prev: icmp_error_about(ROUTER6, NODE6, prev[0].data, 2, 0),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE6, c6, syn(c6, 40081, NODE6, REMOTE_TCP), 2, 0)),
            before=(("kpr_tc_in6", syn(c6, 40081, NODE6, REMOTE_TCP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(  # the quoted UDP checksum is translated too
            "icmp-port-unreachable-from-a-remote-backend-reaches-the-client",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(REMOTE4, NODE4, prev[0].data, 3, 3),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE4, c4, udp(c4, 50081, NODE4, REMOTE_UDP), 3, 3)),
            before=(("kpr_tc_in4", udp(c4, 50081, NODE4, REMOTE_UDP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(
            "icmpv6-port-unreachable-from-a-remote-backend-reaches-the-client",
            "kpr_tc_in6",
            lambda prev: icmp_error_about(REMOTE6, NODE6, prev[0].data, 1, 4),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE6, c6, udp(c6, 50081, NODE6, REMOTE_UDP), 1, 4)),
            before=(("kpr_tc_in6", udp(c6, 50081, NODE6, REMOTE_UDP)),),
            counters={"tc_icmp_related": 1},
        ),
        Case(  # a router near the client: a reply node1 sent for node2's backend; the backend hears it from node1
            "icmp-frag-needed-about-a-masqueraded-reply-reaches-the-remote-backend",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(c4, NODE4, prev[1].data),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE4, REMOTE4, reply()(prev))),
            before=(("kpr_tc_in4", syn(c4, 40082, NODE4, REMOTE_TCP)), ("kpr_tc_in4", reply())),
            counters={"tc_icmp_related": 1},
        ),
        Case(
            "icmpv6-packet-too-big-about-a-masqueraded-reply-reaches-the-remote-backend",
            "kpr_tc_in6",
            lambda prev: icmp_error_about(c6, NODE6, prev[1].data, 2, 0),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE6, REMOTE6, reply()(prev), 2, 0)),
            before=(("kpr_tc_in6", syn(c6, 40082, NODE6, REMOTE_TCP)), ("kpr_tc_in6", reply())),
            counters={"tc_icmp_related": 1},
        ),
        # tc redirects masqueraded packets past the kernel's forwarding, so kpr answers one too big for the device
        # toward its backend as forwarding would (the answer translated for the client like any other error)
        Case(
            "too-big-for-the-device-toward-a-remote-backend-is-answered-with-frag-needed",
            "kpr_tc_in4",
            BIG_DF,
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE4, c4, BIG_DF, mtu=1500, ident=0)),
            before=(("kpr_tc_in4", syn(c4, 40095, NODE4, REMOTE_TCP)),),
            counters={"tc_dnat": 1, "tc_too_big": 1, "tc_icmp_related": 1},
        ),
        Case(
            "too-big-for-the-device-toward-a-remote-backend-is-answered-with-packet-too-big-v6",
            "kpr_tc_in6",
            BIG6,
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE6, c6, BIG6, 2, 0, mtu=1500)),
            before=(("kpr_tc_in6", syn(c6, 40095, NODE6, REMOTE_TCP)),),
            counters={"tc_dnat": 1, "tc_too_big": 1, "tc_icmp_related": 1},
        ),
        Case(  # DIFFERENT FROM KUBE-PROXY: the kernel would fragment it; kpr does not fragment
            "too-big-without-df-toward-a-remote-backend-is-dropped",
            "kpr_tc_in4",
            BIG_NO_DF,
            SHOT,
            AnyOutput(),
            before=(("kpr_tc_in4", syn(c4, 40095, NODE4, REMOTE_TCP)),),
            counters={"tc_dnat": 1, "tc_drop_too_big": 1},
        ),
        Case(  # about no tracked flow: the node's own business
            "icmp-error-about-an-untracked-packet-is-left-alone",
            "kpr_tc_in4",
            icmp_error_about(OTHER4, NODE4, syn(NODE4, 40083, OTHER4, 443)),
            OK,
            Unchanged(),
        ),
        Case(
            "icmp-error-quoting-less-than-8-bytes-of-l4-is-left-alone",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(ROUTER4, NODE4, prev[0].data, quoted_l4=4),
            OK,
            Unchanged(),
            before=(("kpr_tc_in4", syn(c4, 40084, NODE4, REMOTE_TCP)),),
        ),
        Case(
            "icmp-echo-reply-is-left-alone",
            "kpr_tc_out4",
            P.packet(NODE4, c4, P.Icmp(0, 0, b"\0\1\0\1", b"ping")),
            OK,
            Unchanged(),
        ),
        # ---- SCTP: translated at tc, its CRC32c kept right (the socket hooks never run for SCTP) ----
        Case(
            "sctp-init-to-a-nodeport-local",
            "kpr_tc_in4",
            sctp(c4, 40200, NODE4, NP_SCTP),
            OK,
            Nat(dst=(LOCAL4, TARGET_SCTP)),
            counters={**NEW_FLOW, "tc_sctp_crc": 1},
        ),
        Case(
            "sctp-init-to-a-nodeport-local-v6",
            "kpr_tc_in6",
            sctp(c6, 40200, NODE6, NP_SCTP),
            OK,
            Nat(dst=(LOCAL6, TARGET_SCTP)),
            counters={**NEW_FLOW, "tc_sctp_crc": 1},
        ),
        Case(
            "sctp-init-ack-of-a-local-backend-comes-from-the-nodeport",
            "kpr_tc_out4",
            reply(),
            OK,
            Nat(src=(NODE4, NP_SCTP)),
            before=(("kpr_tc_in4", sctp(c4, 40201, NODE4, NP_SCTP)),),
            counters={"tc_revnat": 1, "tc_sctp_crc": 1},
        ),
        Case(
            "sctp-data-of-a-tracked-association-follows-it",
            "kpr_tc_in4",
            sctp(c4, 40202, NODE4, NP_SCTP, chunk=0, value=b"payload-of-a-data-chunk", vtag=42),
            OK,
            Nat(dst=(LOCAL4, TARGET_SCTP)),
            before=(("kpr_tc_in4", sctp(c4, 40202, NODE4, NP_SCTP)),),
            counters={"tc_dnat": 1, "tc_sctp_crc": 1},
        ),
        Case(
            "sctp-init-to-a-remote-backend-is-masqueraded",
            "kpr_tc_in4",
            sctp(c4, 40203, NODE4, REMOTE_SCTP),
            REDIRECT,
            Nat(dst=(REMOTE4, TARGET_SCTP), src=masqueraded(NODE4)),
            counters={**NEW_MASQUERADED_FLOW, "tc_sctp_crc": 2},
            flows=flows_of_masqueraded_flow(c4, 40203, NODE4, REMOTE_SCTP, REMOTE4, P.SCTP),
        ),
        Case(
            "sctp-init-to-a-remote-backend-is-masqueraded-v6",
            "kpr_tc_in6",
            sctp(c6, 40203, NODE6, REMOTE_SCTP),
            REDIRECT,
            Nat(dst=(REMOTE6, TARGET_SCTP), src=masqueraded(NODE6)),
            counters={**NEW_MASQUERADED_FLOW, "tc_sctp_crc": 2},
        ),
        Case(
            "sctp-init-ack-of-a-masqueraded-association-comes-back-to-the-client",
            "kpr_tc_in6",
            reply(),
            REDIRECT,
            Nat(src=(NODE6, REMOTE_SCTP), dst=(c6, 40204)),
            before=(("kpr_tc_in6", sctp(c6, 40204, NODE6, REMOTE_SCTP)),),
            counters={"tc_revnat": 1, "tc_sctp_crc": 2},
        ),
        Case(
            "sctp-abort-ends-the-association",
            "kpr_tc_in4",
            sctp(c4, 40205, NODE4, NP_SCTP, chunk=6, value=b""),
            OK,
            Nat(dst=(LOCAL4, TARGET_SCTP)),
            before=(("kpr_tc_in4", sctp(c4, 40205, NODE4, NP_SCTP)),),
            counters={"tc_dnat": 1, "tc_sctp_crc": 1},
            flows=lambda h, frame, out: _assert_closing(h, ("original", CLIENT4, 40205, NODE4, NP_SCTP, P.SCTP)),
        ),
        Case(
            "sctp-to-a-nodeport-without-endpoints-is-port-unreachable",
            "kpr_tc_in4",
            sctp(c4, 40206, NODE4, EMPTY_SCTP),
            REDIRECT,
            PortUnreachable(),
            counters={"tc_reject_udp": 1},
        ),
        Case(
            "sctp-bad-crc-stays-exactly-as-wrong",
            "kpr_tc_in4",
            P.with_byte(sctp(c4, 40207, NODE4, NP_SCTP), P.ETH_HLEN + 20 + 9, 0x5A),
            OK,
            Nat(dst=(LOCAL4, TARGET_SCTP)),
            counters={**NEW_FLOW, "tc_sctp_crc": 1},
        ),
        Case(  # the CRC covers what the IP header says, not the Ethernet padding after it
            "sctp-with-ethernet-padding",
            "kpr_tc_in4",
            sctp(c4, 40208, NODE4, NP_SCTP, chunk=14, value=b"") + bytes(14),
            OK,
            Nat(dst=(LOCAL4, TARGET_SCTP)),
            counters={**NEW_FLOW, "tc_sctp_crc": 1},
        ),
        Case(
            "icmp-frag-needed-about-a-masqueraded-sctp-packet-reaches-the-client",
            "kpr_tc_in4",
            lambda prev: icmp_error_about(ROUTER4, NODE4, prev[0].data),
            REDIRECT,
            Exactly(lambda prev: icmp_error_about(NODE4, c4, sctp(c4, 40209, NODE4, REMOTE_SCTP))),
            before=(("kpr_tc_in4", sctp(c4, 40209, NODE4, REMOTE_SCTP)),),
            counters={"tc_icmp_related": 1},
        ),
        # ---- headers the stack would refuse (ip_rcv / ipv6_rcv drop them before netfilter ever sees them) ----
        # tc runs before the stack's header checks: a wrong version field is left untouched (found by the property
        # test below, when tc.c did not check it and translated and tracked such junk).
        Case(
            "ipv4-version-5-to-a-frontend-is-left-alone",
            "kpr_tc_in4",
            P.with_byte(syn(c4, 40085, NODE4, NP_TCP), P.ETH_HLEN, 0x55, fix_ip_checksum=True),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        Case(
            "ipv6-version-7-to-a-frontend-is-left-alone",
            "kpr_tc_in6",
            P.with_byte(udp(c6, 50085, NODE6, NP_UDP), P.ETH_HLEN, 0x70),
            OK,
            Unchanged(),
            flows=no_flows,
        ),
        # DIFFERENT FROM KUBE-PROXY: tc.c does not check the IPv4 header checksum, so a packet with a wrong one is
        # translated and tracked; the stack drops it after (ip_rcv), and kube-proxy never sees it.
        Case(
            "bad-ipv4-header-checksum-to-a-frontend-is-translated",  # and stays exactly as wrong
            "kpr_tc_in4",
            P.with_byte(syn(c4, 40086, NODE4, NP_TCP), P.ETH_HLEN + 11, 0x00),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        # ---- checksums ----
        Case(
            "bad-tcp-checksum-stays-exactly-as-wrong",  # the incremental update carries the error through
            "kpr_tc_in4",
            bad_checksum(syn(c4, 40090, NODE4, NP_TCP)),
            OK,
            Nat(dst=(LOCAL4, TARGET_TCP)),
            counters=NEW_FLOW,
        ),
        Case(
            "bad-udp-checksum-stays-exactly-as-wrong-v6",
            "kpr_tc_in6",
            bad_checksum(udp(c6, 50090, NODE6, NP_UDP)),
            OK,
            Nat(dst=(LOCAL6, TARGET_UDP)),
            counters=NEW_FLOW,
        ),
    ]
    return rows


CASES = _cases()


def _run_case(tc: TcHarness, case: Case, flags: int = 0) -> tuple[bytes, ProgRun, list[ProgRun], dict[str, int]]:
    tc.flush_conntrack()
    tc.configure(case.settings)
    prev: list[ProgRun] = []
    for program, frame in case.before:
        raw = frame(prev) if callable(frame) else frame
        out = tc.run(program, raw, flags=flags)
        assert out.retval in (OK, REDIRECT), f"setup step {program} gave {out.retval}"
        assert P.check(out.data) == [], f"setup step output: {P.check(out.data)}"
        prev.append(out)
    frame = case.frame(prev) if callable(case.frame) else case.frame
    before = tc.counters()
    out = tc.run(case.program, frame, flags=flags)
    after = tc.counters()
    moved = {name: after[name] - before[name] for name in after if after[name] != before[name]}
    return frame, out, prev, moved


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tc_fixture(tc: TcHarness, case: Case) -> None:
    frame, out, prev, moved = _run_case(tc, case)
    assert out.retval == case.verdict, f"verdict {out.retval}, expected {case.verdict}; counters moved: {moved}"
    case.expect.check(frame, out, prev)
    assert moved == dict(case.counters)
    if out.retval in (OK, REDIRECT):
        if P.check(frame) == []:
            assert P.check(out.data) == [], P.check(out.data)
        # a frame that came in with a wrong checksum leaves with exactly the same error
        assert P.l4_residual(out.data) == P.l4_residual(frame) or isinstance(case.expect, (Reset, PortUnreachable))
    if case.flows is not None:
        case.flows(tc, frame, out)


# The packets kpr hands to the stack at ingress after rewriting them: a NIC that reports CHECKSUM_COMPLETE gives the
# skb a checksum of the whole packet, which the rewrite must keep right or the stack drops the packet as corrupt.
# The kernel computes skb->csum before the run and checks it after (BPF_F_TEST_SKB_CHECKSUM_COMPLETE).
STACK_BOUND = [c for c in CASES if c.verdict == OK and isinstance(c.expect, (Nat, Exactly)) and "_in" in c.program]


# A UDP datagram without checksum keeps none (BPF_F_MARK_MANGLED_0 makes bpf_l4_csum_replace a no-op), so nothing
# accounts in skb->csum for the port rewritten with bpf_skb_store_bytes: the kernel's check fails (EBADMSG). Harmless:
# the stack never validates a zero UDP checksum (udp4_csum_init marks it CHECKSUM_UNNECESSARY) and forwarding to a
# pod resets CHECKSUM_COMPLETE anyway (skb_forward_csum). Passing BPF_F_RECOMPUTE_CSUM for the port store would fix it.
STALE_COMPLETE_CHECKSUM = {"udp-without-checksum-stays-without"}


@pytest.mark.parametrize("case", STACK_BOUND, ids=[c.id for c in STACK_BOUND])
def test_translated_packets_keep_a_complete_checksum_right(tc: TcHarness, case: Case) -> None:
    if case.id in STALE_COMPLETE_CHECKSUM:
        with pytest.raises(BpfError) as e:
            _run_case(tc, case, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
        assert e.value.errno == errno.EBADMSG
        return
    frame, out, prev, _ = _run_case(tc, case, flags=BPF_F_TEST_SKB_CHECKSUM_COMPLETE)
    assert out.retval == case.verdict
    case.expect.check(frame, out, prev)


# ---- the harness itself ----


def test_sk_buff_mirror_matches_the_kernel_uapi() -> None:
    import ctypes

    assert ctypes.sizeof(SkBuff) == 192
    assert (SkBuff.ifindex.offset, SkBuff.cb.offset, SkBuff.tstamp.offset, SkBuff.hwtstamp.offset) == (40, 48, 152, 184)


def test_context_fields_the_kernel_refuses_fail_with_einval(tc: TcHarness) -> None:
    frame = syn(CLIENT4, 40100, NODE4, 22)
    fd = tc.programs["kpr_tc_in4"]
    with pytest.raises(BpfError) as e:
        tc.pool.submit(prog_test_run, fd, frame, ctx=bytes(SkBuff(ifindex=tc.ifindex, protocol=8))).result()
    assert e.value.errno == errno.EINVAL
    with pytest.raises(BpfError) as e:
        tc.pool.submit(prog_test_run, fd, frame, ctx=skb_context(ifindex=tc.ifindex + 1000)).result()
    assert e.value.errno == errno.ENODEV  # not a device of node1's namespace


def test_without_a_devices_entry_masquerading_drops(tc: TcHarness) -> None:
    """The skb arrives on node1's loopback (ifindex 1), which the devices map does not know: no node address."""
    tc.flush_conntrack()
    before = tc.counters()["tc_drop_fib"]
    out = tc.run("kpr_tc_in4", syn(CLIENT4, 40101, NODE4, REMOTE_TCP), ctx=skb_context(ifindex=1))
    assert out.retval == SHOT
    assert tc.counters()["tc_drop_fib"] == before + 1
    assert tc.flows() == {}


def test_every_masquerade_port_in_use_drops_the_new_flow_and_says_so(tc: TcHarness) -> None:
    """Reliability finding 14: with every port of 61000-65535 taken toward one backend, a new masqueraded flow
    cannot be recorded; it is dropped and counted as such (not as a full conntrack table), and nothing is tracked."""
    tc.flush_conntrack()
    node, backend = abi.be32_of_ipv4(NODE4), abi.be32_of_ipv4(REMOTE4)
    keys, values = [], []
    for port in SNAT_PORTS:  # live reply entries of other clients' flows, one per masquerade port
        keys.append(
            abi.CtKey4(
                src=backend,
                dst=node,
                sport=abi.be16_of_port(TARGET_TCP),
                dport=abi.be16_of_port(port),
                proto=P.TCP,
                dir=abi.CT_REPLY,
            )
        )
        values.append(abi.CtValue4(last_seen_ns=2**62, flags=abi.CT_F_SNAT))  # far in the future: never expired
    tc.writer.update_many("ct4", keys, values)
    before = tc.counters()
    out = tc.run("kpr_tc_in4", syn(CLIENT4, 40102, NODE4, REMOTE_TCP))
    after = tc.counters()
    assert out.retval == SHOT
    assert after["tc_drop_snat_ports"] == before["tc_drop_snat_ports"] + 1
    assert after["tc_drop_ct_full"] == before["tc_drop_ct_full"]
    assert len(tc.conntrack(4)) == len(SNAT_PORTS)  # nothing recorded for the dropped flow
    tc.flush_conntrack()


def _sum_by_modulo(data: bytes) -> int:
    """The ones' complement sum another way: the 16-bit words' sum modulo 0xffff (RFC 1071, section 2(B))."""
    data += b"\0" * (len(data) % 2)
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)) % 0xFFFF
    return total or 0xFFFF


def test_packet_helpers_agree_with_published_checksums() -> None:
    assert P.ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2  # RFC 1071's example
    header = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")  # a classic worked IPv4 header example
    assert P.checksum(header) == 0xB861
    frame = syn("192.0.2.1", 1234, "198.51.100.2", 80, seq=1, window=1024, payload=b"odd")
    tcp = frame[P.ETH_HLEN + 20 :]
    pseudo = P.addr_bytes("192.0.2.1") + P.addr_bytes("198.51.100.2") + bytes([0, P.TCP]) + len(tcp).to_bytes(2, "big")
    assert _sum_by_modulo(pseudo + tcp) == 0xFFFF
    assert _sum_by_modulo(frame[P.ETH_HLEN : P.ETH_HLEN + 20]) == 0xFFFF
    assert P.check(frame) == [] and P.check(bad_checksum(frame)) == ["bad TCP checksum"]


# ---- property: random frames through the ingress and egress programs ----

ADDRS4 = [NODE4, CLIENT4, BLOCKED4, POD4, LOCAL4, REMOTE4, LB4, CIP4, OTHER4]
ADDRS6 = [NODE6, CLIENT6, BLOCKED6, POD6, LOCAL6, REMOTE6, LB6, CIP6, OTHER6]
PORTS = [NP_TCP, NP_UDP, REMOTE_TCP, REMOTE_UDP, EMPTY_TCP, EMPTY_UDP, LOCAL_POLICY, 80, TARGET_TCP, TARGET_UDP, 22]
PORTS += [NP_SCTP, REMOTE_SCTP, EMPTY_SCTP, TARGET_SCTP]


@st.composite
def addresses(draw: st.DrawFn, family: int) -> str:
    known = ADDRS4 if family == 4 else ADDRS6
    if draw(st.sampled_from([True, True, True, False])):
        return draw(st.sampled_from(known))
    bits = draw(st.integers(1, 2**32 - 1 if family == 4 else 2**128 - 1))
    return str(ipaddress.ip_address(bits) if family == 4 else ipaddress.IPv6Address(bits))


@st.composite
def structured_frames(draw: st.DrawFn, family: int) -> bytes:
    """TCP, UDP or SCTP from a known or random source to a frontend (often) or anywhere, random flags or chunk,
    sometimes with a corrupted IP header byte or cut short."""
    src, dst = draw(addresses(family)), draw(addresses(family))
    ports = st.sampled_from(PORTS) | st.integers(1, 65535)
    sport, dport = draw(ports), draw(ports)
    proto = draw(st.sampled_from([P.TCP, P.UDP, P.SCTP]))
    # (hypothesis favours the first of sampled_from's choices and small integers: the common case goes first)
    if draw(st.sampled_from([True, True, False])):  # two in three to a frontend, mostly with its protocol
        frontend = draw(st.sampled_from([f for f in FRONTENDS if f.family == family]))
        dst, dport = frontend.addr, frontend.port
        if draw(st.sampled_from([True, True, True, False])):
            proto = {"TCP": P.TCP, "UDP": P.UDP, "SCTP": P.SCTP}[frontend.protocol]
    payload = draw(st.binary(max_size=64))
    l4: P.L4
    if proto == P.TCP:
        common = st.sampled_from(
            [P.SYN, P.SYN, P.SYN | P.ACK, P.ACK, P.ACK | P.PSH, P.FIN | P.ACK, P.RST, P.RST | P.ACK]
        )
        flags = draw(st.one_of(common, common, common, st.integers(0, 255)))
        seq, ack = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        l4 = P.Tcp(sport, dport, flags=flags, seq=seq, ack=ack, payload=payload)
    elif proto == P.SCTP:
        chunk = draw(st.sampled_from([1, 0, 2, 6, 14]) | st.integers(0, 255))
        l4 = P.Sctp(sport, dport, chunk=chunk, value=payload, vtag=draw(st.integers(0, 2**32 - 1)))
    else:
        l4 = P.Udp(sport, dport, payload=payload, zero_checksum=family == 4 and draw(st.booleans()))
    frame = P.packet(src, dst, l4)
    if draw(st.sampled_from([False] * 7 + [True])):  # sometimes corrupt a byte of the IP header
        at = P.ETH_HLEN + draw(st.integers(0, (20 if family == 4 else 40) - 1))
        frame = frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1 :]
    if draw(st.sampled_from([False] * 5 + [True])):  # sometimes cut it short anywhere past the Ethernet header
        frame = frame[: draw(st.integers(P.ETH_HLEN + 1, len(frame)))]
        if len(frame) < P.ETH_HLEN + (20 if family == 4 else 40):
            frame = other_ethertype(frame)  # what the kernel would refuse to test-run as IP (see the table)
    return frame


@st.composite
def random_frames(draw: st.DrawFn, family: int) -> bytes:
    """Random bytes after an IPv4 or IPv6 Ethernet header (as long as the kernel accepts for test runs)."""
    ethertype = P.ETH_P_IP if family == 4 else P.ETH_P_IPV6
    return P.eth(P.NODE_MAC, P.CLIENT_MAC, ethertype) + draw(st.binary(min_size=20 if family == 4 else 40, max_size=96))


REPLY = "reply"  # a step that answers the previous step's output


@st.composite
def scenarios(draw: st.DrawFn) -> list[tuple[str, bytes | str]]:
    """One to three steps; a step is a program and a frame, or a REPLY to what the step before put out."""
    family = draw(st.sampled_from([4, 6]))
    programs = st.sampled_from([f"kpr_tc_in{family}"] * 3 + [f"kpr_pod_in{family}"] + [f"kpr_tc_out{family}"] * 2)
    frames = st.one_of(structured_frames(family), structured_frames(family), random_frames(family))
    steps: list[tuple[str, bytes | str]] = []
    for _ in range(draw(st.integers(1, 3))):
        if steps and draw(st.booleans()):
            steps.append((f"kpr_tc_in{family}", REPLY))  # the program is chosen by where the answer comes from
        else:
            steps.append((draw(programs), draw(frames)))
    return steps


def _answer(out: bytes, flags: int) -> bytes | None:
    p = P.parse(out)
    if p.proto == P.TCP and p.tcp_flags >= 0 and P.check(out) == []:
        return P.packet(p.dst, p.src, P.Tcp(p.dport, p.sport, flags=flags, seq=1, ack=(p.seq + 1) & 0xFFFFFFFF))
    if p.proto == P.UDP and p.dport >= 0 and P.check(out) == []:
        return P.packet(p.dst, p.src, P.Udp(p.dport, p.sport))
    if p.proto == P.SCTP and p.dport >= 0 and P.check(out) == []:
        return P.packet(p.dst, p.src, P.Sctp(p.dport, p.sport, chunk=2))
    return None


def _may_translate(tc: TcHarness, program: str, frame: bytes) -> bool:
    """Whether the programs may rewrite this frame: addressed to a frontend, or part of a tracked flow.

    Judged on the header fields whatever the IP version field says: tc.c does not check it (see the table's
    "ipv4-version-5-..." rows; the property test found it)."""
    p = P.parse(frame, any_version=True)
    if not p.family or p.sport < 0:
        return False
    if (p.dst, p.dport, p.proto) in FRONTEND_ADDRESSES:
        return True
    flows = tc.flows()
    keys = [("reply", p.src, p.sport, p.dst, p.dport, p.proto)]
    if "_out" not in program:
        keys.append(("original", p.src, p.sport, p.dst, p.dport, p.proto))
    return any(k in flows for k in keys)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=scenarios(), reply_flags=st.sampled_from([P.SYN | P.ACK, P.ACK, P.FIN | P.ACK, P.RST]))
def test_random_frames_come_out_sound_and_only_flows_of_frontends_are_translated(
    tc: TcHarness, steps: list[tuple[str, bytes | str]], reply_flags: int
) -> None:
    tc.flush_conntrack()
    last: bytes | None = None
    for program, planned in steps:
        if planned == REPLY:
            if last is None or (frame := _answer(last, reply_flags)) is None:
                continue
            # a masqueraded packet's answer comes back in from the network, a DNATed one's leaves a local pod
            masqueraded = P.parse(last).src in (NODE4, NODE6)
            program = f"kpr_tc_in{P.parse(frame).family}" if masqueraded else f"kpr_tc_out{P.parse(frame).family}"
        else:
            assert isinstance(planned, bytes)
            frame = planned
        allowed = _may_translate(tc, program, frame)
        out = tc.run(program, frame)
        assert out.retval in (OK, SHOT, REDIRECT)
        event(f"{program}: verdict {out.retval}, {'rewritten' if out.data != frame else 'as it was'}")
        if not allowed:
            assert (out.retval, out.data.hex()) == (OK, frame.hex()), f"{program} touched {P.parse(frame)}"
        elif out.retval in (OK, REDIRECT) and P.check(frame) == []:
            assert P.check(out.data) == [], f"{program}: {P.parse(frame)} -> {P.parse(out.data)}"
        last = out.data if out.retval != SHOT else None
