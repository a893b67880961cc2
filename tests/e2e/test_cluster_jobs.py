"""Multi-process jobs and queue routing through the real API (uvicorn) and real workers.

1. A 2-process gloo job with SyncBatchNorm (``resources: {device: cpu, gpus: 2, sync_bn: true}``)
   ends, after one epoch, with the weights of a 1-process job over the concatenated batch
   (within 1e-5) and the same running statistics: both checkpoints are downloaded over HTTP.
2. With only a CPU worker alive, a CUDA job waits in the queue with the reason in GET /jobs/{id},
   a CPU job posted after it runs, and a worker asked for "cpu,gpu" on this CPU-only machine
   does not take the gpu queue.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors

from tests.harness import Stack, wait_for

# One deployment per mode for the whole module (module_stack): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("e2e-cluster-jobs")

FINISHED = ("succeeded", "failed", "cancelled")
B = 8

# No augmentation, no dropout, SGD with momentum and weight decay on both sides.
DDP_JOB: dict[str, Any] = {
    "name": "ddp-gloo-sync-bn",
    "model": {"arch": "convblock", "norm": "bn", "dropout": 0.0, "width": 8, "depth": 2},
    "data": {"dataset": "synthetic", "batch_size": B, "num_samples": 160, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "epochs": 1,
    "seed": 5,
    "resources": {"device": "cpu", "gpus": 2, "sync_bn": True},
}


def single_job() -> dict[str, Any]:
    """The same job in one process over the concatenated batch."""
    spec = copy.deepcopy(DDP_JOB)
    spec["name"] = "one-process-double-batch"
    spec["data"]["batch_size"] = 2 * B
    spec["resources"] = {"device": "cpu", "gpus": 1}
    return spec


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def submit(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()


def finished(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    wait_for(lambda: job(client, job_id)["status"] in FINISHED, timeout=timeout, what=job_id)
    return job(client, job_id)


def checkpoint_weights(client: httpx.Client, job_id: str) -> dict[str, torch.Tensor]:
    """The model tensors of the job's last checkpoint, downloaded over HTTP."""
    [ckpt] = client.get(f"/jobs/{job_id}/checkpoints").json()
    r = client.get(f"/jobs/{job_id}/checkpoints/{ckpt['name']}")
    assert r.status_code == 200, r.text
    return load_safetensors(r.content)


def test_two_process_sync_bn_job_matches_one_process_job(module_stack: Stack) -> None:
    with module_stack.client() as client:
        ddp_id = submit(client, DDP_JOB)["id"]
        one_id = submit(client, single_job())["id"]
        ddp, one = finished(client, ddp_id), finished(client, one_id)
        assert ddp["status"] == "succeeded", ddp
        assert one["status"] == "succeeded", one

        ddp_w, one_w = checkpoint_weights(client, ddp_id), checkpoint_weights(client, one_id)
        assert ddp_w.keys() == one_w.keys()
        assert not any(k.startswith("module.") for k in ddp_w)
        stats = [k for k in ddp_w if k.endswith(("running_mean", "running_var"))]
        assert len(stats) == 4
        for key, value in ddp_w.items():
            diff = (value.double() - one_w[key].double()).abs().max().item()
            tol = 1e-6 if key in stats else 1e-5
            assert diff <= tol, f"{key} differs by {diff}"

        # the rows describe the global batch: same steps and (within rounding) same losses
        def train_losses(job_id: str) -> list[tuple[int, float]]:
            items = client.get(f"/jobs/{job_id}/metrics").json()["items"]
            return [(r["step"], r["values"]["loss"]) for r in items if r["split"] == "train"]

        ddp_rows, one_rows = train_losses(ddp_id), train_losses(one_id)
        assert [s for s, _ in ddp_rows] == [s for s, _ in one_rows] == list(range(1, 9))
        assert max(abs(a - b) for (_, a), (_, b) in zip(ddp_rows, one_rows, strict=True)) < 1e-5
        logs = [line["message"] for line in client.get(f"/jobs/{ddp_id}/logs").json()["items"]]
        assert any("data parallel over 2 processes (gloo)" in m for m in logs)


def test_gpu_job_waits_while_only_cpu_workers_live_and_cpu_job_runs(module_stack: Stack) -> None:
    # Last in the module: it leaves a second worker and a CUDA job queued on the shared stack.
    admin = module_stack.token_for("root", admin=True)
    # A second worker asked for both queues on this CPU-only machine: it must drop "gpu".
    module_stack.add_worker(queues="cpu,gpu", name="both")
    with module_stack.client(admin) as root:

        def registered() -> dict[str, Any]:
            rows = {w["name"]: w for w in root.get("/workers").json()["items"]}
            return rows if len(rows) == 2 else {}

        rows = wait_for(registered, timeout=60, what="both workers to register")
    assert rows["worker0@test"]["queues"] == ["cpu"]
    assert rows["both@test"]["queues"] == ["cpu"] and rows["both@test"]["gpus"] == 0

    cuda = copy.deepcopy(single_job())
    cuda["name"] = "wants-cuda"
    cuda["resources"] = {"device": "cuda", "gpus": 1}
    with module_stack.client() as client:
        # no GPU worker ever registered here: refused rather than left waiting forever
        r = client.post("/jobs", json=cuda)
        assert r.status_code == 422 and "ever registered" in r.text, r.text
    store = module_stack.env.store()
    try:  # a GPU worker that served this deployment once and has stopped
        store.register_worker("gpu@gone", host="g", pid=9, gpus=1, queues=["gpu"])
        store.remove_worker("gpu@gone")
    finally:
        store.dispose()
    with module_stack.client() as client:
        gpu = submit(client, cuda)
        assert gpu["queue"] == "gpu" and gpu["status"] == "queued"
        assert gpu["status_reason"] == "waiting for a gpu worker: none is live"
        cpu = submit(client, {**single_job(), "name": "runs-on-cpu"})
        assert cpu["queue"] == "cpu"

        done = finished(client, cpu["id"])
        assert done["status"] == "succeeded", done
        deadline = time.monotonic() + 3  # and still nobody takes the CUDA job
        while time.monotonic() < deadline:
            waiting = job(client, gpu["id"])
            assert waiting["status"] == "queued" and waiting["attempt"] == 0, waiting
            assert waiting["status_reason"] == "waiting for a gpu worker: none is live"
            time.sleep(0.5)
    assert all(w.alive() for w in module_stack.workers)
