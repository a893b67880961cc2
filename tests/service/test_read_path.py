"""The API's read path (issue 12 item 3): a metrics poll is one read transaction on a pooled
connection, token lookups are cached for a few seconds and a revocation still lands within
that time, and rows are paged by an index range scan; on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import event

from service.api.app import create_app
from service.auth import TOKEN_CACHE_TTL_S, TokenCache
from service.db import metadata
from service.db import metrics as metrics_t
from service.store import Store
from service.store.poll import PollStatements
from tests.harness import make_env, start_api
from tests.service.store_backends import BACKENDS, pg_database

pytestmark = pytest.mark.xdist_group("service-read-path")


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


class Counter:
    """Counts pool checkouts and DBAPI connections opened on an engine."""

    def __init__(self, engine: sa.Engine) -> None:
        self.checkouts = 0
        self.connects = 0
        self.engine = engine
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "connect", self._connect)

    def _checkout(self, _dbapi: Any, _record: Any, _proxy: Any) -> None:
        self.checkouts += 1

    def _connect(self, _dbapi: Any, _record: Any) -> None:
        self.connects += 1

    def reset(self) -> None:
        self.checkouts = self.connects = 0

    def close(self) -> None:
        event.remove(self.engine, "checkout", self._checkout)
        event.remove(self.engine, "connect", self._connect)


@pytest.fixture(params=BACKENDS)
def api(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[TestClient, Store, str, str]]:
    """An in-process API (no lifespan) on each backend: client, store, alice's token, her job
    with three metric rows."""
    if request.param == "sqlite":
        env = make_env(tmp_path / "nc")
    else:
        env = make_env(
            tmp_path / "nc",
            mode="cluster",
            postgres_url=request.getfixturevalue("pg_url"),
            redis_url="redis://127.0.0.1:6379/15",
        )
    app = create_app(env.settings())
    store: Store = app.state.store
    if request.param == "postgresql":  # the module's database: empty it for this test
        names = ", ".join(t.name for t in metadata.sorted_tables)
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    token = store.create_token("alice", "alice-token")
    alice = store.get_user("alice")
    assert alice is not None
    job, _ = store.create_job(owner_id=alice.id, spec={}, name="poll", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    store.add_metrics(
        job.id,
        attempt=attempt,
        rows=[{"step": s, "split": "train", "values": {"loss": 1.0 / s}} for s in (1, 2, 3)],
    )
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    try:
        yield client, store, token, job.id
    finally:
        client.close()
        store.dispose()


def test_a_metrics_poll_is_one_read_transaction_on_a_pooled_connection(
    api: tuple[TestClient, Store, str, str],
) -> None:
    client, store, _token, job_id = api
    counter = Counter(store.engine)
    try:
        first = client.get(f"/jobs/{job_id}/metrics", params={"after": 0})
        assert first.status_code == 200
        assert [r["step"] for r in first.json()["items"]] == [1, 2, 3]
        assert counter.checkouts == 2  # the token (now cached), then the job and its rows
        counter.reset()
        after = first.json()["next"]
        for _ in range(5):
            r = client.get(f"/jobs/{job_id}/metrics", params={"after": after})
            assert r.status_code == 200 and r.json() == {"items": [], "next": after}
        assert counter.checkouts == 5
        assert counter.connects == 0  # every poll reused a pooled connection
        # Final rows: the job's status and checkpoints are read on the same connection.
        counter.reset()
        r = client.get(f"/jobs/{job_id}/metrics", params={"final": "true"})
        assert r.status_code == 200 and r.json()["items"] == []
        assert counter.checkouts == 1
    finally:
        counter.close()


def test_one_poll_still_checks_ownership_and_parameters(
    api: tuple[TestClient, Store, str, str],
) -> None:
    client, store, _token, job_id = api
    bob = store.create_token("bob", "bob-token")
    r = client.get(f"/jobs/{job_id}/metrics", headers={"Authorization": f"Bearer {bob}"})
    assert r.status_code == 404 and r.json()["detail"] == f"job {job_id!r} not found"
    r = client.get(f"/jobs/{job_id}/metrics", params={"aftr": 1})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "aftr"]
    r = client.get("/jobs/no-such-job/metrics")
    assert r.status_code == 404
    r = client.get(f"/jobs/{job_id}/metrics", headers={"Authorization": "Bearer nc_forged"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_read_transaction_shares_one_connection_and_nests(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    try:
        token = store.create_token("alice", "t")
        user = store.authenticate(token)
        assert user is not None
        job, _ = store.create_job(owner_id=user.id, spec={}, name="j", queue="cpu")
        attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
        assert attempt is not None
        checkouts: list[int] = []
        event.listen(store.engine, "checkout", lambda dbapi, *_: checkouts.append(id(dbapi)))
        with store.read_transaction():
            assert store.get_job(job.id) is not None
            # A write inside the block takes its own connection; a read after it sees it.
            store.add_metrics(
                job.id, attempt=attempt, rows=[{"step": 1, "split": "train", "values": {}}]
            )
            with store.read_transaction():
                assert [r.step for r in store.get_metrics(job.id)[0]] == [1]
            assert store.last_metrics(job.id) is not None
        assert len(checkouts) == 2  # one for the reads, one for the write
        assert len(set(checkouts)) == 2
    finally:
        store.dispose()


def test_token_cache_expires_and_is_bounded() -> None:
    now = [100.0]
    cache = TokenCache(ttl=5.0, maxsize=2, clock=lambda: now[0])
    cache.put("a", "alice")
    assert cache.get("a") == "alice"
    now[0] += 4.999
    assert cache.get("a") == "alice"
    now[0] += 0.001
    assert cache.get("a") is None and len(cache) == 0
    cache.put("a", "alice")
    cache.put("b", "bob")
    assert cache.get("a") == "alice"  # a is now the most recently used
    cache.put("c", "carol")
    assert cache.get("b") is None and cache.get("a") == "alice" and cache.get("c") == "carol"
    assert "a" not in cache._entries  # keyed by digest, never the token itself
    with pytest.raises(ValueError):
        TokenCache(maxsize=0)


def test_revocation_takes_effect_within_the_cache_ttl(tmp_path: Path) -> None:
    """A real server: the revoked token keeps working at most TOKEN_CACHE_TTL_S seconds."""
    env = make_env(tmp_path / "nc")
    store = env.store()
    token = store.create_token("alice", "alice-laptop")
    proc, url = start_api(env)
    try:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            assert c.get("/jobs").status_code == 200  # looked up and cached
            assert store.revoke_token("alice-laptop") is True
            revoked = time.monotonic()
            while (r := c.get("/jobs")).status_code == 200:
                assert time.monotonic() - revoked < TOKEN_CACHE_TTL_S + 1.0, "still accepted"
                time.sleep(0.1)
            assert r.status_code == 401 and "revoked" in r.json()["detail"]
            # Never accepted again once refused (refusals are not cached, lookups are).
            for _ in range(3):
                assert c.get("/jobs").status_code == 401
    finally:
        proc.stop()
        store.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_metric_pages_use_the_job_seq_index(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'store.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    store = Store(url)
    store.upgrade()
    try:
        query = (
            sa.select(metrics_t)
            .where(
                metrics_t.c.job_id == "j",
                metrics_t.c.seq > 10,
                metrics_t.c.discarded.is_(False),
            )
            .order_by(metrics_t.c.seq)
            .limit(1000)
        )
        # The route's Core query, and the poll fast path's plain statement (service.store.poll).
        fast = PollStatements(store.engine).rows
        fast = fast.replace("?", "{}") if backend == "sqlite" else fast.replace("%s", "{}")
        with store.engine.connect() as conn:
            sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
            for text in (sql, fast.format("'j'", 10, 1000)):
                if backend == "sqlite":
                    explain = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + text)
                    plan = " ".join(str(r) for r in explain)
                    assert "USING INDEX ix_metrics_job_id_seq (job_id=? AND seq>?)" in plan, plan
                else:
                    # An empty table is cheapest to scan; ask what the planner does past that.
                    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                    plan = " ".join(r[0] for r in conn.exec_driver_sql("EXPLAIN " + text))
                    assert "ix_metrics_job_id_seq" in plan and "Sort" not in plan, plan
    finally:
        store.dispose()
