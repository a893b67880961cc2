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


_FAST_TYPES = frozenset({float, int, type(None)})


def _ranks(column: list[Any]) -> np.ndarray:
    """``_rank`` of every value of ``column`` as float64 (a name's values over a split's rows).

    The common column (every value a float, an int or None) is converted by numpy in one call
    (None -> NaN -> +inf, as ``_rank``); a column with another type (a bool, a string, a missing
    value) goes value by value.
    """
    if set(map(type, column)) <= _FAST_TYPES:
        ranks = np.array(column, dtype=np.float64)
        ranks[~np.isfinite(ranks)] = np.inf
        return ranks
    return np.fromiter(map(_rank, column), np.float64, len(column))


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

    Cost: a few C-level passes over the rows per value name (numpy conversions and sorts);
    a column of floats, ints and None is converted in one numpy call (``_ranks``).
    """
    if max_points < 2:
        raise ValueError("max_points must be at least 2 (a bucket keeps its minimum and maximum)")
    split_of = np.array(splits, dtype=object)
    out: list[tuple[int, set[str] | None]] = []
    for split in sorted(set(splits)):
        idx = np.flatnonzero(split_of == split)
        if idx.size <= max_points:  # no series can be over the budget
            out.extend((i, None) for i in idx.tolist())
            continue
        split_steps = np.array([steps[i] for i in idx.tolist()], dtype=np.int64)
        split_seqs = np.array([seqs[i] for i in idx.tolist()], dtype=np.int64)
        order = np.lexsort((split_seqs, split_steps))
        if not np.array_equal(order, np.arange(order.size)):
            idx = idx[order]
        rows = [values[i] for i in idx.tolist()]
        n, buckets = len(rows), max_points // 2
        columns = {name: [v.get(name, _MISSING) for v in rows] for name in set().union(*rows)}
        counts = {name: n - column.count(_MISSING) for name, column in columns.items()}
        if all(c <= max_points for c in counts.values()):
            out.extend((i, None) for i in idx.tolist())
            continue
        bucket = np.arange(n, dtype=np.int64) * buckets // n
        keep: dict[int, set[str]] = defaultdict(set)  # row index -> value names
        for name, column in columns.items():
            ranks = _ranks(column)
            present = np.flatnonzero(~np.isnan(ranks))  # NaN: no such value or not a number
            if present.size == 0:
                continue
            r, bk = ranks[present], bucket[present]
            # Sorted by (bucket, rank, position): the first of a bucket is its minimum; by
            # (bucket, -rank, position) its maximum; ties go to the earliest row.
            for by_rank in (np.lexsort((present, r, bk)), np.lexsort((present, -r, bk))):
                sorted_bk = bk[by_rank]
                first = by_rank[np.flatnonzero(np.r_[True, sorted_bk[1:] != sorted_bk[:-1]])]
                for row in idx[present[first]].tolist():
                    keep[row].add(name)
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
