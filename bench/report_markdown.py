# ruff: noqa: RUF001 (the Markdown uses typographic signs: multiplication sign, en dash)
"""The report's Markdown: one function a section, in the order they appear, and the tables they are made of."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.report_stats import MAIN, cpu_check, fmt, get, median, paired, percentile, ratio_text, size_label
from bench.report_targets import misses_text


def markdown(results: dict[str, Any], summary: dict[str, Any] | None, goals: list[dict[str, Any]]) -> str:
    """The whole README: one list entry a paragraph or table, sections in reading order."""
    dp = results.get("datapath")
    cp = results.get("controlplane")
    out = _intro(results)
    if summary is not None and dp is not None:
        out += _headline(dp, summary, cp)
    out += _targets(goals, results)
    if dp is not None and summary is not None:
        out += _datapath(results, dp, summary)
    if cp is not None:
        out += _controlplane(cp, dp)
    out.append(METHOD + "\n")
    if cp and cp.get("iptables_backends"):
        out += _iptables_backends(cp)
    return "\n".join(out)


def _intro(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    cfg = results["config"]
    mode = "`--quick`" if cfg["quick"] else "full"
    return [
        "# Benchmarks: kpr vs kube-proxy (iptables, nftables) vs the pod IP\n",
        f"One run of `make bench` ({mode} mode, {results.get('elapsed_seconds', 0) / 60:.1f} minutes) on "
        f"{m['cpus']} vCPUs ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, {m['distribution']}; "
        f"{m['iptables']}, {m['nft']}, {m['iperf3']}; {m['date']}. Every datapath number is the median of "
        f"{cfg['repeats']} rounds (latency and UDP: {cfg.get('repeats_other', cfg['repeats'])}, bulk: "
        f"{cfg.get('repeats_bulk', cfg['repeats'])}) in which kpr and every baseline were measured one after the "
        "other, in a "
        "different order each round, on a shared and noisy machine; a ratio is the median of the per-round ratios "
        "(kpr against the baseline measured in the same round), which cancels most of the machine's drift. Raw "
        "numbers: "
        "[results.json](results.json). Re-run: `make bench` (full, under 15 minutes) or "
        "`make bench BENCH_ARGS=--quick`.\n",
    ]


def _headline(dp: dict[str, Any], summary: dict[str, Any], cp: dict[str, Any] | None) -> list[str]:
    lines = _headline_datapath(dp, summary)
    if cp and cp["change_ms"]["iptables_full"]:
        lines.append(_headline_change(cp))
    if cp and cp["cold_seconds"]["iptables_restore"]:
        lines.append(_headline_cold(cp))
    return ["## Headline\n", "\n".join(lines) + "\n"]


def _headline_datapath(dp: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    sizes = dp["sizes"]
    big = 10000 if 10000 in sizes else sizes[-1]
    crr = "crr/rate"
    vs_iptables = paired(dp, crr, "kpr", "iptables", big)
    return [
        f"- **Connection rate through a ClusterIP: kpr {ratio_text(vs_iptables)} "
        f"kube-proxy's iptables mode at {size_label(big)} Services** "
        f"({fmt(get(summary, crr, 'kpr', big))} vs {fmt(get(summary, crr, 'iptables', big))} connections/s), "
        f"and {ratio_text(paired(dp, crr, 'kpr', 'direct', big))} the pod IP dialled directly"
        + (
            f"; at {size_label(sizes[-1])} Services {ratio_text(paired(dp, crr, 'kpr', 'iptables', sizes[-1]))} "
            f"iptables and {ratio_text(paired(dp, crr, 'kpr', 'direct', sizes[-1]))} the pod IP."
            if sizes[-1] > big
            else "."
        ),
        "- kpr's rate across "
        + ", ".join(size_label(s) for s in sizes)
        + " Services: "
        + ", ".join(fmt(get(summary, crr, "kpr", s)) for s in sizes)
        + "/s; iptables: "
        + ", ".join(fmt(get(summary, crr, "iptables", s)) for s in sizes)
        + "/s.",
    ]


def _headline_change(cp: dict[str, Any]) -> str:
    ch = cp["change_ms"]
    kpr_ms = median(ch["kpr"])
    text = (
        f"- **One endpoint change at {size_label(cp['services'])} Services: kpr {fmt(kpr_ms)} ms (p50), "
        f"{ratio_text(median(ch['iptables_full']) / kpr_ms)} faster than kube-proxy's full iptables-restore "
        f"({fmt(median(ch['iptables_full']) / 1000)} s)**, "
        f"{ratio_text(median(ch['iptables_partial']) / kpr_ms)} faster than its partial restore"
    )
    if ch["nftables"]:
        text += f", {ratio_text(median(ch['nftables']) / kpr_ms)} faster than its nft transaction"
    return text + "."


def _headline_cold(cp: dict[str, Any]) -> str:
    cold = cp["cold_seconds"]
    text = (
        f"- Cold programming of {size_label(cp['services'])} Services × {cp['endpoints_per_service']} "
        f"endpoints: kpr's agent {fmt(median(cold['kpr_agent_sync']))} s "
        f"({fmt(median(cold['kpr_end_to_end']))} s from the first API request), iptables-restore "
        f"{fmt(median(cold['iptables_restore']))} s"
    )
    if cold["nft"]:
        text += f", nft -f {fmt(median(cold['nft']))} s"
    return text + f"; agent memory {cp['agent_rss_mib_after_cold_sync']} MiB."


def _targets(goals: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    return [
        "## Targets (issue 6)\n",
        table(
            ["target", "measured", "met?"],
            [[g["target"], g["measured"], "yes" if g["met"] else f"**no**: {g['shortfall']}"] for g in goals],
        )
        + "\n",
        misses_text(goals, results) + "\n",
    ]


def _datapath(results: dict[str, Any], dp: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    return [
        "## Datapath\n",
        *_connection_rate(cfg, dp, summary),
        *_latency(dp, summary),
        *_udp_bulk(cfg, dp, summary),
        *_client_check(results["machine"], dp),
    ]


def _connection_rate(cfg: dict[str, Any], dp: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = [
        "![connection rate](connection_rate.png)\n",
        "### New TCP connections per second\n\nA client pod opens connections to the Service's port 80 "
        f"({cfg['crr_concurrency']} in flight, C load generator `bench/loadgen.c`): connect, read the server's "
        'one line, close. The server pod runs the C echo server on the same node. "pod IP, node with …" '
        "dials the server pod's IP on the iptables and kpr nodes: traffic that is not for a Service.\n",
        datapath_table(dp, summary, "crr/rate", "connections/s", variants=[*MAIN, "direct_iptables", "direct_kpr"])
        + "\n",
    ]
    walk = rule_walk_text(dp, summary)
    if walk:
        out.append(walk)
    return out


def _latency(dp: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    return [
        "### Connect + first byte latency, one connection at a time\n",
        "![latency](latency.png)\n",
        datapath_table(dp, summary, "latency/p50", "p50 µs", higher_is_better=False) + "\n",
        datapath_table(dp, summary, "latency/p99", "p99 µs", higher_is_better=False) + "\n",
    ]


def _udp_bulk(cfg: dict[str, Any], dp: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    return [
        "### UDP request/response and bulk TCP\n",
        "![udp and bulk](udp_bulk.png)\n",
        f"UDP: {cfg['udp_concurrency']} connected sockets, each with one request in flight, to the Service's "
        "port 53 (kube-proxy's rule walk happens once per socket, on its first packet; after that conntrack "
        "translates every packet). Bulk: one iperf3 connection through the ClusterIP for "
        f"{cfg['bulk_seconds']} s after a 1 s warm-up.\n",
        datapath_table(dp, summary, "udp/rate", "UDP requests/s") + "\n",
        datapath_table(dp, summary, "bulk/gbit", "Gbit/s") + "\n",
    ]


def _client_check(m: dict[str, Any], dp: dict[str, Any]) -> list[str]:
    c = cpu_check(dp)
    return [
        "### Was the client the bottleneck?\n",
        f"No. In the connection-rate runs the load generator ({c['client_threads']} threads) used a median "
        f"{c['client_cpu_cores_median']:.2f} cores of the {c['client_threads']} its threads could use (at most "
        f"{c['client_cpu_cores_max']:.2f}; that includes the kernel work of its own connects and closes, which "
        "runs in its context), the echo server "
        f"{c['server_cpu_cores_median']:.2f} cores, and the machine as a whole was "
        f"{c['machine_busy_cores_median']:.2f} of {m['cpus']} cores busy (steal "
        f"{c['steal_share_median']:.1%}). Client, server and every packet's kernel work share the same "
        f"{m['cpus']} cores, so each variant's rate is set by what one connection costs the machine, which is "
        "exactly what differs between them. Connection errors over the whole run: "
        f"{c['errors']}; UDP requests resent after 200 ms: {c['udp_lost']}.\n",
    ]


def _controlplane(cp: dict[str, Any], dp: dict[str, Any] | None) -> list[str]:
    return [
        "## Control plane\n",
        "![control plane](controlplane.png)\n",
        *_cold_programming(cp),
        *_endpoint_change(cp),
        *_agent_memory(cp, dp),
    ]


def _cold_programming(cp: dict[str, Any]) -> list[str]:
    cold = cp["cold_seconds"]
    rows = [
        ["kpr: the agent's first sync, objects in memory -> maps (translate, plan, write)",
         fmt(median(cold["kpr_agent_sync"])), str(len(cold["kpr_agent_sync"]))],
        ["kpr: end to end, first API list request -> every Service in the maps (includes the Python test API "
         "server serving 20k objects)", fmt(median(cold["kpr_end_to_end"])), str(len(cold["kpr_end_to_end"]))],
        ["iptables-restore of kube-proxy's ruleset", fmt(median(cold["iptables_restore"])),
         str(len(cold["iptables_restore"]))],
        ["nft -f of kube-proxy's table (one transaction, as kube-proxy writes it)",
         fmt(median(cold["nft"])) if cold["nft"] else "not measured (--quick)", str(len(cold["nft"]))],
    ]  # fmt: skip
    return [
        f"### Cold programming: {cp['services']:,} Services × {cp['endpoints_per_service']} endpoints\n\n"
        + table(["what", "seconds (median)", "runs"], rows)
        + "\n",
    ]


def _endpoint_change(cp: dict[str, Any]) -> list[str]:
    ch = cp["change_ms"]
    rows = [
        ["kpr: EndpointSlice applied to the API server -> the map holds the new endpoint count",
         fmt(median(ch["kpr"])), fmt(percentile(ch["kpr"], 0.99)), str(len(ch["kpr"]))],
        ["kube-proxy iptables, full sync: iptables-restore of the whole ruleset",
         fmt(median(ch["iptables_full"])), fmt(percentile(ch["iptables_full"], 0.99)),
         str(len(ch["iptables_full"]))],
        ["kube-proxy iptables, partial sync (>= 1.27): --noflush restore of KUBE-SERVICES + the changed chains",
         fmt(median(ch["iptables_partial"])), fmt(percentile(ch["iptables_partial"], 0.99)),
         str(len(ch["iptables_partial"]))],
        ["kube-proxy nftables: nft -f of the changed chains",
         fmt(median(ch["nftables"])) if ch["nftables"] else "not measured (--quick)",
         fmt(percentile(ch["nftables"], 0.99)) if ch["nftables"] else "", str(len(ch["nftables"]))],
    ]  # fmt: skip
    return [
        f"### One endpoint change at {cp['services']:,} Services\n\n"
        + table(["what", "p50 ms", "p99 ms", "changes"], rows)
        + "\n",
        f"kpr's figure is end to end (API server -> watch -> agent -> map, polled from outside); kube-proxy's "
        "are only the time of the iptables-restore / nft process it would start, not its own watch and rule "
        "generation, so the comparison favours kube-proxy. Input sizes: full iptables-restore "
        f"{cp['input_bytes'].get('iptables_full_change', 0) / 1e6:.1f} MB, partial "
        f"{cp['input_bytes'].get('iptables_partial_change', 0) / 1e6:.2f} MB, nft change "
        f"{cp['input_bytes'].get('nft_change', 0) / 1e3:.1f} kB.\n",
    ]


def _agent_memory(cp: dict[str, Any], dp: dict[str, Any] | None) -> list[str]:
    out = [
        f"### Agent memory\n\nkpr agent RSS with {cp['services']:,} Services × {cp['endpoints_per_service']} "
        f"endpoints: {cp['agent_rss_mib_after_cold_sync']} MiB after the cold sync, "
        f"{cp['agent_rss_mib_after_changes']} MiB after the changes (target in DESIGN §8: <= 250 MiB).\n"
    ]
    if dp is not None:
        rss = {s: v.get("agent_rss_mib") for s, v in dp["setup"].items()}
        out.append(
            "In the datapath runs (2 endpoints per Service): "
            + ", ".join(f"{size_label(int(s))} Services {v} MiB" for s, v in rss.items())
            + ".\n"
        )
    return out


def _iptables_backends(cp: dict[str, Any]) -> list[str]:
    return [
        "### iptables backends\n\nMeasured in this run, cold `iptables-restore` of kube-proxy's rules "
        "(2 endpoints per Service):\n\n"
        + table(
            ["Services", "iptables-nft-restore (s)", "iptables-legacy-restore (s)"],
            [
                [f"{r['services']:,}", fmt(r["iptables_nft_seconds"]), fmt(r["iptables_legacy_seconds"])]
                for r in cp["iptables_backends"]
            ],
        )
        + "\n"
    ]


# --------------------------------------------------------------------------------------------------------------------
# tables


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def datapath_table(dp: dict[str, Any], summary: dict[str, Any], key: str, unit: str, scale: float = 1.0,
                   higher_is_better: bool = True, variants: Sequence[str] = MAIN) -> str:  # fmt: skip
    sizes = dp["sizes"]
    rows = []
    for v in variants:
        cells = summary[key].get(v)
        if not cells:
            continue
        row = [dp["variants"][v]["label"] + (" → ClusterIP" if dp["variants"][v]["via_cluster_ip"] else "")]
        for s in sizes:
            row.append(fmt(cells[s]["median"] * scale) if s in cells else "not measured")
        rows.append(row)
    for other in ("direct", "iptables", "nftables"):
        if other not in summary[key]:
            continue
        row = [f"**kpr ÷ {dp['variants'][other]['label']}**"]
        for s in sizes:
            r = paired(dp, key, "kpr", other, s, higher_is_better)
            row.append(f"**{ratio_text(r)}**" if not math.isnan(r) else "–")
        rows.append(row)
    return table([f"{unit}, median of the rounds", *[f"{size_label(s)} Services" for s in sizes]], rows)


def rule_walk_text(dp: dict[str, Any], summary: dict[str, Any]) -> str:
    """What kube-proxy's iptables rule walk costs one new connection, from the one-at-a-time latencies."""
    sizes = [s for s in dp["sizes"] if s > 0 and s in summary["latency/p50"].get("iptables", {})]
    if not sizes:
        return ""
    parts = []
    for s in sizes:
        extra = get(summary, "latency/p50", "iptables", s) - get(summary, "latency/p50", "kpr", s)
        parts.append(f"{fmt(extra)} µs at {size_label(s)} Services (about {extra * 1000 / s:.0f} ns per Service)")
    return (
        "What the iptables rules cost: one new connection to the last Service takes, at the median, "
        + ", ".join(parts)
        + " longer through kube-proxy's rules than through kpr (one connection at a time). That is the walk "
        "through `KUBE-SERVICES`, one rule per service port, and the node pays it for every new connection, also "
        'for those that are not for a Service ("pod IP, node with the iptables rules"), while kpr\'s hooks cost '
        "the same at every size.\n"
    )



