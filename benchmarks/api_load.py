"""Load on the embedded server: N clients poll /metrics of a running job for a fixed time.

Starts the embedded deployment (uvicorn API + one worker, SQLite store and broker) in a temp
folder, submits a job that trains for longer than the run, then N concurrent clients each follow
the job's metric rows with ?after (as `Client.iter_metrics` does, without sleeping) for
`--seconds`. Prints requests/s and p50/p99 latency, medians over `--repeats` runs.

    .venv/bin/python benchmarks/api_load.py --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from embedded import REPO, Deployment, free_port

JOB = {
    "name": "api-load",
    "model": {"arch": "resnet20", "norm": "bn", "num_classes": 4},
    "data": {"dataset": "synthetic", "num_samples": 2048, "image_size": 16, "batch_size": 32},
    "optim": {"lr": 0.05},
    "epochs": 200,
    "checkpoint": {"every_epochs": 50, "keep_last": 1},
}


async def _poller(
    client: httpx.AsyncClient, job_id: str, deadline: float, latencies: list[float]
) -> int:
    """Follow the job's rows with ?after until the deadline; return the rows seen."""
    after, rows = 0, 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        response = await client.get(f"/jobs/{job_id}/metrics", params={"after": after})
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()
        page = response.json()
        rows += len(page["items"])
        after = page["next"]
    return rows


async def _run_load(url: str, token: str, job_id: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30
    ) as client:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        rows = await asyncio.gather(
            *(_poller(client, job_id, deadline, latencies) for _ in range(clients))
        )
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "rows_per_client": statistics.median(rows),
    }


def main() -> int:
    """Start the embedded server, run the load `--repeats` times, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from service.store import Store

    with tempfile.TemporaryDirectory(prefix="normcore-load-") as tmp:
        dep = Deployment(Path(tmp))
        store = Store(dep.env["NORMCORE_DATABASE_URL"])
        store.upgrade()
        token = store.create_token("bench", "bench-load", admin=False)
        store.dispose()
        try:
            url = dep.start_api(free_port())
            dep.start_worker()
            headers = {"Authorization": f"Bearer {token}"}
            job = httpx.post(f"{url}/jobs", json=JOB, headers=headers, timeout=30).json()
            deadline = time.monotonic() + 120
            while httpx.get(f"{url}/jobs/{job['id']}", headers=headers).json()["status"] != (
                "running"
            ):
                if time.monotonic() > deadline:
                    print("job never started:", (dep.data / "worker0.log").read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            runs = []
            for i in range(args.repeats):
                result = asyncio.run(_run_load(url, token, job["id"], args.clients, args.seconds))
                runs.append(result)
                print(
                    f"run {i + 1}: {result['requests']} requests, {result['rps']:.0f} req/s, "
                    f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms"
                )
            status = httpx.get(f"{url}/jobs/{job['id']}", headers=headers).json()["status"]
            httpx.post(f"{url}/jobs/{job['id']}/cancel", headers=headers)
        finally:
            dep.stop()
    print(
        f"\nembedded server, {args.clients} clients polling /metrics?after of a running job "
        f"(status during the run: {status}), {args.seconds:.0f} s x {args.repeats}, medians:"
    )
    print(f"  requests/s   {statistics.median(r['rps'] for r in runs):8.0f}")
    print(f"  p50 latency  {statistics.median(r['p50_ms'] for r in runs):8.1f} ms")
    print(f"  p99 latency  {statistics.median(r['p99_ms'] for r in runs):8.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
