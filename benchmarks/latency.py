"""Latency where the user waits: POST -> running -> first metric row -> succeeded, embedded mode.

Starts ``bash scripts/serve.sh`` (the embedded service exactly as a user starts it: API + one
worker under ``normcore serve``, SQLite store and broker, every setting at its default) in a temp
data folder, timing start -> ``/healthz`` answers (the venv already built: a warm start; a start
after ``pyproject.toml`` changed installs first and is not one). Then:

- one warm-up job (not counted: the worker's fork server may still be importing torch);
- ``--jobs`` jobs of ``examples/lenet-digits.json``, one after the other, each polled every
  50 ms by the client: POST -> ``running``, -> first metric row, -> ``succeeded``;
- ``--resnet-jobs`` jobs of ``examples/resnet20-gn-synthetic.yaml``, each cancelled once its
  first row is seen (only the time to it is measured).

Each job's phases come from its own record: created -> claimed (``started_at``), claim -> the
training process's "attempt N started" line (its own seconds since the claim), -> "training
started" (the engine's setup: data, model), -> the first row's own timestamp.

``--alone`` also runs the lenet spec with ``normcore.train`` in a process of its own at each
thread count from 1 to the number of usable CPUs, nothing else of ours running, and compares
its best training time (train start to train end) with the embedded jobs' (the same span, from
their "training started"/"training ended" lines).

    .venv/bin/python benchmarks/latency.py --jobs 5 --resnet-jobs 3 --alone --serve-starts 3

The acceptance goals of issue 12 are printed beside the numbers, with the load average.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from embedded import REPO, free_port

LENET = json.loads((REPO / "examples" / "lenet-digits.json").read_text())
RESNET = yaml.safe_load((REPO / "examples" / "resnet20-gn-synthetic.yaml").read_text())
POLL_S = 0.05
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")


def _ts(value: Any) -> float:
    """Unix seconds from a JSON time: a float, or an ISO 8601 string (UTC when naive)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).replace("Z", "+00:00")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        from datetime import UTC

        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class Served:
    """``bash scripts/serve.sh`` in its own process group, its output in a file."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NORMCORE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.log = data.parent / f"{data.name}.log"
        t0 = time.monotonic()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["bash", "scripts/serve.sh", "--port", str(self.port), "--data-dir", str(data)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = t0 + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("serve.sh exited:\n" + self.log.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        else:
            raise RuntimeError("no /healthz in 180 s:\n" + self.log.read_text()[-3000:])
        self.healthz_s = time.monotonic() - t0

    def token(self) -> str:
        """The admin token serve wrote (it may land a moment after /healthz answers)."""
        path = self.data / "admin.token"
        for _ in range(100):
            if path.exists() and path.read_text().strip():
                return path.read_text().strip()
            time.sleep(0.05)
        raise RuntimeError("no admin token")

    def stop(self) -> None:
        """SIGTERM serve (worker, then API), SIGKILL what is left after 60 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def run_job(client: httpx.Client, spec: dict[str, Any], key: str, *, cancel: bool) -> dict:
    """Submit ``spec``, poll until it ends (or cancel at its first row); times in seconds."""
    t_post = time.time()
    r = client.post("/jobs", json=spec, headers={"Idempotency-Key": key})
    r.raise_for_status()
    job_id = r.json()["id"]
    seen: dict[str, float] = {}
    status = "queued"
    while status not in FINISHED:
        status = client.get(f"/jobs/{job_id}").json()["status"]
        now = time.time()
        if status != "queued":
            seen.setdefault("running", now)
        if ("first_row" not in seen and status == "running") or status in FINISHED:
            rows = client.get(f"/jobs/{job_id}/metrics", params={"after": 0}).json()["items"]
            if rows and "first_row" not in seen:
                seen["first_row"] = now
                if cancel:
                    client.post(f"/jobs/{job_id}/cancel")
        time.sleep(POLL_S)
    seen["done"] = time.time()
    job = client.get(f"/jobs/{job_id}").json()
    logs = client.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
    rows = client.get(f"/jobs/{job_id}/metrics", params={"after": 0}).json()["items"]
    return {
        "id": job_id,
        "status": job["status"],
        "post_to_running": seen.get("running", seen["done"]) - t_post,
        "post_to_first_row": seen["first_row"] - t_post if "first_row" in seen else None,
        "post_to_done": seen["done"] - t_post,
        **phases(job, logs, rows),
    }


def _line(logs: list[dict], pattern: str) -> tuple[float, re.Match[str]] | None:
    for entry in logs:
        m = re.search(pattern, entry["message"])
        if m:
            return _ts(entry["time"]), m
    return None


def phases(job: dict, logs: list[dict], rows: list[dict]) -> dict[str, Any]:
    """The split by phase from the job's own timestamps and log lines (None where missing)."""
    out: dict[str, Any] = {}
    created, claimed = _ts(job["created_at"]), job.get("started_at")
    claimed = _ts(claimed) if claimed else None
    out["queued"] = claimed - created if claimed else None
    started = _line(logs, r"attempt \d+ started on worker .* ([\d.]+) s after the claim, (\S+)")
    out["claim_to_attempt"] = float(started[1].group(1)) if started else None
    out["warm"] = bool(started and started[1].group(2) == "forked")
    training = _line(logs, r"training started \(attempt")
    ended = _line(logs, r"training ended")
    threads = _line(logs, r"torch threads (\d+)")
    out["threads"] = int(threads[1].group(1)) if threads else None
    out["claim_to_training"] = training[0] - claimed if training and claimed else None
    out["attempt_to_training"] = (
        training[0] - started[0] if training and started else None
    )  # store time of both lines: the setup of data and model
    first = rows[0]["time"] if rows else None
    out["training_to_first_row"] = _ts(first) - training[0] if first and training else None
    out["training_s"] = ended[0] - training[0] if ended and training else None
    return out


