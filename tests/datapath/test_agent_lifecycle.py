"""The agent's life cycle on a lab node: restarts never interrupt traffic, cleanup leaves nothing behind."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.datapath import abi, bpfsys
from kpr.datapath.inspect import read_backends, read_services
from kpr.datapath.loader import attached_programs, detach_all, unpin_all
from kpr.lab import Lab
from kpr.lab.cluster import (
    LabAgent,
    endpoint_slice,
    finish_client_loop,
    pod_endpoints,
    remove_manifest,
    service,
    start_client_loop,
    wait_until,
    write_manifest,
)

pytestmark = pytest.mark.datapath

VIP = "10.96.2.10"
FRONTEND = f"{VIP}:80/TCP"


def under_client_loop(lab: Lab, seconds: float, action: Callable[[], None], warmup: float = 1.0) -> dict[str, Any]:
    """A client pod connecting to the VIP every few ms while `action` runs (after `warmup` s): its result."""
    client = start_client_loop(lab, lab.pods["client"], VIP, 80, seconds=seconds)
    try:
        time.sleep(warmup)
        action()
        return finish_client_loop(client, timeout=60)
    finally:
        if client.poll() is None:
            client.kill()


@pytest.fixture
def node_with_agent(tmp_path: Path) -> Iterator[tuple[Lab, LabAgent]]:
    lab = Lab()
    try:
        node = lab.add_node("node1")
        pods = [lab.add_pod(node, n) for n in ("pod-a", "pod-b", "pod-c")]
        lab.add_pod(node, "client", echo=False)
        write_manifest(
            tmp_path,
            "web.yaml",
            [
                service("web", [VIP], [("http", 80, 8080, "TCP")]),
                endpoint_slice("web", pod_endpoints(pods), [("http", 8080, "TCP")]),
            ],
        )
        agent = LabAgent(lab, node, tmp_path).start()
        agent.wait_started()
        wait_until(lambda: any(r.frontend == FRONTEND for r in read_services(node.bpffs_dir)), 15, "web")
        yield lab, agent
        lab.assert_host_isolated()
    finally:
        lab.close()


def test_sigkill_and_restart_while_a_client_connects_in_a_loop_loses_no_connect(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    lab, agent = node_with_agent
    maps_before = [r.as_dict() for r in read_services(agent.node.bpffs_dir)]

    def restart_twice() -> None:
        for _ in range(2):
            agent.stop(signal.SIGKILL)
            agent.start()  # recompiles, replaces the attached programs in place, adopts the pinned maps
            agent.wait_started()

    result = under_client_loop(lab, 12, restart_twice)
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] == result["attempts"] > 500
    assert set(result["served"]) == {"pod-a", "pod-b", "pod-c"}
    # The restarted agent adopted the maps as they were: same ids, same slots, nothing rewritten.
    assert [r.as_dict() for r in read_services(agent.node.bpffs_dir)] == maps_before
    assert '"service programmed"' not in agent.log(this_run=True)


def test_sigterm_leaves_programs_and_maps_so_traffic_keeps_flowing(node_with_agent: tuple[Lab, LabAgent]) -> None:
    lab, agent = node_with_agent
    assert agent.stop(signal.SIGTERM) == 0
    assert '"stopped; programs stay attached' in agent.log()
    result = lab.client(lab.pods["client"], "tcp", VIP, 80, count=60)
    assert result["ok"] == 60 and len(result["served"]) == 3


def test_cleanup_detaches_every_program_and_unpins_every_map_twice_over(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    lab, agent = node_with_agent
    node = agent.node
    assert {p.name for p in attached_programs(node.cgroup)} >= {"kpr_connect4", "kpr_peername6"}
    agent.stop(signal.SIGTERM)
    args = ("cleanup", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir))
    first = agent.kpr(*args)
    assert "detached 8 program(s)" in first.stdout
    assert f"unpinned {len(abi.MAPS)} map(s) and 8 program(s)" in first.stdout  # the socket programs' pins
    assert attached_programs(node.cgroup) == []
    assert not node.bpffs_dir.exists()
    second = agent.kpr(*args)  # idempotent
    assert "detached 0 program(s)" in second.stdout and "unpinned 0 map(s)" in second.stdout
    # With kpr gone, the ClusterIP is just an unrouted address again.
    result = lab.client(lab.pods["client"], "tcp", VIP, 80, count=2, timeout=0.5)
    assert result["ok"] == 0 and "ECONNREFUSED" not in result["errors"]


def test_a_second_agent_on_the_same_bpffs_directory_is_refused(node_with_agent: tuple[Lab, LabAgent]) -> None:
    """Two agents on one directory used to both run and "repair" each other's writes at every drift check."""
    lab, agent = node_with_agent
    second = LabAgent(lab, agent.node, Path(agent.source_args[1])).start()
    assert second.proc.wait(timeout=60) == 1
    assert f"another kpr agent (pid {agent.proc.pid}) owns {agent.node.bpffs_dir}" in second.log(this_run=True)
    assert agent.proc.poll() is None  # the first one serves on
    assert lab.client(lab.pods["client"], "tcp", VIP, 80, count=20)["ok"] == 20


