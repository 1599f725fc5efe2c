# ruff: noqa: RUF001 (numbers are shown with typographic signs: multiplication sign, en dash)
"""The numbers of a benchmark report, drawn from results.json, and how a number is written.

results.json's "datapath" part holds one record a measurement ({test, variant, size, round, ...}); everything here
reduces those to medians over rounds, and to ratios paired by round (kpr against a baseline measured in the same
round). The "controlplane" part is lists of seconds or milliseconds, read directly by the sections that show them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

MAIN = ("kpr", "iptables", "nftables", "direct")  # the variants every datapath table and plot shows


def size_label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{x:,.{decimals}f}"


def ratio_text(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "–"
    return f"{x:.2f}×" if x < 10 else f"{x:,.0f}×"


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


# --------------------------------------------------------------------------------------------------------------------
# summaries


def metric(run: dict[str, Any], name: str) -> float:
    if name == "p50":
        return float(run["latency_us"]["p50"])
    if name == "p99":
        return float(run["latency_us"]["p99"])
    if name == "gbit":
        return float(run["gbit_per_second"])
    return float(run["rate"])


def summarize(dp: dict[str, Any]) -> dict[str, Any]:
    """{test/metric: {variant: {size: {median, min, max, n}}}}."""
    wanted = {"crr": ["rate"], "latency": ["p50", "p99"], "udp": ["rate"], "bulk": ["gbit"]}
    out: dict[str, Any] = {}
    for test, names in wanted.items():
        for name in names:
            table: dict[str, dict[int, dict[str, float]]] = {}
            for run in dp["runs"]:
                if run["test"] != test:
                    continue
                cell = table.setdefault(run["variant"], {}).setdefault(run["size"], {"values": []})  # type: ignore[dict-item]
                cell["values"].append(metric(run, name))  # type: ignore[attr-defined]
            for cells in table.values():
                for size, cell in cells.items():
                    values = cell.pop("values")  # type: ignore[arg-type]
                    cells[size] = {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}
            out[f"{test}/{name}"] = table
    return out


def per_round(dp: dict[str, Any], test: str, a: str, b: str, size: int) -> list[float]:
    """a's rate divided by b's, round by round."""
    by_round: dict[int, dict[str, float]] = {}
    for run in dp["runs"]:
        if run["test"] == test and run["size"] == size and run["variant"] in (a, b):
            by_round.setdefault(run["round"], {})[run["variant"]] = float(run["rate"])
    return [x[a] / x[b] for x in by_round.values() if a in x and b in x and x[b] > 0]


def paired(dp: dict[str, Any], key: str, a: str, b: str, size: int, higher_is_better: bool = True) -> float:
    """Median over the rounds of a's value divided by b's in the same round (b's by a's when lower is better):
    pairing by round removes most of the drift of a shared machine, which moves every variant alike."""
    test, name = key.split("/")
    by_round: dict[int, dict[str, float]] = {}
    for run in dp["runs"]:
        if run["test"] == test and run["size"] == size and run["variant"] in (a, b):
            by_round.setdefault(run["round"], {})[run["variant"]] = metric(run, name)
    ratios = [
        (x[a] / x[b]) if higher_is_better else (x[b] / x[a])
        for x in by_round.values()
        if a in x and b in x and x[a] > 0 and x[b] > 0
    ]
    return median(ratios)


def get(summary: dict[str, Any], key: str, variant: str, size: int) -> float:
    cell = summary.get(key, {}).get(variant, {}).get(size)
    return float(cell["median"]) if cell else float("nan")


def cpu_check(dp: dict[str, Any]) -> dict[str, Any]:
    """Client and server CPU during the connection-rate runs, and how busy the whole machine was."""
    runs = [r for r in dp["runs"] if r["test"] == "crr" and r["variant"] in MAIN]
    threads = max((r.get("threads", 1) for r in runs), default=1)
    return {
        "client_threads": threads,
        "client_cpu_cores_median": median([r["client_cpu_cores"] for r in runs]),
        "client_cpu_cores_max": max((r["client_cpu_cores"] for r in runs), default=float("nan")),
        "server_cpu_cores_median": median([r["server_cpu_cores"] for r in runs]),
        "machine_busy_cores_median": median([r["machine_busy_cores"] for r in runs]),
        "steal_share_median": median([r["machine_steal_share"] for r in runs]),
        "errors": sum(r.get("errors", 0) for r in dp["runs"] if r["test"] in ("crr", "latency")),
        "udp_lost": sum(r.get("lost", 0) for r in dp["runs"] if r["test"] == "udp"),
    }
