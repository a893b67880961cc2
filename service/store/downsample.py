"""Downsampling of a job's metric rows for plotting: each bucket keeps its extremes.

Min/max decimation (the "M4"-style reduction used by plotting tools): the rows of one split are
cut into equal-count buckets along the step axis, and for every value name each bucket keeps the
row holding its minimum and the row holding its maximum, so a one-step spike survives any
amount of reduction (a mean or a stride would lose it).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

from service.store.records import MetricRecord


def _rank(value: object) -> float | None:
    """The value's place on the axis: a number, +inf for a non-finite or null value (it must
    stay visible, so it counts as the bucket's maximum), None for a non-numeric value."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else math.inf


def downsample(rows: Sequence[MetricRecord], max_points: int) -> list[MetricRecord]:
    """At most ``max_points`` points per series (split x value name), extremes kept.

    ``rows``: a job's live metric rows (any order). A split whose every series has at most
    ``max_points`` points is returned whole. Otherwise its rows (ordered by step, then seq) are cut
    into ``max_points // 2`` buckets of equal count and, per value name and bucket, the row of
    the minimum and the row of the maximum are kept (the first one on ties). A kept row's
    ``values`` holds only the names it was kept for, so every series stays within the budget.
    Returns rows in seq order. Raises ValueError for ``max_points < 2``.
    """
    if max_points < 2:
        raise ValueError("max_points must be at least 2 (a bucket keeps its minimum and maximum)")
    by_split: dict[str, list[MetricRecord]] = defaultdict(list)
    for row in rows:
        by_split[row.split].append(row)
    out: list[MetricRecord] = []
    for split_rows in by_split.values():
        counts: dict[str, int] = defaultdict(int)
        for row in split_rows:
            for name in row.values:
                counts[name] += 1
        if all(c <= max_points for c in counts.values()):
            out.extend(split_rows)
            continue
        split_rows.sort(key=lambda r: (r.step, r.seq))
        n, buckets = len(split_rows), max_points // 2
        # One pass: per (name, bucket) the (rank, index) of the minimum and of the maximum.
        lows: dict[tuple[str, int], tuple[float, int]] = {}
        highs: dict[tuple[str, int], tuple[float, int]] = {}
        for i, row in enumerate(split_rows):
            b = i * buckets // n
            for name, value in row.values.items():
                r = _rank(value)
                if r is None:
                    continue
                key = (name, b)
                low = lows.get(key)
                if low is None or r < low[0]:
                    lows[key] = (r, i)
                high = highs.get(key)
                if high is None or r > high[0]:
                    highs[key] = (r, i)
        keep: dict[int, set[str]] = defaultdict(set)  # index in split_rows -> value names
        for picks in (lows, highs):
            for (name, _), (_, i) in picks.items():
                keep[i].add(name)
        for i, names in keep.items():
            row = split_rows[i]
            out.append(
                dataclasses.replace(row, values={k: v for k, v in row.values.items() if k in names})
            )
    out.sort(key=lambda r: r.seq)
    return out
