"""The per-user active-job quota is atomic: parallel submits never exceed it, on SQLite and
PostgreSQL, through the store's own connections and through a real uvicorn process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.store import QuotaExceeded, Store
from tests.harness import make_env, start_api

SPEC: dict[str, Any] = {
    "name": "quota",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 16, "num_samples": 64},
    "epochs": 1,
}
LIMIT = 20
PARALLEL = 50


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'quota.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def test_parallel_create_job_never_exceeds_the_quota(database_url: str) -> None:
    store = Store(database_url)
    store.upgrade()
    try:
        owner = store.create_user("fresh").id
        other = store.create_user("other").id
        store.create_job(owner_id=other, spec={}, name="x", queue="cpu", max_active=1)
        barrier = threading.Barrier(PARALLEL)

        def one(i: int) -> str:
            barrier.wait()
            try:
                store.create_job(
                    owner_id=owner, spec={}, name=f"j{i}", queue="cpu", max_active=LIMIT
                )
            except QuotaExceeded as exc:
                assert (exc.active, exc.limit) == (LIMIT, LIMIT)
                return "refused"
            return "created"

        with ThreadPoolExecutor(PARALLEL) as pool:
            outcomes = list(pool.map(one, range(PARALLEL)))
        assert outcomes.count("created") == LIMIT
        assert outcomes.count("refused") == PARALLEL - LIMIT
        assert store.count_active(owner) == LIMIT
        # Another user's quota is their own; a finished job frees a slot.
        assert store.count_active(other) == 1
        first = store.list_jobs(owner_id=owner, limit=1)[0][0]
        store.request_cancel(first.id)
        store.create_job(owner_id=owner, spec={}, name="again", queue="cpu", max_active=LIMIT)
        with pytest.raises(QuotaExceeded):
            store.create_job(owner_id=owner, spec={}, name="over", queue="cpu", max_active=LIMIT)
    finally:
        store.dispose()


def test_fifty_parallel_submits_over_http_accept_exactly_the_quota(
    database_url: str, tmp_path: Path
) -> None:
    env = make_env(
        tmp_path / "nc",
        NORMCORE_DATABASE_URL=database_url,
        NORMCORE_MAX_ACTIVE_JOBS_PER_USER=str(LIMIT),
    )
    store = env.store()
    token = store.create_token("newcomer", "newcomer-token")
    proc, url = start_api(env)
    try:
        barrier = threading.Barrier(PARALLEL)

        def submit(i: int) -> httpx.Response:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            ) as client:
                barrier.wait()
                return client.post("/jobs", json={**SPEC, "name": f"quota-{i}"})

        with ThreadPoolExecutor(PARALLEL) as pool:
            answers = list(pool.map(submit, range(PARALLEL)))
        codes = [r.status_code for r in answers]
        assert codes.count(201) == LIMIT, codes
        assert codes.count(429) == PARALLEL - LIMIT, codes
        for r in answers:
            if r.status_code == 429:
                detail = r.json()["detail"]
                assert detail["active"] == LIMIT and detail["limit"] == LIMIT
                assert "limit is 20" in detail["message"]
        user = store.get_user("newcomer")
        assert user is not None and store.count_active(user.id) == LIMIT
    finally:
        proc.stop()
        store.dispose()