ALONE = """
import json, sys, time, tempfile
import torch, normcore
from normcore.engine import Callback
torch.set_num_threads(int(sys.argv[1]))
marks = {}
class Timer(Callback):
    def on_train_start(self, info): marks["start"] = time.perf_counter()
    def on_train_end(self, result): marks["end"] = time.perf_counter()
spec = json.loads(sys.argv[2])
with tempfile.TemporaryDirectory() as workdir:
    normcore.train(spec, workdir, callbacks=[Timer()])
print(json.dumps({"threads": torch.get_num_threads(), "training_s": marks["end"] - marks["start"]}))
"""


def alone(spec: dict[str, Any], repeats: int) -> dict[int, float]:
    """Best training time of ``spec`` in a process of its own at each thread count."""
    cpus = len(os.sched_getaffinity(0))
    best: dict[int, float] = {}
    for threads in range(1, cpus + 1):
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-c", ALONE, str(threads), json.dumps(spec)],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            value = json.loads(out.stdout.strip().splitlines()[-1])["training_s"]
            best[threads] = min(best.get(threads, float("inf")), value)
    return best


def med(values: list[Any]) -> float | None:
    """Median of the values that are not None."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    """Run the benchmark; print each job, the medians and the acceptance goals."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=5, help="lenet/digits jobs (default 5)")
    parser.add_argument("--resnet-jobs", type=int, default=3, help="resnet20 jobs (default 3)")
    parser.add_argument("--serve-starts", type=int, default=1, help="extra timed serve starts")
    parser.add_argument("--alone", action="store_true", help="also time normcore.train alone")
    parser.add_argument("--alone-repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args()

    report: dict[str, Any] = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="normcore-latency-") as tmp:
        starts = []
        for i in range(args.serve_starts):
            s = Served(Path(tmp) / f"start{i}")
            starts.append(s.healthz_s)
            s.stop()
        served = Served(Path(tmp) / "data")
        starts.append(served.healthz_s)
        report["serve_to_healthz"] = starts
        print("serve.sh -> /healthz: " + ", ".join(f"{s:.2f} s" for s in starts))
        try:
            headers = {"Authorization": f"Bearer {served.token()}"}
            with httpx.Client(base_url=served.url, headers=headers, timeout=30) as client:
                warm = run_job(client, LENET, "warmup", cancel=False)
                print(
                    f"warm-up job (not counted): POST -> first row {fmt(warm['post_to_first_row'])} s"
                )
                lenet = [
                    run_job(client, LENET, f"lenet-{i}", cancel=False) for i in range(args.jobs)
                ]
                resnet = [
                    run_job(client, RESNET, f"resnet-{i}", cancel=True)
                    for i in range(args.resnet_jobs)
                ]
        finally:
            served.stop()
    report.update(warmup=warm, lenet=lenet, resnet=resnet)

    cols = [
        ("post_to_running", "POST->running"),
        ("post_to_first_row", "POST->row"),
        ("post_to_done", "POST->done"),
        ("queued", "queued"),
        ("claim_to_attempt", "claim->attempt"),
        ("attempt_to_training", "attempt->training"),
        ("claim_to_training", "claim->training"),
        ("training_to_first_row", "training->row"),
        ("training_s", "training"),
    ]
    for name, jobs in (("lenet/digits", lenet), ("resnet20 (cancelled at its first row)", resnet)):
        if not jobs:
            continue
        print(f"\n{name}, seconds ({len(jobs)} jobs; warm: {sum(j['warm'] for j in jobs)}, "
              f"threads: {sorted({j['threads'] for j in jobs})})")  # fmt: skip
        print("  ".join(f"{label:>17}" for _, label in cols))
        for job in jobs:
            print("  ".join(f"{fmt(job[key]):>17}" for key, _ in cols))
        print("  ".join(f"{fmt(med([j[key] for j in jobs])):>17}" for key, _ in cols) + "  median")

    best = None
    if args.alone:
        times = alone(LENET, args.alone_repeats)
        report["alone"] = times
        best_threads = min(times, key=times.__getitem__)
        best = times[best_threads]
        print("\nnormcore.train alone, lenet/digits training time by thread count: "
              + ", ".join(f"{t}: {s:.2f} s" for t, s in times.items()))  # fmt: skip

    report["load_after"] = os.getloadavg()
    row_med = med([j["post_to_first_row"] for j in lenet])
    claim_med = med([j["claim_to_training"] for j in lenet])
    resnet_med = med([j["post_to_first_row"] for j in resnet])
    train_med = med([j["training_s"] for j in lenet])
    goals = [
        ("POST -> first row, lenet median <= 3 s", row_med, row_med is not None and row_med <= 3),
        ("claim -> training started <= 1 s", claim_med, claim_med is not None and claim_med <= 1),
        ("resnet20 POST -> first row <= 3 s", resnet_med, resnet_med is not None and resnet_med <= 3),
        ("warm serve.sh -> /healthz <= 5 s", max(starts), max(starts) <= 5),
    ]  # fmt: skip
    if best is not None and train_med is not None:
        ratio = train_med / best
        goals.append(("embedded lenet training <= 1.3x alone at best threads", ratio, ratio <= 1.3))
    print(f"\nload average before {report['load_before']}, after {report['load_after']}; "
          f"{len(os.sched_getaffinity(0))} CPUs")  # fmt: skip
    for text, value, ok in goals:
        print(f"{'met ' if ok else 'MISS'}  {text}: {fmt(value)}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