METHOD = """## How it is measured

**Lab.** Everything runs in network namespaces made by `kpr.lab` (the root namespace gets no rule, route or
interface; the run asserts it). Four lab nodes are identical except for what handles the ClusterIP: each has a
client pod and a server pod on its `cni0` bridge. **kpr**: the real agent (`kpr agent --kubeconfig`), fed by an
in-process API server (`tests/e2e/fake_apiserver.py`) holding the Services and EndpointSlices, attached to the node's
cgroup, so the client pod's `connect()` is translated by the socket program. **iptables**: kube-proxy's ruleset
(`bench/kubeproxy.py`, following kube-proxy v1.31: `KUBE-SERVICES` jumped to from `PREROUTING` and `OUTPUT`, one
`KUBE-SVC-*` chain per service port marking off-cluster sources for masquerade and choosing an endpoint with
`-m statistic --mode random --probability`, one `KUBE-SEP-*` chain per endpoint with `KUBE-MARK-MASQ` and `DNAT`,
`KUBE-POSTROUTING` masquerading marked packets, plus the filter table's `KUBE-FORWARD` etc.), loaded with
`iptables-restore --noflush --counters`. **nftables**: kube-proxy's nftables table (`table ip kube-proxy`, the
`services` chain's `ip daddr . meta l4proto . th dport vmap @service-ips`, per-service chains with
`numgen random mod N vmap`, per-endpoint chains with `dnat`), loaded with `nft -f`. **pod IP**: a node with none of
these; the client dials the server pod's IP (the physical limit).

**The same Services everywhere.** The filler Services are `bench/controlplane.py`'s (ClusterIP 10.96.x.y, port 80,
2 endpoints each in the datapath cases, so kube-proxy has the rule count and kpr the slot count a real cluster would
have); the measured Service (10.100.0.10, ports 80/TCP and 53/UDP to the echo server, 5201/TCP to iperf3, one
endpoint: the node's server pod) is created last, so in kube-proxy's `KUBE-SERVICES` chain its rules come after every
other Service's: a new connection to it walks the whole chain. (kube-proxy writes Services in Go map order, so an
average Service would walk about half; traffic to a pod IP, as in the "pod IP, node with the iptables rules" rows,
walks all of it.) For kpr and nftables the position does not matter: both find the Service with one hash lookup.

**Where the iptables rules act.** In the node's namespace, as kube-proxy installs them: the client pod's packets to
the ClusterIP leave through its default route to the node's `cni0` address, so they are routed by the node and DNATed
in its `PREROUTING` chain; the server's replies are bridged straight back to the client and un-NATed by conntrack
because `br_netfilter` is active in the node namespace (`bridge-nf-call-iptables=1`, as on every kube-proxy node
with a bridge CNI). This was checked: each node's client reaches its own server through the ClusterIP, over TCP and
UDP, before the measurements (`results.json`, `datapath.checks`). It is the fair comparison because it is what a
kube-proxy node does: the rules could have been put in the client pod's own `OUTPUT` chain (which kube-proxy only
does for host-network clients, through the node's `OUTPUT`), which would skip the node's routing step and flatter
iptables. kpr instead translates at `connect()` in the client's cgroup (its agent attaches to the node's cgroup;
the pods' cgroups are under it), so the client's packets carry the pod IP from the start and are bridged directly,
with no conntrack, like the pod-IP baseline.

**Which iptables.** kube-proxy uses whichever iptables backend the node uses. The benchmark uses
`iptables-legacy-restore`: with Debian 12's `iptables-nft` 1.8.9, loading kube-proxy's ruleset takes time that
grows with the square of the Services (table below; 149 s at 10k Services × 2 endpoints when building this
benchmark, so 50k would take hours), while legacy loads 50k in about 25 s. The legacy backend's rule walk costs about
15 ns per Service (see the connection-rate section); the nft backend's was not measured.

**nftables at scale.** kube-proxy writes its whole table in one `nft -f` transaction. On this kernel that is
super-linear: binding each Service's anonymous `numgen` verdict map walks the whole pending transaction
(`__nft_set_trans_bind` was 84 % of the time in a `perf` profile), which is the control-plane number reported above
(and what kubernetes/kubernetes#139328 and #139513 report). For the datapath the table only has to be in place, so
the benchmark loads the same ruleset in transactions of 500 Services, which is linear up to about 10k Services; past
that, creating each anonymous set scans every set in the table, and 50k Services did not load in a reasonable time
(when building this benchmark, 30k took 274 s and the rate kept falling), so nftables is not measured at 50k.

**Load generator.** `bench/loadgen.c`, compiled with gcc at run time: two epoll threads, 32 connections in flight,
latency measured from `connect()` to the end of the server's line; the echo server (same file, two threads on
`SO_REUSEPORT` sockets) answers each connection with one line and closes it first, and the client reads on to that
FIN before closing, so TIME_WAIT stays on the server (a client left with tens of thousands of TIME_WAIT sockets
spends its CPU searching for a free port in `connect()`). The latency case keeps one connection in flight so the
numbers are the path's cost, not queueing. The rows that dial the pod IP on the iptables and kpr nodes use a client
pod of their own: the server cannot tell a DNATed connection from a direct one with the same addresses and ports,
and TIME_WAIT left by one kind would reject the other kind's SYNs.

**Control plane.** kpr: the real agent against the test API server holding 10k Services × 10 endpoints (as
`bench/controlplane.py`), `--min-sync-period 0`; cold = agent started on empty maps (after `kpr cleanup`); a change =
one EndpointSlice re-applied with one endpoint fewer (or back), timed until the Service's entry in the pinned map
shows the new count. kube-proxy: the same Services turned into its iptables-restore input and nft transaction
(`bench/kubeproxy.py`), each timed from fork to exit inside a fresh lab node's namespace. A full sync rewrites every
chain; a partial sync (kube-proxy >= 1.27) still rewrites all of `KUBE-SERVICES` (one rule per service port) and
the changed Service's chains; in large-cluster mode (> 1000 endpoints) kube-proxy leaves per-endpoint comments out and
deletes stale chains only periodically, and so does the benchmark. Changes are spread over the whole Service set and
interleaved between kpr, iptables and nftables.
"""
