"""The Lab object: builds nodes, pods and external clients, runs processes in them, and removes all of it at close().

It keeps the lab's state (what exists, which processes run where) under one lock; the pieces it uses are
kpr/lab/layout.py (names and addresses), kpr/lab/plumbing.py (namespaces and veths), kpr/lab/cgroups.py,
kpr/lab/processes.py, kpr/lab/teardown.py (ownership and removal) and kpr/lab/isolation.py (the root namespace check).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from kpr.lab.cgroups import cgroup2_mount, cgroup_kill, cgroup_remove
from kpr.lab.errors import LabError, RunError
from kpr.lab.isolation import host_snapshot, host_violations
from kpr.lab.layout import (
    MAX_EXTERNALS,
    MAX_NODES,
    MAX_PODS_PER_NODE,
    POD_BRIDGE,
    UNDERLAY,
    UNDERLAY_BRIDGE,
    External,
    Node,
    Pod,
    Where,
    check_name,
    external_at,
    host_veth_name,
    lab_prefix,
    node_at,
    pod_at,
    underlay_port,
)
from kpr.lab.plumbing import (
    NODE_SYSCTLS,
    add_netns,
    delete_netns,
    make_underlay,
    unwire_pod,
    wire_external,
    wire_node,
    wire_pod,
)
from kpr.lab.processes import CLIENT_PATH, ECHO_PATH, Tracked, in_netns_and_cgroup, killpg, terminate, wait_ready
from kpr.lab.teardown import RUN_ROOT, claim_prefix, remove_bpffs_dir, remove_remains

_OPEN_LABS: weakref.WeakSet[Lab] = weakref.WeakSet()


def _close_open_labs() -> None:
    for lab in list(_OPEN_LABS):
        with contextlib.suppress(Exception):
            lab.close()


atexit.register(_close_open_labs)


class Lab:
    """A set of lab namespaces, cgroups and processes that close() removes completely.

    Usable as a context manager; setup happens in the constructor, so `lab = Lab(); …; lab.close()` works too.
    """

    def __init__(self, prefix: str | None = None) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, cgroups, bpffs)")
        self.prefix = lab_prefix(prefix)
        self.cgroup_root = cgroup2_mount()
        self.cgroup = self.cgroup_root / self.prefix
        self.run_dir = RUN_ROOT / self.prefix
        self.underlay = f"{self.prefix}-{UNDERLAY}"
        self._lock = threading.RLock()
        self._nodes: dict[str, Node] = {}
        self._pods: dict[str, Pod] = {}
        self._externals: dict[str, External] = {}
        self._pod_counter: dict[str, int] = {}  # node name -> last pod number handed out
        self._pod_numbers: dict[str, int] = {}  # pod name -> its number within its node
        self._link_names: set[str] = {UNDERLAY_BRIDGE}
        self._tracked: list[Tracked] = []
        self._owned = False
        self._closed = False
        self._before = host_snapshot()
        claim_prefix(self.prefix)
        self._owned = True
        try:
            self.cgroup.mkdir(exist_ok=True)
            add_netns(self.underlay, {})
            make_underlay(self.underlay)
        except BaseException:
            self._close_quietly()
            raise
        _OPEN_LABS.add(self)

    # ---- public views

    @property
    def nodes(self) -> Mapping[str, Node]:
        return MappingProxyType(self._nodes)

    @property
    def pods(self) -> Mapping[str, Pod]:
        return MappingProxyType(self._pods)

    @property
    def externals(self) -> Mapping[str, External]:
        return MappingProxyType(self._externals)

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}, nodes={list(self._nodes)}, pods={list(self._pods)})"

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        else:
            self._close_quietly()

    # ---- building

    def add_node(self, name: str) -> Node:
        """A node namespace on the underlay with a pod bridge, forwarding and routes to the other nodes' pods."""
        with self._lock:
            self._check_name(name)
            number = _next_number(self._nodes.values(), MAX_NODES, "nodes")
            node = node_at(self.prefix, self.cgroup, name, number)
            add_netns(node.netns, NODE_SYSCTLS)
            node.cgroup.mkdir(exist_ok=True)
            self._link_names.update({underlay_port(node), POD_BRIDGE})
            wire_node(self.underlay, self.prefix, node, self._nodes.values())
            self._nodes[name] = node
            return node

    def add_pod(
        self,
        node: Node | str,
        name: str,
        *,
        tcp_ports: Sequence[int] = (8080,),
        udp_ports: Sequence[int] = (8080,),
        stream_ports: Sequence[int] = (),
        echo: bool = True,
    ) -> Pod:
        """A pod namespace on the node's cni0 bridge, with an echo server answering as `name` unless echo=False."""
        with self._lock:
            the_node = self._node(node)
            self._check_name(name)
            number = self._next_pod_number(the_node)
            taken = (p.host_veth for p in self._pods.values() if p.node == the_node.name)
            pod = pod_at(self.prefix, the_node, name, number, host_veth_name(name, taken))
            add_netns(pod.netns, {})
            self._pods[name] = pod  # from here on remove_pod() can undo it
            self._pod_numbers[name] = number
            self._link_names.add(pod.host_veth)
            try:
                pod.cgroup.mkdir(exist_ok=True)
                wire_pod(self.prefix, the_node, pod)
                if echo:
                    self.start_echo(pod, tcp_ports=tcp_ports, udp_ports=udp_ports, stream_ports=stream_ports)
            except BaseException:
                with contextlib.suppress(Exception):
                    self.remove_pod(name)
                raise
            return pod

    def add_external(self, name: str = "ext") -> External:
        """A client namespace on the underlay bridge (outside every node), like a machine in the same L2 segment."""
        with self._lock:
            self._check_name(name)
            number = _next_number(self._externals.values(), MAX_EXTERNALS, "externals")
            ext = external_at(self.prefix, self.cgroup, name, number)
            add_netns(ext.netns, {})
            self._externals[name] = ext
            ext.cgroup.mkdir(exist_ok=True)
            self._link_names.add(underlay_port(ext))
            wire_external(self.underlay, ext)
            return ext

    def remove_pod(self, name: str) -> None:
        """Stop the pod's processes and delete its namespace (and so its veth) and its cgroup."""
        with self._lock:
            pod = self._pods.get(name)
            if pod is None:
                raise LabError(f"no pod {name!r} in lab {self.prefix}")
            node = self._nodes[pod.node]
            self._terminate([t for t in self._tracked if t.owner == name])
            cgroup_kill(pod.cgroup)
            unwire_pod(node, pod)
            delete_netns([pod.netns])
            cgroup_remove(pod.cgroup)
            del self._pods[name]
            self._pod_numbers.pop(name, None)

    # ---- processes

    def spawn(self, where: Where, argv: Sequence[str | os.PathLike[str]], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start argv in the namespace and cgroup of a node, pod or external; close() kills it (process group).

        The process gets its own session (so its whole process group can be signalled); stdin defaults to
        /dev/null. Other keyword arguments go to subprocess.Popen.
        """
        return self._spawn(where, argv, internal=False, **popen_kwargs)

    def run(
        self,
        where: Where,
        argv: Sequence[str | os.PathLike[str]],
        timeout: float = 30,
        check: bool = True,
        *,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion in a node, pod or external; text mode, output captured."""
        proc = self.spawn(
            where,
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        args = [os.fspath(arg) for arg in argv]
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            killpg(proc, signal.SIGKILL)
            out, err = proc.communicate()
            raise subprocess.TimeoutExpired(args, timeout, out, err) from None
        finally:
            self._untrack(proc)
        if check and proc.returncode != 0:
            raise RunError(proc.returncode, args, out, err)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def start_echo(
        self,
        where: Where,
        name: str | None = None,
        *,
        tcp_ports: Sequence[int] = (8080,),
        udp_ports: Sequence[int] = (8080,),
        stream_ports: Sequence[int] = (),
        timeout: float = 10.0,
    ) -> subprocess.Popen[Any]:
        """Start kpr.lab.echo in a node, pod or external and return once it listens on every port."""
        owner = self._locate(where)[2]
        name = name or owner
        argv: list[str] = [sys.executable, "-I", "-S", str(ECHO_PATH), "--name", name]
        for port in tcp_ports:
            argv += ["--tcp", str(port)]
        for port in udp_ports:
            argv += ["--udp", str(port)]
        for port in stream_ports:
            argv += ["--stream", str(port)]
        log_path = self.run_dir / f"echo-{owner}-{name}.log"
        with open(log_path, "ab") as log:
            proc = self._spawn(where, argv, internal=True, stdout=subprocess.PIPE, stderr=log)
        wait_ready(proc, f"echo server in {owner}", log_path, timeout)
        return proc

    def client(
        self,
        where: Where,
        proto: str,
        host: str,
        port: int,
        *,
        count: int | None = None,
        duration: float | None = None,
        interval: float | None = None,
        timeout: float | None = None,
        connected: bool = False,
        sequence: bool = False,
    ) -> dict[str, Any]:
        """Run kpr.lab.client in a node, pod or external and return its JSON summary."""
        argv: list[str] = [sys.executable, "-I", "-S", str(CLIENT_PATH), proto, host, str(port)]
        if count is not None:
            argv += ["--count", str(count)]
        if duration is not None:
            argv += ["--duration", str(duration)]
        if interval is not None:
            argv += ["--interval", str(interval)]
        if timeout is not None:
            argv += ["--timeout", str(timeout)]
        if connected:
            argv.append("--connected")
        if sequence:
            argv.append("--sequence")
        per_attempt = (timeout if timeout is not None else 2.0) * 2 + (interval or 0.0)
        budget = duration + per_attempt if duration is not None else (count or 1) * per_attempt
        result: dict[str, Any] = json.loads(self.run(where, argv, timeout=budget + 30).stdout)
        return result

    # ---- isolation

    def assert_host_isolated(self) -> None:
        """Fail if the root namespace gained a route or address for a cluster range, or a lab interface."""
        problems = host_violations(self._before, host_snapshot(), self.prefix, self._link_names)
        if problems:
            raise AssertionError(f"lab {self.prefix} leaked into the root network namespace: " + "; ".join(problems))

    # ---- teardown

    def close(self) -> None:
        """Kill every process, delete every namespace, cgroup, bpffs dir and the runtime dir. Idempotent."""
        with self._lock:
            self._closed = True
            _OPEN_LABS.discard(self)
            if not self._owned:
                return
            errors: list[str] = []
            try:
                self._terminate(list(self._tracked))
            except Exception as exc:
                errors.append(f"processes: {exc}")
            for node in self._nodes.values():  # also those whose name differs from the prefix glob (none today)
                try:
                    remove_bpffs_dir(node.bpffs_dir)
                except Exception as exc:
                    errors.append(f"bpffs: {exc}")
            errors += remove_remains(self.prefix, self.cgroup_root)
            if errors:
                raise LabError(f"lab {self.prefix} could not be removed completely: " + "; ".join(errors))

    # ---- internals

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception as exc:
            warnings.warn(f"lab teardown failed: {exc}", RuntimeWarning, stacklevel=3)

    def _check_name(self, name: str) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")
        check_name(name)
        if name in self._nodes or name in self._pods or name in self._externals:
            raise LabError(f"{name!r} already exists in lab {self.prefix}")

    def _node(self, node: Node | str) -> Node:
        name = node.name if isinstance(node, Node) else node
        try:
            return self._nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.prefix}") from None

    def _next_pod_number(self, node: Node) -> int:
        # Hand out fresh numbers first: a reused address would meet stale neighbour entries in other pods.
        last = self._pod_counter.get(node.name, 0)
        if last < MAX_PODS_PER_NODE:
            self._pod_counter[node.name] = last + 1
            return last + 1
        used = {self._pod_numbers[p.name] for p in self._pods.values() if p.node == node.name}
        for number in range(1, MAX_PODS_PER_NODE + 1):
            if number not in used:
                return number
        raise LabError(f"node {node.name} has no free pod address")

    def _locate(self, where: Where) -> tuple[str, Path, str]:
        """(netns, cgroup, owner name) of a node, pod or external (or its name)."""
        name = where if isinstance(where, str) else where.name
        for table in (self._pods, self._nodes, self._externals):
            thing = table.get(name)
            if thing is not None:
                return thing.netns, thing.cgroup, thing.name
        raise LabError(f"nothing called {name!r} in lab {self.prefix}")

    def _spawn(
        self, where: Where, argv: Sequence[str | os.PathLike[str]], *, internal: bool, **popen_kwargs: Any
    ) -> subprocess.Popen[Any]:
        with self._lock:
            if self._closed:
                raise LabError(f"lab {self.prefix} is closed")
            netns, cgroup, owner = self._locate(where)
            for key in ("start_new_session", "process_group", "preexec_fn"):
                if key in popen_kwargs:
                    raise TypeError(f"Lab.spawn() sets {key} itself")
            popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
            cmd = in_netns_and_cgroup(netns, cgroup, argv)
            proc: subprocess.Popen[Any] = subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)
            self._tracked.append(Tracked(proc, owner, internal))
            return proc

    def _untrack(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            self._tracked = [t for t in self._tracked if t.proc is not proc]

    def _terminate(self, tracked: list[Tracked]) -> None:
        """Stop these processes (see processes.terminate) and forget those that are gone."""
        terminate(tracked)
        done = {id(t.proc) for t in tracked if t.proc.poll() is not None}
        self._tracked = [t for t in self._tracked if id(t.proc) not in done]


def _next_number(things: Iterable[Node | External], limit: int, what: str) -> int:
    """The number for a new node or external: one more than the highest so far, at most `limit`."""
    number = max((thing.number for thing in things), default=0) + 1
    if number > limit:
        raise LabError(f"at most {limit} {what} per lab")
    return number


def assert_host_isolated(lab: Lab) -> None:
    """Module-level spelling of Lab.assert_host_isolated()."""
    lab.assert_host_isolated()
