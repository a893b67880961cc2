"""Recovery time: seconds from kill -9 of a worker to its job running again, with default settings.

Starts the embedded deployment (uvicorn API + ``python -m worker``, SQLite store and broker,
every reliability setting at its default) in a temp folder. Each run submits a CPU job, waits for
its first checkpoint, SIGKILLs the process group of the worker running it and at once starts a
fresh worker (as a supervisor such as systemd or compose would), then measures:

- running: until ``GET /jobs/{id}`` shows the job ``running`` as attempt 2;
- first row: until the first metric row written by attempt 2 (its own timestamp).

With ``--idle-worker`` a second worker is already idle when the first is killed (a cluster with
spare capacity); no fresh worker is started. Prints each run and the medians.

    .venv/bin/python benchmarks/recovery.py --repeats 5
    .venv/bin/python benchmarks/recovery.py --repeats 5 --idle-worker

The timeline: the lease runs out ``lease_seconds`` after the last heartbeat (so 5-6 s after the
kill with the defaults 6 s and 1 s), a reaper (the API's or a worker's) re-queues and publishes
the job within ``reaper_interval_seconds`` (1 s), a worker polling the SQLite broker sees it
within ~1 s, claims it and spawns the training child, which restores the checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from embedded import REPO, Deployment, free_port

# ~51 steps an epoch of a few ms each, a checkpoint every epoch: it runs far longer than a run.
JOB: dict[str, Any] = {
    "name": "recovery-bench",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 2048, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2000,
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def one_run(dep: Deployment, client: httpx.Client, store: Any, idle_worker: bool) -> dict:
    """Submit, wait for a checkpoint, kill the job's worker, time the recovery."""
    job_id = client.post("/jobs", json=JOB).json()["id"]
    _wait(lambda: client.get(f"/jobs/{job_id}/checkpoints").json(), 120, "a checkpoint")
    owner = client.get(f"/jobs/{job_id}").json()["attempts"][-1]["worker"]
    victim = next(w for w in dep.workers if owner.endswith(f":{w.pid}") and w.poll() is None)

    os.killpg(victim.pid, signal.SIGKILL)
    killed_wall, killed = time.time(), time.monotonic()
    if not idle_worker:
        dep.start_worker()
    victim.wait(10)

    def running_again() -> bool:
        job = client.get(f"/jobs/{job_id}").json()
        return job["attempt"] == 2 and job["status"] == "running"

    _wait(running_again, 60, "attempt 2 to run")
    running = time.monotonic() - killed

    def first_row() -> float | None:
        rows, _ = store.get_metrics(job_id, limit=10_000)
        times = [r.time for r in rows if r.attempt == 2]
        return min(times) if times else None

    row_time = _wait(first_row, 60, "a row of attempt 2")
    client.post(f"/jobs/{job_id}/cancel")
    _wait(lambda: client.get(f"/jobs/{job_id}").json()["status"] == "cancelled", 60, "cancel")
    return {"running": running, "first_row": row_time - killed_wall}


def main() -> int:
    """Start the embedded deployment, time ``--repeats`` recoveries, print each and the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--idle-worker",
        action="store_true",
        help="keep a second worker idle instead of starting a fresh one after the kill",
    )
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from service.settings import Settings
    from service.store import Store

    with tempfile.TemporaryDirectory(prefix="normcore-recovery-") as tmp:
        dep = Deployment(Path(tmp))
        store = Store(dep.env["NORMCORE_DATABASE_URL"])
        store.upgrade()
        token = store.create_token("bench", "bench-recovery")
        runs: list[dict] = []
        try:
            url = dep.start_api(free_port())
            dep.start_worker()
            if args.idle_worker:
                dep.start_worker()
            headers = {"Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                for i in range(args.repeats):
                    if args.idle_worker and sum(w.poll() is None for w in dep.workers) < 2:
                        dep.start_worker()  # back to one busy and one idle worker
                    result = one_run(dep, client, store, args.idle_worker)
                    runs.append(result)
                    print(
                        f"run {i + 1}: running again after {result['running']:.2f} s, "
                        f"first metric row of attempt 2 after {result['first_row']:.2f} s",
                        flush=True,
                    )
        finally:
            dep.stop()
            store.dispose()
    s = Settings(data_dir=Path(tempfile.gettempdir()))
    how = "a second worker already idle" if args.idle_worker else "a fresh worker started at once"
    print(
        f"\nembedded mode, default settings (lease {s.lease_seconds:g} s, heartbeat "
        f"{s.heartbeat_seconds:g} s, reaper every {s.reaper_interval_seconds:g} s), {how}; "
        f"median of {len(runs)}:"
    )
    print(
        f"  kill -> running as attempt 2    {statistics.median(r['running'] for r in runs):6.2f} s"
    )
    print(
        f"  kill -> first row of attempt 2  {statistics.median(r['first_row'] for r in runs):6.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
