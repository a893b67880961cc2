"""The store against real databases: a SQLite file and a PostgreSQL server, same tests for both."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import random
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

import service.store.jobs as store_jobs_mod
from service.db import UTCDateTime, metadata
from service.db import jobs as jobs_t
from service.store import (
    MIGRATIONS_DIR,
    IdempotencyConflict,
    NotFound,
    StaleAttempt,
    Store,
    decode_cursor,
    normalize_url,
)

TABLES = ("logs", "metrics", "checkpoints", "job_tags", "jobs", "tokens", "users")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def pg_session_url(postgres_server: str) -> Iterator[str]:
    """One PostgreSQL database for this test session, migrated once, dropped at the end."""
    import psycopg

    name = f"normcore_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    migrator = Store(url)
    migrator.upgrade()
    migrator.dispose()
    yield url
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty store on a SQLite file or on the session's PostgreSQL database."""
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'store.db'}")
        s.upgrade()
    else:
        s = Store(request.getfixturevalue("pg_session_url"))
        s.upgrade()
        with s.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield s
    s.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a brand-new, empty database (nothing migrated)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("postgres_url")


def _job(store: Store, owner: str = "alice", **kw: Any) -> tuple[int, str]:
    user = store.create_user(owner)
    job, created = store.create_job(
        owner_id=user.id, spec={"epochs": 1}, name=kw.pop("name", "j"), queue="cpu", **kw
    )
    assert created
    return user.id, job.id


def _running(store: Store, lease: float = 30.0) -> tuple[str, int]:
    _, job_id = _job(store)
    attempt = store.claim_job(job_id, worker_id="w1", lease_seconds=lease)
    assert attempt == 1
    return job_id, attempt


def _row(step: int, split: str = "train", loss: float = 1.0, epoch: float = 0) -> dict[str, Any]:
    return {"step": step, "epoch": epoch, "split": split, "values": {"loss": loss}, "time": 1.0}


# ---------------------------------------------------------------- processes


def _proc_upgrade(url: str, start: Any, out: Any) -> None:
    s = Store(url)
    start.wait(30)
    try:
        s.upgrade()
        out.put("ok")
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")
    finally:
        s.dispose()


def _proc_claim(url: str, job_id: str, worker: str, start: Any, out: Any) -> None:
    s = Store(url)
    s.ping()  # connect before the start line
    start.wait(30)
    try:
        out.put((worker, s.claim_job(job_id, worker_id=worker, lease_seconds=30)))
    except Exception as exc:
        out.put((worker, f"{type(exc).__name__}: {exc}"))
    finally:
        s.dispose()


def _proc_write(url: str, job_id: str, attempt: int, n: int, start: Any, out: Any) -> None:
    s = Store(url)
    start.wait(30)
    try:
        for i in range(n):
            s.add_metrics(job_id, attempt=attempt, rows=[_row(i), _row(i, "val")])
            s.add_logs(job_id, attempt=attempt, lines=[("info", f"step {i}")])
            s.heartbeat(job_id, attempt=attempt, lease_seconds=30)
        out.put("ok")
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")
    finally:
        s.dispose()


def _run_procs(target: Any, arg_lists: list[tuple[Any, ...]]) -> list[Any]:
    # fork: children start at once with everything imported; Store disposes inherited pools.
    ctx = mp.get_context("fork")
    start = ctx.Event()
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, out)) for args in arg_lists]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return results


# ---------------------------------------------------------------- migrations


def test_upgrade_fresh_database_twice(fresh_url: str) -> None:
    s = Store(fresh_url)
    try:
        s.upgrade()
        s.upgrade()
        head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
        with s.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
            assert set(TABLES) <= set(sa.inspect(conn).get_table_names())
        assert s.ping()
    finally:
        s.dispose()


