"""Print a sweep report (the JSON that run.py writes, or GET /sweeps/{id}/report) as a Markdown
table: rows are the first axis's values, columns the second's, each cell the final metric's
mean ± sample sd over seeds (n), for docs/experiments.md.

    python examples/sweeps/table.py docs/experiments/norm-vs-batch-digits.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def fmt(cell: dict[str, Any]) -> str:
    """'0.9749 ± 0.0035 (3)', or the mean alone for one seed, or '-' without a value."""
    if cell["final_mean"] is None:
        return "-"
    text = f"{cell['final_mean']:.4f}"
    if cell["final_std"] is not None:
        text += f" ± {cell['final_std']:.4f}"
    return f"{text} ({cell['n']})"


def table(report: dict[str, Any]) -> str:
    """The Markdown table of a report with one or two axes."""
    axes = report["axes"]
    rows_axis = axes[0]
    cols_axis = axes[1] if len(axes) > 1 else None
    cols = report["grid"][cols_axis] if cols_axis else [None]
    head = f"| {rows_axis} | " + " | ".join(
        f"{cols_axis}={c}" if cols_axis else f"final {report['metric']}" for c in cols
    )
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for value in report["grid"][rows_axis]:
        cells = []
        for c in cols:
            match = [
                x
                for x in report["cells"]
                if x["values"][rows_axis] == value
                and (cols_axis is None or x["values"][cols_axis] == c)
            ]
            cells.append(fmt(match[0]) if match else "")
        lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(table(json.loads(Path(name).read_text(encoding="utf-8"))))
