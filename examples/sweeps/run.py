"""Run a sweep file and write its report: CSV, JSON, SVG and PNG.

Two ways, the same report (per cell: final and best metric, mean and sample std over seeds):

    # in this process, cell after cell, with the engine (no service needed)
    python examples/sweeps/run.py examples/sweeps/norm-vs-batch-digits.json --out docs/experiments

    # through a running service (POST /sweeps, wait, GET /sweeps/{id}/report)
    python examples/sweeps/run.py FILE --out DIR --url http://127.0.0.1:8000 --token TOKEN

The engine mode sets torch to ``--threads`` threads (default 1: one run per core is the fastest
use of a small machine) and records each run's wall time. A run whose loss diverges is kept as
"failed" (no final value) and said so in the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from service.sweeps.figure import render  # noqa: E402
from service.sweeps.grid import SweepRequest, build_spec, cell_label, run_of  # noqa: E402
from service.sweeps.report import (  # noqa: E402
    STD_NOTE,
    best_of,
    report_csv,
    summarise_cells,
)


def run_engine(request: SweepRequest, threads: int, data_root: str | None) -> dict[str, Any]:
    """Train every run in this process; returns the report dict (same keys as the API's)."""
    import torch

    from normcore.engine.callbacks import Callback, MetricRow, TrainingDiverged
    from normcore.engine.loop import train

    torch.set_num_threads(threads)

    class Rows(Callback):
        def __init__(self) -> None:
            self.series: list[tuple[int, int, float]] = []

        def on_metrics(self, row: MetricRow) -> None:
            value = row.values.get(request.metric)
            if row.split == "val" and value is not None:
                self.series.append((row.step, row.epoch, float(value)))

    cells = request.cells()
    per_cell: list[list[dict[str, Any]]] = [[] for _ in cells]
    for number in range(request.runs):
        run = run_of(request, number)
        spec = build_spec(request, run)
        rows = Rows()
        started = time.perf_counter()
        status = "succeeded"
        with tempfile.TemporaryDirectory() as workdir:
            try:
                train(spec, workdir, rows, data_root=data_root, device="cpu")
            except TrainingDiverged:
                status = "failed"
        seconds = time.perf_counter() - started
        best = best_of(rows.series, request.direction)
        ok = status == "succeeded" and rows.series
        per_cell[run.cell].append(
            {
                "run": number,
                "seed": run.seed,
                "job_id": f"run-{number}",
                "status": status,
                "final": rows.series[-1][2] if ok else None,
                "best": best[0] if ok and best else None,
                "best_epoch": best[1] if ok and best else None,
                "seconds": round(seconds, 1),
            }
        )
        final = per_cell[run.cell][-1]["final"]
        print(
            f"run {number + 1}/{request.runs} [{cell_label(run.values)}, seed {run.seed}]: "
            f"{status}, final {request.metric} {final}, {seconds:.1f} s",
            flush=True,
        )
    out_cells = summarise_cells(cells, per_cell)
    return {
        "name": request.name,
        "metric": request.metric,
        "direction": request.direction,
        "axes": request.axes,
        "grid": request.grid,
        "seeds": request.seeds,
        "std": STD_NOTE,
        "runs": request.runs,
        "finished": request.runs,
        "complete": True,
        "cells": out_cells,
    }


def run_service(body: dict[str, Any], url: str, token: str | None) -> dict[str, Any]:
    """Submit through a running service, wait for every run, return its JSON report."""
    from normcore.client import Client

    with Client(url, token=token) as client:
        sweep = client.submit_sweep(body)
        print(f"sweep {sweep['id']}: {sweep['runs']} runs", flush=True)
        client.wait_sweep(sweep["id"], timeout=None)
        return client.sweep_report(sweep["id"])


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the sweep, write <out>/<name>.{json,csv,svg,png}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="A sweep request (JSON), as POST /sweeps takes.")
    parser.add_argument("--out", type=Path, default=Path("sweep-out"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (engine mode).")
    parser.add_argument("--data-root", default=None, help="For file data sets (engine mode).")
    parser.add_argument("--url", default=None, help="A running service: submit there instead.")
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    body = json.loads(args.file.read_text(encoding="utf-8"))
    request = SweepRequest.model_validate(body)
    started = time.perf_counter()
    if args.url:
        report = run_service(body, args.url, args.token)
    else:
        report = run_engine(request, args.threads, args.data_root)
    report["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": args.threads,
        "wall_s": round(time.perf_counter() - started, 1),
        "mode": "service" if args.url else "engine",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / request.name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".csv").write_text(report_csv(report), encoding="utf-8")
    stem.with_suffix(".svg").write_bytes(render(report, "svg"))
    stem.with_suffix(".png").write_bytes(render(report, "png"))
    print(report_csv(report))
    print(f"wrote {stem}.{{json,csv,svg,png}} in {report['machine']['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
