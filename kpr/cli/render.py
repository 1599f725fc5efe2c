"""Text rendering for the CLI: pure functions of plain rows, unit-tested without root."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kpr.datapath.inspect import BackendListing, FlowRow, FrontendRow


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [headers, *rows]]
    return "\n".join(lines)


def services_table(frontends: Sequence[FrontendRow]) -> str:
    """One line per backend (continuation lines leave the frontend columns blank), like `cilium service list`."""
    rows: list[list[str]] = []
    for f in frontends:
        service = f.service + (f":{f.port_name}" if f.port_name else "")
        first = True
        for scope in f.scopes:
            flags = ",".join(scope.flags)
            if f.affinity_timeout and "affinity" in scope.flags:
                flags = flags.replace("affinity", f"affinity={f.affinity_timeout}s")
            entries = [f"{b.address} ({b.state}{', local' if b.node_local else ''})" for b in scope.backends] + [
                f"! {p}" for p in scope.problems
            ]
            if not entries:
                entries = ["(none: drop)" if "empty-drop" in scope.flags else "(none: reject)"]
            for i, entry in enumerate(entries):
                rows.append(
                    [
                        service if first else "",
                        f.kind if first else "",
                        f.frontend if first else "",
                        scope.scope if i == 0 else "",
                        flags if i == 0 else "",
                        entry,
                    ]
                )
                first = False
    if not rows:
        return "no services programmed"
    return table(["SERVICE", "TYPE", "FRONTEND", "SCOPE", "FLAGS", "BACKENDS"], rows)


def backends_table(backends: Sequence[BackendListing]) -> str:
    """One line per backend; one in no slot is standby (new flows avoid it, tracked ones stay) or gone (kept while
    its tracked flows last)."""

    def used_by(b: BackendListing) -> str:
        if b.frontends:
            return ", ".join(b.frontends)
        return "(gone: kept while its flows last)" if b.state == "gone" else "(standby: no new flows)"

    rows = [
        [str(b.id), b.address, b.state, "yes" if b.node_local else "no", str(b.flows), used_by(b)] for b in backends
    ]
    if not rows:
        return "no backends programmed"
    return table(["ID", "BACKEND", "STATE", "LOCAL", "FLOWS", "USED BY"], rows)


def conntrack_table(flows: Sequence[FlowRow]) -> str:
    rows = [
        [
            f.protocol,
            f.direction,
            f.source,
            f.destination,
            f.frontend,
            f.backend,
            f.masquerade or "-",
            f"{f.idle_seconds}s" + (" closing" if f.closing else ""),
        ]
        for f in flows
    ]
    if not rows:
        return "no tracked flows"
    return table(["PROTO", "DIR", "SOURCE", "DESTINATION", "FRONTEND", "BACKEND", "NAT", "IDLE"], rows)


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _yes(value: bool) -> str:
    return "yes" if value else "NO"


def status_text(s: dict[str, Any], now: float, verbose: bool = False) -> str:
    """`kpr status` as text, from the plain dict of kpr.cli.status.Status (so JSON and text show the same facts)."""
    lines: list[str] = []

    def row(label: str, text: str) -> None:
        lines.append(f"{label + ':':<13} {text}")

    agent = s["agent"]
    if agent is None:
        row("Agent", f"DOWN ({s['agent_error']})")
    else:
        state = "healthy" if agent["healthy"] else f"UNHEALTHY: {agent['health']}"
        row("Agent", f"{state} (pid {agent['pid']}, node {agent['node']}, up {_ago(now - agent['started'])})")
        source = agent["source"]
        where = source.get("directory") or source.get("kubeconfig")
        text = f"{source['kind']} ({where})"
        watches = source.get("watches")
        if watches:
            text += "; " + ", ".join(
                f"{kind} {w['state']} at rv {w['resource_version'] or '-'}"
                + (f" ({w['problem']})" if w.get("problem") else "")
                for kind, w in watches.items()
            )
        if source.get("problem"):
            text += f"; PROBLEM: {source['problem']}"
        row("Source", text)
        if agent["last_sync"]:
            row(
                "Last sync",
                f"{_ago(now - agent['last_sync'])} ago, took {agent['last_sync_seconds'] * 1000:.1f} ms; "
                f"{agent['queued_services']} queued, {len(agent['failing_services'])} failing",
            )
        else:
            row("Last sync", "not yet (waiting for the first list of every kind)")
        row("Programmed", ", ".join(_count(agent[k], k[:-1]) for k in ("services", "frontends", "backends")))
        sweep = agent.get("last_socket_sweep")
        if sweep:
            row(
                "Socket sweep",
                f"{_ago(now - sweep['time'])} ago: {sweep['destroyed']} connected UDP socket(s) of ended backends "
                f"destroyed in {sweep['namespaces']} namespace(s), {sweep['seconds'] * 1000:.1f} ms",
            )
    hooks = len(s["programs"])
    total = hooks + len(s["missing_hooks"])
    mode = "full" if hooks and not s["missing_hooks"] else ("partial" if hooks else "off")
    if agent and agent.get("socket_lb") == "hostns-only" and mode == "full":
        mode = "host namespace only (chained pods per packet at their veth)"
    row("Socket LB", f"{mode}: {hooks}/{total} hooks attached to {s['cgroup']}")
    devices = (agent or {}).get("devices") or []
    north_south = f"tc on {', '.join(devices)} (ingress and egress)" if devices else "not configured"
    if devices and (agent or {}).get("external_cluster_ip"):
        north_south += "; ClusterIPs served from outside the node too"
    if devices and (agent or {}).get("cluster_cidrs"):
        north_south += f"; pods (detect-local): {', '.join(agent['cluster_cidrs'])}"
    row("North-south", north_south)
    nodeports = s.get("nodeport_addresses") or {}
    if nodeports:
        row("NodePorts on", ", ".join(a + (" (the node's own sockets)" if lo else "") for a, lo in nodeports.items()))
    sctp = s.get("sctp_frontends", 0)
    if sctp:
        row(
            "SCTP",
            f"{_count(sctp, 'frontend')}, served at tc only (NodePorts, LoadBalancer and external IPs, chained pods; "
            "the kernel runs no socket hooks for SCTP, so other pods and the node's own sockets reach SCTP ClusterIPs "
            f"untranslated); {s['counters'].get('tc_sctp_crc', 0)} checksum(s) updated for rewritten ports",
        )
    k = s["kernel"]
    row(
        "Kernel",
        f"{k['release']}; BTF {_yes(k['btf'])}, bpffs {_yes(k['bpffs'])}, cgroup2 {_yes(k['cgroup2'])}, "
        f"bpf_set_retval {_yes(k['bpf_set_retval'])}, batch map ops {_yes(k['batch_map_ops'])}, "
        f"headers for BCC: {k['kernel_headers_for_bcc'] or 'NONE (see README, Kernel headers)'}",
    )
    states = s.get("backends") or {}
    if states:
        row(
            "Backends",
            f"{states.get('active', 0)} active, {states.get('terminating', 0)} terminating, "
            f"{states.get('not-serving', 0)} not serving, {states.get('gone', 0)} gone (kept for their flows); "
            f"{states.get('flows_off_slots', 0)} tracked flow(s) on backends that take no new ones",
        )
    if s["maps"]:
        lines.append(f"Maps ({s['bpffs_dir']}):")
        for m in s["maps"]:
            flag = "  <- over 90%" if m["fill"] >= 0.9 else ""
            lines.append(f"  {m['name']:<15} {m['entries']:>8} / {m['max_entries']:<8} {m['fill']:6.1%}{flag}")
    c = s["counters"]
    if c:
        row(
            "Datapath",
            f"translated {c.get('xlate_fwd', 0)}, shown as frontend {c.get('xlate_rev', 0)}, "
            f"refused {c.get('reject_no_backend', 0)}, dropped (no local backend) {c.get('drop_no_local_backend', 0)}, "
            f"affinity {c.get('affinity_hit', 0)} hits / {c.get('affinity_new', 0)} new",
        )
        if any(v for k, v in c.items() if k.startswith("tc_")):
            row(
                "tc path",
                f"new flows {c.get('tc_ct_new', 0)}, to backends {c.get('tc_dnat', 0)}, "
                f"replies {c.get('tc_revnat', 0)}, masqueraded {c.get('tc_snat', 0)}, "
                f"resets {c.get('tc_reject_tcp', 0)} ({c.get('tc_reset_untracked', 0)} of untracked segments), "
                f"unreachables {c.get('tc_reject_udp', 0)}, flows re-picked {c.get('tc_ct_stale', 0)}, "
                f"ICMP errors translated {c.get('tc_icmp_related', 0)} (too big: {c.get('tc_too_big', 0)} answered, "
                f"{c.get('tc_drop_too_big', 0)} dropped), "
                f"dropped: no local backend {c.get('tc_drop_no_local', 0)}, "
                f"source range {c.get('tc_drop_source_range', 0)}, no route {c.get('tc_drop_fib', 0)}, "
                f"conntrack full {c.get('tc_drop_ct_full', 0)}, no masquerade port {c.get('tc_drop_snat_ports', 0)}, "
                f"resets (never answered) {c.get('tc_drop_reset', 0)}, rewrite failed {c.get('tc_drop_rewrite', 0)}, "
                f"answer not built {c.get('tc_drop_answer', 0)}, ICMP error not translated {c.get('tc_drop_icmp', 0)}, "
                f"failed tail calls {c.get('err_tail_call', 0)}",
            )
        if verbose:
            for name, value in c.items():
                lines.append(f"  {name:<24} {value}")
    if verbose:
        for p in s["programs"]:
            lines.append(f"  program {p['name']:<16} id {p['id']:<6} on {p['hook']}")
        for e in (agent or {}).get("recent_errors", []):
            lines.append(f"  error {_ago(now - e['time'])} ago: {e['error']}")
    if s["warnings"]:
        lines.append("Warnings:")
        lines.extend(f"  - {w}" for w in s["warnings"])
    return "\n".join(lines)
