"""Text rendering for the CLI: pure functions of plain rows, unit-tested without root."""

from __future__ import annotations

from collections.abc import Sequence

from kpr.datapath.inspect import FrontendRow


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