def test_cleanup_refuses_while_an_agent_runs_and_the_agent_never_outlives_its_maps(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """`kpr cleanup` under a running agent used to leave it writing into unpinned maps, reporting healthy beside
    "0/8 hooks attached" while ClusterIPs failed. Now cleanup refuses; with --force the agent notices within a
    second or two, says why and exits 1 (a DaemonSet restarts it into a fresh, consistent state)."""
    _, agent = node_with_agent
    node = agent.node
    args = ("cleanup", "--cgroup-root", str(node.cgroup), "--bpffs-dir", str(node.bpffs_dir))
    refused = agent.kpr(*args, check=False)
    assert refused.returncode == 1 and f"a kpr agent (pid {agent.proc.pid}) is running" in refused.stderr
    assert attached_programs(node.cgroup) and node.bpffs_dir.exists()

    forced = agent.kpr(*args, "--force")
    assert "detached 8 program(s)" in forced.stdout
    assert agent.proc.wait(timeout=10) == 1
    assert "maps unpinned from" in agent.log(this_run=True)


def test_programs_detached_behind_the_agents_back_are_attached_again(node_with_agent: tuple[Lab, LabAgent]) -> None:
    lab, agent = node_with_agent
    detach_all(agent.node.cgroup)  # another tool, or a half-run cleanup
    wait_until(lambda: len(attached_programs(agent.node.cgroup)) == 8, 5, "the programs attached again")
    assert "programs were detached behind the agent's back" in agent.log(this_run=True)
    assert lab.client(lab.pods["client"], "tcp", VIP, 80, count=20)["ok"] == 20


def test_a_restart_with_the_pins_gone_attaches_nothing_before_the_maps_are_full(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """The bpffs directory removed and the agent restarted: the new programs used to be attached to empty maps
    before the first sync (5 failed connects). The old programs keep serving from the old maps (they hold them)
    until the new ones replace them, attached only after the new maps hold the first full sync."""
    lab, agent = node_with_agent

    def restart_without_pins() -> None:
        agent.stop(signal.SIGKILL)
        unpin_all(agent.node.bpffs_dir)  # what an operator wiping /sys/fs/bpf/kpr does; the programs stay attached
        agent.start()
        agent.wait_started()

    result = under_client_loop(lab, 8, restart_without_pins)
    assert result["errors"] == {}, result["errors"]
    assert result["ok"] == result["attempts"] > 300
    log = agent.log(this_run=True)
    assert log.index('"first full sync done"') < log.index('"programs attached"')


def _max_entries(node_bpffs: Path, name: str) -> int:
    fd = bpfsys.obj_get(str(abi.map_pin(node_bpffs, name)))
    try:
        return bpfsys.map_info(fd).max_entries
    finally:
        os.close(fd)


def test_a_restart_with_another_map_size_migrates_the_maps_without_a_failed_connect(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """Reliability finding 8: a restart with a different --map-size used to keep the pinned maps' old sizes silently
    (BCC adopts a pin whatever its size), so maps could never grow. Now they are migrated: moved aside, created anew,
    entries copied, old pins removed once the new programs are attached."""
    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    maps_before = [r.as_dict() for r in read_services(node.bpffs_dir)]
    grown = LabAgent(lab, node, manifests, extra_args=["--map-size", "backends=100000"])

    def restart_grown() -> None:
        agent.stop(signal.SIGTERM)
        grown.start().wait_started()

    result = under_client_loop(lab, 8, restart_grown)
    assert result["errors"] == {}, result["errors"]
    assert _max_entries(node.bpffs_dir, "backends4") == 100000
    assert _max_entries(node.bpffs_dir, "affinity_match") == 100000  # sized by KPR_BACKENDS_MAX too
    log = grown.log(this_run=True)
    assert '"pinned maps of another shape replaced"' in log and '"service programmed"' not in log  # adopted as is
    assert [r.as_dict() for r in read_services(node.bpffs_dir)] == maps_before
    assert not list(node.bpffs_dir.glob("old_*"))

    grown.stop(signal.SIGTERM)
    shrunk = LabAgent(lab, node, manifests, extra_args=["--map-size", "backends=2"]).start()
    assert shrunk.proc is not None and shrunk.proc.wait(timeout=60) == 1
    assert "map backends4 holds 3 entries; a size of 2 cannot hold them" in shrunk.log(this_run=True)
    assert lab.client(lab.pods["client"], "tcp", VIP, 80, count=20)["ok"] == 20  # the programs serve on meanwhile
    assert _max_entries(node.bpffs_dir, "backends4") == 100000 and not list(node.bpffs_dir.glob("old_*"))


OLD_CT = """
struct old_ct_key { u32 words[4]; };
struct old_ct_value { u64 words[3]; };  /* the ct value before fe_addr/fe_port were added */
BPF_TABLE_PINNED("lru_hash", struct old_ct_key, struct old_ct_value, ct4, 128, "%s/ct4");
int kpr_old_probe(void *ctx) { return 0; }
"""


def test_an_upgrade_that_changed_a_map_layout_rebuilds_the_maps_naming_each_other(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """A kpr whose header changed a struct must not run against maps of the old layout (BCC would adopt them). The
    conntrack value grew this way once: ct4 cannot be copied, so every map naming backend and frontend ids is rebuilt
    from the sources (the old programs serve from the old maps until the new ones are attached over complete maps)."""
    from bcc import BPF

    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    agent.stop(signal.SIGTERM)
    abi.map_pin(node.bpffs_dir, "ct4").unlink()
    BPF(text=OLD_CT % node.bpffs_dir).cleanup()  # an old kpr's ct4, pinned in its place
    upgraded = LabAgent(lab, node, manifests)
    result = under_client_loop(lab, 6, lambda: upgraded.start().wait_started(), warmup=0.5)
    assert result["errors"] == {}, result["errors"]
    log = upgraded.log(this_run=True)
    assert '"pinned maps of another shape replaced"' in log
    adopted = next(json.loads(line) for line in log.splitlines() if '"maps adopted"' in line)
    assert adopted["frontends"] == 0  # nothing adopted: rebuilt from the manifests
    assert not list(node.bpffs_dir.glob("old_*"))
    fd = bpfsys.obj_get(str(abi.map_pin(node.bpffs_dir, "ct4")))
    try:
        assert bpfsys.map_info(fd).value_size == ctypes.sizeof(abi.CtValue4)
    finally:
        os.close(fd)
    assert set(lab.client(lab.pods["client"], "tcp", VIP, 80, count=30)["served"]) == {"pod-a", "pod-b", "pod-c"}


def _rename_map_pins(bpffs_dir: Path, names: list[str], to: Callable[[abi.MapSpec], str]) -> None:
    for name in names:
        abi.map_pin(bpffs_dir, name).rename(bpffs_dir / to(abi.MAPS[name]))


def test_maps_pinned_before_pins_carried_a_layout_version_are_adopted(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """An agent from before versioned pins pinned "services4", not "services4_v1"; its layouts are version 1, so the
    upgrade adopts those maps as they are (renamed), flows and all, instead of rebuilding them."""
    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    maps_before = [r.as_dict() for r in read_services(node.bpffs_dir)]
    agent.stop(signal.SIGTERM)
    pinned = [name for name in abi.MAPS if abi.map_pin(node.bpffs_dir, name).exists()]
    _rename_map_pins(node.bpffs_dir, pinned, lambda spec: spec.name)
    upgraded = LabAgent(lab, node, manifests)
    result = under_client_loop(lab, 6, lambda: upgraded.start().wait_started(), warmup=0.5)
    assert result["errors"] == {}, result["errors"]
    log = upgraded.log(this_run=True)
    assert '"pinned maps of another shape replaced"' not in log
    adopted = next(json.loads(line) for line in log.splitlines() if '"maps adopted"' in line)
    assert adopted["frontends"] == len(maps_before) > 0
    assert all(abi.map_pin(node.bpffs_dir, name).exists() for name in pinned)
    assert not [p.name for p in node.bpffs_dir.iterdir() if p.name in abi.MAPS or p.name.startswith("old_")]
    assert [r.as_dict() for r in read_services(node.bpffs_dir)] == maps_before


def test_maps_of_another_layout_version_are_never_adopted_even_at_the_same_size(
    node_with_agent: tuple[Lab, LabAgent],
) -> None:
    """A layout change can keep a struct's size (fields reordered, a flag's meaning changed): the version in the pin
    name is what tells. Maps pinned under another version (here: a kpr with layout 7 of conntrack and backends, the
    same sizes as ours) are moved aside and never copied, and the maps naming their ids are rebuilt from the sources."""
    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    agent.stop(signal.SIGTERM)
    _rename_map_pins(node.bpffs_dir, ["ct4", "backends4"], lambda spec: f"{spec.name}_v7")
    other = LabAgent(lab, node, manifests)
    result = under_client_loop(lab, 6, lambda: other.start().wait_started(), warmup=0.5)
    assert result["errors"] == {}, result["errors"]
    log = other.log(this_run=True)
    assert '"pinned maps of another shape replaced"' in log and "ct4_v7" in log
    adopted = next(json.loads(line) for line in log.splitlines() if '"maps adopted"' in line)
    assert adopted["frontends"] == 0  # nothing adopted: rebuilt from the manifests
    assert not list(node.bpffs_dir.glob("old_*")) and not list(node.bpffs_dir.glob("*_v7"))
    assert set(lab.client(lab.pods["client"], "tcp", VIP, 80, count=30)["served"]) == {"pod-a", "pod-b", "pod-c"}


FRESH_MAPS = '#include "kpr.h"\nint kpr_fresh_probe(struct bpf_sock_addr *ctx) { return 1; }\n'


def _map_id(pin: Path) -> int:
    fd = bpfsys.obj_get(str(pin))
    try:
        return bpfsys.map_info(fd).id
    finally:
        os.close(fd)


@pytest.mark.parametrize("newer", ["bare", "versioned"])
def test_of_a_bare_and_a_versioned_pin_of_the_same_map_the_newer_is_adopted(
    node_with_agent: tuple[Lab, LabAgent], newer: str
) -> None:
    """Upgrade, roll back, upgrade again: the rolled-back kpr pinned "ct4" beside the first upgrade's "ct4_v1". The
    newer of the two (map ids only grow) holds the live flows and is adopted; the other is moved aside, never copied,
    and removed; cleanup would find both (kpr_map_pins)."""
    from bcc import BPF

    from kpr.datapath.migrate import kpr_map_pins

    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    agent.stop(signal.SIGTERM)
    bpffs = node.bpffs_dir
    scratch = bpffs.with_name(bpffs.name + "-fresh")
    scratch.mkdir()
    try:
        BPF(text=FRESH_MAPS, cflags=[f'-DKPR_PIN_DIR="{scratch}"', f"-I{abi.BPF_DIR}"]).cleanup()  # newer map ids
        if newer == "bare":
            (scratch / abi.MAPS["ct4"].pin).rename(bpffs / "ct4")
        else:
            abi.map_pin(bpffs, "ct4").rename(bpffs / "ct4")
            (scratch / abi.MAPS["ct4"].pin).rename(abi.map_pin(bpffs, "ct4"))
        assert {bpffs / "ct4", abi.map_pin(bpffs, "ct4")} <= set(kpr_map_pins(bpffs))
        newest = max(_map_id(bpffs / "ct4"), _map_id(abi.map_pin(bpffs, "ct4")))
    finally:
        unpin_all(scratch)
    upgraded = LabAgent(lab, node, manifests)
    result = under_client_loop(lab, 6, lambda: upgraded.start().wait_started(), warmup=0.5)
    assert result["errors"] == {}, result["errors"]
    assert _map_id(abi.map_pin(bpffs, "ct4")) == newest
    assert not (bpffs / "ct4").exists() and not list(bpffs.glob("old_*"))
    adopted = next(json.loads(line) for line in upgraded.log(this_run=True).splitlines() if '"maps adopted"' in line)
    assert adopted["frontends"] > 0  # ct4 holds flows only: the service maps were adopted as they were


def test_a_migration_never_brings_back_what_the_first_sync_removed(node_with_agent: tuple[Lab, LabAgent]) -> None:
    """Maps migrated for another --map-size are copied before the first sync and, for the maps the programs write,
    once more after attaching. The agent's own maps must not be copied again: the first sync has since removed what
    the sources no longer hold (here a Service deleted while the agent was down), and a second copy brought it back."""
    lab, agent = node_with_agent
    node, manifests = agent.node, Path(agent.source_args[1])
    agent.stop(signal.SIGTERM)
    remove_manifest(manifests, "web.yaml")
    grown = LabAgent(lab, node, manifests, extra_args=["--map-size", "backends=100000"]).start()
    grown.wait_started()
    assert _max_entries(node.bpffs_dir, "backends4") == 100000  # backends4/6 and affinity_match were migrated
    assert read_services(node.bpffs_dir) == []
    wait_until(lambda: not read_backends(node.bpffs_dir), 10, "the deleted Service's backends to be released")
    time.sleep(2.0)  # the agent has attached and finished the migration: nothing comes back
    assert read_backends(node.bpffs_dir) == []
