"""Turns docs/benchmarks/results.json into docs/benchmarks/README.md and PNG plots.

    python bench/report.py [results.json] [output dir]     (bench/run.py calls it at the end)

Every number is a median over the rounds of one run (kpr and its baselines measured side by side, interleaved);
ratios are ratios of those medians. The numbers: bench/report_stats.py; the targets and the note on missed ones:
bench/report_targets.py; the plots: bench/report_plots.py; the Markdown, one function a section:
bench/report_markdown.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report_markdown import markdown  # noqa: E402
from bench.report_plots import plot_connection_rate, plot_controlplane, plot_latency, plot_udp_bulk  # noqa: E402
from bench.report_stats import summarize  # noqa: E402
from bench.report_targets import targets  # noqa: E402

OUT_DIR = ROOT / "docs" / "benchmarks"


def write(results: dict[str, Any], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    dp = results.get("datapath")
    summary = summarize(dp) if dp else None
    goals = targets(results, summary)
    by_size = (
        {k: {v: {str(s): c for s, c in cells.items()} for v, cells in t.items()} for k, t in summary.items()}
        if summary
        else None
    )
    results["summary"] = {
        "datapath": by_size,
        "targets": goals,
    }
    if dp and summary:
        plot_connection_rate(dp, summary, out_dir / "connection_rate.png")
        plot_latency(dp, summary, out_dir / "latency.png")
        plot_udp_bulk(dp, summary, out_dir / "udp_bulk.png")
    if results.get("controlplane"):
        plot_controlplane(results["controlplane"], out_dir / "controlplane.png")
    (out_dir / "README.md").write_text(markdown(results, summary, goals))
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"report written to {out_dir / 'README.md'}")


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR / "results.json"
    out_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else path.parent
    results = json.loads(path.read_text())
    write(results, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
