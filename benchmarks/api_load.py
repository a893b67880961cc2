"""Load on the embedded API: followers polling ``GET /jobs/{id}/metrics?after=`` with a token.

The load generator runs in its own process(es), never in the server's: ``wrk`` (one thread,
``--clients`` connections, a Lua script that follows ``next`` as ``Client.iter_metrics`` does)
when it is on PATH, else ``--procs`` Python processes sharing ``--clients`` httpx connections.
Two scenarios on the embedded deployment (uvicorn API as a subprocess, SQLite store):

1. no job: the API alone, polling a finished job that has 200 rows;
2. a job training: a worker trains a resnet20 job at the default thread count while the
   API is polled. Each repeat has three windows: quiet (no polls), paced (``--job-rate``
   polls/s in all, 300 by default: the issue's goal rate) and as fast as the API answers. The
   job's own ``samples_per_s`` (its train rows) in the paced window is compared with the quiet
   one; the fast window gives the API's throughput and latency beside a training job.

wrk corrects its percentiles for coordinated omission: a request that stalls for ``d`` also
counts the requests a steady client would have sent meanwhile (about ``d`` / the mean interval
per connection), so one 200 ms stall of the server weighs like dozens of slow answers.

Every window starts 16 followers at ``after=0`` (long first pages, then small ones): the
catch-up burst is part of what is measured. The API is settled first: a spec check waits for
the torch import its start leaves to a thread.

Prints requests/s, p50 and p99 latency of each run and the medians, with the load average.

    .venv/bin/python benchmarks/api_load.py --clients 16 --seconds 20 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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

WRK_SCRIPT = """
after = 0
wrk.headers["Authorization"] = "Bearer %(token)s"
request = function()
  return wrk.format("GET", "/jobs/%(job)s/metrics?after=" .. after)
