"""``Store.fair_order`` on SQLite and PostgreSQL: the owner with the fewest running jobs first,
then the owner served longest ago, then the oldest job; only claimable jobs of the queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.store import Store
from tests.service.store_backends import BACKENDS, open_store, pg_database


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(request, tmp_path, "pg_url")


def _job(store: Store, owner: str, queue: str = "cpu") -> str:
    user = store.get_user(owner) or store.create_user(owner)
    job, _ = store.create_job(
        owner_id=user.id, spec={"model": {}}, name=f"{owner}-job", queue=queue
    )
    return job.id


def test_round_robin_between_users(store: Store) -> None:
    a1, a2, a3 = (_job(store, "ann") for _ in range(3))
    b1 = _job(store, "bob")
    other_queue = _job(store, "bob", queue="gpu")
    # nobody was ever served: the oldest job first
    assert store.fair_order(b1) == [a1, a2, a3, b1]
    assert store.claim_job(a1, worker_id="w", lease_seconds=30) == 1
    # ann has a job running: bob's comes first, whichever message woke the worker
    assert store.fair_order(a2) == [b1, a2, a3]
    store.finish_job(a1, attempt=1, status="succeeded")
    # nobody runs now, but ann was served and bob never was
    assert store.fair_order(a3) == [b1, a2, a3]
    assert store.claim_job(b1, worker_id="w", lease_seconds=30) == 1
    store.finish_job(b1, attempt=1, status="succeeded")
    # both served: ann's last start is older than bob's
    assert store.fair_order(a2) == [a2, a3]
    assert store.fair_order(other_queue) == [other_queue]
    store.request_cancel(a3)
    assert a3 not in store.fair_order(a2)
    assert store.fair_order("no-such-job") == []
