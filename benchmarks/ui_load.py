"""How long a long job's page takes to get its data: 100,000 metric rows, ``?max_points``.

Writes a job with ``--rows`` train rows (and a val row every 1,000 steps) into a fresh SQLite
store, starts the real API (uvicorn, as tests/harness.py does) and times, over ``--repeat``
runs, what the dashboard's job page fetches when it opens: ``GET /jobs/{id}`` and
``GET /jobs/{id}/metrics?max_points=N`` (N = 2000, as service/ui/static/job.js asks), the two
in parallel as the page does, plus the page's static files. For comparison it also times
reading every row in pages of 10,000 (what a client without ``max_points`` must do).

    .venv/bin/python benchmarks/ui_load.py --rows 100000 --repeat 5

The goal (issue 13): the page's data arrives in under 1 s with ``max_points``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import make_env, start_api

ASSETS = [
    "/ui/jobs/{id}",
    "/ui/static/app.css",
    "/ui/static/vendor/uplot/uPlot.min.css",
    "/ui/static/vendor/uplot/uPlot.iife.min.js",
    "/ui/static/common.js",
    "/ui/static/charts.js",
    "/ui/static/normstats.js",
    "/ui/static/job.js",
]


def seed(data_dir: Path, rows: int) -> tuple[str, str, object]:
    """A store with alice's job of ``rows`` train rows; returns (token, job id, env)."""
    env = make_env(data_dir)
    store = env.store()
    token = store.create_token("alice", "bench")
    alice = store.get_user("alice")
    assert alice is not None
    job, _ = store.create_job(owner_id=alice.id, spec={}, name="long", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="bench", lease_seconds=3600)
    batch: list[dict] = []
    for step in range(1, rows + 1):
        batch.append({"step": step, "split": "train", "values": {"loss": 1.0 / step, "lr": 0.1}})
        if step % 1000 == 0:
            batch.append(
                {
                    "step": step,
                    "split": "val",
                    "values": {"train_loss": 1.0, "val_loss": 1.0, "val_accuracy": 0.5},
                }
            )
        if len(batch) >= 10_000:
            store.add_metrics(job.id, attempt=attempt, rows=batch)
            batch = []
    if batch:
        store.add_metrics(job.id, attempt=attempt, rows=batch)
    store.dispose()
    return token, job.id, env


def main() -> None:
    """Seed, start the API, time the page's requests and print a summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-points", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        token, job_id, env = seed(Path(tmp), args.rows)
        print(f"seeded {args.rows} rows in {time.perf_counter() - t0:.1f} s")
        api, url = start_api(env)  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
                pool = concurrent.futures.ThreadPoolExecutor(4)
                data_s, asset_s, full_s, sizes = [], [], [], []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    futs = [
                        pool.submit(c.get, f"/jobs/{job_id}"),
                        pool.submit(
                            c.get, f"/jobs/{job_id}/metrics", params={"max_points": args.max_points}
                        ),
                    ]
                    answers = [f.result() for f in futs]
                    data_s.append(time.perf_counter() - t)
                    assert all(a.status_code == 200 for a in answers)
                    sizes.append(len(answers[1].content))
                    items = len(answers[1].json()["items"])
                    t = time.perf_counter()
                    total = sum(len(c.get(a.format(id=job_id)).content) for a in ASSETS)
                    asset_s.append(time.perf_counter() - t)
                    t, after = time.perf_counter(), 0
                    while True:
                        page = c.get(
                            f"/jobs/{job_id}/metrics", params={"after": after, "limit": 10_000}
                        ).json()
                        if not page["items"]:
                            break
                        after = page["next"]
                    full_s.append(time.perf_counter() - t)
        finally:
            api.stop()
    load = os.getloadavg()[0]
    print(f"rows {args.rows}, max_points {args.max_points}: {items} rows, {sizes[-1]} bytes")
    print(
        f"page data (job + metrics?max_points, parallel): median {statistics.median(data_s):.3f} s,"
        f" max {max(data_s):.3f} s  (goal < 1 s); in order: {', '.join(f'{d:.3f}' for d in data_s)}"
    )
    print(f"job page static files: {total / 1024:.0f} KiB, {statistics.median(asset_s):.3f} s")
    print(f"every row in pages of 10,000 (no max_points): median {statistics.median(full_s):.3f} s")
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
