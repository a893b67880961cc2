"""Fair scheduling through the real API and a real worker: one user queues three long jobs,
another a short one after them; with one worker the short job starts second, before the long
ones finish (not fourth, as first-in first-out would have it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx

from tests.harness import ServiceEnv, running_stack, wait_for

JOB: dict[str, Any] = {
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
}


def _submit(client: httpx.Client, name: str, epochs: int) -> str:
    r = client.post("/jobs", json={**JOB, "name": name, "epochs": epochs})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_second_user_is_not_starved(sqlite_env: ServiceEnv) -> None:
    with running_stack(sqlite_env, workers=0) as stack:
        ann = stack.client()
        bob = stack.client(stack.token_for("bob"))
        # queued before any worker runs, in this order: ann's three, then bob's
        long_ids = [_submit(ann, f"long-{i}", epochs=2) for i in range(3)]
        short_id = _submit(bob, "short", epochs=1)
        stack.add_worker()

        def finished() -> list[dict[str, Any]] | None:
            jobs = [ann.get(f"/jobs/{i}").json() for i in long_ids]
            jobs.append(bob.get(f"/jobs/{short_id}").json())
            done = all(j["status"] in ("succeeded", "failed") for j in jobs)
            return jobs if done else None

        jobs = wait_for(finished, timeout=300, interval=0.5, what="all four jobs")
        assert [j["status"] for j in jobs] == ["succeeded"] * 4
        started = {j["id"]: datetime.fromisoformat(j["started_at"]) for j in jobs}
        order = sorted(started, key=started.__getitem__)
        assert order == [long_ids[0], short_id, long_ids[1], long_ids[2]], order
        ended = {j["id"]: datetime.fromisoformat(j["finished_at"]) for j in jobs}
        assert started[short_id] < ended[long_ids[1]] and started[short_id] < ended[long_ids[2]]
        ann.close()
        bob.close()
