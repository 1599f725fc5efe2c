"""kpr's real tc programs, loaded but attached nowhere, run on crafted frames with BPF_PROG_TEST_RUN.

The harness (Katran's BpfTester, Cilium's PKTGEN tests) compiles bpf/tc.c from the working tree exactly as the agent
does (kpr.datapath.loader.TcLB.load: the same cflags, pinned maps, pod-program pins and tc_tails), writes frontends
and backends with the real Reconciler through a PinnedMapWriter, and fills the `devices` map entry the programs find
by skb->ifindex. Programs run from a thread inside a two-node lab's node1 namespace: BPF_PROG_TEST_RUN builds its skb
in the caller's namespace, so the context's ifindex names node1's eth0 (the kernel insists on a device of that
namespace) and bpf_fib_lookup sees node1's routes (node2's pod CIDRs via node2) when a masqueraded flow is redirected.
Nothing is attached to eth0 or any other device and nothing is transmitted; the lab (namespaces, the bpffs directory
the maps are pinned in) is removed when the harness closes, whatever happened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kpr.datapath import abi, bpfsys, codec, netns
from kpr.datapath.inspect import read_counters
from kpr.datapath.loader import DatapathSettings, TcLB, _device_info, unpin_all, write_config
from kpr.datapath.testrun import ProgRun, prog_test_run, skb_context
from kpr.datapath.writers import PinnedMapWriter
from kpr.lab import Lab, Node
from kpr.model.types import Frontend, ServiceKey
from kpr.reconcile.reconciler import Reconciler

INGRESS_PROGRAMS = ("kpr_tc_in4", "kpr_tc_in6", "kpr_pod_in4", "kpr_pod_in6")
EGRESS_PROGRAMS = ("kpr_tc_out4", "kpr_tc_out6")
PROGRAMS = INGRESS_PROGRAMS + EGRESS_PROGRAMS


FlowKey = tuple[str, str, int, str, int, int]  # (original | reply, src, sport, dst, dport, IP protocol)


@dataclass(frozen=True)
class Flow:
    backend: tuple[str, int] | None  # None: its backend entry is gone
    rev_nat_id: int
    nat: tuple[str, int] | None  # masqueraded: ORIGINAL holds the node address:port used, REPLY the client
    closing: bool


@dataclass
class TcHarness:
    lab: Lab
    node: Node  # node1: the node the programs run on
    peer: Node  # node2: its pod CIDRs are routed via node2, so remote backends live there
    bpffs_dir: Path
    programs: dict[str, int]  # program name -> fd
    ifindex: int  # node1's eth0, in node1's namespace
    device: abi.DeviceInfo  # what the devices map holds for it
    reconciler: Reconciler
    writer: PinnedMapWriter
    pool: ThreadPoolExecutor  # one thread living in node1's namespace

    def run(self, program: str, frame: bytes, *, ctx: bytes | None = None, flags: int = 0) -> ProgRun:
        """Run one of tc.c's programs on `frame` as if it arrived on (ingress) or left by (egress) node1's eth0."""
        if ctx is None:
            ingress = program in INGRESS_PROGRAMS
            ctx = skb_context(ifindex=self.ifindex, ingress_ifindex=self.ifindex if ingress else 0)
        fd = self.programs[program]
        return self.pool.submit(prog_test_run, fd, frame, ctx=ctx, flags=flags).result()

    def configure(self, settings: DatapathSettings) -> None:
        """Write the config map as the agent's flags would (--external-cluster-ip, --cluster-cidr, ...)."""
        write_config(self.bpffs_dir, settings)

    def sync(self, frontends: Sequence[Frontend]) -> None:
        """Program the frontends, one service at a time, with the agent's reconciler."""
        by_service: dict[ServiceKey, list[Frontend]] = {}
        for f in frontends:
            by_service.setdefault(f.service, []).append(f)
        for service, fes in by_service.items():
            result = self.reconciler.sync_service(service, fes)
            assert not result.conflicts, result.conflicts

    def counters(self) -> dict[str, int]:
        return read_counters(self.bpffs_dir)

    def conntrack(self, family: int) -> list[tuple[Any, Any]]:
        return self.writer.items(f"ct{family}")

    def flows(self) -> dict[FlowKey, Flow]:
        """ct4 and ct6, decoded: (direction, src, sport, dst, dport, proto) -> the flow's backend, NAT and flags."""
        backends = {}
        for fam in (4, 6):
            for k, v in self.writer.items(f"backends{fam}"):
                b = codec.decode_backend(v)
                backends[int(k.value)] = (b.addr, b.port)
        out = {}
        for fam in (4, 6):
            for key, value in self.conntrack(fam):
                direction = "reply" if key.dir == abi.CT_REPLY else "original"
                src, dst = codec.addr_of(key.src), codec.addr_of(key.dst)
                flow_key = (direction, src, abi.port_of_be16(key.sport), dst, abi.port_of_be16(key.dport), key.proto)
                nat = (codec.addr_of(value.addr), abi.port_of_be16(value.port))
                out[flow_key] = Flow(
                    backend=backends.get(value.backend_id),
                    rev_nat_id=value.rev_nat_id,
                    nat=nat if value.flags & abi.CT_F_SNAT else None,
                    closing=bool(value.flags & abi.CT_F_CLOSING),
                )
        return out

    def flush_conntrack(self) -> None:
        for name in ("ct4", "ct6", "affinity"):
            for key, _ in self.writer.items(name):
                self.writer.delete(name, key)


def _eth0() -> tuple[int, abi.DeviceInfo]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = int(ipr.link_lookup(ifname="eth0")[0])
        return index, _device_info(ipr, index)


@contextlib.contextmanager
def tc_harness() -> Iterator[TcHarness]:
    """A TcHarness; on exit (even after a failure) the programs are released and the lab, maps included, removed."""
    lab = Lab()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lab.close)
        node, peer = lab.add_node("node1"), lab.add_node("node2")
        bpffs_dir = node.bpffs_dir  # /sys/fs/bpf/<lab prefix>-node1, removed by lab.close() too
        bpffs_dir.mkdir(mode=0o700)
        cleanup.callback(unpin_all, bpffs_dir)
        bpf, fns = TcLB(bpffs_dir).load()
        cleanup.callback(bpf.cleanup)
        pool = netns.executor(f"/run/netns/{node.netns}", name="kpr-tc-fixture")
        cleanup.callback(pool.shutdown)
        ifindex, device = pool.submit(_eth0).result()
        with bpfsys.Map(str(abi.map_pin(bpffs_dir, "devices")), abi.U32, abi.DeviceInfo) as devices:
            devices.update(abi.U32(ifindex), device)
        writer = PinnedMapWriter(bpffs_dir)
        cleanup.callback(writer.close)
        yield TcHarness(
            lab=lab,
            node=node,
            peer=peer,
            bpffs_dir=bpffs_dir,
            programs={name: fns[name].fd for name in PROGRAMS},
            ifindex=ifindex,
            device=device,
            reconciler=Reconciler(writer),
            writer=writer,
            pool=pool,
        )
    lab.assert_host_isolated()
