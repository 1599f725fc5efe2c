# ruff: noqa: RUF001 (the plots use typographic signs: multiplication sign, division sign)
"""The report's PNG plots: connection rate, latency, UDP and bulk, control plane (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report_stats import MAIN, fmt, median, paired, percentile, size_label

COLORS = {
    "kpr": "#1b9e77",
    "iptables": "#d95f02",
    "nftables": "#7570b3",
    "direct": "#444444",
    "direct_iptables": "#e6ab02",
    "direct_kpr": "#66a61e",
}
STYLE = {"direct": "--", "direct_iptables": ":", "direct_kpr": ":"}


def _positions(sizes: Sequence[int]) -> list[int]:
    return list(range(len(sizes)))


def plot_connection_rate(dp: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    sizes = dp["sizes"]
    labels = dp["variants"]
    xs = _positions(sizes)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.15, 1]})
    order = ("direct", "kpr", "direct_kpr", "nftables", "direct_iptables", "iptables")
    for v in order:
        cells = summary["crr/rate"].get(v, {})
        pts = [(x, cells[s]) for x, s in zip(xs, sizes, strict=True) if s in cells]
        if not pts:
            continue
        lo = [(p[1]["median"] - p[1]["min"]) / 1000 for p in pts]
        hi = [(p[1]["max"] - p[1]["median"]) / 1000 for p in pts]
        ax.errorbar(
            [p[0] for p in pts],
            [p[1]["median"] / 1000 for p in pts],
            yerr=[lo, hi],
            label=labels[v]["label"] + (" (ClusterIP)" if labels[v]["via_cluster_ip"] else ""),
            color=COLORS[v],
            linestyle=STYLE.get(v, "-"),
            marker="o",
            linewidth=2.5 if v == "kpr" else 1.6,
            capsize=3,
        )
        if v == "direct":
            continue
        ratios = [(x, paired(dp, "crr/rate", v, "direct", s)) for x, s in zip(xs, sizes, strict=True) if s in cells]
        ax2.plot(
            [r[0] for r in ratios],
            [r[1] for r in ratios],
            color=COLORS[v],
            linestyle=STYLE.get(v, "-"),
            marker="o",
            linewidth=2.5 if v == "kpr" else 1.6,
        )
        last = ratios[-1]
        ax2.annotate(f"{last[1]:.2f}", (last[0], last[1]), textcoords="offset points", xytext=(6, -3), fontsize=8)
    for a in (ax, ax2):
        a.set_xticks(xs, [size_label(s) for s in sizes])
        a.set_xlabel("Services on the node (the measured one is created last)")
        a.grid(axis="y", alpha=0.3)
        a.set_ylim(bottom=0)
    ax.set_ylabel("new TCP connections per second (thousands)")
    ax.set_title("Connections per second from a pod (median, min-max)")
    ax.legend(fontsize=8, loc="lower left")
    ax2.axhline(1.0, color=COLORS["direct"], linestyle="--", linewidth=1)
    ax2.axhline(0.95, color="#999999", linestyle=":", linewidth=1)
    ax2.text(xs[0] + 0.05, 0.935, "target for kpr: 0.95", fontsize=8, color="#777777", va="top")
    ax2.set_ylim(0, 1.25)
    ax2.set_ylabel("rate ÷ the pod IP's rate in the same round (median)")
    ax2.set_title("Relative to dialling the pod IP: kpr stays at 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _grouped_bars(ax: Any, summary_key: str, summary: dict[str, Any], dp: dict[str, Any], scale: float = 1.0) -> None:
    sizes = dp["sizes"]
    variants = [v for v in MAIN if summary[summary_key].get(v)]
    width = 0.8 / len(variants)
    for k, v in enumerate(variants):
        cells = summary[summary_key][v]
        xs = [i + (k - (len(variants) - 1) / 2) * width for i, s in enumerate(sizes) if s in cells]
        ys = [cells[s]["median"] * scale for s in sizes if s in cells]
        lo = [(cells[s]["median"] - cells[s]["min"]) * scale for s in sizes if s in cells]
        hi = [(cells[s]["max"] - cells[s]["median"]) * scale for s in sizes if s in cells]
        label = dp["variants"][v]["label"]
        ax.bar(xs, ys, width, yerr=[lo, hi], label=label, color=COLORS[v], capsize=2)
    ax.set_xticks(range(len(sizes)), [size_label(s) for s in sizes])
    ax.set_xlabel("Services on the node")
    ax.grid(axis="y", alpha=0.3)


def plot_latency(dp: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, title in ((axes[0], "latency/p50", "p50"), (axes[1], "latency/p99", "p99")):
        _grouped_bars(ax, key, summary, dp)
        ax.set_yscale("log")
        ax.set_ylim(bottom=10)
        ax.set_title(f"connect + first byte, {title} (one connection at a time)")
        ax.set_ylabel("microseconds (log scale)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_udp_bulk(dp: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _grouped_bars(axes[0], "udp/rate", summary, dp, scale=1 / 1000)
    axes[0].set_ylabel("thousands of request/response pairs per second")
    axes[0].set_title("UDP request/response rate")
    axes[0].legend(fontsize=8, loc="lower left")
    _grouped_bars(axes[1], "bulk/gbit", summary, dp)
    axes[1].set_ylabel("Gbit/s")
    axes[1].set_title("Bulk TCP throughput, one connection (iperf3)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_controlplane(cp: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    cold = cp["cold_seconds"]
    rows = [
        ("kpr: agent's first sync\n(objects in memory -> maps)", cold["kpr_agent_sync"], COLORS["kpr"]),
        ("kpr: end to end\n(first API list -> maps)", cold["kpr_end_to_end"], "#66c2a5"),
        ("iptables-restore\n(kube-proxy ruleset)", cold["iptables_restore"], COLORS["iptables"]),
        ("nft -f\n(kube-proxy table)", cold["nft"], COLORS["nftables"]),
    ]
    title = f"Cold programming, {size_label(cp['services'])} Services × {cp['endpoints_per_service']} endpoints"
    _median_bars(axes[0], rows, "s", "seconds", title)
    ch = cp["change_ms"]
    rows = [
        ("kpr (API event -> map), p50", [median(ch["kpr"])], COLORS["kpr"]),
        ("kpr, p99", [percentile(ch["kpr"], 0.99)], "#66c2a5"),
        ("nft -f of the changed chains", ch["nftables"], COLORS["nftables"]),
        ("iptables-restore --noflush,\npartial (kube-proxy >= 1.27)", ch["iptables_partial"], "#fc8d62"),
        ("iptables-restore,\nfull ruleset", ch["iptables_full"], COLORS["iptables"]),
    ]
    _median_bars(axes[1], rows, "ms", "milliseconds", f"One endpoint change at {size_label(cp['services'])} Services")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _median_bars(ax: Any, rows: list[tuple[str, list[float], str]], unit: str, units: str, title: str) -> None:
    """Horizontal bars on a log scale, one a (label, values, colour) row with values, each at its values' median."""
    rows = [r for r in rows if r[1]]
    ax.set_xscale("log")
    ax.barh(range(len(rows)), [median(r[1]) for r in rows], color=[r[2] for r in rows])
    for y, r in enumerate(rows):
        ax.text(median(r[1]), y, f"  {fmt(median(r[1]))} {unit}", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"{units} (log scale)")
    ax.set_title(title)
    ax.set_xlim(min(median(r[1]) for r in rows) / 4, max(median(r[1]) for r in rows) * 8)
