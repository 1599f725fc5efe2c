"""CLI rendering and `kpr explain` from golden in-memory maps, and every command's help. No root needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from kpr.cli.explain import BadTarget, explain, explanation_text, parse_destination
from kpr.cli.main import main
from kpr.cli.render import backends_table, services_table, status_text
from kpr.datapath import abi, codec
from kpr.datapath.inspect import BackendListing, backends_from, draining_flows, filter_services, services_from
from kpr.datapath.loader import DatapathSettings
from kpr.datapath.writers import MemoryMapWriter
from kpr.model.detect_local import parse_cluster_cidrs
from kpr.model.types import Backend, BackendState, Frontend, FrontendKind, ServiceKey
from kpr.reconcile.reconciler import Reconciler

pytestmark = pytest.mark.unit

WEB, LOCAL, EMPTY = ServiceKey("default", "web"), ServiceKey("shop", "local"), ServiceKey("default", "empty")


def b(last: int, port: int = 8080, local: bool = True, state: BackendState = BackendState.ACTIVE) -> Backend:
    return Backend(f"10.244.1.{last}", port, "TCP", node_local=local, state=state)


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
                (b(11), b(12, state=BackendState.TERMINATING)),
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


def test_backends_table() -> None:
    text = backends_table(
        [
            BackendListing(1, "10.244.1.11:8080/TCP", "active", True, ["default/web 10.96.0.10:80/TCP"], 4),
            BackendListing(2, "10.244.1.12:8080/TCP", "terminating", True, [], 2),
            BackendListing(3, "10.244.2.13:80/TCP", "gone", False, [], 1),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "BACKEND", "STATE", "LOCAL", "FLOWS", "USED", "BY"]
    assert lines[1].split() == ["1", "10.244.1.11:8080/TCP", "active", "yes", "4", "default/web", "10.96.0.10:80/TCP"]
    assert lines[2].split()[2:5] == ["terminating", "yes", "2"] and lines[2].endswith("(standby: no new flows)")
    assert lines[3].split()[2:5] == ["gone", "no", "1"] and lines[3].endswith("(gone: kept while its flows last)")
    assert backends_table([]) == "no backends programmed"


def _track(
    w: MemoryMapWriter, rec: Reconciler, client_port: int, frontend: tuple[str, int, str], backend: Backend
) -> None:
    """A tc-path flow as bpf/tc.c records it: the original-direction entry naming the frontend and the backend."""
    key = abi.CtKey4(
        src=abi.be32_of_ipv4("192.0.2.7"),
        dst=abi.be32_of_ipv4(frontend[0]),
        sport=abi.be16_of_port(client_port),
        dport=abi.be16_of_port(frontend[1]),
        proto=6,
        dir=abi.CT_ORIGINAL,
    )
    value = abi.CtValue4(
        last_seen_ns=10**18,  # far in the future of any test clock: live
        backend_id=rec.backends[backend.identity].id,
        rev_nat_id=rec.frontends[frontend].rev_nat_id,
    )
    w.update("ct4", key, value)


def test_backends_and_explain_show_the_flows_left_on_terminating_and_gone_backends() -> None:
    w = MemoryMapWriter()
    rec = Reconciler(w)
    np = ServiceKey("default", "np")
    web = (b(11), b(12), b(13))

    def fe(backends: tuple[Backend, ...], standby: tuple[Backend, ...] = ()) -> Frontend:
        return Frontend(np, "", FrontendKind.NODE_PORT, "172.16.0.1", 30080, "TCP", backends, standby=standby)

    rec.sync_service(np, [fe(web)])
    address = ("172.16.0.1", 30080, "TCP")
    for port, backend in ((40001, web[0]), (40002, web[1]), (40003, web[1]), (40004, web[2])):
        _track(w, rec, port, address, backend)
    rec.sync_service(np, [fe(web[:1], standby=(b(12, state=BackendState.TERMINATING),))])  # 12 draining, 13 gone
    listing = {x.address: (x.state, x.flows, x.frontends) for x in backends_from(w, now_ns=0)}
    assert listing == {
        "10.244.1.11:8080/TCP": ("active", 1, ["default/np 172.16.0.1:30080/TCP"]),
        "10.244.1.12:8080/TCP": ("terminating", 2, []),
        "10.244.1.13:8080/TCP": ("gone", 1, []),
    }
    draining = draining_flows(w, now_ns=0)
    assert draining == {
        "172.16.0.1:30080/TCP": ["10.244.1.12:8080/TCP (terminating): 2 flows", "10.244.1.13:8080/TCP (gone): 1 flow"]
    }
    ex = explain(services_from(w), "192.0.2.9", "172.16.0.1:30080/TCP", external=True, draining=draining)
    assert ex.candidates == ["10.244.1.11:8080/TCP"] and ex.draining == draining["172.16.0.1:30080/TCP"]
    assert "stay on them until they end" in explanation_text(ex)
    assert codec.decode_backend(next(v for _, v in w.items("backends4") if v.state == abi.BACKEND_GONE)).port == 8080


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


def test_explain_external_flows_follow_the_agents_datapath_settings(maps: MemoryMapWriter) -> None:
    rows = services_from(maps)
    flags = DatapathSettings(external_cluster_ip=True, cluster_cidrs=("10.244.0.0/16",))
    cluster_ip = explain(rows, "192.0.2.1", "10.96.0.10:80/TCP", external=True, settings=flags)
    assert cluster_ip.verdict == "load-balanced" and "--external-cluster-ip" in explanation_text(cluster_ip)
    itp_local = explain(rows, "192.0.2.1", "10.96.0.20:80/TCP", external=True, settings=flags)
    assert itp_local.verdict == "dropped" and "internalTrafficPolicy=Local" in explanation_text(itp_local)
    pod = explain(rows, "10.244.2.7", "172.16.0.1:30080/TCP", external=True, settings=flags)
    assert (pod.verdict, pod.scope, pod.candidates) == ("load-balanced", "internal", ["10.244.1.21:8080/TCP"])
    assert "detect-local" in explanation_text(pod) and "masquerade" in explanation_text(pod)
    outsider = explain(rows, "192.0.2.1", "172.16.0.1:30080/TCP", external=True, settings=flags)
    assert (outsider.verdict, outsider.scope) == ("dropped", "default")


def test_datapath_settings_survive_the_config_map() -> None:
    settings = DatapathSettings("hostns-only", True, ("10.244.0.0/16", "fd00:244::/32"))
    config = settings.config(host_netns_cookie=4096)
    assert config.host_netns_cookie == 4096 and config.flags == abi.CONFIG_F_EXTERNAL_CLUSTER_IP
    assert DatapathSettings.from_config(config) == settings
    assert DatapathSettings.from_json(settings.to_json()) == settings
    assert DatapathSettings.from_config(DatapathSettings().config(1)) == DatapathSettings()


@pytest.mark.parametrize(
    ("flag", "parsed"),
    [
        ("", ()),
        ("10.244.0.0/16", ("10.244.0.0/16",)),
        ("10.244.3.7/16, fd00:244::/32", ("10.244.0.0/16", "fd00:244::/32")),
        ("10.244.0.0/16,10.245.0.0/16", "one CIDR, or one IPv4 and one IPv6"),
        ("10.244.0.0/16,fd00::/8,fd01::/8", "one CIDR, or one IPv4 and one IPv6"),
        ("pods", "not a CIDR"),
        ("0.0.0.0/0", "every source a pod"),
    ],
)
def test_cluster_cidr_flag_is_validated_as_kube_proxy_does(flag: str, parsed: tuple[str, ...] | str) -> None:
    if isinstance(parsed, tuple):
        assert parse_cluster_cidrs(flag) == parsed
    else:
        with pytest.raises(ValueError, match=parsed):
            parse_cluster_cidrs(flag)


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
        "last_socket_sweep": {"time": 1170.0, "candidates": 3, "namespaces": 7, "destroyed": 2, "seconds": 0.0123},
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
    "backends": {"active": 30, "terminating": 4, "not-serving": 1, "gone": 1, "flows_off_slots": 9},
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
        "kernel_headers_for_bcc": "node (/lib/modules/6.18.0-amd64/build)",
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
Socket sweep: 10s ago: 2 connected UDP socket(s) of ended backends destroyed in 7 namespace(s), 12.3 ms
Socket LB:    partial: 1/2 hooks attached to /sys/fs/cgroup
North-south:  not configured
Kernel:       6.18.0; BTF yes, bpffs yes, cgroup2 yes, bpf_set_retval yes, batch map ops yes, headers for BCC: \
node (/lib/modules/6.18.0-amd64/build)
Backends:     30 active, 4 terminating, 1 not serving, 1 gone (kept for their flows); 9 tracked flow(s) on backends \
that take no new ones
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


def test_status_warns_of_services_waiting_for_a_frontend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kpr.cli import status as status_module

    agent = dict(STATUS["agent"], conflicts={"bulk/aaa": ["10.96.0.1:80/TCP is already served for bulk/svc0"]})
    monkeypatch.setattr(status_module, "fetch_agent_status", lambda address: (agent, ""))
    collected = status_module.collect(tmp_path / "bpffs", tmp_path / "cgroup", "127.0.0.1:10256")
    assert any("bulk/aaa waits for a frontend another Service holds" in w for w in collected.warnings)


def test_status_says_how_sctp_is_served() -> None:
    text = status_text(dict(STATUS, sctp_frontends=2, counters=dict(STATUS["counters"], tc_sctp_crc=7)), now=1180.0)
    assert "SCTP:         2 frontends, served at tc only" in text and "7 checksum(s) updated" in text
    assert "SCTP" not in status_text(STATUS, now=1180.0)


def test_status_names_the_north_south_settings() -> None:
    agent = dict(STATUS["agent"], devices=["eth0"], external_cluster_ip=True, cluster_cidrs=["10.244.0.0/16"])
    text = status_text(dict(STATUS, agent=agent), now=1180.0)
    assert (
        "North-south:  tc on eth0 (ingress and egress); ClusterIPs served from outside the node too; "
        "pods (detect-local): 10.244.0.0/16"
    ) in text


@pytest.mark.parametrize("command", [[], ["agent"], ["services"], ["backends"], ["status"], ["explain"], ["cleanup"]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    assert "Show this message and exit." in result.output
    if command:
        assert len(result.output.splitlines()[2].strip()) > 20  # a real one-line summary, not a placeholder
