"""kpr.datapath.flows against in-memory maps: which tracked flows end, which ids they still hold, and expiry."""

from __future__ import annotations

import socket

import pytest

from kpr.datapath import abi
from kpr.datapath.flows import collect_expired, ct_expired, scan_flows
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


def pair(
    w: MemoryMapWriter, sport: int, proto: int, idle_s: float, reply_idle_s: float, snat: bool = False
) -> tuple[abi.CtKey4, abi.CtKey4]:
    """A tracked flow from client 1:sport to frontend 2:80 on backend 7 (10.0.0.7:8080), as tc.c records it."""
    w.update("backends4", abi.U32(7), abi.Backend4(addr=7, port=8080, proto=proto))
    original = abi.CtKey4(src=1, dst=2, sport=sport, dport=80, proto=proto, dir=abi.CT_ORIGINAL)
    value = abi.CtValue4(last_seen_ns=NOW - int(idle_s * SECOND), backend_id=7, rev_nat_id=1)
    if snat:
        value.addr, value.port, value.flags = 3, 61000 + sport, abi.CT_F_SNAT
    reply = abi.CtKey4(
        src=7, sport=8080, dst=3 if snat else 1, dport=61000 + sport if snat else sport, proto=proto, dir=abi.CT_REPLY
    )
    reply_value = abi.CtValue4(last_seen_ns=NOW - int(reply_idle_s * SECOND), backend_id=7, rev_nat_id=1)
    w.update("ct4", original, value)
    w.update("ct4", reply, reply_value)
    return original, reply


def test_expired_flows_are_collected_in_pairs_and_live_ones_left_alone() -> None:
    """ct4/ct6 are plain hashes: nothing evicts, so the agent deletes flows once both of their entries expired."""
    w = MemoryMapWriter()
    udp, tcp = socket.IPPROTO_UDP, socket.IPPROTO_TCP
    gone = pair(w, 1, udp, idle_s=61, reply_idle_s=70)  # both expired: collected
    one_way = pair(w, 2, udp, idle_s=1, reply_idle_s=300)  # a client that sends, a backend that never answers: kept
    masqueraded = pair(w, 3, tcp, idle_s=abi.CT_TCP_LIFETIME_S + 5, reply_idle_s=abi.CT_TCP_LIFETIME_S + 9, snat=True)
    live = pair(w, 4, tcp, idle_s=5, reply_idle_s=5)
    orphan = abi.CtKey4(src=9, sport=9, dst=1, dport=9, proto=udp, dir=abi.CT_REPLY)  # its original is long gone
    w.update("ct4", orphan, abi.CtValue4(last_seen_ns=NOW - 100 * SECOND))
    collected = collect_expired(w, now_ns=NOW)
    assert (collected.deleted, collected.kept) == (5, 4)
    left = {bytes(k) for k, _ in w.items("ct4")}
    assert left == {bytes(k) for k in (*one_way, *live)}
    assert {bytes(k) for k in (*gone, *masqueraded, orphan)}.isdisjoint(left)


def test_a_flow_started_again_on_an_expired_tuple_is_not_collected() -> None:
    """Between reading the table and deleting, the datapath may have put a new flow on the same tuple."""
    w = MemoryMapWriter()
    original, _ = pair(w, 5, socket.IPPROTO_UDP, idle_s=61, reply_idle_s=61)

    class Racing(MemoryMapWriter):
        def lookup(self, map_name: str, key: object) -> object:  # the datapath refreshed it just now
            value = w.lookup(map_name, key)  # type: ignore[arg-type]
            if value is not None and bytes(key) == bytes(original):  # type: ignore[arg-type]
                value.last_seen_ns = NOW
            return value

    racing = Racing()
    racing.tables = w.tables
    assert collect_expired(racing, now_ns=NOW).deleted == 1  # the reply entry only
    assert w.lookup("ct4", original) is not None


def mark_closing(w: MemoryMapWriter, key: abi.CtKey4) -> None:
    """What the datapath does to the entry of the direction a FIN or RST went."""
    value = w.lookup("ct4", key)
    assert value is not None
    value.flags |= abi.CT_F_CLOSING
    w.update("ct4", key, value)


def test_a_connection_closing_in_one_direction_is_collected_whole() -> None:
    """A client's RST marks only its own entry closing (the backend's never sees one): the pair is over once both are
    idle past the closing lifetime, not after the other entry's 6 hours (the soak found ct full of such replies)."""
    w = MemoryMapWriter()
    tcp = socket.IPPROTO_TCP
    reset = pair(w, 1, tcp, idle_s=abi.CT_CLOSING_LIFETIME_S + 1, reply_idle_s=abi.CT_CLOSING_LIFETIME_S + 2, snat=True)
    mark_closing(w, reset[0])
    still_talking = pair(w, 2, tcp, idle_s=abi.CT_CLOSING_LIFETIME_S + 1, reply_idle_s=1)  # half closed, replies flow
    mark_closing(w, still_talking[0])
    assert collect_expired(w, now_ns=NOW).deleted == 2
    left = {bytes(k) for k, _ in w.items("ct4")}
    assert left == {bytes(k) for k in still_talking}


def test_a_reply_entry_no_original_names_goes_once_idle_past_the_closing_lifetime() -> None:
    """A new flow on the same client tuple replaced its original: the old reply translates nothing any more."""
    w = MemoryMapWriter()
    tcp = socket.IPPROTO_TCP
    stale = abi.CtKey4(src=7, sport=8080, dst=3, dport=61005, proto=tcp, dir=abi.CT_REPLY)
    fresh = abi.CtKey4(
        src=7, sport=8080, dst=3, dport=61006, proto=tcp, dir=abi.CT_REPLY
    )  # written before its original
    w.update(
        "ct4", stale, abi.CtValue4(last_seen_ns=NOW - (abi.CT_CLOSING_LIFETIME_S + 1) * SECOND, flags=abi.CT_F_SNAT)
    )
    w.update("ct4", fresh, abi.CtValue4(last_seen_ns=NOW - SECOND, flags=abi.CT_F_SNAT))
    assert collect_expired(w, now_ns=NOW).deleted == 1
    assert w.lookup("ct4", stale) is None and w.lookup("ct4", fresh) is not None


def test_a_reply_whose_original_exists_keeps_its_lifetime_even_if_the_backend_is_unknown() -> None:
    """Pairing needs the original's backend; without it the reply is not taken for an orphan: an idle live connection
    keeps its return path for the TCP lifetime."""
    w = MemoryMapWriter()
    original, reply = pair(w, 3, socket.IPPROTO_TCP, idle_s=60, reply_idle_s=60, snat=True)
    w.delete("backends4", abi.U32(7))
    assert collect_expired(w, now_ns=NOW).deleted == 0
    assert w.lookup("ct4", original) is not None and w.lookup("ct4", reply) is not None