def test_migrated_schema_matches_models(fresh_url: str) -> None:
    s = Store(fresh_url)
    try:
        s.upgrade()
        with s.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, metadata)
        assert diff == []
        with s.engine.connect() as conn:
            insp = sa.inspect(conn)
            indexed = {
                t: {tuple(ix["column_names"]) for ix in insp.get_indexes(t)}
                | {tuple(u["column_names"]) for u in insp.get_unique_constraints(t)}
                for t in TABLES
            }
        assert ("job_id", "seq") in indexed["metrics"]
        assert ("owner_id", "created_at", "id") in indexed["jobs"]
        assert ("status",) in indexed["jobs"]
        assert ("job_id", "id") in indexed["logs"]
        assert ("token_hash",) in indexed["tokens"]
    finally:
        s.dispose()


def _migrate_to(store: Store, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        conn.commit()


def test_0004_moves_enqueue_failed_reasons_into_columns(fresh_url: str) -> None:
    s = Store(fresh_url)
    try:
        _migrate_to(s, "0003")
        now = datetime.now(UTC)
        row = {
            "owner_id": 1,
            "name": "j",
            "spec": {},
            "queue": "cpu",
            "attempt": 0,
            "attempts": [],
            "cancel_requested": False,
            "created_at": now,
            "updated_at": now,
        }
        with s.engine.begin() as conn:
            conn.execute(
                sa.text("INSERT INTO users (id, name, admin, created_at) VALUES (1, 'a', :f, :t)"),
                {"f": False, "t": now.replace(tzinfo=None)},
            )
        # Insert through the 0003 schema (no enqueue columns yet) with plain SQL.
        old = sa.table(
            "jobs",
            *(sa.column(c) for c in ("id", "status", "status_reason", "owner_id", "name", "queue")),
            *(sa.column(c) for c in ("attempt", "cancel_requested")),
            sa.column("spec", sa.JSON()),
            sa.column("attempts", sa.JSON()),
            sa.column("created_at", UTCDateTime()),
            sa.column("updated_at", UTCDateTime()),
        )
        with s.engine.begin() as conn:
            for job_id, status, reason in [
                ("a" * 32, "queued", "enqueue failed: Error 111 connecting to redis"),
                ("b" * 32, "queued", "waiting for a gpu worker: none is live"),
                ("c" * 32, "failed", "enqueue failed: but it is finished"),
            ]:
                conn.execute(
                    sa.insert(old).values(id=job_id, status=status, status_reason=reason, **row)
                )
        s.upgrade()
        failed = s.get_job("a" * 32)
        assert failed is not None and failed.enqueue_error == "Error 111 connecting to redis"
        assert failed.enqueue_failed_at is not None
        assert failed.status_reason == "enqueue failed: Error 111 connecting to redis"
        with s.engine.connect() as conn:
            stored = conn.execute(sa.select(jobs_t.c.status_reason).where(jobs_t.c.id == "a" * 32))
            assert stored.scalar_one() is None  # the state moved to the column
        waiting = s.get_job("b" * 32)
        assert waiting is not None and waiting.enqueue_error is None
        assert waiting.status_reason == "waiting for a gpu worker: none is live"
        finished = s.get_job("c" * 32)
        assert finished is not None and finished.enqueue_error is None
        s.clear_enqueue_failed("a" * 32)
        assert s.get_job("a" * 32).status_reason is None  # type: ignore[union-attr]
    finally:
        s.dispose()


def test_concurrent_upgrade_from_several_processes(fresh_url: str) -> None:
    results = _run_procs(_proc_upgrade, [(fresh_url,)] * 3)
    assert results == ["ok"] * 3
    s = Store(fresh_url)
    try:
        s.create_user("after-upgrade")
        assert s.has_users()
    finally:
        s.dispose()


def test_url_normalization() -> None:
    assert normalize_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


def test_sqlite_uses_wal_and_busy_timeout(tmp_path: Path) -> None:
    s = Store(f"sqlite:///{tmp_path / 'sub' / 'w.db'}")  # parent folder is created
    try:
        with s.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        s.dispose()


# ---------------------------------------------------------------- users and tokens


def test_tokens_are_hashed_and_revocable(store: Store, tmp_path: Path) -> None:
    assert not store.has_users()
    token = store.create_token("bob", "laptop")
    assert token.startswith("nc_") and len(token) > 40
    assert store.has_users()
    user = store.authenticate(token)
    assert user is not None and user.name == "bob" and not user.admin

    with store.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT * FROM tokens")).all()
    dumped = repr(rows)
    assert token not in dumped
    assert hashlib.sha256(token.encode()).hexdigest() in dumped
    if store.dialect == "sqlite":
        store.dispose()
        for f in tmp_path.glob("store.db*"):
            assert token.encode() not in f.read_bytes()

    other = store.create_token("bob", "ci")
    assert other != token
    with pytest.raises(ValueError, match="already exists"):
        store.create_token("carol", "laptop")
    assert store.revoke_token("laptop") is True
    assert store.revoke_token("laptop") is False
    assert store.revoke_token("nope") is False
    # A revoked token's name stays taken, and the refusal says why.
    with pytest.raises(ValueError, match="revoked token named 'laptop' exists; token names are"):
        store.create_token("bob", "laptop")
    assert store.authenticate(token) is None
    assert store.authenticate(other) == user
    assert store.authenticate("nc_unknown") is None
    assert store.authenticate("") is None


def test_users_idempotent_and_admin_promotion(store: Store) -> None:
    a = store.create_user("ann")
    assert store.create_user("ann") == a
    assert not a.admin
    token = store.create_token("ann", "admin-token", admin=True)
    promoted = store.authenticate(token)
    assert promoted is not None and promoted.admin and promoted.id == a.id
    assert store.create_user("ann").admin  # never demoted
    assert store.get_user("ann") == promoted
    assert store.get_user("nobody") is None
    assert promoted.created_at.tzinfo is UTC


# ---------------------------------------------------------------- jobs


def test_create_and_get_job(store: Store) -> None:
    owner, job_id = _job(store, name="resnet")
    other = store.create_user("mallory").id
    job = store.get_job(job_id)
    assert job is not None
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.status, job.attempt, job.queue, job.name) == ("queued", 0, "cpu", "resnet")
    assert job.spec == {"epochs": 1} and not job.cancel_requested and job.attempts == []
    for when in (job.created_at, job.updated_at):
        assert when.tzinfo is UTC
        assert abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert store.get_job(job_id, owner_id=owner) == job
    assert store.get_job(job_id, owner_id=other) is None
    assert store.get_job("0" * 32) is None


