"""Faults become clear job errors and a live worker, against the real embedded deployment.

One worker, its training processes limited to 2 GiB of address space
(``train_memory_limit_bytes``), takes in turn: a job whose first forward pass needs 16 GiB (a real
CPU out-of-memory error, not a fake), a job whose loss turns NaN, a job reading a truncated
``.npz``, and a good job. Each failure names its cause and the same worker process runs the next
job. Then a checkpoint is corrupted while its worker is dead: the next attempt says so in the log,
falls back to the checkpoint before it and succeeds.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import ServiceEnv, Stack, make_env, running_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-faults")]

FINISHED = ("succeeded", "failed", "cancelled")
BASE: dict[str, Any] = {
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2,
}
# 64 images of 256x256 through 1024 channels: the first activation alone is 16 GiB.
OUT_OF_MEMORY: dict[str, Any] = {
    **BASE,
    "name": "oom",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 1024, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 64, "num_samples": 80, "image_size": 256},
    "epochs": 1,
}
# EDSR at lr 10 without clipping: the loss is NaN within a handful of steps.
DIVERGING: dict[str, Any] = {
    "name": "nan",
    "model": {"arch": "edsr", "width": 4, "depth": 1, "scale": 2},
    "data": {"dataset": "sr-synthetic", "batch_size": 16, "num_samples": 64, "image_size": 8},
    "optim": {"name": "sgd", "lr": 10.0, "momentum": 0.9, "weight_decay": 0.0},
    "resources": {"device": "cpu"},
    "epochs": 3,
}
CORRUPT_DATA: dict[str, Any] = {
    **BASE,
    "name": "bad-npz",
    "data": {"dataset": "npz", "path": "sets/bad.npz", "batch_size": 16},
}
LONG: dict[str, Any] = {
    **BASE,
    "name": "long",
    "data": {**BASE["data"], "num_samples": 2048},
    "epochs": 12,  # the kill comes after epoch 2's checkpoint: 10 epochs to spare
}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> ServiceEnv:
    env = make_env(
        tmp_path_factory.mktemp("faults") / "nc",
        NORMCORE_TRAIN_MEMORY_LIMIT_BYTES=str(2 * 2**30),
        NORMCORE_TRAIN_THREADS="1",
        # No memory budget at submit: the out-of-memory job must reach the worker, as one whose
        # estimate was wrong would.
        NORMCORE_JOB_MEMORY_BUDGET_BYTES="0",
    )
    (env.data_root / "sets").mkdir(parents=True)
    (env.data_root / "sets" / "bad.npz").write_bytes(NPZ)
    return env


@pytest.fixture(scope="module")
def stack(env: ServiceEnv) -> Iterator[Stack]:
    """One deployment for the module: the faults run on its first worker, which the corrupt
    checkpoint test then kills (so that test comes last) and replaces."""
    with running_stack(env, workers=1) as running:
        yield running


def _npz() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), y=np.arange(64) % 4)
    return buf.getvalue()


NPZ = _npz()


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def logs(client: httpx.Client, job_id: str) -> str:
    items = client.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
    return "\n".join(item["message"] for item in items)


def test_faults_fail_their_job_and_the_worker_takes_the_next(env: ServiceEnv, stack: Stack) -> None:
    with stack.client() as c:
        ids = {}
        for body in (OUT_OF_MEMORY, DIVERGING, CORRUPT_DATA, {**BASE, "name": "good"}):
            r = c.post("/jobs", json=body)
            assert r.status_code == 201, r.text
            ids[body["name"]] = r.json()["id"]
        # The .npz is cut in half after its job was accepted (its zip directory is gone), so the
        # worker meets it; a spec naming it now is refused at submit.
        (env.data_root / "sets" / "bad.npz").write_bytes(NPZ[: len(NPZ) // 2])
        refused = c.post("/jobs", json={**CORRUPT_DATA, "name": "bad-npz-again"})
        assert refused.status_code == 422, refused.text
        assert "sets/bad.npz" in refused.text and str(env.data_root) not in refused.text
        wait_for(
            lambda: all(job(c, i)["status"] in FINISHED for i in ids.values()),
            timeout=240,
            interval=0.25,
            what="the four jobs",
        )
        done = {name: job(c, job_id) for name, job_id in ids.items()}
        worker = stack.workers[0]
        assert worker.alive(), worker.log()[-3000:]

        oom = done["oom"]
        assert oom["status"] == "failed", oom
        assert re.fullmatch(
            r"out of memory at step 1 \(tried to allocate \d+\.\d\d GiB\): "
            r"lower data\.batch_size or model width",
            oom["error"],
        ), oom["error"]
        assert "address space limited to 2.00 GiB" in logs(c, ids["oom"])

        nan = done["nan"]
        assert nan["status"] == "failed"
        assert re.match(r"training diverged: loss is nan at step \d+", nan["error"]), nan["error"]

        bad = done["bad-npz"]
        assert bad["status"] == "failed"
        assert bad["error"].startswith("sets/bad.npz: cannot read the .npz"), bad["error"]
        assert str(env.data_root) not in bad["error"]
        for failed in (oom, nan, bad):
            assert "Traceback" not in failed["error"] and failed["attempt"] == 1

        assert done["good"]["status"] == "succeeded"
        # One worker process ran all four, one after the other.
        assert {d["attempts"][0]["worker"] for d in done.values()} == {
            done["good"]["attempts"][0]["worker"]
        }


def test_corrupt_checkpoint_at_resume_falls_back_to_the_one_before(
    env: ServiceEnv, stack: Stack
) -> None:
    with stack.client() as c:
        r = c.post("/jobs", json=LONG)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(
            lambda: len(c.get(f"/jobs/{job_id}/checkpoints").json()) >= 2,
            timeout=120,
            interval=0.05,
            what="two checkpoints",
        )
        # The machine dies: the worker and its training child, so nothing writes after this.
        child = int(re.search(r"\(pid (\d+)\)", logs(c, job_id)).group(1))
        stack.workers[0].kill_group(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child, signal.SIGKILL)
        stack.workers[0].popen.wait(10)

        folders = sorted((env.artifact_dir / "jobs" / job_id / "checkpoints").glob("epoch-*"))
        newest, before = folders[-1], folders[-2]
        model = newest / "model.safetensors"
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped bit pattern in the tensor data
        model.write_bytes(bytes(data))

        stack.add_worker(name="worker-after")
        wait_for(lambda: job(c, job_id)["status"] in FINISHED, timeout=180, what="the job")
        done = job(c, job_id)
        assert done["status"] == "succeeded" and done["attempt"] == 2, done
        text = logs(c, job_id)
        assert f"skipping corrupt checkpoint {newest.name}, falling back to an older one" in text
        epoch = int(before.name.split("-")[1])
        assert f"resuming attempt 2 from checkpoint {before.name} at epoch {epoch}" in text
        rows = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        keys = [(r["split"], r["step"]) for r in rows]
        assert len(keys) == len(set(keys))
        assert sorted(r["epoch"] for r in rows if r["split"] == "val") == list(
            range(1, LONG["epochs"] + 1)
        )
