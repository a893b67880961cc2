"""A job over its max_runtime through the real API and a real worker: it ends timed_out with a
checkpoint of the step it stopped at, and says so in its error and logs."""

from __future__ import annotations

from typing import Any

from tests.harness import Stack, wait_for

ENDLESS: dict[str, Any] = {
    "name": "endless",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 10_000,
    "max_runtime": 0.1,  # 6 s
}


def test_job_over_max_runtime_ends_timed_out_with_its_checkpoint(sqlite_stack: Stack) -> None:
    with sqlite_stack.client() as client:
        r = client.post("/jobs", json=ENDLESS)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def ended() -> dict[str, Any] | None:
            job = client.get(f"/jobs/{job_id}").json()
            return job if job["status"] not in ("queued", "running") else None

        job = wait_for(
            ended,
            timeout=300,
            interval=0.5,
            what="the job to stop",
            explain=lambda: sqlite_stack.explain(job_id),
        )
        assert job["status"] == "timed_out", job
        assert "stopped at its time limit (max_runtime) at step" in job["error"]
        assert "the checkpoint written then holds that step" in job["error"]
        step = int(job["error"].split(" at step ")[1].split(";")[0])
        checkpoints = client.get(f"/jobs/{job_id}/checkpoints").json()
        assert checkpoints and checkpoints[-1]["step"] == step, checkpoints
        r = client.get(f"/jobs/{job_id}/checkpoints/{checkpoints[-1]['name']}")
        assert r.status_code == 200 and len(r.content) == checkpoints[-1]["bytes"]
        logs = client.get(f"/jobs/{job_id}/logs", params={"limit": 1000}).json()["items"]
        text = "\n".join(line["message"] for line in logs)
        assert "time limit: 0.10 min left of this job's 0.1 min" in text
        assert f"reached at step {step}" in text
        assert "training ended: timed_out" in text
