"""The store: every read and write of service state, over SQLite or PostgreSQL with one code path.

Methods return frozen dataclass records, never live ORM objects. Worker-side writes are fenced by
the job's ``attempt``: a write carrying a stale attempt raises :class:`StaleAttempt`, so a zombie
twin of a job cannot write. Times are timezone-aware UTC, taken from this process's clock.

SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write transaction (a deferred
transaction that reads and then writes can fail at once with "database is locked" in WAL mode);
writes are retried a few times if the database is still locked. PostgreSQL: psycopg 3, READ
COMMITTED; per-job writes lock the job row first, so per-job sequence numbers follow commit order.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from service.db import (
    ACTIVE_STATUSES,
    FINISHED_STATUSES,
    JOB_STATUSES,
    UTCDateTime,
    checkpoints,
    jobs,
    logs,
    tokens,
    users,
    utcnow,
    workers,
)
from service.db import metrics as metrics_t

T = TypeVar("T")

TOKEN_PREFIX = "nc_"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number: the key of the PostgreSQL advisory lock held while migrating.
_PG_MIGRATION_LOCK = 0x6E6F726D636F7265  # "normcore"
_WRITE_RETRIES = 8
_IN_CHUNK = 500
# The status_reason of a queued job whose message the broker refused (a reaper publishes it again).
ENQUEUE_FAILED = "enqueue failed"
# A queued job is republished after republish_after, then after twice that, ... up to this factor.
REPUBLISH_BACKOFF_MAX = 64


class StoreError(Exception):
    """Base class of the store's own errors."""


class NotFound(StoreError, LookupError):
    """The job (or other object) does not exist."""


class StaleAttempt(StoreError):
    """A worker-side write carried an attempt that no longer owns the job."""


class IdempotencyConflict(StoreError):
    """An Idempotency-Key was reused with a different request body."""


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class UserRecord:
    """A user as the API sees it."""

    id: int
    name: str
    admin: bool
    created_at: datetime


@dataclass(frozen=True)
class JobRecord:
    """A job row. ``attempts`` is the history: [{attempt, worker, started_at, ended_at, outcome}]."""

    id: str
    owner_id: int
    name: str
    spec: dict[str, Any]
    status: str
    queue: str
    attempt: int
    error: str | None
    status_reason: str | None
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    lease_owner: str | None
    lease_expires_at: datetime | None
    idempotency_key: str | None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    enqueued_at: datetime | None = None
    enqueues: int = 0

    @property
    def finished(self) -> bool:
        """True once the job is succeeded, failed or cancelled."""
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class MetricRecord:
    """One metric row; ``time`` is Unix seconds as reported by the trainer."""

    seq: int
    job_id: str
    attempt: int
    step: int
    epoch: float
    split: str
    values: dict[str, Any]
    time: float


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint of a job as recorded after its files were written and hashed."""

    job_id: str
    name: str
    attempt: int
    epoch: int
    step: int
    bytes: int
    sha256: str
    files: dict[str, Any]
    metrics: dict[str, Any]
    path: str
    created_at: datetime


@dataclass(frozen=True)
class LogRecord:
    """One log line of a job."""

    id: int
    job_id: str
    attempt: int
    time: datetime
    level: str
    message: str


@dataclass(frozen=True)
class WorkerRecord:
    """A registered worker: its node name, host, process, GPUs, memory, queues and heartbeat."""

    name: str
    host: str
    pid: int
    gpus: int
    gpu_names: list[str]
    memory_bytes: int | None
    queues: list[str]
    started_at: datetime
    heartbeat_at: datetime
    version: str | None

    def is_live(self, within_seconds: float, now: datetime | None = None) -> bool:
        """True if the last heartbeat is at most ``within_seconds`` old."""
        return (now or utcnow()) - self.heartbeat_at <= timedelta(seconds=within_seconds)


def queue_gpus(queue: str) -> int:
    """GPUs a job of ``queue`` needs on one worker: 0 for ``cpu``, 1 for ``gpu``, K for ``gpuK``."""
    if queue == "gpu":
        return 1
    if queue.startswith("gpu") and queue[3:].isdigit():
        return int(queue[3:])
    return 0


def waiting_reason(queue: str) -> str:
    """The status_reason of a job queued while no worker of its queue is live."""
    return f"waiting for a {queue} worker: none is live"


def _worker(row: Any) -> WorkerRecord:
    m = row._mapping
    return WorkerRecord(
        name=m["name"],
        host=m["host"],
        pid=int(m["pid"]),
        gpus=int(m["gpus"]),
        gpu_names=[str(n) for n in m["gpu_names"] or []],
        memory_bytes=m["memory_bytes"],
        queues=[str(q) for q in m["queues"] or []],
        started_at=m["started_at"],
        heartbeat_at=m["heartbeat_at"],
        version=m["version"],
    )


def _job(row: Any) -> JobRecord:
    m = row._mapping
    return JobRecord(
        id=m["id"],
        owner_id=m["owner_id"],
        name=m["name"],
        spec=m["spec"],
        status=m["status"],
        queue=m["queue"],
        attempt=m["attempt"],
        error=m["error"],
        status_reason=m["status_reason"],
        cancel_requested=bool(m["cancel_requested"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        lease_owner=m["lease_owner"],
        lease_expires_at=m["lease_expires_at"],
        idempotency_key=m["idempotency_key"],
        attempts=list(m["attempts"] or []),
        enqueued_at=m["enqueued_at"],
        enqueues=int(m["enqueues"] or 0),
    )


def _user(row: Any) -> UserRecord:
    m = row._mapping
    return UserRecord(
        id=m["id"], name=m["name"], admin=bool(m["admin"]), created_at=m["created_at"]
    )


_R = TypeVar("_R")


def _record(cls: type[_R], row: Any) -> _R:
    """A frozen record from a result row whose columns carry the record's field names."""
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def _metric(row: Any) -> MetricRecord:
    return _record(MetricRecord, row)


