"""The `kpr` command."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import click
from prometheus_client import CollectorRegistry

from kpr import log

DEFAULT_BPFFS_DIR = Path("/sys/fs/bpf/kpr")


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
    "--nodeport-addresses",
    default="",
    metavar="CIDR[,CIDR...]",
    help="Serve NodePorts only on node addresses inside these CIDRs (like kube-proxy's flag); default: all.",
)
@click.option(
    "--metrics-bind-address",
    default="127.0.0.1:10249",
    show_default=True,
    help="Where to serve Prometheus metrics (/metrics); empty to disable.",
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
    nodeport_addresses: str,
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
    from kpr.agent.agent import Agent, AgentConfig
    from kpr.datapath.loader import DatapathError
    from kpr.k8s.convert import InvalidObject, parse_cidrs

    log.configure(log_format, log_level)
    try:
        cidrs = list(parse_cidrs(c for c in nodeport_addresses.split(",") if c.strip())) or None
    except InvalidObject as e:
        raise click.BadParameter(str(e), param_hint="--nodeport-addresses") from e
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
        nodeport_cidrs=cidrs,
    )
    a = Agent(config)
    try:
        if metrics_bind_address:
            serve_metrics(metrics_bind_address, a.metrics.registry)
        a.start()
    except (DatapathError, OSError) as e:
        log.get("kpr.agent").error("cannot start", error=str(e))
        sys.exit(1)
    a.run()


def serve_metrics(address: str, registry: CollectorRegistry) -> None:
    """Serve /metrics from a daemon thread (prometheus_client's own server)."""
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=registry)


@main.command()
@bpffs_option
@output_option
@click.option("--service", "service_filter", default=None, metavar="NS/NAME", help="Only this service.")
def services(bpffs_dir: Path, output: str, service_filter: str | None) -> None:
    """Frontends and their backends, read straight from the pinned maps."""
    from kpr.cli.render import services_table
    from kpr.datapath.bpfsys import BpfError
    from kpr.datapath.inspect import read_services

    try:
        rows = read_services(bpffs_dir)
    except BpfError as e:
        raise click.ClickException(
            f"cannot read kpr's maps in {bpffs_dir}: {e.strerror}. Is the agent set up there (see --bpffs-dir)?"
        ) from e
    if service_filter:
        rows = [r for r in rows if r.service == service_filter]
    if output == "json":
        click.echo(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        click.echo(services_table(rows))


@main.command()
@cgroup_option
@bpffs_option
def cleanup(cgroup_root: Path | None, bpffs_dir: Path) -> None:
    """Detach kpr's programs from the cgroup and unpin its maps. Safe to run twice."""
    from kpr.datapath.loader import DatapathError, detach_all, unpin_all

    if os.geteuid() != 0:
        raise click.ClickException("cleanup needs root (CAP_BPF and CAP_NET_ADMIN)")
    cgroup = cgroup_root or _default_cgroup_root()
    detached = detach_all(cgroup)
    try:
        unpinned = unpin_all(bpffs_dir)
    except DatapathError as e:
        raise click.ClickException(str(e)) from e
    click.echo(
        f"detached {len(detached)} program(s) from {cgroup}"
        + (f" ({', '.join(p.hook for p in detached)})" if detached else "")
    )
    click.echo(f"unpinned {len(unpinned)} map(s) from {bpffs_dir}")


if __name__ == "__main__":
    main()
