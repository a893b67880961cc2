"""Kill -9 of the worker mid-training, three times, against the real embedded deployment.

Each round submits the same job, waits for a checkpoint, SIGKILLs the worker's process group
(the training child, in a group of its own, stops by itself once its supervisor is gone; in one
round it is killed too, as in a machine crash) and starts a fresh worker at once, with the default lease and reaper settings. The job must finish
as attempt 2, resumed from its checkpoint (not from step 0), with one metric row per (split,
step) and every step present, and final weights bit-identical to an uninterrupted in-process
``normcore.train`` run at the same torch thread count.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load as load_safetensors

from tests.harness import ServiceEnv, Stack, make_env, running_stack, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-recovery")]

EPOCHS = 15
# ~51 steps an epoch of a few ms each: a few seconds in all, long enough to kill mid-run (the
# last kill leaves 9 epochs to go).
SPEC: dict[str, Any] = {
    "name": "recovery",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 2048, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "resources": {"device": "cpu"},
    "epochs": EPOCHS,
    "seed": 7,
    "checkpoint": {"every_epochs": 1, "keep_last": 3},
}
# The training child's thread count, fixed so the service run and the reference agree bit for bit.
THREADS = 1
# The checkpoint epoch each round waits for before the kill.
KILL_AFTER_EPOCH = (1, 3, 6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Final weights of the same spec trained uninterrupted in this process."""
    import torch

    import normcore

    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        result = normcore.train(SPEC, tmp_path_factory.mktemp("reference"))
    finally:
        torch.set_num_threads(saved)
    final = result.checkpoints[-1].path / "model.safetensors"
    return load_safetensors(final.read_bytes())


@pytest.fixture
def env(tmp_path: Path) -> ServiceEnv:
    """Embedded mode with default lease, heartbeat and reaper settings; 1 torch thread."""
    return make_env(tmp_path / "nc", NORMCORE_TRAIN_THREADS=str(THREADS))


def _logs(stack: Stack, job_id: str) -> str:
    with stack.client() as c:
        items = c.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
    return "\n".join(item["message"] for item in items)


def _child_pid(stack: Stack, job_id: str, attempt: int = 1) -> int:
    """The pid (and process group) of an attempt's training child, from its start line."""
    pattern = rf"attempt {attempt} started on worker \S+ \(pid (\d+)\)"
    m = re.search(pattern, _logs(stack, job_id))
    assert m, f"attempt {attempt}'s start line is missing"
    return int(m.group(1))


def _job(stack: Stack, job_id: str) -> dict[str, Any]:
    with stack.client() as c:
        r = c.get(f"/jobs/{job_id}")
        r.raise_for_status()
        return r.json()


