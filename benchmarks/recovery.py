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
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deployment:
    """The embedded deployment's processes, each in its own process group, logs in the data dir."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.env = {
            **os.environ,
            "NORMCORE_DATA_DIR": str(data),
            "NORMCORE_DATABASE_URL": f"sqlite:///{data / 'normcore.db'}",
            "NORMCORE_BROKER_URL": f"sqla+sqlite:///{data / 'broker.db'}",
            "NORMCORE_ARTIFACT_DIR": str(data / "artifacts"),
            "NORMCORE_DATA_ROOT": str(data / "datasets"),
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _start(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.data / log, "ab") as out:
            proc = subprocess.Popen(
                args,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def start_api(self, port: int) -> str:
        """Start uvicorn on ``port`` and wait for /healthz."""
        api = self._start(
            [sys.executable, "-m", "uvicorn", "service.api.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
            "api.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and api.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return url
            time.sleep(0.2)
        raise RuntimeError("the API did not start:\n" + (self.data / "api.log").read_text()[-3000:])

    def start_worker(self) -> subprocess.Popen[bytes]:
        """``python -m worker`` with its default queues, as ``normcore serve`` starts it."""
        worker = self._start([sys.executable, "-m", "worker"], f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """SIGTERM every process group we started, then SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)


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
            url = dep.start_api(_free_port())
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
