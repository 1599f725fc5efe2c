"""CLI rendering and `kpr explain` from golden in-memory maps, and every command's help. No root needed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from kpr.cli.explain import BadTarget, explain, explanation_text, parse_destination
from kpr.cli.main import main
from kpr.cli.render import backends_table, services_table, status_text
from kpr.datapath.inspect import filter_services, services_from
from kpr.datapath.writers import MemoryMapWriter
from kpr.model.types import Backend, Frontend, FrontendKind, ServiceKey
from kpr.reconcile.reconciler import Reconciler

pytestmark = pytest.mark.unit

WEB, LOCAL, EMPTY = ServiceKey("default", "web"), ServiceKey("shop", "local"), ServiceKey("default", "empty")


def b(last: int, port: int = 8080, local: bool = True, terminating: bool = False) -> Backend:
    return Backend(f"10.244.1.{last}", port, "TCP", node_local=local, terminating=terminating)


@pytest.fixture
def maps() -> MemoryMapWriter:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    rec.sync_service(
        WEB,
        [
            Frontend(
                WEB,
                "http",
                FrontendKind.CLUSTER_IP,
                "10.96.0.10",
                80,
                "TCP",
                (b(11), b(12, terminating=True)),
                affinity_timeout=600,
            ),
            Frontend(
                WEB,
                "http",
                FrontendKind.CLUSTER_IP,
                "fd00:96::10",
                80,
                "TCP",
                (Backend("fd00:244:1::11", 8080, "TCP", node_local=True),),
            ),
        ],
    )
    rec.sync_service(
        LOCAL,
        [
            Frontend(
                LOCAL,
                "",
                FrontendKind.NODE_PORT,
                "172.16.0.1",
                30080,
                "TCP",
                (),
                internal_backends=(b(21, local=False),),
                empty_drop=True,
            ),
            Frontend(LOCAL, "", FrontendKind.CLUSTER_IP, "10.96.0.20", 80, "TCP", (), empty_drop=True),
        ],
    )
    rec.sync_service(EMPTY, [Frontend(EMPTY, "dns", FrontendKind.CLUSTER_IP, "10.96.0.30", 53, "UDP", ())])
    return w


def test_services_table_golden(maps: MemoryMapWriter) -> None:
    assert services_table(services_from(maps)).splitlines() == [
        "SERVICE            TYPE       FRONTEND              SCOPE     FLAGS                           BACKENDS",
        "default/empty:dns  ClusterIP  10.96.0.30:53/UDP     default                                   (none: reject)",
        "default/web:http   ClusterIP  10.96.0.10:80/TCP     default   affinity=600s                   "
        "10.244.1.11:8080/TCP (active, local)",
        "                                                                                              "
        "10.244.1.12:8080/TCP (terminating, local)",
        "default/web:http   ClusterIP  [fd00:96::10]:80/TCP  default                                   "
        "[fd00:244:1::11]:8080/TCP (active, local)",
        "shop/local         ClusterIP  10.96.0.20:80/TCP     default   empty-drop                      (none: drop)",
        "shop/local         NodePort   172.16.0.1:30080/TCP  default   two-scopes,empty-drop,external  (none: drop)",
        "                                                    internal                                  "
        "10.244.1.21:8080/TCP (active)",
    ]


def test_filters(maps: MemoryMapWriter) -> None:
    rows = services_from(maps)
    assert {r.service for r in filter_services(rows, namespace="shop")} == {"shop/local"}
    assert {r.frontend for r in filter_services(rows, service="web")} == {"10.96.0.10:80/TCP", "[fd00:96::10]:80/TCP"}
    assert {r.service for r in filter_services(rows, address="10.244.1.21")} == {"shop/local"}
    assert [r.frontend for r in filter_services(rows, address="10.96.0.30")] == ["10.96.0.30:53/UDP"]
    assert filter_services(rows, service="nope") == []


def test_backends_table(maps: MemoryMapWriter) -> None:
    from kpr.datapath.inspect import BackendListing

    text = backends_table(
        [
            BackendListing(1, "10.244.1.11:8080/TCP", "active", True, ["default/web 10.96.0.10:80/TCP"]),
            BackendListing(2, "10.244.1.99:80/TCP", "active", False, []),
        ]
    )
    assert text.splitlines()[1].split() == [
        "1",
        "10.244.1.11:8080/TCP",
        "active",
        "yes",
        "default/web",
        "10.96.0.10:80/TCP",
    ]
    assert text.splitlines()[2].endswith("(none)")
    assert backends_table([]) == "no backends programmed"


@pytest.mark.parametrize(
    ("dst", "verdict", "candidates", "says"),
    [
        ("10.96.0.10:80/TCP", "load-balanced", ["10.244.1.11:8080/TCP", "10.244.1.12:8080/TCP"], "ClientIP"),
        ("[fd00:96::10]:80", "load-balanced", ["[fd00:244:1::11]:8080/TCP"], "no NAT"),
        ("10.96.0.30:53/udp", "refused", [], "ECONNREFUSED"),
        ("10.96.0.20:80/TCP", "dropped", [], "EHOSTUNREACH"),
        ("172.16.0.1:30080/TCP", "load-balanced", ["10.244.1.21:8080/TCP"], "internal scope"),
        ("10.96.0.10:81/TCP", "not-a-frontend", [], "leaves the flow alone"),
        ("10.96.0.30:53/TCP", "not-a-frontend", [], "10.96.0.30:53/UDP"),
    ],
)
def test_explain(maps: MemoryMapWriter, dst: str, verdict: str, candidates: list[str], says: str) -> None:
    ex = explain(services_from(maps), "10.244.1.50", dst)
    assert ex.verdict == verdict
    assert ex.candidates == candidates
    text = explanation_text(ex)
    assert says in text and text.startswith(f"10.244.1.50 -> {ex.destination}: {verdict}")


def test_explain_external_flow_to_local_and_remote_backends() -> None:
    w = MemoryMapWriter()
    lb = ServiceKey("default", "lb")
    Reconciler(w).sync_service(
        lb,
        [
            Frontend(
                lb,
                "",
                FrontendKind.LOAD_BALANCER,
                "172.16.100.1",
                80,
                "TCP",
                (b(11), b(31, local=False)),
                source_ranges=("192.0.2.0/24",),
            )
        ],
    )
    ex = explain(services_from(w), "192.0.2.7", "172.16.100.1:80/TCP", external=True)
    text = explanation_text(ex)
    assert ex.verdict == "load-balanced" and len(ex.candidates) == 2
    assert "loadBalancerSourceRanges apply" in text
    assert "On this node (10.244.1.11:8080/TCP): DNAT only" in text
    assert "On other nodes (10.244.1.31:8080/TCP): DNAT and masquerade" in text and "61000-65535" in text


def test_explain_external_flows(maps: MemoryMapWriter) -> None:
    rows = services_from(maps)
    nodeport = explain(rows, "192.0.2.1", "172.16.0.1:30080/TCP", external=True)
    assert (nodeport.verdict, nodeport.path, nodeport.scope) == ("dropped", "external", "default")
    assert "externalTrafficPolicy=Local" in explanation_text(nodeport)
    cluster_ip = explain(rows, "192.0.2.1", "10.96.0.10:80/TCP", external=True)
    assert cluster_ip.verdict == "not-a-frontend" and "left to routing" in explanation_text(cluster_ip)


@pytest.mark.parametrize("bad", ["10.96.0.10", "10.96.0.10:99999", "10.96.0.10:80/ICMP", "web:80", "[fd00::1]"])
def test_explain_rejects_bad_destinations(bad: str) -> None:
    with pytest.raises(BadTarget):
        parse_destination(bad)


STATUS = {
    "agent": {
        "healthy": True,
        "health": "ok",
        "pid": 42,
        "node": "node1",
        "started": 1000.0,
        "source": {
            "kind": "kubernetes-api",
            "kubeconfig": "in-cluster",
            "watches": {"Service": {"state": "watching", "resource_version": "812", "lists": 1, "watches": 3}},
        },
        "last_sync": 1175.0,
        "last_sync_seconds": 0.0021,
        "queued_services": 0,
        "failing_services": [],
        "services": 12,
        "frontends": 24,
        "backends": 36,
        "recent_errors": [{"time": 1100.0, "error": "Service shop/x: spec.ports[0].port 0 is out of range"}],
    },
    "agent_error": "",
    "bpffs_dir": "/sys/fs/bpf/kpr",
    "cgroup": "/sys/fs/cgroup",
    "maps": [
        {"name": "services4", "entries": 60, "max_entries": 327680, "fill": 0.0002},
        {"name": "affinity", "entries": 61000, "max_entries": 65536, "fill": 0.9308},
    ],
    "programs": [{"hook": "connect4", "id": 7, "name": "kpr_connect4"}],
    "missing_hooks": ["connect6"],
    "counters": {
        "xlate_fwd": 900,
        "xlate_rev": 880,
        "reject_no_backend": 3,
        "drop_no_local_backend": 0,
        "affinity_hit": 5,
        "affinity_new": 2,
        "err_slot_missing": 0,
    },
    "kernel": {
        "release": "6.18.0",
        "btf": True,
        "kernel_headers_for_bcc": True,
        "bpffs": True,
        "cgroup2": True,
        "bpf_set_retval": True,
        "batch_map_ops": True,
    },
    "warnings": ["map affinity is 93% full (61000/65536); raise it with --map-size"],
}


def test_status_text_golden() -> None:
    assert (
        status_text(STATUS, now=1180.0)
        == """\