def _checkpoint(row: Any) -> CheckpointRecord:
    return _record(CheckpointRecord, row)


def _log(row: Any) -> LogRecord:
    return _record(LogRecord, row)


# ---------------------------------------------------------------- helpers


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; ``postgresql://`` and ``postgres://`` get the psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def _ts(value: datetime) -> sa.BindParameter[datetime]:
    # A literal that goes through UTCDateTime (plain func arguments would not).
    return sa.literal(value, UTCDateTime())


def encode_cursor(created_at: datetime, job_id: str) -> str:
    """The opaque list_jobs cursor for a position after (created_at, id)."""
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`; raises ValueError on anything malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        when = datetime.fromisoformat(created)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError(f"invalid cursor {cursor!r}") from exc
    if when.tzinfo is None or not isinstance(job_id, str):
        raise ValueError(f"invalid cursor {cursor!r}")
    return when, job_id


def _retryable(exc: DBAPIError, dialect: str) -> bool:
    if dialect == "sqlite":
        text = str(exc.orig).lower()
        return "locked" in text or "busy" in text
    # serialization_failure, deadlock_detected
    return getattr(exc.orig, "sqlstate", None) in ("40001", "40P01")


def _chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _normalize_metric_row(row: Mapping[str, Any]) -> dict[str, Any]:
    try:
        step = row["step"]
        split = row["split"]
        values = row["values"]
    except KeyError as exc:
        raise ValueError(f"metric row {row!r} lacks {exc.args[0]!r}") from None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"metric row step must be an int, got {step!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"metric row split must be a non-empty str, got {split!r}")
    if not isinstance(values, Mapping):
        raise ValueError(f"metric row values must be a dict, got {type(values).__name__}")
    when = row.get("time")
    if when is None:
        when = time.time()
    elif isinstance(when, datetime):
        when = when.timestamp()
    return {
        "step": step,
        "split": split,
        "epoch": float(row.get("epoch") or 0.0),
        "values": dict(values),
        "time": float(when),
    }


def _history_close(
    history: list[dict[str, Any]], attempt: int, outcome: str, ended: datetime
) -> list[dict[str, Any]]:
    out = [dict(h) for h in history]
    for h in reversed(out):
        if h.get("attempt") == attempt:
            h["ended_at"] = ended.isoformat()
            h["outcome"] = outcome
            break
    else:
        out.append(
            {
                "attempt": attempt,
                "worker": None,
                "started_at": None,
                "ended_at": ended.isoformat(),
                "outcome": outcome,
            }
        )
    return out


def _describe_attempts(history: list[dict[str, Any]]) -> str:
    parts = [
        f"attempt {h.get('attempt')} on {h.get('worker') or '?'} "
        f"({h.get('started_at') or '?'} to {h.get('ended_at') or '?'}): {h.get('outcome')}"
        for h in history
    ]
    return "; ".join(parts)


# ---------------------------------------------------------------- engine


def make_engine(url: str | URL) -> Engine:
    """An engine configured for the service: WAL + busy timeout on SQLite, psycopg 3 on PostgreSQL."""
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        memory = u.database in (None, "", ":memory:")
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30.0, "check_same_thread": False}}
        if memory:
            kwargs["poolclass"] = StaticPool
        else:
            Path(u.database).expanduser().absolute().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(u, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take BEGIN away from sqlite3 so the "begin" hook below decides its kind.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            if conn.get_execution_options().get("normcore_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("BEGIN")

        return engine
    if u.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in u.query:
            connect_args["connect_timeout"] = 10
        return sa.create_engine(u, pool_pre_ping=True, connect_args=connect_args)
    return sa.create_engine(u, pool_pre_ping=True)


def _dispose_after_fork(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        # The parent's pooled connections must not be used (or closed) by the child.
        engine.dispose(close=False)


# ---------------------------------------------------------------- the store


class Store:
    """All service state: users and tokens, jobs, metrics, checkpoints and logs."""

    def __init__(self, url: str | URL) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._writer = self.engine.execution_options(normcore_write=True)
        ref = weakref.ref(self.engine)
        os.register_at_fork(after_in_child=lambda: _dispose_after_fork(ref))

    @classmethod
    def from_settings(cls, settings: Any) -> Store:
        """A store on ``settings.database_url``."""
        return cls(settings.database_url)

    def __repr__(self) -> str:
        return f"Store({self.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------ plumbing

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction, retrying while the database is locked."""
        delay = 0.05
        for i in range(_WRITE_RETRIES):
            try:
                with self._writer.begin() as conn:
                    return fn(conn)
            except OperationalError as exc:
                if i == _WRITE_RETRIES - 1 or not _retryable(exc, self.dialect):
                    raise
            except DBAPIError as exc:
                if i == _WRITE_RETRIES - 1 or not _retryable(exc, self.dialect):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def _fence(self, conn: Connection, job_id: str, attempt: int, *, running: bool = True) -> Any:
        """Lock the job row and check ``attempt`` owns it; returns the row."""
        row = conn.execute(
            sa.select(jobs.c.status, jobs.c.attempt, jobs.c.attempts)
            .where(jobs.c.id == job_id)
            .with_for_update()
        ).first()
        if row is None:
            raise NotFound(f"job {job_id} not found")
        if row.attempt != attempt or (running and row.status != "running"):
            raise StaleAttempt(
                f"job {job_id}: attempt {attempt} is stale "
                f"(the job is {row.status} at attempt {row.attempt})"
            )
        return row

    # ------------------------------------------------------------ lifecycle

    def upgrade(self) -> None:
        """Run the Alembic migrations to head; safe when several processes start at once."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        # The URL is not needed (env.py uses the connection below); escape % for configparser.
        cfg.set_main_option(
            "sqlalchemy.url", self.url.render_as_string(hide_password=True).replace("%", "%%")
        )
        with self._migration_lock(), self._writer.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            if conn.in_transaction():
                conn.commit()

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        if self.dialect == "postgresql":
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
                try:
                    yield
                finally:
                    conn.execute(
                        sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK}
                    )
                    conn.commit()
        elif self.dialect == "sqlite" and self.url.database not in (None, "", ":memory:"):
            lock_path = Path(self.url.database).expanduser().absolute()
            lock_path = lock_path.with_name(lock_path.name + ".migrate.lock")
            with open(lock_path, "a+") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        else:
            with _LOCAL_MIGRATION_LOCK:
                yield

    def ping(self) -> bool:
        """True if the database answers a trivial query."""
        try:
            with self._read() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    def dispose(self) -> None:
        """Close all pooled connections."""
        self.engine.dispose()

    # ------------------------------------------------------------ users and tokens

    def _get_or_create_user(self, conn: Connection, name: str, admin: bool) -> UserRecord:
        row = conn.execute(sa.select(users).where(users.c.name == name)).first()
        if row is None:
            conn.execute(sa.insert(users).values(name=name, admin=admin, created_at=utcnow()))
            row = conn.execute(sa.select(users).where(users.c.name == name)).one()
        elif admin and not row.admin:
            conn.execute(sa.update(users).where(users.c.id == row.id).values(admin=True))
            row = conn.execute(sa.select(users).where(users.c.id == row.id)).one()
        return _user(row)

    def create_user(self, name: str, *, admin: bool = False) -> UserRecord:
        """Create a user, or return the existing one of that name (admin=True promotes it)."""
        if not name or len(name) > 200:
            raise ValueError("user name must be 1 to 200 characters")
        try:
            return self._write(lambda conn: self._get_or_create_user(conn, name, admin))
        except IntegrityError:
            # Another process created it between our read and insert.
            return self._write(lambda conn: self._get_or_create_user(conn, name, admin))

    def get_user(self, name: str) -> UserRecord | None:
        """The user of that name, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(users).where(users.c.name == name)).first()
        return _user(row) if row else None

    def create_token(self, user_name: str, token_name: str, *, admin: bool = False) -> str:
        """Create a token for a user (created if missing); returns the plaintext, only this once.

        Token names are unique; reusing one raises ValueError.
        """
        if not token_name or len(token_name) > 200:
            raise ValueError("token name must be 1 to 200 characters")
        self.create_user(user_name, admin=admin)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)

        def tx(conn: Connection) -> None:
            user = self._get_or_create_user(conn, user_name, admin)
            taken = conn.execute(sa.select(tokens.c.id).where(tokens.c.name == token_name)).first()
            if taken is not None:
                raise ValueError(f"a token named {token_name!r} already exists")
            conn.execute(
                sa.insert(tokens).values(
                    user_id=user.id,
                    name=token_name,
                    token_hash=hash_token(token),
                    created_at=utcnow(),
                )
            )

        try:
            self._write(tx)
        except IntegrityError as exc:
            raise ValueError(f"a token named {token_name!r} already exists") from exc
        return token

    def revoke_token(self, token_name: str) -> bool:
        """Revoke a token by name; False if no such live token."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(
                sa.update(tokens)
                .where(tokens.c.name == token_name, tokens.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            return res.rowcount == 1

        return self._write(tx)

    def authenticate(self, token: str) -> UserRecord | None:
        """The user a live token belongs to, or None if unknown or revoked."""
        if not isinstance(token, str) or not token or len(token) > 512:
            return None
        digest = hash_token(token)
        with self._read() as conn:
            row = conn.execute(
                sa.select(users, tokens.c.token_hash)
                .join(tokens, tokens.c.user_id == users.c.id)
                .where(tokens.c.token_hash == digest, tokens.c.revoked_at.is_(None))
            ).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return _user(row)

    def has_users(self) -> bool:
        """True once any user exists."""
        with self._read() as conn:
            return conn.execute(sa.select(users.c.id).limit(1)).first() is not None

    # ------------------------------------------------------------ jobs

    def create_job(
        self,
        *,
        owner_id: int,
        spec: dict[str, Any],
        name: str,
        queue: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job; with an idempotency key, return the earlier job instead.

        Returns (job, created). The same key with another request_hash raises IdempotencyConflict.
        """
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
            raise ValueError("Idempotency-Key must be 1 to 255 characters")

        def existing(conn: Connection) -> tuple[JobRecord, bool] | None:
            if idempotency_key is None:
                return None
            row = conn.execute(
                sa.select(jobs).where(
                    jobs.c.owner_id == owner_id, jobs.c.idempotency_key == idempotency_key
                )
            ).first()
            if row is None:
                return None
            if row.request_hash != request_hash:
                raise IdempotencyConflict(
                    f"Idempotency-Key {idempotency_key!r} was used for a different request "
                    f"(job {row.id})"
                )
            return _job(row), False

        def tx(conn: Connection) -> tuple[JobRecord, bool]:
            found = existing(conn)
            if found is not None:
                return found
            now = utcnow()
            job_id = uuid.uuid4().hex
            conn.execute(
                sa.insert(jobs).values(
                    id=job_id,
                    owner_id=owner_id,
                    name=name,
                    spec=spec,
                    status="queued",
                    queue=queue,
                    attempt=0,
                    attempts=[],
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                    # The caller publishes right after this; if it never does (it crashed, or the
                    # broker lost the message), a reaper republishes after republish_after.
                    enqueued_at=now,
                    enqueues=1,
                )
            )
            return _job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()), True

        try:
            return self._write(tx)
        except IntegrityError:
            if idempotency_key is None:
                raise
            # A concurrent request with the same key won the insert.
            found = self._write(existing)
            if found is None:
                raise
            return found

    def get_job(self, job_id: str, *, owner_id: int | None = None) -> JobRecord | None:
        """A job by id; with owner_id, None unless that user owns it."""
        q = sa.select(jobs).where(jobs.c.id == job_id)
        if owner_id is not None:
            q = q.where(jobs.c.owner_id == owner_id)
        with self._read() as conn:
            row = conn.execute(q).first()
        return _job(row) if row else None

    def list_jobs(
        self,
        *,
        owner_id: int | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, ``limit`` at a time; returns (jobs, next cursor or None).

        Raises ValueError for an unknown status or a malformed cursor.
        """
        limit = max(1, min(int(limit), 1000))
        q = sa.select(jobs)
        if owner_id is not None:
            q = q.where(jobs.c.owner_id == owner_id)
        if status is not None:
            if status not in JOB_STATUSES:
                raise ValueError(f"unknown status {status!r}; one of {', '.join(JOB_STATUSES)}")
            q = q.where(jobs.c.status == status)
        if cursor:
            after_created, after_id = decode_cursor(cursor)
            q = q.where(
                sa.or_(
                    jobs.c.created_at < after_created,
                    sa.and_(jobs.c.created_at == after_created, jobs.c.id < after_id),
                )
            )
        q = q.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
        with self._read() as conn:
            rows = conn.execute(q).all()
        items = [_job(r) for r in rows[:limit]]
        nxt = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        return items, nxt

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: queued ones at once, running ones cooperatively; finished ones unchanged."""

        def tx(conn: Connection) -> JobRecord:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "queued")
                .values(
                    status="cancelled",
                    cancel_requested=True,
                    finished_at=now,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    status_reason="cancelled while queued",
                )
            )
            if res.rowcount == 0:
                conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.status == "running",
                        sa.not_(jobs.c.cancel_requested),
                    )
                    .values(cancel_requested=True, updated_at=now, status_reason="cancel requested")
                )
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            return _job(row)

        return self._write(tx)

    def set_status_reason(self, job_id: str, reason: str | None) -> None:
        """Set the human-readable reason shown beside the status (None clears it)."""

        def tx(conn: Connection) -> None:
            res = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(status_reason=reason, updated_at=utcnow())
            )
            if res.rowcount == 0:
                raise NotFound(f"job {job_id} not found")

        self._write(tx)

    def count_by_status(self) -> dict[str, int]:
        """Number of jobs per status, every status present (zero included)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.status, sa.func.count()).group_by(jobs.c.status)
            ).all()
        out = dict.fromkeys(JOB_STATUSES, 0)
        out.update({status: count for status, count in rows})
        return out

    def count_active(self, owner_id: int) -> int:
        """Queued plus running jobs of one user."""
        with self._read() as conn:
            return conn.execute(
                sa.select(sa.func.count())
                .select_from(jobs)
                .where(jobs.c.owner_id == owner_id, jobs.c.status.in_(ACTIVE_STATUSES))
            ).scalar_one()

    # ------------------------------------------------------------ workers

    def register_worker(
        self,
        name: str,
        *,
        host: str,
        pid: int,
        gpus: int = 0,
        gpu_names: Sequence[str] = (),
        memory_bytes: int | None = None,
        queues: Sequence[str] = (),
        version: str | None = None,
    ) -> WorkerRecord:
        """Insert or replace the row of worker ``name`` (started and heartbeat now).

        Queued jobs of its queues that were waiting for a live worker lose that reason (a gpu
        worker counts only with at least one GPU).
        """
        if not name or len(name) > 255:
            raise ValueError("worker name must be 1 to 255 characters")
        if gpus < 0:
            raise ValueError(f"gpus must be >= 0, got {gpus}")
        queue_list = [str(q) for q in queues]
        now = utcnow()
        values = {
            "host": host[:255],
            "pid": int(pid),
            "gpus": int(gpus),
            "gpu_names": [str(n) for n in gpu_names],
            "memory_bytes": memory_bytes,
            "queues": queue_list,
            "started_at": now,
            "heartbeat_at": now,
            "version": version[:64] if version else None,
        }
        serves = [q for q in queue_list if gpus >= queue_gpus(q)]

        def tx(conn: Connection) -> WorkerRecord:
            res = conn.execute(sa.update(workers).where(workers.c.name == name).values(**values))
            if res.rowcount == 0:
                conn.execute(sa.insert(workers).values(name=name, **values))
            for queue in serves:
                conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.status == "queued",
                        jobs.c.queue == queue,
                        jobs.c.status_reason == waiting_reason(queue),
                    )
                    .values(status_reason=None, updated_at=now)
                )
            return _worker(conn.execute(sa.select(workers).where(workers.c.name == name)).one())

        try:
            return self._write(tx)
        except IntegrityError:  # registered by a twin between our update and insert
            return self._write(tx)

    def worker_heartbeat(self, name: str) -> bool:
        """Refresh a worker's heartbeat; False if it is not registered (register it again)."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(
                sa.update(workers).where(workers.c.name == name).values(heartbeat_at=utcnow())
            )
            return res.rowcount == 1

        return self._write(tx)

    def remove_worker(self, name: str) -> bool:
        """Forget a worker (it is shutting down); True if it was registered."""
        return self._write(
            lambda conn: (
                conn.execute(sa.delete(workers).where(workers.c.name == name)).rowcount == 1
            )
        )

    def list_workers(self, live_within_seconds: float | None = None) -> list[WorkerRecord]:
        """Registered workers by name; with ``live_within_seconds``, only those beating since."""
        q = sa.select(workers).order_by(workers.c.name)
        if live_within_seconds is not None:
            since = utcnow() - timedelta(seconds=live_within_seconds)
            q = q.where(workers.c.heartbeat_at >= since)
        with self._read() as conn:
            return [_worker(r) for r in conn.execute(q).all()]

    def max_live_gpus(
        self, queue: str | None = None, *, live_within_seconds: float = 30.0
    ) -> int | None:
        """Most GPUs of one live worker (consuming ``queue`` when given); None if none is live."""
        live = [
            w for w in self.list_workers(live_within_seconds) if queue is None or queue in w.queues
        ]
        return max((w.gpus for w in live), default=None)

    # ------------------------------------------------------------ the worker's side

    def claim_job(self, job_id: str, *, worker_id: str, lease_seconds: float) -> int | None:
        """Atomically take a queued job: running, attempt += 1, lease set; returns the attempt.

        None if the job is not queued, cancel-requested, leased, or missing (a duplicate delivery).
        """

        def tx(conn: Connection) -> int | None:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status == "queued",
                    sa.not_(jobs.c.cancel_requested),
                    sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now),
                )
                .values(
                    status="running",
                    attempt=jobs.c.attempt + 1,
                    lease_owner=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=sa.func.coalesce(jobs.c.started_at, _ts(now)),
                    updated_at=now,
                    status_reason=None,
                )
            )
            if res.rowcount != 1:
                return None
            row = conn.execute(
                sa.select(jobs.c.attempt, jobs.c.attempts).where(jobs.c.id == job_id)
            ).one()
            history = [dict(h) for h in row.attempts or []]
            history.append(
                {
                    "attempt": row.attempt,
                    "worker": worker_id,
                    "started_at": now.isoformat(),
                    "ended_at": None,
                    "outcome": "running",
                }
            )
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(attempts=history))
            return int(row.attempt)

        return self._write(tx)

    def heartbeat(self, job_id: str, *, attempt: int, lease_seconds: float) -> bool:
        """Renew the lease of a running attempt; returns cancel_requested. Stale: StaleAttempt."""

        def tx(conn: Connection) -> bool:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.attempt == attempt, jobs.c.status == "running")
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            if res.rowcount != 1:
                self._fence(conn, job_id, attempt)  # raises NotFound or StaleAttempt
            return bool(
                conn.execute(
                    sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)
                ).scalar_one()
            )

        return self._write(tx)

    def add_metrics(self, job_id: str, *, attempt: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert metric rows (keys step, epoch, split, values, time) per (job, split, step).

        A replaced row is deleted and inserted anew, so it gets a new, larger seq; rows of one call
        get ascending seqs in step order.
        """
        normalized: dict[tuple[str, int], dict[str, Any]] = {}
        for raw in rows:
            r = _normalize_metric_row(raw)
            normalized.pop((r["split"], r["step"]), None)  # the last duplicate wins
            normalized[(r["split"], r["step"])] = r
        ordered = sorted(normalized.values(), key=lambda r: r["step"])

        def tx(conn: Connection) -> None:
            self._fence(conn, job_id, attempt)
            if not ordered:
                return
            by_split: dict[str, list[int]] = {}
            for r in ordered:
                by_split.setdefault(r["split"], []).append(r["step"])
            for split, steps in by_split.items():
                for chunk in _chunks(steps):
                    conn.execute(
                        sa.delete(metrics_t).where(
                            metrics_t.c.job_id == job_id,
                            metrics_t.c.split == split,
                            metrics_t.c.step.in_(list(chunk)),
                        )
                    )
            # One statement per row keeps seq assignment in this exact order on every backend.
            stmt = sa.insert(metrics_t)
            for r in ordered:
                conn.execute(stmt, {"job_id": job_id, "attempt": attempt, **r})

        self._write(tx)

    def discard_metrics_after(self, job_id: str, *, attempt: int, step: int) -> int:
        """Delete the job's metric rows past ``step`` (a resumed attempt starts there).

        Rows an earlier attempt wrote beyond the checkpoint a resume starts from describe
        training that no longer counts; the resumed attempt writes those steps anew, and if it
        stops earlier (cancelled, failed) none of the discarded rows linger. Returns the count.
        """

        def tx(conn: Connection) -> int:
            self._fence(conn, job_id, attempt)
            res = conn.execute(
                sa.delete(metrics_t).where(metrics_t.c.job_id == job_id, metrics_t.c.step > step)
            )
            return int(res.rowcount or 0)

        return self._write(tx)

    def add_checkpoint(
        self,
        job_id: str,
        *,
        attempt: int,
        name: str,
        epoch: int,
        step: int,
        bytes: int,
        sha256: str,
        files: dict[str, Any],
        metrics: dict[str, Any],
        path: str,
    ) -> None:
        """Record a checkpoint (written, fsynced and hashed already); replaces one of that name."""
        values = {
            "job_id": job_id,
            "attempt": attempt,
            "name": name,
            "epoch": epoch,
            "step": step,
            "bytes": bytes,
            "sha256": sha256,
            "files": files,
            "metrics": metrics,
            "path": path,
        }

        def tx(conn: Connection) -> None:
            self._fence(conn, job_id, attempt)
            conn.execute(
                sa.delete(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            )
            conn.execute(sa.insert(checkpoints).values(**values, created_at=utcnow()))

        self._write(tx)

    def delete_checkpoint(self, job_id: str, *, attempt: int, name: str) -> bool:
        """Forget a checkpoint (keep_last pruned its files); True if one was recorded."""

        def tx(conn: Connection) -> bool:
            self._fence(conn, job_id, attempt)
            res = conn.execute(
                sa.delete(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            )
            return res.rowcount > 0

        return self._write(tx)

    def add_logs(self, job_id: str, *, attempt: int, lines: Sequence[tuple[str, str]]) -> None:
        """Append log lines (level, message) to a running attempt."""
        now = utcnow()
        params = [
            {
                "job_id": job_id,
                "attempt": attempt,
                "time": now,
                "level": str(level)[:16],
                "message": str(message),
            }
            for level, message in lines
        ]

        def tx(conn: Connection) -> None:
            self._fence(conn, job_id, attempt)
            for p in params:
                conn.execute(sa.insert(logs), p)

        self._write(tx)

    def finish_job(
        self, job_id: str, *, attempt: int, status: str, error: str | None = None
    ) -> JobRecord:
        """Record the final status of a running attempt; returns the job.

        If the job is already finished at this attempt (a retried call, or the reaper cancelled
        it), nothing changes: the first final status wins. Any other mismatch: StaleAttempt.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(f"finish status must be one of {FINISHED_STATUSES}, not {status!r}")

        def tx(conn: Connection) -> JobRecord:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if row.attempt == attempt and row.status in FINISHED_STATUSES:
                return _job(row)
            if row.attempt != attempt or row.status != "running":
                raise StaleAttempt(
                    f"job {job_id}: attempt {attempt} is stale "
                    f"(the job is {row.status} at attempt {row.attempt})"
                )
            now = utcnow()
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    status=status,
                    error=error,
                    finished_at=now,
                    updated_at=now,
                    lease_expires_at=None,
                    status_reason=None,
                    attempts=_history_close(list(row.attempts or []), attempt, status, now),
                )
            )
            return _job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

        return self._write(tx)

    def requeue_expired(self, *, now: datetime | None = None, max_attempts: int) -> list[str]:
        """Reap running jobs whose lease expired; returns the ids put back in the queue.

        Back to queued while attempts remain; failed (with the attempt history in the error) once
        ``max_attempts`` attempts were used; cancelled if a cancel was requested.
        """
        now = now or utcnow()
        with self._read() as conn:
            candidates = conn.execute(
                sa.select(jobs.c.id, jobs.c.attempt).where(
                    jobs.c.status == "running", jobs.c.lease_expires_at < now
                )
            ).all()

        requeued: list[str] = []
        for job_id, attempt in candidates:

            def tx(conn: Connection, job_id: str = job_id, attempt: int = attempt) -> bool:
                row = conn.execute(
                    sa.select(jobs).where(jobs.c.id == job_id).with_for_update()
                ).first()
                # Re-check under the lock: a heartbeat or finish may have come in meanwhile.
                if (
                    row is None
                    or row.status != "running"
                    or row.attempt != attempt
                    or row.lease_expires_at is None
                    or row.lease_expires_at >= now
                ):
                    return False
                history = _history_close(list(row.attempts or []), attempt, "lost", now)
                # Clear the lease so the next claim need not wait for the wall clock to pass it.
                values: dict[str, Any] = {
                    "updated_at": now,
                    "attempts": history,
                    "lease_owner": None,
                    "lease_expires_at": None,
                }
                if row.cancel_requested:
                    values |= {
                        "status": "cancelled",
                        "finished_at": now,
                        "status_reason": "cancel requested; worker lost",
                    }
                elif attempt >= max_attempts:
                    values |= {
                        "status": "failed",
                        "finished_at": now,
                        "status_reason": None,
                        "error": f"worker lost on all {attempt} attempts "
                        f"(max_attempts={max_attempts}): {_describe_attempts(history)}",
                    }
                else:
                    values |= {
                        "status": "queued",
                        "status_reason": f"worker lost; re-queued as attempt {attempt + 1}",
                        "enqueued_at": now,  # the caller publishes it
                        "enqueues": 1,
                    }
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))
                return values["status"] == "queued"

            if self._write(tx):
                requeued.append(job_id)
        return requeued

    def mark_enqueue_failed(self, job_id: str, error: str) -> None:
        """Note that publishing a queued job failed: a reaper retries it on its next round."""
        reason = f"{ENQUEUE_FAILED}: {error}"[:2000]

        def tx(conn: Connection) -> None:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == "queued")
                .values(
                    enqueued_at=None,
                    # a publish that did not happen does not count towards the backoff
                    enqueues=sa.case((jobs.c.enqueues > 0, jobs.c.enqueues - 1), else_=0),
                    status_reason=reason,
                    updated_at=utcnow(),
                )
            )

        self._write(tx)

    def clear_enqueue_failed(self, job_id: str) -> None:
        """Drop an "enqueue failed" status reason once the job's message went out."""

        def tx(conn: Connection) -> None:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status_reason.like(f"{ENQUEUE_FAILED}%"))
                .values(status_reason=None, updated_at=utcnow())
            )

        self._write(tx)

    def take_unpublished(
        self, *, after_seconds: float, now: datetime | None = None, limit: int = 100
    ) -> list[tuple[str, str]]:
        """Queued jobs whose message may be lost, marked as republished now: [(id, queue)].

        Due: the last publish failed (``enqueued_at`` is NULL), or the job is still unclaimed
        ``after_seconds * 2**(enqueues - 1)`` (at most ``REPUBLISH_BACKOFF_MAX`` times
        ``after_seconds``) after its last publish, so a job that merely waits for a busy worker
        gets a handful of duplicate messages (dropped by the claim), not one per period. Each job
        is taken by one conditional UPDATE, so of several reapers only one republishes it.
        """
        now = now or utcnow()
        first_due = now - timedelta(seconds=after_seconds)
        with self._read() as conn:
            rows = conn.execute(
                sa.select(jobs.c.id, jobs.c.queue, jobs.c.enqueued_at, jobs.c.enqueues)
                .where(
                    jobs.c.status == "queued",
                    sa.not_(jobs.c.cancel_requested),
                    sa.or_(jobs.c.enqueued_at.is_(None), jobs.c.enqueued_at < first_due),
                )
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(max(1, int(limit)))
            ).all()
        taken: list[tuple[str, str]] = []
        for job_id, queue, enqueued_at, enqueues in rows:
            factor = min(2 ** max(int(enqueues) - 1, 0), REPUBLISH_BACKOFF_MAX)
            due = now - timedelta(seconds=after_seconds * factor)
            if enqueued_at is not None and enqueued_at >= due:
                continue
            seen = sa.or_(jobs.c.enqueued_at.is_(None), jobs.c.enqueued_at < _ts(due))

            def tx(
                conn: Connection, job_id: str = job_id, n: int = int(enqueues), seen: Any = seen
            ) -> bool:
                res = conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.status == "queued",
                        sa.not_(jobs.c.cancel_requested),
                        jobs.c.enqueues == n,
                        seen,
                    )
                    .values(enqueued_at=now, enqueues=n + 1)
                )
                return res.rowcount == 1

            if self._write(tx):
                taken.append((job_id, queue))
        return taken

    # ------------------------------------------------------------ reads for the API

    def get_metrics(
        self, job_id: str, *, after: int = 0, limit: int = 1000
    ) -> tuple[list[MetricRecord], int]:
        """Metric rows with seq > after, in seq order; returns (rows, last seq or after)."""
        limit = max(1, min(int(limit), 10_000))
        with self._read() as conn:
            rows = conn.execute(
                sa.select(metrics_t)
                .where(metrics_t.c.job_id == job_id, metrics_t.c.seq > after)
                .order_by(metrics_t.c.seq)
                .limit(limit)
            ).all()
        items = [_metric(r) for r in rows]
        return items, (items[-1].seq if items else after)

    def last_metrics(self, job_id: str) -> dict[str, Any] | None:
        """The latest row of each split: {split: {seq, step, epoch, values, time}}, or None."""
        latest = (
            sa.select(metrics_t.c.split, sa.func.max(metrics_t.c.step).label("step"))
            .where(metrics_t.c.job_id == job_id)
            .group_by(metrics_t.c.split)
            .subquery()
        )
        with self._read() as conn:
            rows = conn.execute(
                sa.select(metrics_t)
                .join(
                    latest,
                    sa.and_(metrics_t.c.split == latest.c.split, metrics_t.c.step == latest.c.step),
                )
                .where(metrics_t.c.job_id == job_id)
                .order_by(metrics_t.c.split)
            ).all()
        if not rows:
            return None
        out: dict[str, Any] = {}
        for r in rows:
            m = _metric(r)
            out[m.split] = {
                "seq": m.seq,
                "step": m.step,
                "epoch": m.epoch,
                "values": m.values,
                "time": m.time,
            }
        return out

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoints, oldest step first."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(checkpoints)
                .where(checkpoints.c.job_id == job_id)
                .order_by(checkpoints.c.step, checkpoints.c.id)
            ).all()
        return [_checkpoint(r) for r in rows]

    def get_checkpoint(self, job_id: str, name: str) -> CheckpointRecord | None:
        """One checkpoint by name, or None."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            ).first()
        return _checkpoint(row) if row else None

    def get_logs(
        self, job_id: str, *, after: int = 0, limit: int = 1000
    ) -> tuple[list[LogRecord], int]:
        """Log lines with id > after, in order; returns (lines, last id or after)."""
        limit = max(1, min(int(limit), 10_000))
        with self._read() as conn:
            rows = conn.execute(
                sa.select(logs)
                .where(logs.c.job_id == job_id, logs.c.id > after)
                .order_by(logs.c.id)
                .limit(limit)
            ).all()
        items = [_log(r) for r in rows]
        return items, (items[-1].id if items else after)


_LOCAL_MIGRATION_LOCK = threading.Lock()

__all__ = [
    "ENQUEUE_FAILED",
    "CheckpointRecord",
    "IdempotencyConflict",
    "JobRecord",
    "LogRecord",
    "MetricRecord",
    "NotFound",
    "StaleAttempt",
    "Store",
    "StoreError",
    "UserRecord",
    "WorkerRecord",
    "hash_token",
    "normalize_url",
    "waiting_reason",
]
