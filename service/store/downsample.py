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
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from service.store.records import MetricRecord

_MISSING = object()


def _rank(value: object) -> float:
    """The value's place on the axis: a number, +inf for a non-finite or null value (it must
    stay visible, so it counts as the bucket's maximum), NaN for a missing or non-numeric one
    (not part of the series)."""
    if type(value) is float:
        return value if -math.inf < value < math.inf else math.inf
    if value is None:
        return math.inf
    if value is _MISSING or isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


class SeriesRow(Protocol):
    """What downsampling reads of a metric row."""

    seq: int
    step: int
    split: str
    values: Mapping[str, Any]


def select_extremes(
    rows: Sequence[SeriesRow], max_points: int
) -> list[tuple[int, set[str] | None]]:
    """``select_extremes_columns`` over rows with ``seq``, ``step``, ``split``, ``values``."""
    return select_extremes_columns(
        [r.seq for r in rows],
        [r.step for r in rows],
        [r.split for r in rows],
        [r.values for r in rows],
        max_points,
    )


def select_extremes_columns(
    seqs: Sequence[int],
    steps: Sequence[int],
    splits: Sequence[str],
    values: Sequence[Mapping[str, Any]],
    max_points: int,
) -> list[tuple[int, set[str] | None]]:
    """Which rows to keep: ``(row index, the value names kept, None for all)``; row ``i`` is
    ``(seqs[i], steps[i], splits[i], values[i])``.

    A split whose every series (value name) has at most ``max_points`` points is kept whole.
    Otherwise its rows, ordered by (step, seq), are cut into ``max_points // 2`` buckets of
    equal count and, per value name and bucket, the row of the minimum and the row of the
    maximum are kept (the first one on ties). Raises ValueError for ``max_points < 2``.
    """
    if max_points < 2:
        raise ValueError("max_points must be at least 2 (a bucket keeps its minimum and maximum)")
    by_split: dict[str, list[int]] = defaultdict(list)
    for i, split in enumerate(splits):
        by_split[split].append(i)
    out: list[tuple[int, set[str] | None]] = []
    for indices in by_split.values():
        counts: dict[str, int] = defaultdict(int)
        for i in indices:
            for name in values[i]:
                counts[name] += 1
        if all(c <= max_points for c in counts.values()):
            out.extend((i, None) for i in indices)
            continue
        indices.sort(key=lambda i: (steps[i], seqs[i]))
        n, buckets = len(indices), max_points // 2
        bucket = np.arange(n, dtype=np.int64) * buckets // n
        keep: dict[int, set[str]] = defaultdict(set)  # row index -> value names
        for name in counts:
            ranks = np.fromiter(
                (_rank(values[i].get(name, _MISSING)) for i in indices), np.float64, n
            )
            present = np.flatnonzero(~np.isnan(ranks))  # NaN: no such value or not a number
            if present.size == 0:
                continue
            r, bk = ranks[present], bucket[present]
            # Sorted by (bucket, rank, position): the first of a bucket is its minimum; by
            # (bucket, -rank, position) its maximum; ties go to the earliest row.
            for order in (np.lexsort((present, r, bk)), np.lexsort((present, -r, bk))):
                sorted_bk = bk[order]
                first = order[np.flatnonzero(np.r_[True, sorted_bk[1:] != sorted_bk[:-1]])]
                for pos in present[first].tolist():
                    keep[indices[pos]].add(name)
        out.extend(keep.items())
    return out


def downsample(rows: Sequence[MetricRecord], max_points: int) -> list[MetricRecord]:
    """At most ``max_points`` points per series (split x value name), extremes kept
    (``select_extremes``); a kept row's ``values`` holds only the names it was kept for, so
    every series stays within the budget. Returns rows in seq order. Raises ValueError for
    ``max_points < 2``.
    """
    out = []
    for i, names in select_extremes(rows, max_points):
        row = rows[i]
        if names is not None:
            row = dataclasses.replace(
                row, values={k: v for k, v in row.values.items() if k in names}
            )
        out.append(row)
    out.sort(key=lambda r: r.seq)
    return out