def test_kill_9_three_times_resumes_exactly(env: ServiceEnv, reference: dict[str, Any]) -> None:
    store = env.store()
    with running_stack(env, workers=1) as stack:
        for round_no, kill_epoch in enumerate(KILL_AFTER_EPOCH):
            victim = stack.workers[-1]
            with stack.client() as c:
                r = c.post("/jobs", json=SPEC)
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]

                def saved(job_id: str = job_id, at: int = kill_epoch) -> bool:
                    ckpts = c.get(f"/jobs/{job_id}/checkpoints").json()
                    return any(ck["epoch"] >= at for ck in ckpts)

                wait_for(saved, timeout=120, interval=0.05, what=f"checkpoint {kill_epoch}")
                child = _child_pid(stack, job_id)
                victim.kill_group(signal.SIGKILL)
                if round_no == 1:
                    # As when the machine dies: the training child's own group goes too, instead
                    # of the child noticing its supervisor is gone and stopping by itself.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child, signal.SIGKILL)
                killed_at = time.monotonic()
                victim.popen.wait(10)
                stack.add_worker(name=f"worker-r{round_no}")
                assert _job(stack, job_id)["status"] == "running", "the job ended before the kill"

                back = wait_for(
                    lambda job_id=job_id: (
                        (j := _job(stack, job_id))["attempt"] == 2
                        and j["status"] == "running"
                        and j
                    ),
                    timeout=60,
                    interval=0.1,
                    what="attempt 2 running",
                )
                recovery = time.monotonic() - killed_at
                wait_for(
                    lambda job_id=job_id: (
                        _job(stack, job_id)["status"] in ("succeeded", "failed", "cancelled")
                    ),
                    timeout=180,
                    what="the job to end",
                )
                job = _job(stack, job_id)
                assert job["status"] == "succeeded", (job, stack.workers[-1].log()[-3000:])
                assert job["attempt"] == 2 and job["error"] is None
                assert [h["outcome"] for h in job["attempts"]] == ["lost", "succeeded"]
                # Defaults: 6 s lease + 1 s reaper round + ~1 s broker poll; generous for CI.
                assert recovery < 30, f"attempt 2 ran {recovery:.1f}s after the kill"
                assert back["status_reason"] is None

                # Resumed from a checkpoint at or after the one seen before the kill.
                text = _logs(stack, job_id)
                m = re.search(
                    r"resuming attempt 2 from checkpoint epoch-(\d+) at epoch (\d+)", text
                )
                assert m, text[-3000:]
                resumed_epoch = int(m.group(2))
                assert resumed_epoch >= kill_epoch

                rows = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
            keys = [(r["split"], r["step"]) for r in rows]
            assert len(keys) == len(set(keys)), "a metric row appears twice"
            val = sorted((r for r in rows if r["split"] == "val"), key=lambda r: r["step"])
            assert [r["epoch"] for r in val] == list(range(1, EPOCHS + 1))
            steps_per_epoch = val[0]["step"]
            total = steps_per_epoch * EPOCHS
            assert sorted(s for split, s in keys if split == "train") == list(range(1, total + 1))
            # The store says which attempt wrote each row: attempt 2 started right after the
            # checkpoint, not at step 1.
            second = [r for r in store.get_metrics(job_id, limit=10_000)[0] if r.attempt == 2]
            first_step = min(r.step for r in second if r.split == "train")
            assert first_step == resumed_epoch * steps_per_epoch + 1 > 1

            # Final weights: bit-identical to the uninterrupted run.
            final = job["checkpoints"][-1]
            assert final["epoch"] == EPOCHS
            with stack.client() as c:
                download = c.get(f"/jobs/{job_id}/checkpoints/{final['name']}")
            assert download.status_code == 200
            weights = load_safetensors(download.content)
            assert weights.keys() == reference.keys()
            differ = [k for k in weights if not bool((weights[k] == reference[k]).all())]
            assert not differ, f"round {round_no}: tensors differ from the reference: {differ}"
    store.dispose()


def test_worker_lost_on_every_attempt_fails_the_job(tmp_path: Path) -> None:
    """With max_attempts=2, a job whose worker dies (kill -9 of the worker and its child) in both
    attempts ends failed, saying why and listing both attempts, with its checkpoints kept; no
    third attempt starts although a live worker is waiting for work."""
    env = make_env(tmp_path / "nc", NORMCORE_TRAIN_THREADS="1", NORMCORE_MAX_ATTEMPTS="2")
    with running_stack(env, workers=1) as stack, stack.client() as c:
        r = c.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        last_epoch = 0
        for attempt in (1, 2):

            def running(attempt: int = attempt) -> bool:
                job = _job(stack, job_id)
                assert job["status"] in ("queued", "running"), job
                return job["status"] == "running" and job["attempt"] == attempt

            wait_for(running, timeout=60, interval=0.1, what=f"attempt {attempt} running")

            def newer_checkpoint(seen: int = last_epoch) -> int:
                epochs = [ck["epoch"] for ck in c.get(f"/jobs/{job_id}/checkpoints").json()]
                return max((e for e in epochs if e > seen), default=0)

            # attempt 2 is training too: it writes a checkpoint past the one it resumed from
            last_epoch = wait_for(newer_checkpoint, timeout=60, interval=0.05, what="a checkpoint")
            child = _child_pid(stack, job_id, attempt)
            victim = stack.workers[-1]
            victim.kill_group(signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
            victim.popen.wait(10)
            # what attempt 1 wrote up to the kill is no proof that attempt 2 trained
            last_epoch = max(ck["epoch"] for ck in c.get(f"/jobs/{job_id}/checkpoints").json())
            stack.add_worker(name=f"worker-after-{attempt}")

        job = wait_for(
            lambda: (j := _job(stack, job_id))["status"] not in ("queued", "running") and j,
            timeout=60,
            interval=0.1,
            what="the job to end",
        )
        assert job["status"] == "failed", job
        assert job["attempt"] == 2
        assert "worker lost on all 2 attempts (max_attempts=2)" in job["error"], job["error"]
        assert [h["outcome"] for h in job["attempts"]] == ["lost", "lost"]
        assert job["checkpoints"], "the checkpoints written before the losses are gone"
        # The live worker never gets a third attempt.
        time.sleep(3)
        job = _job(stack, job_id)
        assert job["status"] == "failed" and job["attempt"] == 2
        assert "attempt 3" not in _logs(stack, job_id)
