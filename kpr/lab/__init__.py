"""The lab: nodes, pods and external clients made of network namespaces, cgroups and bpffs directories.

Used by `make demo`, the datapath and end-to-end tests and the benchmarks. See kpr/lab/topology.py for the layout;
kpr/lab/echo.py and kpr/lab/client.py are the stdlib-only server and client that run inside it.
"""

from __future__ import annotations

from kpr.lab.topology import (
    CLIENT_PATH,
    ECHO_PATH,
    External,
    HostSnapshot,
    Lab,
    LabError,
    Node,
    Pod,
    RunError,
    Where,
    assert_host_isolated,
    cgroup2_mount,
    host_snapshot,
    host_violations,
    sweep_stale,
)

__all__ = [
    "CLIENT_PATH",
    "ECHO_PATH",
    "External",
    "HostSnapshot",
    "Lab",
    "LabError",
    "Node",
    "Pod",
    "RunError",
    "Where",
    "assert_host_isolated",
    "cgroup2_mount",
    "host_snapshot",
    "host_violations",
    "sweep_stale",
]
