"""kpr.datapath.flows against in-memory maps: which tracked flows end, which ids they still hold, and expiry."""

from __future__ import annotations

import socket

import pytest

from kpr.datapath import abi
from kpr.datapath.flows import ct_expired, scan_flows
from kpr.datapath.writers import MemoryMapWriter

pytestmark = pytest.mark.unit

SECOND = 1_000_000_000
NOW = 1_000_000 * SECOND


def flow(
    w: MemoryMapWriter, sport: int, proto: int, backend_id: int, rev_nat_id: int, idle_s: float, flags: int = 0
) -> None:
    key = abi.CtKey4(src=1, dst=2, sport=sport, dport=53, proto=proto, dir=abi.CT_ORIGINAL)
    value = abi.CtValue4(
        last_seen_ns=NOW - int(idle_s * SECOND), backend_id=backend_id, rev_nat_id=rev_nat_id, flags=flags
    )
    w.update("ct4", key, value)


def test_udp_flows_of_ended_backends_and_frontends_are_deleted_and_the_rest_reported() -> None:
    w = MemoryMapWriter()
    udp, tcp = socket.IPPROTO_UDP, socket.IPPROTO_TCP
    flow(w, 1, udp, backend_id=7, rev_nat_id=1, idle_s=1)  # its backend stopped serving: ends
    flow(w, 2, udp, backend_id=8, rev_nat_id=2, idle_s=1)  # its frontend went: ends
    flow(w, 3, tcp, backend_id=7, rev_nat_id=1, idle_s=1)  # TCP on the same id: stays
    flow(w, 4, udp, backend_id=9, rev_nat_id=1, idle_s=61)  # expired: neither deleted nor holding anything
    flow(w, 5, tcp, backend_id=10, rev_nat_id=3, idle_s=5, flags=abi.CT_F_CLOSING)  # closing: 5 s left
    scan = scan_flows(w, end_udp_backends={7}, end_udp_frontends={2}, now_ns=NOW, watch_backends={10})
    assert scan.udp_flows_ended == 2 and len(w.tables["ct4"]) == 3
    assert scan.backends_in_use == {7, 10} and scan.rev_nats_in_use == {1, 3}
    assert scan.flows == 2
    assert scan.next_expiry_ns == NOW + 5 * SECOND  # when the closing flow holding backend 10 may expire


@pytest.mark.parametrize(
    ("proto", "flags", "idle_s", "expired"),
    [
        (socket.IPPROTO_TCP, 0, abi.CT_TCP_LIFETIME_S - 1, False),
        (socket.IPPROTO_TCP, 0, abi.CT_TCP_LIFETIME_S + 1, True),
        (socket.IPPROTO_TCP, abi.CT_F_CLOSING, abi.CT_CLOSING_LIFETIME_S + 1, True),
        (socket.IPPROTO_UDP, 0, abi.CT_UDP_LIFETIME_S - 1, False),
        (socket.IPPROTO_UDP, 0, abi.CT_UDP_LIFETIME_S + 1, True),
        (socket.IPPROTO_UDP, 0, -5, False),  # refreshed by the datapath after `now` was taken
    ],
)
def test_expiry_mirrors_the_datapath(proto: int, flags: int, idle_s: float, expired: bool) -> None:
    value = abi.CtValue4(last_seen_ns=NOW - int(idle_s * SECOND), flags=flags)
    assert ct_expired(value, proto, NOW) == expired
