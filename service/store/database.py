"""The database: engine set-up for SQLite and PostgreSQL, transactions, migrations.

SQLite: WAL, a busy timeout, and ``BEGIN IMMEDIATE`` for every write transaction (a deferred
transaction that reads and then writes can fail at once with "database is locked" in WAL mode),
so write transactions are serialized; reads send no BEGIN (each statement reads one consistent
state, as under PostgreSQL's READ COMMITTED); writes are retried a few times if the database is still
locked. PostgreSQL: psycopg 3, READ COMMITTED; per-job writes lock the job row first, so per-job
sequence numbers follow commit order, and a submit locks its user's row (the quota check).
Every public method of the store runs in one transaction of its own, or inside the caller's
:meth:`Database.read_transaction` (an API request reads its job and rows in one transaction).
Connections are pooled on both backends (a QueuePool sized for the API's thread pool).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool, StaticPool

from service.db import UTCDateTime

T = TypeVar("T")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# Any fixed 64-bit number: the key of the PostgreSQL advisory lock held while migrating.
_PG_MIGRATION_LOCK = 0x6E6F726D636F7265  # "normcore"
_WRITE_RETRIES = 8
_IN_CHUNK = 500
_LOCAL_MIGRATION_LOCK = threading.Lock()
# Pool sizes: the API runs sync routes on AnyIO's thread pool (40 threads by default) and holds
# at most one connection per request; a worker holds a few. Connections past pool_size are
# opened for a burst and closed on return.
POOL_SIZE = 10
POOL_MAX_OVERFLOW = 30
POOL_TIMEOUT_S = 30.0
# SQLite page cache per connection (negative: KiB) and memory-mapped reads, per connection.
_SQLITE_CACHE_KIB = 16_384
_SQLITE_MMAP_BYTES = 256 * 1024 * 1024
# The connection of the read transaction this context is inside, with its Database.
_READING: ContextVar[tuple[Database, Connection] | None] = ContextVar(
    "normcore_reading", default=None
)


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL; ``postgresql://`` and ``postgres://`` get the psycopg 3 driver."""
    u = make_url(url)
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    return u


def ts(value: datetime) -> sa.BindParameter[datetime]:
    """A literal that goes through UTCDateTime (plain func arguments would not)."""
    return sa.literal(value, UTCDateTime())


def chunks(items: Sequence[T], size: int = _IN_CHUNK) -> Iterator[Sequence[T]]:
    """``items`` in slices of at most ``size`` (bounded ``IN (...)`` lists)."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _retryable(exc: DBAPIError, dialect: str) -> bool:
    if dialect == "sqlite":
        text = str(exc.orig).lower()
        return "locked" in text or "busy" in text
    # serialization_failure, deadlock_detected
    return getattr(exc.orig, "sqlstate", None) in ("40001", "40P01")


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
            # Opening a SQLite connection (and its pragmas) costs more than a small query.
            kwargs.update(
                poolclass=QueuePool,
                pool_size=POOL_SIZE,
                max_overflow=POOL_MAX_OVERFLOW,
                pool_timeout=POOL_TIMEOUT_S,
            )
        engine = sa.create_engine(u, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take BEGIN away from sqlite3 so the "begin" hook below decides its kind.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA mmap_size={_SQLITE_MMAP_BYTES}")
            cur.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Reads send no BEGIN: each SELECT is its own implicit transaction (a consistent
            # statement, as under PostgreSQL's READ COMMITTED, which every read already
            # allows for). A BEGIN/ROLLBACK pair per read cost more than the query itself.
            if conn.get_execution_options().get("normcore_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if u.get_backend_name() == "postgresql":
        connect_args: dict[str, Any] = {}
        if "connect_timeout" not in u.query:
            connect_args["connect_timeout"] = 10
        return sa.create_engine(
            u,
            pool_pre_ping=True,
            pool_size=POOL_SIZE,
            max_overflow=POOL_MAX_OVERFLOW,
            pool_timeout=POOL_TIMEOUT_S,
            connect_args=connect_args,
        )
    return sa.create_engine(u, pool_pre_ping=True)


def _dispose_after_fork(ref: weakref.ref[Engine]) -> None:
    engine = ref()
    if engine is not None:
        # The parent's pooled connections must not be used (or closed) by the child.
        engine.dispose(close=False)


class Database:
    """An engine plus the transaction helpers every part of the store uses."""

    def __init__(self, url: str | URL) -> None:
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._writer = self.engine.execution_options(normcore_write=True)
        ref = weakref.ref(self.engine)
        os.register_at_fork(after_in_child=lambda: _dispose_after_fork(ref))

    @classmethod
    def from_settings(cls, settings: Any) -> Self:
        """A store on ``settings.database_url``."""
        return cls(settings.database_url)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url.render_as_string(hide_password=True)!r})"

    # ------------------------------------------------------------ transactions

    def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction, retrying while the database is locked.

        On SQLite the transaction is ``BEGIN IMMEDIATE``: it holds the write lock from its first
        statement, so a read-then-write inside ``fn`` is atomic against every other writer.
        """
        delay = 0.05
        for i in range(_WRITE_RETRIES):
            try:
                with self._writer.begin() as conn:
                    return fn(conn)
            except DBAPIError as exc:  # OperationalError included
                if i == _WRITE_RETRIES - 1 or not _retryable(exc, self.dialect):
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection to read on: the enclosing :meth:`read_transaction`'s, else a pooled one
        for this read alone."""
        reading = _READING.get()
        if reading is not None and reading[0] is self:
            yield reading[1]
            return
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Run every store read inside the block on one pooled connection, in one transaction.

        An API request reads its job and then its rows with one checkout and one reset
        instead of one per read. Each statement sees committed data as of its start (SQLite
        sends no BEGIN for reads; PostgreSQL is READ COMMITTED), so the block is no snapshot:
        a read that needs one must stay a single statement. Nested blocks join the outer one. The block is bound to the current thread or task (a context variable):
        a read run on another thread opens its own transaction. Writes inside the block use
        their own connection and transaction, as always.
        """
        reading = _READING.get()
        if reading is not None and reading[0] is self:
            yield
            return
        with self.engine.connect() as conn:
            token = _READING.set((self, conn))
            try:
                yield
            finally:
                _READING.reset(token)

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
