"""The lab: nodes, pods and external clients made of network namespaces, cgroups and bpffs directories.

Used by `make demo`, the datapath and end-to-end tests and the benchmarks. See kpr/lab/layout.py for the layout and
kpr/lab/lab.py for the Lab object; kpr/lab/echo.py and kpr/lab/client.py are the stdlib-only server and client that run
inside it.
"""

from __future__ import annotations

from kpr.lab.cgroups import cgroup2_mount
from kpr.lab.errors import LabError, RunError
from kpr.lab.isolation import HostSnapshot, host_snapshot, host_violations
from kpr.lab.lab import Lab, assert_host_isolated
from kpr.lab.layout import External, Node, Pod, Where
from kpr.lab.processes import CLIENT_PATH, ECHO_PATH
from kpr.lab.teardown import sweep_stale

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
