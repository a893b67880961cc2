"""A job's whole life through HTTP: the real API (uvicorn) and a real `python -m worker`.

One deployment per mode (SQLite store + broker; PostgreSQL + Redis) runs three jobs in a row on
its single worker: one that succeeds (watched by incremental metric polling), one that diverges,
and one cancelled while it trains.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.harness import Stack, wait_for

# One deployment per mode for the whole module (module_stack): its tests run on one xdist worker.
pytestmark = pytest.mark.xdist_group("e2e-job-lifecycle")

TINY: dict[str, Any] = {
    "name": "tiny-gn",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2,
}
DIVERGING: dict[str, Any] = {
    "name": "edsr-lr10",
    "model": {"arch": "edsr", "width": 4, "depth": 1, "scale": 2},
    "data": {"dataset": "sr-synthetic", "batch_size": 16, "num_samples": 64, "image_size": 8},
    "optim": {"name": "sgd", "lr": 10.0, "momentum": 0.9, "weight_decay": 0.0},
    "resources": {"device": "cpu"},
    "epochs": 3,
}
FINISHED = ("succeeded", "failed", "cancelled")


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def submit(client: httpx.Client, spec: dict[str, Any]) -> str:
    r = client.post("/jobs", json=spec)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "queued" and body["attempt"] == 0
    return body["id"]


def poll_metrics(client: httpx.Client, job_id: str) -> tuple[list[dict[str, Any]], bool]:
    """Poll /metrics with ?after= until the job ends; return the rows and if any came while running."""
    rows: list[dict[str, Any]] = []
    after, live = 0, False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = job(client, job_id)["status"]
        page = client.get(f"/jobs/{job_id}/metrics", params={"after": after}).json()
        rows.extend(page["items"])
        if page["items"] and state == "running":
            live = True
        assert page["next"] >= after
        after = page["next"]
        if state in FINISHED:
            rows.extend(
                client.get(f"/jobs/{job_id}/metrics", params={"after": after}).json()["items"]
            )
            return rows, live
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish")


def test_job_lifecycle_over_http(module_stack: Stack) -> None:
    with module_stack.client() as client:
        ok_id = submit(client, TINY)
        bad_id = submit(client, DIVERGING)
        long_id = submit(client, {**TINY, "name": "long", "epochs": 500})

        # 1. succeeds; rows one per (split, step), in seq order (that rows stream in while a
        # job runs is checked on the long job below: this one can finish between two looks)
        rows, _ = poll_metrics(client, ok_id)
        done = job(client, ok_id)
        assert done["status"] == "succeeded", done
        assert done["attempt"] == 1 and done["error"] is None
        seqs = [r["seq"] for r in rows]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert len({(r["split"], r["step"]) for r in rows}) == len(rows)
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 13))
        ckpts = client.get(f"/jobs/{ok_id}/checkpoints").json()
        assert [c["name"] for c in ckpts] == ["epoch-0001", "epoch-0002"]
        last = ckpts[-1]
        download = client.get(f"/jobs/{ok_id}/checkpoints/{last['name']}")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == last["sha256"]
        assert download.headers["etag"] == f'"{last["sha256"]}"'
        messages = [line["message"] for line in client.get(f"/jobs/{ok_id}/logs").json()["items"]]
        assert any("attempt 1 started on worker" in m for m in messages)
        assert any(m.startswith("epoch 2/2") for m in messages)

        # 2. diverges: failed, with the engine's message and no traceback in the error
        wait_for(lambda: job(client, bad_id)["status"] in FINISHED, timeout=120, what="divergence")
        bad = job(client, bad_id)
        assert bad["status"] == "failed"
        assert bad["error"].startswith("training diverged: loss is nan at step"), bad["error"]
        assert "Traceback" not in bad["error"]

        # 3. cancelled while it trains: within 2 s, its earlier checkpoints kept
        wait_for(
            lambda: client.get(f"/jobs/{long_id}/checkpoints").json(),
            timeout=120,
            what="the long job's first checkpoint",
        )
        state = job(client, long_id)["status"]
        page = client.get(f"/jobs/{long_id}/metrics").json()
        assert state == "running" and page["items"], "no metric row visible while it runs"
        t0 = time.monotonic()
        r = client.post(f"/jobs/{long_id}/cancel")
        assert r.status_code == 202, r.text
        wait_for(lambda: job(client, long_id)["status"] in FINISHED, timeout=15, what="cancel")
        elapsed = time.monotonic() - t0
        cancelled = job(client, long_id)
        assert cancelled["status"] == "cancelled", cancelled
        assert elapsed < 2.0, f"cancel took {elapsed:.2f}s"
        assert cancelled["checkpoints"], "checkpoints written before the cancel are kept"


LENET_DIGITS: dict[str, Any] = {
    "name": "lenet-bn-digits",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2,
}


def test_lenet_digits_checkpoint_reproduces_its_accuracy(
    module_stack: Stack, tmp_path: Path
) -> None:
    """The downloaded checkpoint loads with normcore.load_model and gives the reported val
    accuracy; /stats equals the running statistics stored in the file, layer by layer."""
    import normcore
    from normcore.data import build_data
    from normcore.spec import JobSpec

    with module_stack.client() as client:
        job_id = submit(client, LENET_DIGITS)
        wait_for(lambda: job(client, job_id)["status"] in FINISHED, timeout=120, what="lenet")
        done = job(client, job_id)
        assert done["status"] == "succeeded", done
        last = client.get(f"/jobs/{job_id}/checkpoints").json()[-1]
        download = client.get(f"/jobs/{job_id}/checkpoints/{last['name']}")
        assert download.headers["etag"] == f'"{hashlib.sha256(download.content).hexdigest()}"'
        path = tmp_path / "model.safetensors"
        path.write_bytes(download.content)
        stats = client.get(f"/jobs/{job_id}/checkpoints/{last['name']}/stats").json()["layers"]
    reported = done["last_metrics"]["val"]["values"]["val_accuracy"]
    assert reported == last["metrics"]["val_accuracy"]

    model = normcore.load_model(path)
    spec = JobSpec.model_validate(LENET_DIGITS)
    bundle = build_data(spec.data, seed=spec.seed)
    with torch.no_grad():
        predicted = model(bundle.val_x).argmax(1)
    accuracy = (predicted == bundle.val_y).float().mean().item()
    assert abs(accuracy - reported) < 1e-6, (accuracy, reported)

    tensors = load_file(str(path))
    bn_names = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".running_mean")}
    assert len(bn_names) == 4, bn_names  # lenet: two BatchNorm2d and two BatchNorm1d
    served = {row["name"]: row for row in stats}
    assert bn_names <= set(served)
    for name in bn_names:
        assert served[name]["running_mean"] == tensors[f"{name}.running_mean"].tolist(), name
        assert served[name]["running_var"] == tensors[f"{name}.running_var"].tolist(), name
