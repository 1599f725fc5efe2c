"""kpr.datapath.sockets against the real kernel: sock_diag finds connected UDP sockets in other network namespaces
and SOCK_DESTROY ends exactly the ones kpr's sock_rev_nat entries name, connected to the ended backend."""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from kpr.datapath import abi, netns, sockets
from kpr.datapath.writers import MemoryMapWriter
from kpr.lab import Lab, Pod

pytestmark = pytest.mark.datapath

SO_COOKIE = 57
BACKEND4, BACKEND6 = ("10.244.9.9", 53), ("fd00:244:9::9", 53)
T = TypeVar("T")


def in_netns(pod: Pod, make: Callable[[], T]) -> T:
    """make() in the pod's network namespace (sockets stay in the namespace they are made in)."""
    return netns.run_in(f"/run/netns/{pod.netns}", make)


def connected(family: int, peer: tuple[str, int], v6only: bool = True) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.connect(peer)
    sock.setblocking(False)
    return sock


def cookie(sock: socket.socket) -> int:
    return int(struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0])


def record(w: MemoryMapWriter, sock: socket.socket, backend: tuple[str, int], rev_nat_id: int = 1) -> None:
    """What kpr's connect hook writes: {cookie, backend} -> the frontend."""
    if ":" in backend[0]:
        key6 = abi.SockRevNatKey6(
            cookie=cookie(sock), addr=abi.be32x4_of_ipv6(backend[0]), port=abi.be16_of_port(backend[1])
        )
        w.update("sock_rev_nat6", key6, abi.SockRevNat6(rev_nat_id=rev_nat_id))
    else:
        key4 = abi.SockRevNatKey4(
            cookie=cookie(sock), addr=abi.be32_of_ipv4(backend[0]), port=abi.be16_of_port(backend[1])
        )
        w.update("sock_rev_nat4", key4, abi.SockRevNat4(rev_nat_id=rev_nat_id))


def destroyed(sock: socket.socket) -> bool:
    """ECONNABORTED pending (what udp_abort() leaves for the application); reading SO_ERROR clears it."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 103


@pytest.fixture
def pods() -> Iterator[tuple[Pod, Pod]]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        yield lab.add_pod(node, "one", echo=False), lab.add_pod(node, "two", echo=False)
        lab.assert_host_isolated()
    finally:
        lab.close()


def test_only_translated_sockets_still_connected_to_the_ended_backend_are_destroyed(pods: tuple[Pod, Pod]) -> None:
    one, two = pods
    w = MemoryMapWriter()
    made: dict[str, socket.socket] = {}
    try:
        made["v4"] = in_netns(one, lambda: connected(socket.AF_INET, BACKEND4))
        made["v6"] = in_netns(two, lambda: connected(socket.AF_INET6, BACKEND6))
        made["mapped"] = in_netns(two, lambda: connected(socket.AF_INET6, (f"::ffff:{BACKEND4[0]}", 53), False))
        made["untranslated"] = in_netns(one, lambda: connected(socket.AF_INET, BACKEND4))  # dialled the pod IP itself
        made["elsewhere"] = in_netns(one, lambda: connected(socket.AF_INET, ("10.244.9.8", 53)))  # moved on since
        made["other port"] = in_netns(one, lambda: connected(socket.AF_INET, (BACKEND4[0], 54)))
        for name in ("v4", "mapped", "elsewhere", "other port"):
            record(w, made[name], BACKEND4)
        record(w, made["v6"], BACKEND6)

        wanted = sockets.targets(w, [(*BACKEND4, "UDP"), (*BACKEND6, "UDP"), ("10.244.9.9", 80, "TCP")], [])
        candidates = ("v4", "mapped", "elsewhere", "other port", "v6")  # what sock_rev_nat says; not all still hold
        assert {t.cookie for t in wanted.values()} == {cookie(made[n]) for n in candidates}
        namespaces = [f"/run/netns/{one.netns}", f"/run/netns/{two.netns}"]
        result = sockets.destroy_connected_udp(wanted, namespaces)
        assert result.errors == [] and result.destroyed == 3 and result.namespaces == 2
        with pytest.raises(OSError) as exc:
            made["v4"].recv(10)
        assert exc.value.errno == 103  # the application learns it at once: ECONNABORTED
        assert {name for name, sock in made.items() if name != "v4" and destroyed(sock)} == {"v6", "mapped"}
    finally:
        for sock in made.values():
            sock.close()


def test_sockets_of_an_ended_frontend_are_destroyed_whatever_their_backend(pods: tuple[Pod, Pod]) -> None:
    one, _ = pods
    w = MemoryMapWriter()
    sock = in_netns(one, lambda: connected(socket.AF_INET, BACKEND4))
    keep = in_netns(one, lambda: connected(socket.AF_INET, BACKEND4))
    try:
        record(w, sock, BACKEND4, rev_nat_id=5)
        record(w, keep, BACKEND4, rev_nat_id=6)
        wanted = sockets.targets(w, [], [5])
        result = sockets.destroy_connected_udp(wanted, [f"/run/netns/{one.netns}"])
        assert result.destroyed == 1 and destroyed(sock) and not destroyed(keep)
    finally:
        sock.close()
        keep.close()


def test_nothing_to_do_costs_no_namespace_visit() -> None:
    w = MemoryMapWriter()
    assert sockets.targets(w, [("10.244.9.9", 53, "UDP")], []) == {}
    assert sockets.destroy_connected_udp({}, ["/nonexistent"]).namespaces == 0