end
%(delay)s
response = function(status, headers, body)
  local n = body:match('"next":(%%d+)')
  if n then
    n = tonumber(n)
    if n > after then after = n end
  end
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    """A wrk duration ("812.00us", "1.20ms", "2.01s") in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if m is None:
        raise ValueError(f"unexpected wrk duration {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _pause_s(clients: int, rate: float | None) -> float:
    """Seconds each connection waits between an answer and its next request for about ``rate``
    req/s in all (0: as fast as the server answers). A request's own time adds to the pause,
    so the pause is 10% short of ``clients / rate``; the run reports the rate it reached."""
    return 0.9 * clients / rate if rate else 0.0


def run_wrk(
    url: str, token: str, job_id: str, clients: int, seconds: float, rate: float | None = None
) -> dict[str, Any]:
    """One wrk run (1 thread, ``clients`` connections, paced to about ``rate`` req/s when
    given); requests/s, p50/p99 in ms, errors."""
    pause_ms = 1000 * _pause_s(clients, rate)
    delay = f"delay = function() return {pause_ms:.0f} end" if pause_ms else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT % {"token": token, "job": job_id, "delay": delay})
        script = fh.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(seconds))}s", "--latency",
             "--timeout", "10s", "-s", script, url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        os.unlink(script)
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\S+)\s*$", out, re.M))
    if "99" not in pct:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "errors": (int(non2xx.group(1)) if non2xx else 0)
        + (sum(int(x) for x in sock.groups()) if sock else 0),
    }


async def _poller(
    client: httpx.AsyncClient, job_id: str, deadline: float, latencies: list[float], pause: float
) -> int:
    """Follow the job's rows with ?after until the deadline, ``pause`` seconds between an answer
    and the next request; return the errors seen."""
    after, errors = 0, 0
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        response = await client.get(f"/jobs/{job_id}/metrics", params={"after": after})
        latencies.append(time.perf_counter() - start)
        if pause:
            await asyncio.sleep(pause)
        if response.status_code != 200:
            errors += 1
            continue
        after = response.json()["next"]
    return errors


async def _load(
    url: str, token: str, job_id: str, clients: int, seconds: float, pause: float
) -> tuple:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=30
    ) as client:
        started = time.perf_counter()
        errors = await asyncio.gather(
            *(_poller(client, job_id, started + seconds, latencies, pause) for _ in range(clients))
        )
        return latencies, time.perf_counter() - started, sum(errors)


def _load_process(args: tuple[str, str, str, int, float, float]) -> tuple:
    return asyncio.run(_load(*args))


def run_procs(
    url: str,
    token: str,
    job_id: str,
    clients: int,
    seconds: float,
    procs: int,
    rate: float | None = None,
) -> dict[str, Any]:
    """``procs`` client processes sharing ``clients`` connections; same figures as run_wrk."""
    share = [clients // procs + (i < clients % procs) for i in range(procs)]
    pause = _pause_s(clients, rate)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs) as pool:
        jobs = [(url, token, job_id, n, seconds, pause) for n in share if n]
        parts = pool.map(_load_process, jobs)
    latencies = sorted(x for lat, _, _ in parts for x in lat)
    elapsed = max(e for _, e, _ in parts)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "errors": sum(e for _, _, e in parts),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _samples_per_s(store: Any, job_id: str, t0: float, t1: float) -> float | None:
    """The job's training speed between t0 and t1 (unix seconds), from its own train rows:
    batch size x steps done / time between the first and the last row of the window."""
    rows, after = [], 0
    while True:
        page, nxt = store.get_metrics(job_id, after=after, limit=10_000)
        rows += page
        if len(page) < 10_000:
            break
        after = nxt
    window = sorted((r.time, r.step) for r in rows if r.split == "train" and t0 <= r.time <= t1)
    if len(window) < 2 or window[-1][0] <= window[0][0]:
        return None
    steps = window[-1][1] - window[0][1]
    return JOB["data"]["batch_size"] * steps / (window[-1][0] - window[0][0])  # type: ignore[index]


def _fmt(rate: float | None) -> str:
    return "n/a (under 2 train rows in the window)" if rate is None else f"{rate:.0f}"


def _report(title: str, runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("rps", "p50_ms", "p99_ms", "cpu_ms")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    print(
        f"{title}: medians of {len(runs)} runs: {med['rps']:.0f} req/s, "
        f"p50 {med['p50_ms']:.1f} ms, p99 {med['p99_ms']:.1f} ms, "
        f"server CPU {med['cpu_ms']:.2f} ms/request "
        f"(errors {sum(r['errors'] for r in runs)})"
    )
    return med


def main() -> int:
    """Start the embedded server, run both scenarios, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2, help="client processes without wrk")
    parser.add_argument("--no-wrk", action="store_true", help="use Python client processes")
    parser.add_argument("--skip-job", action="store_true", help="only the 'no job' scenario")
    parser.add_argument(
        "--job-rate",
        type=float,
        default=300.0,
        help="polls/s in all during the paced window beside the training job",
    )
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from service.store import Store

    use_wrk = shutil.which("wrk") is not None and not args.no_wrk
    generator = "wrk -t1" if use_wrk else f"{args.procs} httpx client processes"

    def load(url: str, token: str, job_id: str, rate: float | None = None) -> dict[str, Any]:
        # The server's CPU time per request hardly depends on what else the machine runs:
        # 1 / cpu_ms is what one quiet core could serve.
        api_pid = dep.procs[0].pid
        cpu0 = cpu_seconds(api_pid)
        if use_wrk:
            result = run_wrk(url, token, job_id, args.clients, args.seconds, rate)
        else:
            result = run_procs(url, token, job_id, args.clients, args.seconds, args.procs, rate)
        result["cpu_ms"] = 1000 * (cpu_seconds(api_pid) - cpu0) / max(1, result["requests"])
        return result

    def show(i: int, r: dict[str, Any]) -> None:
        print(
            f"  run {i + 1}: {r['requests']} requests, {r['rps']:.0f} req/s, "
            f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, "
            f"server CPU {r['cpu_ms']:.2f} ms/request, "
            f"load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )

    print(
        f"{args.clients} connections from {generator}, {args.seconds:.0f} s runs, "
        f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="normcore-load-") as tmp:
        dep = Deployment(Path(tmp))
        store = Store(dep.env["NORMCORE_DATABASE_URL"])
        store.upgrade()
        token = store.create_token("bench", "bench-load", admin=False)
        user = store.get_user("bench")
        assert user is not None
        idle, _ = store.create_job(owner_id=user.id, spec=JOB, name="idle", queue="none")
        attempt = store.claim_job(idle.id, worker_id="bench", lease_seconds=60)
        assert attempt is not None
        store.add_metrics(
            idle.id,
            attempt=attempt,
            rows=[{"step": s, "split": "train", "values": {"loss": 1 / s}} for s in range(1, 201)],
        )
        store.finish_job(idle.id, attempt=attempt, status="succeeded")
        try:
            url = dep.start_api(free_port())
            # The API imports torch (for spec checks) on a thread once it answers; a spec
            # check waits for that import, so the windows below measure a settled server.
            warm = httpx.post(
                f"{url}/jobs/validate",
                json=JOB,
                headers={"Authorization": f"Bearer {token}"},
                timeout=180,
            )
            warm.raise_for_status()
            print("no job (API alone, a finished job's 200 rows then caught up):")
            idle_runs = []
            for i in range(args.repeats):
                idle_runs.append(load(url, token, idle.id))
                show(i, idle_runs[-1])
            _report("no job", idle_runs)
            if args.skip_job:
                return 0

            dep.start_worker()
            headers = {"Authorization": f"Bearer {token}"}
            job = httpx.post(f"{url}/jobs", json=JOB, headers=headers, timeout=30).json()
            deadline = time.monotonic() + 180
            while not store.get_metrics(job["id"], limit=1)[0]:
                if time.monotonic() > deadline:
                    print("no train row:", (dep.data / "worker0.log").read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            print(
                "a resnet20 job training (default thread count); per repeat a quiet window, "
                f"one paced at {args.job_rate:.0f} polls/s, one as fast as the API answers:"
            )
            paced_runs, busy_runs, quiet, loaded = [], [], [], []
            for i in range(args.repeats):
                t0 = time.time()
                time.sleep(args.seconds)
                t1 = time.time()
                paced_runs.append(load(url, token, job["id"], args.job_rate))
                t2 = time.time()
                show(i, paced_runs[-1])
                busy_runs.append(load(url, token, job["id"]))
                show(i, busy_runs[-1])
                time.sleep(3)  # the worker writes rows in batches: let the window's rows land
                quiet.append(_samples_per_s(store, job["id"], t0, t1))
                loaded.append(_samples_per_s(store, job["id"], t1, t2))
                print(
                    f"    job samples/s: quiet {_fmt(quiet[-1])}, "
                    f"under {args.job_rate:.0f} polls/s {_fmt(loaded[-1])}"
                )
            status = store.get_job(job["id"]).status  # type: ignore[union-attr]
            httpx.post(f"{url}/jobs/{job['id']}/cancel", headers=headers, timeout=30)
            _report(f"a job training, paced (status {status})", paced_runs)
            _report(f"a job training, as fast as answered (status {status})", busy_runs)
            if all(x is None for x in quiet) or all(x is None for x in loaded):
                print("job samples/s: too few train rows per window; use a longer --seconds")
                return 0
            q = statistics.median(x for x in quiet if x is not None)
            ld = statistics.median(x for x in loaded if x is not None)
            print(
                f"job samples/s: quiet {q:.0f}, under {args.job_rate:.0f} polls/s {ld:.0f} "
                f"({100 * (ld - q) / q:+.0f}%), load average now {os.getloadavg()[0]:.1f}"
            )
        finally:
            store.dispose()
            dep.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
