"""Disk bounds at submit against a real uvicorn process: the per-user disk quota (429 with the
numbers, freed by DELETE) and the server's bound on checkpoint.keep_last (422)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.store import Store
from tests.harness import make_env, start_api

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-disk-quota")

QUOTA = 10_000
MAX_KEEP_LAST = 4
SPEC: dict[str, Any] = {
    "name": "quota",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "epochs": 2,
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store]]:
    """A running API (no worker) with a small disk quota and keep_last bound, and its store."""
    env = make_env(
        tmp_path_factory.mktemp("quota") / "nc",
        NORMCORE_DISK_QUOTA_BYTES_PER_USER=str(QUOTA),
        NORMCORE_MAX_KEEP_LAST=str(MAX_KEEP_LAST),
        NORMCORE_REPUBLISH_AFTER_SECONDS="3600",
    )
    store = env.store()
    proc, url = start_api(env)
    try:
        yield url, store
    finally:
        proc.stop()
        store.dispose()


def _client(url: str, store: Store, user: str) -> httpx.Client:
    token = store.create_token(user, f"{user}-tok")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _finished_with_checkpoint(store: Store, job_id: str, size: int) -> None:
    """Run the job as a worker would: one checkpoint of ``size`` bytes, one log line, done."""
    attempt = store.claim_job(job_id, worker_id="w", lease_seconds=600)
    assert attempt == 1
    store.add_logs(job_id, attempt=attempt, lines=[("info", "12345")])
    store.add_checkpoint(
        job_id,
        attempt=attempt,
        name="epoch-0001",
        epoch=1,
        step=8,
        bytes=size,
        sha256="0" * 64,
        files={},
        metrics={},
        path=f"jobs/{job_id}/checkpoints/epoch-0001",
    )
    store.finish_job(job_id, attempt=attempt, status="succeeded")


def test_disk_quota_refuses_with_the_numbers_until_a_delete(api: tuple[str, Store]) -> None:
    url, store = api
    with _client(url, store, "fay") as fay, _client(url, store, "gus") as gus:
        r = fay.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        first = r.json()["id"]
        _finished_with_checkpoint(store, first, QUOTA - 100)
        r = fay.post("/jobs", json=SPEC)  # 9,900 + 5 bytes: under the quota still
        assert r.status_code == 201, r.text
        _finished_with_checkpoint(store, r.json()["id"], 200)

        r = fay.post("/jobs", json=SPEC)
        assert r.status_code == 429, r.text
        detail = r.json()["detail"]
        assert detail["used"] == QUOTA - 100 + 200 + 2 * 5
        assert detail["quota"] == QUOTA
        assert "delete" in detail["message"].lower()
        # The quota is per user.
        assert gus.post("/jobs", json=SPEC).status_code == 201

        assert fay.delete(f"/jobs/{first}").status_code == 204
        r = fay.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text


def test_keep_last_over_the_servers_bound_is_422(api: tuple[str, Store]) -> None:
    url, store = api
    with _client(url, store, "hal") as hal:
        over = {**SPEC, "checkpoint": {"keep_last": MAX_KEEP_LAST + 1}}
        r = hal.post("/jobs", json=over)
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"][-2:] == ["checkpoint", "keep_last"]
        assert str(MAX_KEEP_LAST) in error["msg"]
        ok = {**SPEC, "checkpoint": {"keep_last": MAX_KEEP_LAST}}
        assert hal.post("/jobs", json=ok).status_code == 201
