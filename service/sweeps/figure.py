"""The report's figure: the metric against the sweep's numeric axis, one line per other value.

The x axis is the first grid axis whose values are all numbers (else the first axis, as
categories); each combination of the other axes' values is one line (its ``gid`` is
``series-<label>``, so an SVG reader can count them), with error bars of the sample standard
deviation over seeds. The x axis is log2 when its values are all powers of two. Rendered with
matplotlib's Agg backend (no display); a rendering is cached per report content and format.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal

FigureFormat = Literal["svg", "png"]
_CACHE_SIZE = 32
_cache: OrderedDict[str, bytes] = OrderedDict()
_lock = threading.Lock()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_power_of_two(value: Any) -> bool:
    """True for a positive integer-valued number that is a power of two (1, 2, 4, ...)."""
    if not _is_number(value) or value <= 0 or float(value) != int(value):
        return False
    n = int(value)
    return n & (n - 1) == 0


def numeric_axis(report: Mapping[str, Any]) -> str | None:
    """The first grid axis whose values are all numbers, or None."""
    for axis in report["axes"]:
        if all(_is_number(v) for v in report["grid"][axis]):
            return axis
    return None


def _label(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)


def series(report: Mapping[str, Any]) -> tuple[str, dict[str, list[tuple[Any, float, float]]]]:
    """(x axis, {line label: [(x, mean, std or 0), ...]}) of the final metric's cell means."""
    x_axis = numeric_axis(report) or report["axes"][0]
    others = [a for a in report["axes"] if a != x_axis]
    lines: dict[str, list[tuple[Any, float, float]]] = {}
    for cell in report["cells"]:
        label = ", ".join(_label(cell["values"][a]) for a in others) or report["metric"]
        points = lines.setdefault(label, [])
        if cell["final_mean"] is not None:
            points.append((cell["values"][x_axis], cell["final_mean"], cell["final_std"] or 0.0))
    return x_axis, lines


def render(report: Mapping[str, Any], fmt: FigureFormat) -> bytes:
    """The figure as SVG or PNG bytes (cached by the report's content). Raises ValueError for
    another format."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"figure format must be svg or png, not {fmt!r}")
    key = hashlib.sha256(
        (fmt + json.dumps(report, sort_keys=True, default=str)).encode()
    ).hexdigest()
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    data = _draw(report, fmt)
    with _lock:
        _cache[key] = data
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return data


def _draw(report: Mapping[str, Any], fmt: FigureFormat) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    x_axis, lines = series(report)
    values = report["grid"][x_axis]
    numeric = all(_is_number(v) for v in values)
    categories = {_label(v): i for i, v in enumerate(values)}
    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    for label, points in lines.items():
        if numeric:
            xs = [float(p[0]) for p in points]
        else:
            xs = [float(categories[_label(p[0])]) for p in points]
        container = ax.errorbar(
            xs,
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
        container.lines[0].set_gid(f"series-{label}")
    if numeric and all(is_power_of_two(v) for v in values):
        ax.set_xscale("log", base=2)
        ax.set_xticks([float(v) for v in values], [str(v) for v in values])
    elif not numeric:
        ax.set_xticks(list(categories.values()), list(categories))
    ax.set_xlabel(x_axis)
    ax.set_ylabel(f"final {report['metric']} (mean ± sd over seeds)")
    title = report["name"] + ("" if report["complete"] else " (partial)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1 or report["axes"][1:]:
        ax.legend(title=", ".join(a for a in report["axes"] if a != x_axis) or None, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    # svg.fonttype none: text stays text (readable, searchable, smaller) instead of glyph paths
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buf, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()