def test_idempotency_key(store: Store) -> None:
    alice = store.create_user("alice").id
    bob = store.create_user("bob").id
    args = {"spec": {"a": 1}, "name": "j", "queue": "cpu", "idempotency_key": "key-1"}
    first, created = store.create_job(owner_id=alice, request_hash="h1", **args)
    assert created
    again, created = store.create_job(owner_id=alice, request_hash="h1", **args)
    assert not created and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        store.create_job(owner_id=alice, request_hash="h2", **args)
    # Keys are per owner.
    bobs, created = store.create_job(owner_id=bob, request_hash="h2", **args)
    assert created and bobs.id != first.id

    # Concurrent requests with one new key make exactly one job.
    args["idempotency_key"] = "key-2"
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda _: store.create_job(owner_id=alice, request_hash="h", **args), range(8))
        )
    assert len({job.id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert store.count_active(alice) == 2


def test_list_jobs_cursor_paging(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = store.create_user("alice").id
    bob = store.create_user("bob").id
    base = datetime.now(UTC) - timedelta(days=1)
    # 25 jobs over 5 distinct timestamps: paging must be stable under equal created_at.
    expected = []
    for i in range(25):
        monkeypatch.setattr(store_jobs_mod, "utcnow", lambda i=i: base + timedelta(seconds=i // 5))
        job, _ = store.create_job(owner_id=alice, spec={}, name=f"j{i}", queue="cpu")
        expected.append(job)
    monkeypatch.undo()
    store.create_job(owner_id=bob, spec={}, name="bobs", queue="cpu")
    expected.sort(key=lambda j: (j.created_at, j.id), reverse=True)

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = store.list_jobs(owner_id=alice, limit=10, cursor=cursor)
        pages += 1
        seen += [j.id for j in page]
        assert all(j.owner_id == alice for j in page)
        if cursor is None:
            break
        decode_cursor(cursor)  # opaque, but well-formed
    assert pages == 3
    assert seen == [j.id for j in expected]
    assert len(set(seen)) == 25

    everyone, nxt = store.list_jobs(limit=100)
    assert len(everyone) == 26 and nxt is None
    assert everyone[0].name == "bobs"  # newest first
    exact, nxt = store.list_jobs(owner_id=alice, limit=25)
    assert len(exact) == 25 and nxt is None

    store.request_cancel(expected[0].id)
    cancelled, _ = store.list_jobs(owner_id=alice, status="cancelled")
    assert [j.id for j in cancelled] == [expected[0].id]
    with pytest.raises(ValueError, match="status"):
        store.list_jobs(status="bogus")
    with pytest.raises(ValueError, match="cursor"):
        store.list_jobs(cursor="not-a-cursor!")


def test_counts(store: Store) -> None:
    owner, a = _job(store)
    _, b = _job(store)
    _, c = _job(store)
    store.claim_job(b, worker_id="w", lease_seconds=30)
    store.request_cancel(c)
    assert store.count_by_status() == {
        "queued": 1,
        "running": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 1,
        "timed_out": 0,
    }
    assert store.count_active(owner) == 2
    assert store.count_active(owner + 100) == 0
    store.set_status_reason(a, "waiting for a GPU")
    assert store.get_job(a).status_reason == "waiting for a GPU"
    store.set_status_reason(a, None)
    assert store.get_job(a).status_reason is None
    with pytest.raises(NotFound):
        store.set_status_reason("f" * 32, "x")


# ---------------------------------------------------------------- claim, fencing, finish


def test_claim_is_exclusive_across_threads(store: Store) -> None:
    _, job_id = _job(store)
    n = 12
    barrier = threading.Barrier(n)

    def claim(i: int) -> int | None:
        barrier.wait()
        return store.claim_job(job_id, worker_id=f"w{i}", lease_seconds=30)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(claim, range(n)))
    winners = [r for r in results if r is not None]
    assert winners == [1]
    job = store.get_job(job_id)
    assert job.status == "running" and job.attempt == 1
    assert job.lease_owner == f"w{results.index(1)}"
    assert len(job.attempts) == 1 and job.attempts[0]["outcome"] == "running"


def test_claim_is_exclusive_across_processes(store: Store) -> None:
    _, job_id = _job(store)
    url = store.url.render_as_string(hide_password=False)
    results = _run_procs(_proc_claim, [(url, job_id, f"p{i}") for i in range(4)])
    claimed = [(w, r) for w, r in results if r is not None]
    assert len(claimed) == 1, results
    assert claimed[0][1] == 1
    assert store.get_job(job_id).lease_owner == claimed[0][0]


def test_claim_refuses_cancelled_running_and_finished(store: Store) -> None:
    _, job_id = _job(store)
    store.request_cancel(job_id)
    assert store.claim_job(job_id, worker_id="w", lease_seconds=30) is None
    job_id, attempt = _running(store)
    assert store.claim_job(job_id, worker_id="w2", lease_seconds=30) is None
    store.finish_job(job_id, attempt=attempt, status="succeeded")
    assert store.claim_job(job_id, worker_id="w2", lease_seconds=30) is None
    assert store.claim_job("e" * 32, worker_id="w", lease_seconds=30) is None


def _stale_writes(store: Store, job_id: str, attempt: int) -> list[Any]:
    return [
        lambda: store.heartbeat(job_id, attempt=attempt, lease_seconds=30),
        lambda: store.add_metrics(job_id, attempt=attempt, rows=[_row(1)]),
        lambda: store.add_logs(job_id, attempt=attempt, lines=[("info", "zombie")]),
        lambda: store.add_checkpoint(
            job_id,
            attempt=attempt,
            name="zombie",
            epoch=1,
            step=1,
            bytes=1,
            sha256="0" * 64,
            files={},
            metrics={},
            path="/nowhere",
        ),
        lambda: store.delete_checkpoint(job_id, attempt=attempt, name="x"),
        lambda: store.finish_job(job_id, attempt=attempt, status="succeeded"),
    ]


def test_stale_attempt_is_refused(store: Store) -> None:
    job_id, first = _running(store, lease=1)
    store.add_metrics(job_id, attempt=first, rows=[_row(1, loss=9.0)])
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert store.requeue_expired(now=later, max_attempts=3) == [job_id]

    # Re-queued, not yet claimed: the old attempt can't write.
    for write in _stale_writes(store, job_id, first):
        with pytest.raises(StaleAttempt):
            write()
    second = store.claim_job(job_id, worker_id="w2", lease_seconds=30)
    assert second == 2
    # Claimed by a new attempt: the zombie still can't write, the new attempt can.
    for write in _stale_writes(store, job_id, first):
        with pytest.raises(StaleAttempt):
            write()
    for write in _stale_writes(store, job_id, 99):
        with pytest.raises(StaleAttempt):
            write()
    assert store.heartbeat(job_id, attempt=second, lease_seconds=30) is False
    store.add_metrics(job_id, attempt=second, rows=[_row(1, loss=1.0)])
    rows, _ = store.get_metrics(job_id)
    assert [(r.attempt, r.values["loss"]) for r in rows] == [(2, 1.0)]
    with pytest.raises(NotFound):
        store.heartbeat("d" * 32, attempt=1, lease_seconds=30)


def test_finish_job(store: Store) -> None:
    job_id, attempt = _running(store)
    with pytest.raises(ValueError):
        store.finish_job(job_id, attempt=attempt, status="running")
    done = store.finish_job(job_id, attempt=attempt, status="failed", error="diverged: loss nan")
    assert done.status == "failed" and done.error == "diverged: loss nan"
    assert done.finished_at is not None and done.finished_at.tzinfo is UTC
    assert done.lease_expires_at is None
    assert done.attempts[-1]["outcome"] == "failed" and done.attempts[-1]["ended_at"]
    # A retried finish changes nothing: the first final status wins.
    again = store.finish_job(job_id, attempt=attempt, status="succeeded")
    assert again.status == "failed" and again.finished_at == done.finished_at
    with pytest.raises(StaleAttempt):
        store.finish_job(job_id, attempt=attempt + 1, status="succeeded")
    with pytest.raises(StaleAttempt):
        store.add_metrics(job_id, attempt=attempt, rows=[_row(1)])


# ---------------------------------------------------------------- cancel and reaper


def test_cancel_semantics(store: Store) -> None:
    _, queued = _job(store)
    job = store.request_cancel(queued)
    assert job.status == "cancelled" and job.cancel_requested and job.finished_at is not None

    running, attempt = _running(store)
    assert store.heartbeat(running, attempt=attempt, lease_seconds=30) is False
    job = store.request_cancel(running)
    assert job.status == "running" and job.cancel_requested
    assert store.request_cancel(running).cancel_requested  # twice is fine
    assert store.heartbeat(running, attempt=attempt, lease_seconds=30) is True
    store.finish_job(running, attempt=attempt, status="cancelled")

    finished, attempt = _running(store)
    store.finish_job(finished, attempt=attempt, status="succeeded")
    job = store.request_cancel(finished)
    assert job.status == "succeeded" and not job.cancel_requested
    with pytest.raises(NotFound):
        store.request_cancel("c" * 32)


def test_requeue_expired_until_max_attempts(store: Store) -> None:
    _, job_id = _job(store)
    now = datetime.now(UTC)
    for attempt in (1, 2, 3):
        assert store.claim_job(job_id, worker_id=f"w{attempt}", lease_seconds=10) == attempt
        # Lease still valid: nothing to reap.
        assert store.requeue_expired(now=now + timedelta(seconds=5), max_attempts=3) == []
        reaped = store.requeue_expired(now=now + timedelta(seconds=3600), max_attempts=3)
        job = store.get_job(job_id)
        if attempt < 3:
            assert reaped == [job_id]
            assert job.status == "queued" and job.attempt == attempt
            assert job.status_reason == f"worker lost; re-queued as attempt {attempt + 1}"
        else:
            assert reaped == []
            assert job.status == "failed" and job.finished_at is not None
            for n in (1, 2, 3):
                assert f"attempt {n} on w{n}" in job.error
            assert "max_attempts=3" in job.error
    job = store.get_job(job_id)
    assert [(h["attempt"], h["worker"], h["outcome"]) for h in job.attempts] == [
        (1, "w1", "lost"),
        (2, "w2", "lost"),
        (3, "w3", "lost"),
    ]
    assert all(h["started_at"] and h["ended_at"] for h in job.attempts)


def test_requeue_expired_cancel_requested_becomes_cancelled(store: Store) -> None:
    job_id, attempt = _running(store, lease=1)
    store.request_cancel(job_id)
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert store.requeue_expired(now=later, max_attempts=3) == []
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    # The dead worker's late finish changes nothing.
    assert store.finish_job(job_id, attempt=attempt, status="failed").status == "cancelled"


def test_heartbeat_keeps_job_from_reaper(store: Store) -> None:
    job_id, attempt = _running(store, lease=1)
    soon = datetime.now(UTC) + timedelta(seconds=30)
    store.heartbeat(job_id, attempt=attempt, lease_seconds=120)
    assert store.requeue_expired(now=soon, max_attempts=3) == []
    assert store.get_job(job_id).status == "running"


def test_take_unpublished_backs_off_and_hands_each_job_to_one_reaper(store: Store) -> None:
    _, job_id = _job(store)
    created = store.get_job(job_id)
    assert created.enqueues == 1 and created.enqueued_at is not None
    t0 = created.enqueued_at

    def take(after: float) -> list[tuple[str, str]]:
        return store.take_unpublished(after_seconds=10, now=t0 + timedelta(seconds=after))

    assert take(5) == []  # published 5 s ago: its message is most likely waiting in the broker
    assert take(11) == [(job_id, "cpu")]
    assert store.get_job(job_id).enqueues == 2
    assert take(11 + 15) == []  # the wait doubled to 20 s
    assert take(11 + 21) == [(job_id, "cpu")]
    assert take(32 + 39) == []  # then 40 s
    assert take(32 + 41) == [(job_id, "cpu")]

    # Several reapers at once: each due job goes to exactly one of them.
    _, other = _job(store, name="other")
    later = t0 + timedelta(hours=1)
    with ThreadPoolExecutor(4) as pool:
        taken = list(
            pool.map(lambda _: store.take_unpublished(after_seconds=10, now=later), range(4))
        )
    assert sorted(j for batch in taken for j, _ in batch) == sorted([job_id, other])

    # The wait is capped at 64 periods however often a job was republished.
    with store.engine.begin() as conn:
        conn.execute(sa.update(jobs_t).values(enqueues=50, enqueued_at=later))
    assert store.take_unpublished(after_seconds=10, now=later + timedelta(seconds=639)) == []
    assert len(store.take_unpublished(after_seconds=10, now=later + timedelta(seconds=641))) == 2

    # Running, finished and cancelled jobs are never republished.
    assert store.claim_job(job_id, worker_id="w", lease_seconds=30) == 1
    store.request_cancel(other)
    assert store.take_unpublished(after_seconds=10, now=later + timedelta(days=1)) == []


def test_failed_publish_is_due_at_once_and_requeue_resets_the_backoff(store: Store) -> None:
    _, job_id = _job(store)
    store.mark_enqueue_failed(job_id, "Error 111 connecting to redis")
    job = store.get_job(job_id)
    assert job.enqueued_at is None and job.enqueues == 0
    assert job.status_reason == "enqueue failed: Error 111 connecting to redis"
    assert store.take_unpublished(after_seconds=10) == [(job_id, "cpu")]
    assert store.take_unpublished(after_seconds=10) == []
    store.clear_enqueue_failed(job_id)
    assert store.get_job(job_id).status_reason is None
    store.set_status_reason(job_id, "waiting for a gpu worker: none is live")
    store.clear_enqueue_failed(job_id)  # only an "enqueue failed" reason is cleared
    assert store.get_job(job_id).status_reason == "waiting for a gpu worker: none is live"

    assert store.claim_job(job_id, worker_id="w", lease_seconds=1) == 1
    store.mark_enqueue_failed(job_id, "late")  # a running job is not marked
    assert store.get_job(job_id).status_reason is None
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert store.requeue_expired(now=later, max_attempts=3) == [job_id]
    job = store.get_job(job_id)
    assert job.enqueues == 1 and job.enqueued_at == later


def test_discard_metrics_after_a_resume_point(store: Store) -> None:
    job_id, attempt = _running(store, lease=1)
    rows = [_row(i) for i in range(1, 11)] + [_row(5, "val"), _row(10, "val")]
    store.add_metrics(job_id, attempt=attempt, rows=rows)
    assert store.requeue_expired(now=datetime.now(UTC) + timedelta(seconds=30), max_attempts=3)
    second = store.claim_job(job_id, worker_id="w2", lease_seconds=30)
    with pytest.raises(StaleAttempt):  # fenced like every worker write
        store.discard_metrics_after(job_id, attempt=attempt, step=5)
    assert store.discard_metrics_after(job_id, attempt=second, step=5) == 6
    kept, _ = store.get_metrics(job_id)
    assert sorted((r.split, r.step) for r in kept) == [("train", i) for i in range(1, 6)] + [
        ("val", 5)
    ]


# ---------------------------------------------------------------- metrics, logs, checkpoints


def test_metrics_upsert_gives_new_seq_and_unique_rows(store: Store) -> None:
    job_id, attempt = _running(store)
    rows = [_row(s, loss=float(s)) for s in range(1, 6)] + [_row(5, "val", loss=0.5)]
    random.Random(0).shuffle(rows)
    store.add_metrics(job_id, attempt=attempt, rows=rows)
    first, _ = store.get_metrics(job_id)
    # One call: seq order is step order.
    assert [r.step for r in first] == sorted(r.step for r in first)
    assert [r.seq for r in first] == sorted(r.seq for r in first)
    old_max = max(r.seq for r in first)

    store.add_metrics(
        job_id,
        attempt=attempt,
        rows=[_row(5, loss=50.0), _row(3, loss=30.0), _row(4, loss=40.0), _row(4, loss=41.0)],
    )
    after, nxt = store.get_metrics(job_id)
    keys = [(r.split, r.step) for r in after]
    assert len(keys) == len(set(keys)) == 6
    by_key = {(r.split, r.step): r for r in after}
    assert by_key[("train", 4)].values == {"loss": 41.0}  # last duplicate wins
    replaced = [by_key[("train", s)] for s in (3, 4, 5)]
    assert all(r.seq > old_max for r in replaced)
    assert [r.seq for r in replaced] == sorted(r.seq for r in replaced)
    assert by_key[("train", 1)].seq <= old_max  # untouched rows keep their seq
    # A poller that had read everything sees exactly the replacements.
    fresh, _ = store.get_metrics(job_id, after=old_max)
    assert [(r.split, r.step) for r in fresh] == [("train", 3), ("train", 4), ("train", 5)]
    assert nxt == max(r.seq for r in after)

    last = store.last_metrics(job_id)
    assert set(last) == {"train", "val"}
    assert last["train"]["step"] == 5 and last["train"]["values"] == {"loss": 50.0}
    assert last["val"]["values"] == {"loss": 0.5}
    assert store.last_metrics("b" * 32) is None

    with pytest.raises(ValueError):
        store.add_metrics(job_id, attempt=attempt, rows=[{"step": "x", "split": "t", "values": {}}])
    with pytest.raises(ValueError):
        store.add_metrics(job_id, attempt=attempt, rows=[{"split": "t", "values": {}}])


def test_metric_seq_never_reused_after_deleting_the_newest(store: Store) -> None:
    job_id, attempt = _running(store)
    store.add_metrics(job_id, attempt=attempt, rows=[_row(1), _row(2)])
    (_, second), nxt = store.get_metrics(job_id)
    store.add_metrics(job_id, attempt=attempt, rows=[_row(2, loss=2.0)])
    rows, _ = store.get_metrics(job_id, after=nxt)
    assert len(rows) == 1 and rows[0].seq > second.seq


def test_get_metrics_paging_returns_every_row_once(store: Store) -> None:
    job_id, attempt = _running(store)
    rng = random.Random(1)
    for batch in range(10):
        steps = rng.sample(range(120), 30)
        store.add_metrics(
            job_id,
            attempt=attempt,
            rows=[_row(s, split, loss=batch) for s in steps for split in ("train", "val")],
        )
    _, job2 = _job(store, owner="other")
    store.claim_job(job2, worker_id="w", lease_seconds=30)
    store.add_metrics(job2, attempt=1, rows=[_row(s) for s in range(50)])

    everything, _ = store.get_metrics(job_id, limit=10_000)
    got = []
    after = 0
    while True:
        page, nxt = store.get_metrics(job_id, after=after, limit=37)
        if not page:
            assert nxt == after
            break
        assert len(page) <= 37 and nxt == page[-1].seq
        got += page
        after = nxt
    assert [r.seq for r in got] == sorted(r.seq for r in got)
    assert got == everything
    assert all(r.job_id == job_id for r in got)
    keys = [(r.split, r.step) for r in got]
    assert len(keys) == len(set(keys))
    assert store.get_metrics(job_id, after=after + 1000) == ([], after + 1000)


def test_logs_paging(store: Store) -> None:
    job_id, attempt = _running(store)
    for i in range(5):
        store.add_logs(job_id, attempt=attempt, lines=[("info", f"a{i}"), ("warning", f"b{i}")])
    lines, nxt = store.get_logs(job_id, limit=4)
    assert [line.message for line in lines] == ["a0", "b0", "a1", "b1"]
    rest, nxt2 = store.get_logs(job_id, after=nxt)
    assert len(rest) == 6 and rest[-1].message == "b4" and nxt2 == rest[-1].id
    assert rest[0].level == "info" and rest[1].level == "warning"
    assert all(line.time.tzinfo is UTC and line.attempt == 1 for line in lines + rest)
    assert store.get_logs(job_id, after=nxt2) == ([], nxt2)


def test_checkpoints(store: Store) -> None:
    job_id, attempt = _running(store)

    def add(name: str, epoch: int, sha: str) -> None:
        store.add_checkpoint(
            job_id,
            attempt=attempt,
            name=name,
            epoch=epoch,
            step=epoch * 10,
            bytes=1234,
            sha256=sha,
            files={"model.safetensors": {"bytes": 1000}},
            metrics={"val": {"acc": 0.5}},
            path=f"/data/jobs/{job_id}/checkpoints/{name}",
        )

    add("epoch-2", 2, "b" * 64)
    add("epoch-1", 1, "a" * 64)
    add("epoch-2", 2, "c" * 64)  # rewritten after a resume: replaces
    names = [c.name for c in store.list_checkpoints(job_id)]
    assert names == ["epoch-1", "epoch-2"]
    ck = store.get_checkpoint(job_id, "epoch-2")
    assert ck is not None and ck.sha256 == "c" * 64 and ck.step == 20 and ck.bytes == 1234
    assert ck.files == {"model.safetensors": {"bytes": 1000}} and ck.metrics["val"]["acc"] == 0.5
    assert ck.created_at.tzinfo is UTC
    assert store.get_checkpoint(job_id, "nope") is None
    assert store.delete_checkpoint(job_id, attempt=attempt, name="epoch-1") is True
    assert store.delete_checkpoint(job_id, attempt=attempt, name="epoch-1") is False
    assert [c.name for c in store.list_checkpoints(job_id)] == ["epoch-2"]


def test_concurrent_writers_from_processes(store: Store) -> None:
    """Several processes write (metrics, logs, heartbeats) at once: no 'database is locked'."""
    url = store.url.render_as_string(hide_password=False)
    jobs = [_running(store) for _ in range(4)]
    results = _run_procs(_proc_write, [(url, j, a, 25) for j, a in jobs])
    assert results == ["ok"] * 4
    for job_id, _ in jobs:
        rows, _ = store.get_metrics(job_id)
        assert len(rows) == 50
        lines, _ = store.get_logs(job_id)
        assert len(lines) == 25