Agent:        healthy (pid 42, node node1, up 3m00s)
Source:       kubernetes-api (in-cluster); Service watching at rv 812
Last sync:    5s ago, took 2.1 ms; 0 queued, 0 failing
Programmed:   12 services, 24 frontends, 36 backends
Socket LB:    partial: 1/2 hooks attached to /sys/fs/cgroup
North-south:  not configured
Kernel:       6.18.0; BTF yes, bpffs yes, cgroup2 yes, bpf_set_retval yes, batch map ops yes, headers for BCC yes
Maps (/sys/fs/bpf/kpr):
  services4             60 / 327680     0.0%
  affinity           61000 / 65536     93.1%  <- over 90%
Datapath:     translated 900, shown as frontend 880, refused 3, dropped (no local backend) 0, affinity 5 hits / 2 new
Warnings:
  - map affinity is 93% full (61000/65536); raise it with --map-size"""
    )


def test_status_text_verbose_and_agent_down() -> None:
    verbose = status_text(STATUS, now=1180.0, verbose=True)
    assert "program kpr_connect4     id 7      on connect4" in verbose
    assert "error 1m20s ago: Service shop/x" in verbose
    down = status_text(dict(STATUS, agent=None, agent_error="no answer from http://127.0.0.1:10256/status"), 0.0)
    assert down.splitlines()[0] == "Agent:        DOWN (no answer from http://127.0.0.1:10256/status)"
    assert "Maps (/sys/fs/bpf/kpr):" in down


@pytest.mark.parametrize("command", [[], ["agent"], ["services"], ["backends"], ["status"], ["explain"], ["cleanup"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert "Show this message and exit." in result.output
    if command:
        assert len(result.output.splitlines()[2].strip()) > 20  # a real one-line summary, not a placeholder
