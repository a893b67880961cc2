"""Time to refuse a spec over the bounds, and the API's memory while it does (issue 17 item 3).

Starts the embedded API (no worker needed) in a temp folder and POSTs specs that must be
refused: split_bn:100000 (a bound on a norm argument) and models at the width/depth limits
(over the server's parameter limit, counted from the spec). For each, prints the status, the
median and worst latency over ``--repeats`` requests on a kept-alive connection, and the API
process's RSS before and after. The acceptance figure is 422 within 100 ms with RSS unchanged.

    .venv/bin/python benchmarks/submit_bounds.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from embedded import REPO, Deployment, free_port

BASE: dict[str, Any] = {
    "name": "bounds",
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "epochs": 1,
}
CASES: dict[str, dict[str, Any]] = {
    "split_bn:100000": {"arch": "lenet", "norm": "split_bn:100000"},
    "convblock w1024 d64": {"arch": "convblock", "width": 1024, "depth": 64},
    "resnet18 w1024 split_bn:16": {"arch": "resnet18", "width": 1024, "norm": "split_bn:16"},
    "vgg11 w1024 gn:32": {"arch": "vgg11", "width": 1024, "norm": "gn:32"},
    "edsr w1024 d64 split_bn:16": {
        "arch": "edsr",
        "width": 1024,
        "depth": 64,
        "norm": "split_bn:16",
    },
}


def _rss(pid: int) -> int:
    """VmRSS of a process in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> None:
    """Start the API, time each refusal, print one row per case."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from service.store import Store

    with tempfile.TemporaryDirectory(prefix="normcore-bounds-") as tmp:
        dep = Deployment(Path(tmp))
        store = Store(dep.env["NORMCORE_DATABASE_URL"])
        store.upgrade()
        token = store.create_token("bench", "bench-bounds", admin=False)
        store.dispose()
        try:
            url = dep.start_api(free_port())
            pid = dep.procs[0].pid
            headers = {"Authorization": f"Bearer {token}"}
            print(f"{'case':<28} {'status':>6} {'median ms':>10} {'max ms':>8} {'RSS MB':>16}")
            with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
                for label, model in CASES.items():
                    spec = {**BASE, "model": model}
                    if model["arch"] == "edsr":
                        spec["data"] = {"dataset": "sr-synthetic", "batch_size": 8}
                    client.post("/jobs", json=spec)  # warm
                    before = _rss(pid)
                    times, codes = [], set()
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        response = client.post("/jobs", json=spec)
                        times.append((time.perf_counter() - start) * 1000)
                        codes.add(response.status_code)
                    after = _rss(pid)
                    print(
                        f"{label:<28} {'/'.join(map(str, sorted(codes))):>6} "
                        f"{statistics.median(times):>10.1f} {max(times):>8.1f} "
                        f"{before / 2**20:>7.1f}->{after / 2**20:<7.1f}"
                    )
        finally:
            dep.stop()


if __name__ == "__main__":
    main()
