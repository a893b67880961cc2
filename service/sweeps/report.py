"""A sweep's report: per cell the final and best metric, mean and standard deviation over seeds.

Per run (one job): ``final`` is the metric in the job's last val row, counted only once the job
succeeded; ``best`` is the largest (direction "max") or smallest ("min") value over its val rows
and ``best_epoch`` the epoch of that row (the first such row on a tie). Per cell, over the runs
that succeeded with a value: ``n``, ``final_mean``/``final_std``, ``best_mean``/``best_std``.
The standard deviation is the sample one, ``sqrt(sum((x - mean)^2) / (n - 1))`` (numpy
``std(ddof=1)``), None when n < 2. Runs still going show their newest value as ``latest``; a
report read while the sweep runs is partial and says so (``complete`` False). A run whose job is
gone (``deleted``, see :func:`service.sweeps.ops.deleted_runs`) counts as ended, with no value.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from service.status import FINISHED_STATUSES, JobStatus
from service.store.sweeps import SweepChild, SweepRecord
from service.sweeps.grid import SweepRequest, cell_label
from service.sweeps.ops import DELETED, deleted_runs

STD_NOTE = "sample standard deviation over seeds (ddof=1); null when n < 2"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation with ddof=1) of ``values``; None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def best_of(series: Sequence[tuple[int, int, float]], direction: str) -> tuple[float, int] | None:
    """(best value, its epoch) over (step, epoch, value) rows; the earliest on a tie."""
    best: tuple[float, int] | None = None
    for _step, epoch, value in series:
        if math.isnan(value):
            continue
        if (
            best is None
            or (direction == "max" and value > best[0])
            or (direction == "min" and value < best[0])
        ):
            best = (value, epoch)
    return best


def summarise_cells(
    cells: Sequence[dict[str, Any]], per_cell: Sequence[Sequence[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """One report entry per cell from its runs (dicts with ``run``, ``final``, ``best`` and
    ``best_epoch``; ``final`` None for a run that did not succeed): final and best metric, mean
    and sample standard deviation over the runs that succeeded, their count ``n``, the epochs of
    the best values, and the runs ordered by run number."""
    out = []
    for index, values in enumerate(cells):
        runs = sorted(per_cell[index], key=lambda r: r["run"] if r["run"] is not None else -1)
        done = [r for r in runs if r["final"] is not None]
        final_mean, final_std = mean_std([r["final"] for r in done])
        best_mean, best_std = mean_std([r["best"] for r in done])
        out.append(
            {
                "cell": index,
                "values": values,
                "label": cell_label(values),
                "n": len(done),
                "final_mean": final_mean,
                "final_std": final_std,
                "best_mean": best_mean,
                "best_std": best_std,
                "best_epochs": [r["best_epoch"] for r in done],
                "runs": runs,
            }
        )
    return out


def build_report(
    sweep: SweepRecord,
    request: SweepRequest,
    children: Sequence[SweepChild],
    series: Mapping[str, Sequence[tuple[int, int, float]]],
) -> dict[str, Any]:
    """The report dict (JSON-ready) of a sweep from its jobs and their metric rows."""
    cells = request.cells()
    per_cell: list[list[dict[str, Any]]] = [[] for _ in cells]
    counts: dict[str, int] = {str(s): 0 for s in JobStatus}
    for child in children:
        job = child.job
        rows = series.get(job.id, ())
        best = best_of(rows, request.direction)
        succeeded = job.status is JobStatus.SUCCEEDED
        counts[str(job.status)] += 1
        run = {
            "run": child.cell.get("run"),
            "seed": child.cell.get("seed"),
            "job_id": job.id,
            "status": str(job.status),
            "final": rows[-1][2] if succeeded and rows else None,
            "best": best[0] if best and succeeded else None,
            "best_epoch": best[1] if best and succeeded else None,
            "latest": rows[-1][2] if rows else None,
            "epochs": rows[-1][1] if rows else 0,
        }
        index = int(child.cell.get("cell", -1))
        if 0 <= index < len(cells):
            per_cell[index].append(run)
    out_cells = summarise_cells(cells, per_cell)
    finished = sum(1 for c in children if c.job.status in FINISHED_STATUSES)
    deleted = deleted_runs(sweep, len(children))
    counts[DELETED] = deleted
    return {
        "sweep_id": sweep.id,
        "name": sweep.name,
        "metric": request.metric,
        "direction": request.direction,
        "axes": request.axes,
        "grid": request.grid,
        "seeds": request.seeds,
        "std": STD_NOTE,
        "runs": sweep.runs,
        "finished": finished,
        "deleted": deleted,
        "complete": finished + deleted >= sweep.runs,
        "status_counts": counts,
        "cells": out_cells,
    }


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, sort_keys=True)
    return value


def report_csv(report: Mapping[str, Any]) -> str:
    """The report as CSV: one row per cell (its axis values, n, means, stds, best epochs, jobs)."""
    axes = list(report["axes"])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "cell",
            *axes,
            "n",
            f"final_{report['metric']}_mean",
            f"final_{report['metric']}_std",
            f"best_{report['metric']}_mean",
            f"best_{report['metric']}_std",
            "best_epochs",
            "job_ids",
        ]
    )
    for cell in report["cells"]:
        writer.writerow(
            [
                cell["cell"],
                *(_csv_value(cell["values"][a]) for a in axes),
                cell["n"],
                _csv_value(cell["final_mean"]),
                _csv_value(cell["final_std"]),
                _csv_value(cell["best_mean"]),
                _csv_value(cell["best_std"]),
                ";".join(str(e) for e in cell["best_epochs"]),
                ";".join(r["job_id"] for r in cell["runs"]),
            ]
        )
    return buf.getvalue()
