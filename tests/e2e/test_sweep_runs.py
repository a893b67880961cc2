"""Sweeps through the real API and a real worker (embedded mode): fairness against another
user's single job, cancel, and the 3 x 3 x 2-seed acceptance sweep submitted with the CLI, whose
report must equal the statistics of the children's own final metric rows."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import Stack, make_env, running_stack, wait_for

BASE: dict[str, Any] = {
    "model": {"arch": "convblock", "norm": "bn", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 16, "num_samples": 128, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "epochs": 1,
    "resources": {"device": "cpu"},
    "checkpoint": {"precise_bn_batches": 0},
}
SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = make_env(
        tmp_path_factory.mktemp("sweeps-e2e") / "nc",
        mode="sqlite",
        NORMCORE_MAX_ACTIVE_JOBS_PER_USER="100",
        NORMCORE_REAPER_INTERVAL_SECONDS="0.3",
        NORMCORE_TRAIN_THREADS="1",
    )
    with running_stack(env, workers=0) as running:
        yield running


def _ensure_workers(stack: Stack, n: int) -> None:
    while sum(w.alive() for w in stack.workers) < n:
        stack.add_worker(name=f"worker{len(stack.workers)}")


def test_a_sweep_does_not_hold_another_users_job_and_cancel_stops_it(stack: Stack) -> None:
    bob = stack.client(stack.token_for("bob"))
    ann = stack.client()
    body = {
        "name": "big",
        "base": BASE,
        "grid": {"optim.lr": [0.01 * (i + 1) for i in range(15)]},
        "seeds": [0, 1],
        "concurrency": 30,
    }
    r = bob.post("/sweeps", json=body)
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["runs"] == 30 and sweep["counts"]["queued"] == 30
    r = ann.post("/jobs", json={**BASE, "name": "single"})
    assert r.status_code == 201
    single = r.json()["id"]
    _ensure_workers(stack, 1)  # one worker: everything queued before it started

    job = wait_for(
        lambda: (j := ann.get(f"/jobs/{single}").json())["status"] == "succeeded" and j,
        timeout=180,
        interval=0.5,
        what="ann's single job",
    )
    ann_start = datetime.fromisoformat(job["started_at"])
    bob_starts = []
    for cell in bob.get(f"/sweeps/{sweep['id']}").json()["cells"]:
        for child in cell["jobs"]:
            started = bob.get(f"/jobs/{child['job_id']}").json()["started_at"]
            if started:
                bob_starts.append(datetime.fromisoformat(started))
    # fair order: bob's oldest job first, then ann's, never behind all 30
    assert sum(s < ann_start for s in bob_starts) <= 1, (ann_start, sorted(bob_starts))

    done = bob.post(f"/sweeps/{sweep['id']}/cancel").json()
    assert done["cancel_requested"]
    final = wait_for(
        lambda: (s := bob.get(f"/sweeps/{sweep['id']}").json())["status"] == "cancelled" and s,
        timeout=120,
        what="the sweep's children to stop",
    )
    assert final["counts"]["queued"] == final["counts"]["running"] == 0
    # every run not finished when the cancel came is cancelled; on a fast machine a few more
    # than ann's job and bob's first run may have succeeded by then
    assert final["counts"]["cancelled"] + final["counts"]["succeeded"] == 30, final["counts"]
    assert final["counts"]["cancelled"] >= 20, final["counts"]
    bob.close()
    ann.close()


def _final_values(client: httpx.Client, job_id: str, metric: str) -> list[float]:
    rows = client.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    return [r["values"][metric] for r in rows if r["split"] == "val"]


def test_acceptance_sweep_through_cli_api_and_worker(stack: Stack, tmp_path: Path) -> None:
    _ensure_workers(stack, 2)
    body = {
        "name": "accept",
        "base": BASE,
        "grid": {"model.norm": ["bn", "gn:4", "none"], "data.batch_size": [8, 16, 32]},
        "seeds": [0, 1],
        "concurrency": 4,
        "lr_rule": {"rule": "linear", "reference_batch": 16},
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(body))
    env = {**os.environ, "COLUMNS": "200", "NORMCORE_DATA_DIR": str(stack.env.data_dir)}
    cli = [sys.executable, "-m", "service.cli", "sweep", str(path), "--wait"]
    cli += ["--url", stack.url, "--token", stack.token]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "sweep" in out.stdout and "succeeded" in out.stdout
    for norm in ("bn", "gn:4", "none"):
        assert norm in out.stdout  # the table's rows

    c = stack.client()
    sweep = c.get("/sweeps").json()["items"][0]
    assert sweep["name"] == "accept" and sweep["status"] == "succeeded"
    assert sweep["counts"]["succeeded"] == 18
    report = c.get(f"/sweeps/{sweep['id']}/report").json()
    assert report["complete"] and len(report["cells"]) == 9
    for cell in report["cells"]:
        assert cell["n"] == 2
        series = [_final_values(c, r["job_id"], "val_accuracy") for r in cell["runs"]]
        finals = np.array([s[-1] for s in series], dtype=np.float64)
        assert cell["final_mean"] == pytest.approx(finals.mean(), rel=1e-12, abs=1e-15)
        assert cell["final_std"] == pytest.approx(finals.std(ddof=1), rel=1e-9, abs=1e-15)
        job = c.get(f"/jobs/{cell['runs'][0]['job_id']}").json()
        batch = cell["values"]["data.batch_size"]
        assert job["spec"]["optim"]["lr"] == pytest.approx(0.05 * batch / 16)
    rows = list(csv.DictReader(io.StringIO(c.get(f"/sweeps/{sweep['id']}/report?format=csv").text)))
    assert len(rows) == 9
    report_cli = [sys.executable, "-m", "service.cli", "sweep", "report", sweep["id"]]
    report_cli += ["--format", "csv", "--url", stack.url, "--token", stack.token]
    out = subprocess.run(report_cli, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert list(csv.DictReader(io.StringIO(out.stdout))) == rows
    svg = c.get(f"/sweeps/{sweep['id']}/report?format=svg").content
    root = ET.fromstring(svg)
    lines = {g.get("id") for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith("series-")}
    assert lines == {"series-bn", "series-gn:4", "series-none"}
    c.close()


def test_a_killed_worker_loses_no_cell(stack: Stack) -> None:
    _ensure_workers(stack, 2)  # the other worker takes the job over once its lease expires
    base = {**BASE, "data": {**BASE["data"], "num_samples": 1024}, "epochs": 3}
    body = {"name": "kill", "base": base, "grid": {"model.norm": ["bn", "gn:4"]}, "concurrency": 2}
    c = stack.client()
    r = c.post("/sweeps", json=body)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    ids = [j["job_id"] for cell in r.json()["cells"] for j in cell["jobs"]]

    def checkpointed_and_running() -> str | None:
        for job_id in ids:
            job = c.get(f"/jobs/{job_id}").json()
            if job["status"] == "running" and job["checkpoints"]:
                return job_id
        return None

    victim_job = wait_for(checkpointed_and_running, timeout=180, interval=0.1, what="a checkpoint")
    owner = c.get(f"/jobs/{victim_job}").json()["attempts"][-1]["worker"]  # host:pid
    group = os.getpgid(int(owner.rsplit(":", 1)[1]))  # each worker runs in a session of its own
    victim = next(w for w in stack.workers if w.alive() and w.pid == group)
    victim.kill_group(signal.SIGKILL)
    victim.popen.wait(10)
    done = wait_for(
        lambda: (s := c.get(f"/sweeps/{sid}").json())["status"] in ("succeeded", "failed") and s,
        timeout=240,
        interval=0.5,
        what="the sweep to end after the kill",
    )
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 2
    job = c.get(f"/jobs/{victim_job}").json()
    assert job["attempt"] >= 2 and len(job["checkpoints"]) >= 1
    report = c.get(f"/sweeps/{sid}/report").json()
    assert [cell["n"] for cell in report["cells"]] == [1, 1]
    c.close()
