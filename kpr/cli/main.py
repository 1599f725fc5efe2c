"""The `kpr` command."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from kpr import log
from kpr.cli.node import node

DEFAULT_BPFFS_DIR = Path("/sys/fs/bpf/kpr")
T = TypeVar("T")


def _default_cgroup_root() -> Path:
    from kpr.datapath.loader import default_cgroup_root

    return default_cgroup_root()


bpffs_option = click.option(
    "--bpffs-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_BPFFS_DIR,
    show_default=True,
    envvar="KPR_BPFFS_DIR",
    help="bpffs directory holding kpr's pinned maps.",
)
cgroup_option = click.option(
    "--cgroup-root",
    type=click.Path(path_type=Path),
    default=None,
    envvar="KPR_CGROUP_ROOT",
    help="cgroup v2 directory the socket programs attach to (default: the cgroup2 mount, i.e. the whole node).",
)
output_option = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True, help="Output format."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kpr")
def main() -> None:
    """kpr: eBPF load balancing for Kubernetes Services, in place of kube-proxy."""


def _map_sizes(values: tuple[str, ...]) -> dict[str, int]:
    sizes = {}
    for item in values:
        name, sep, number = item.partition("=")
        if not sep or not number.isdigit():
            raise click.BadParameter(f"{item!r}: expected NAME=ENTRIES, e.g. backends=500000", param_hint="--map-size")
        sizes[f"KPR_{name.upper()}_MAX"] = int(number)
    return sizes


@main.command()
@click.option(
    "--manifests",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Read Services, EndpointSlices and Nodes from this directory of manifests (YAML/JSON, multi-document) "
    "instead of the Kubernetes API; re-read when it changes.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(dir_okay=False),
    default=None,
    envvar="KUBECONFIG",
    help="kubeconfig of the API server to watch; without it (and without --manifests) the in-cluster config.",
)
@click.option(
    "--node-name",
    envvar="KPR_NODE_NAME",
    default=socket.gethostname,
    show_default="hostname",
    help="This node's name, for node-local endpoints and its Node object.",
)
@cgroup_option
@bpffs_option
@click.option(
    "--min-sync-period",
    type=float,
    default=0.1,
    show_default=True,
    help="Seconds to coalesce changes before writing the maps.",
)
@click.option(
    "--drift-check-period",
    type=float,
    default=300.0,
    show_default=True,
    help="Seconds between comparisons of the maps with the agent's state (differences are repaired).",
)
@click.option(
    "--watch-idle-timeout",
    type=float,
    default=90.0,
    show_default=True,
    help="Restart a watch that has sent nothing, not even a bookmark, for this many seconds.",
)
@click.option(
    "--devices",
    default=None,
    metavar="DEV[,DEV...]",
    help="Node devices where NodePort, LoadBalancer and externalIP traffic arrives (tc programs); default: the "
    'devices of the default routes; "" for none (socket LB only).',
)
@click.option(
    "--socket-lb",
    type=click.Choice(["full", "hostns-only", "off"]),
    default="full",
    show_default=True,
    help="Which sockets are translated at connect(): all (full), only the host's (hostns-only: pods are served "
    "per packet at their veth by kpr-cni, for service meshes that must see the ClusterIP), or none.",
)
@click.option(
    "--nodeport-addresses",
    default="",
    metavar="CIDR|KEYWORD[,...]",
    help="The node addresses NodePorts answer on, as kube-proxy's flag: CIDRs and the keywords primary (the Node's "
    "node IP of each family), localhost (127.0.0.0/8, ::1) and all; a family without a CIDR matches all of its "
    "addresses. Default: all (kube-proxy's iptables mode), 127.0.0.1 included for the node's own sockets.",
)
@click.option(
    "--external-cluster-ip",
    type=click.BOOL,
    is_flag=False,
    flag_value=True,
    default=False,
    metavar="[true|false]",
    help="Also serve ClusterIPs to packets arriving on --devices (a service range routed or BGP-advertised to "
    "the nodes), as kube-proxy does; Cilium's bpf-lb-external-clusterip. Default: ClusterIPs are for pods and the "
    "node.",
)
@click.option(
    "--cluster-cidr",
    default="",
    metavar="CIDR[,CIDR]",
    help="The pods' CIDR (one per family), kube-proxy's detect-local ClusterCIDR mode: pods of other nodes reach "
    "externalTrafficPolicy=Local NodePorts and LoadBalancer IPs of this node through every endpoint, as pods of "
    "this node do, instead of being dropped for want of a local one.",
)
@click.option(
    "--sync-period",
    type=float,
    default=30.0,
    show_default=True,
    help="/healthz fails when a queued change has waited longer than twice this (kube-proxy's rule).",
)
@click.option(
    "--healthz-bind-address",
    default="0.0.0.0:10256",
    show_default=True,
    help="Where to serve /healthz, /livez and /status (what `kpr status` reads); empty to disable.",
)
@click.option(
    "--metrics-bind-address",
    default="127.0.0.1:10249",
    show_default=True,
    help="Where to serve /metrics (Prometheus) and /proxyMode; empty to disable.",
)
@click.option(
    "--map-size",
    "map_sizes",
    multiple=True,
    metavar="NAME=ENTRIES",
    help="Map capacity override: services, backends, rev_nat, sock_rev_nat, affinity.",
)
@click.option("--log-format", type=click.Choice(["auto", "json", "console"]), default="auto", show_default=True)
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
def agent(
    manifests: Path | None,
    kubeconfig: str | None,
    node_name: str,
    cgroup_root: Path | None,
    bpffs_dir: Path,
    min_sync_period: float,
    drift_check_period: float,
    watch_idle_timeout: float,
    devices: str | None,
    socket_lb: str,
    nodeport_addresses: str,
    external_cluster_ip: bool,
    cluster_cidr: str,
    sync_period: float,
    healthz_bind_address: str,
    metrics_bind_address: str,
    map_sizes: tuple[str, ...],
    log_format: str,
    log_level: str,
) -> None:
    """Run the agent in the foreground: program Services into the BPF maps and keep them in step.

    Sources: the Kubernetes API (--kubeconfig, or in-cluster), or a directory of manifests (--manifests).
    On SIGTERM it exits and leaves programs attached and maps pinned, so traffic keeps flowing and the next agent
    picks up where this one stopped. `kpr cleanup` removes everything.
    """
    from kpr.agent import http
    from kpr.agent.agent import Agent, AgentConfig
    from kpr.datapath.loader import DatapathError
    from kpr.model import nodeports
    from kpr.model.detect_local import parse_cluster_cidrs

    log.configure(log_format, log_level)
    try:
        nodeport_spec = nodeports.parse(nodeport_addresses.split(","))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--nodeport-addresses") from e
    try:
        cluster_cidrs = parse_cluster_cidrs(cluster_cidr)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--cluster-cidr") from e
    config = AgentConfig(
        node_name=node_name,
        manifests=manifests,
        kubeconfig=kubeconfig,
        cgroup_root=cgroup_root or _default_cgroup_root(),
        bpffs_dir=bpffs_dir,
        map_sizes=_map_sizes(map_sizes),
        min_sync_period=min_sync_period,
        drift_check_period=drift_check_period,
        watch_idle_timeout=watch_idle_timeout,
        nodeport_addresses=nodeport_spec,
        sync_period=sync_period,
        devices=None if devices is None else [d.strip() for d in devices.split(",") if d.strip()],
        socket_lb=socket_lb,
        external_cluster_ip=external_cluster_ip,
        cluster_cidrs=cluster_cidrs,
    )
    a = Agent(config)
    try:
        a.take_bpffs()
        if metrics_bind_address:
            http.serve(metrics_bind_address, http.metrics_routes(a.metrics.registry), "metrics")
        if healthz_bind_address:
            http.serve(healthz_bind_address, http.health_routes(a), "health")
        a.start()
    except (DatapathError, OSError) as e:
        log.get("kpr.agent").error("cannot start", error=str(e))
        sys.exit(1)
    a.run()
    sys.exit(a.exit_code)


def _read_maps(bpffs_dir: Path, read: Callable[[Path], T]) -> T:
    from kpr.datapath.bpfsys import BpfError

    try:
        return read(bpffs_dir)
    except BpfError as e:
        raise click.ClickException(
            f"cannot read kpr's maps in {bpffs_dir}: {e.strerror}. Is the agent set up there (see --bpffs-dir)?"
        ) from e


@main.command()
@bpffs_option
@output_option
@click.option("-n", "--namespace", default=None, help="Only services of this namespace.")
@click.option("--service", "service_filter", default=None, metavar="[NS/]NAME", help="Only this service.")
@click.option("--address", default=None, help="Only frontends with this address, or with a backend on it.")
def services(
    bpffs_dir: Path, output: str, namespace: str | None, service_filter: str | None, address: str | None
) -> None:
    """Frontends and their backends, read straight from the pinned maps (works while the agent is down).

    \b
    SERVICE           TYPE       FRONTEND           SCOPE    FLAGS  BACKENDS
    default/web:http  ClusterIP  10.96.0.10:80/TCP  default         10.244.1.11:8080/TCP (active, local)
                                                                    10.244.1.12:8080/TCP (active, local)
    """
    from kpr.cli.render import services_table
    from kpr.datapath.inspect import filter_services, read_services

    rows = filter_services(_read_maps(bpffs_dir, read_services), namespace, service_filter, address)
    if output == "json":
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        click.echo(services_table(rows))


@main.command()
@bpffs_option
@output_option
@click.option("--address", default=None, help="Only backends on this address.")
def backends(bpffs_dir: Path, output: str, address: str | None) -> None:
    """Every backend in the maps with its state, its tracked (tc) flows and the frontends whose slots use it.

    \b
    ID  BACKEND               STATE        LOCAL  FLOWS  USED BY
    1   10.244.1.11:8080/TCP  active       yes    4      default/web 10.96.0.10:80/TCP
    2   10.244.1.12:8080/TCP  terminating  yes    2      (standby: no new flows)
    3   10.244.2.13:8080/TCP  gone         no     1      (gone: kept while its flows last)
    """
    from kpr.cli.render import backends_table
    from kpr.datapath.inspect import read_backends

    rows = _read_maps(bpffs_dir, read_backends)
    if address:
        rows = [b for b in rows if b.address.rsplit(":", 1)[0].strip("[]") == address]
    if output == "json":
        click.echo(json.dumps([b.as_dict() for b in rows], indent=2))
    else:
        click.echo(backends_table(rows))


@main.command()
@bpffs_option
@output_option
@click.option("--external", is_flag=True, help="The flow arrives from outside the node (default: it starts on it).")
@click.argument("source")
@click.argument("destination", metavar="DST:PORT[/PROTO]")
def explain(bpffs_dir: Path, output: str, external: bool, source: str, destination: str) -> None:
    """What kpr would do with a new flow from SOURCE to DST:PORT/PROTO, from the live maps.

    \b
    $ kpr explain 10.244.1.20 10.96.0.10:80/TCP
    10.244.1.20 -> 10.96.0.10:80/TCP: load-balanced
      1. The flow starts on this node (a pod or the host); kpr looks up 10.96.0.10:80/TCP in services4.
      2. It matches the ClusterIP frontend of default/web:http.
      3. One of 3 backend(s) is picked at random (33% each): ...
    """
    from kpr.cli.explain import BadTarget, explanation_text
    from kpr.cli.explain import explain as explain_flow
    from kpr.datapath.inspect import read_draining_flows, read_nodeport_addresses, read_services
    from kpr.datapath.loader import read_config

    rows = _read_maps(bpffs_dir, read_services)
    draining = _read_maps(bpffs_dir, read_draining_flows)
    nodeports = _read_maps(bpffs_dir, read_nodeport_addresses)
    settings = _read_maps(bpffs_dir, read_config)
    try:
        result = explain_flow(
            rows,
            source,
            destination,
            external=external,
            draining=draining,
            nodeport_addresses=nodeports,
            settings=settings,
        )
    except BadTarget as e:
        raise click.BadParameter(str(e)) from e
    click.echo(json.dumps(result.as_dict(), indent=2) if output == "json" else explanation_text(result))


@main.command()
@bpffs_option
@output_option
@click.option("--address", default=None, help="Only flows with this address on either side.")
def conntrack(bpffs_dir: Path, output: str, address: str | None) -> None:
    """The north-south flows the tc programs track (NodePort, LoadBalancer, externalIPs), newest first.

    Columns: protocol, direction (original: client to frontend; reply: backend back), source, destination,
    frontend, backend, the masquerade address:port when the backend is on another node, idle time.
    """
    from kpr.cli.render import conntrack_table
    from kpr.datapath.inspect import read_conntrack

    rows = _read_maps(bpffs_dir, read_conntrack)
    if address:
        rows = [
            r
            for r in rows
            if address in (r.source.rsplit(":", 1)[0].strip("[]"), r.destination.rsplit(":", 1)[0].strip("[]"))
        ]
    if output == "json":
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        click.echo(conntrack_table(rows))


@main.command()
@cgroup_option
@bpffs_option
@output_option
@click.option("-v", "--verbose", is_flag=True, help="Every counter, program id and the agent's recent errors.")
@click.option(
    "--agent-address",
    default="127.0.0.1:10256",
    show_default=True,
    envvar="KPR_HEALTHZ_ADDRESS",
    help="The agent's health endpoint (its --healthz-bind-address).",
)
def status(cgroup_root: Path | None, bpffs_dir: Path, output: str, verbose: bool, agent_address: str) -> None:
    """Health of the agent and the datapath: programs, maps and their fill, counters, API watches, errors.

    Works from the pinned maps when the agent is down, and says so.
    """
    import time

    from kpr.cli.render import status_text
    from kpr.cli.status import collect

    report = collect(bpffs_dir, cgroup_root or _default_cgroup_root(), agent_address).as_dict()
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(status_text(report, time.time(), verbose))


@main.command()
@cgroup_option
@bpffs_option
@click.option(
    "--kube-proxy",
    "kube_proxy",
    is_flag=True,
    help="Also remove kube-proxy's iptables chains (KUBE-*, nft and legacy, v4 and v6), its nftables tables and "
    "the IPVS device, so a node switches from kube-proxy in one step.",
)
@click.option(
    "--keep-kpr",
    is_flag=True,
    help="With --kube-proxy: remove only kube-proxy's state and leave kpr's programs and maps (switching a node "
    "while the agent runs).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Clean up even while an agent runs on --bpffs-dir (it then notices, logs why and exits with status 1).",
)
def cleanup(cgroup_root: Path | None, bpffs_dir: Path, kube_proxy: bool, keep_kpr: bool, force: bool) -> None:
    """Detach kpr's programs (cgroup hooks and tc filters) and unpin its maps. Safe to run twice.

    Programs of other tools on the same cgroup or devices and other pins are left alone.
    """
    from kpr.datapath.kube_proxy import clean_kube_proxy
    from kpr.datapath.loader import DatapathError, bpffs_lock_holder, detach_all, detach_tc, unpin_all

    if os.geteuid() != 0:
        raise click.ClickException("cleanup needs root (CAP_BPF and CAP_NET_ADMIN)")
    if keep_kpr and not kube_proxy:
        raise click.UsageError("--keep-kpr goes with --kube-proxy (without both there is nothing to do)")
    if not keep_kpr:
        holder = bpffs_lock_holder(bpffs_dir) if bpffs_dir.exists() else None
        if holder is not None and not force:
            raise click.ClickException(
                f"a kpr agent (pid {holder}) is running on {bpffs_dir}: stop it first (a DaemonSet would start it "
                "again: delete the DaemonSet), or pass --force"
            )
        cgroup = cgroup_root or _default_cgroup_root()
        detached = detach_all(cgroup)
        tc_removed = detach_tc()
        try:
            unpinned = unpin_all(bpffs_dir)
        except DatapathError as e:
            raise click.ClickException(str(e)) from e
        click.echo(
            f"detached {len(detached)} program(s) from {cgroup}"
            + (f" ({', '.join(p.hook for p in detached)})" if detached else "")
        )
        click.echo(f"removed {len(tc_removed)} tc filter(s)" + (f" ({', '.join(tc_removed)})" if tc_removed else ""))
        maps = [name for name in unpinned if not name.startswith("prog_")]
        click.echo(f"unpinned {len(maps)} map(s) and {len(unpinned) - len(maps)} program(s) from {bpffs_dir}")
    if kube_proxy:
        report = clean_kube_proxy()
        click.echo(f"removed {len(report.removed)} piece(s) of kube-proxy state")
        for line in report.removed:
            click.echo(f"  {line}")
        if report.errors:
            denied = any("Permission denied" in e or "Operation not permitted" in e for e in report.errors)
            raise click.ClickException(
                "could not remove (or could not read) kube-proxy's state:\n  "
                + "\n  ".join(report.errors)
                + (
                    "\nthis needs CAP_NET_ADMIN, and CAP_NET_RAW for legacy iptables: run it as root on the node, or "
                    "in the kpr pod's container (kubectl exec), which has both"
                    if denied
                    else ""
                )
            )


main.add_command(node)  # kpr node mount-bpffs | mount-cgroup | install-cni: the DaemonSet's init containers

if __name__ == "__main__":
    main()
