"""The store: every read and write of service state, over SQLite or PostgreSQL with one code path.

A package of small parts behind one facade, :class:`Store` (see ``facade.py``):

- ``database``: engine set-up, one transaction per public method, migrations;
- ``records``: the frozen records returned (tables live apart, in ``service.db``);
- ``errors``: typed errors with codes; ``cursor``: the list_jobs cursor;
- ``users``, ``jobs``, ``attempts`` (claims, leases, fenced writes), ``recovery`` (expired
  leases, lost messages), ``results`` (metrics, checkpoints, logs), ``workers``.

Methods return frozen dataclass records, never live ORM objects. Worker-side writes are fenced by
the job's ``attempt``: a write carrying a stale attempt raises :class:`StaleAttempt`, so a zombie
twin of a job cannot write. Times are timezone-aware UTC, taken from this process's clock.
"""

from __future__ import annotations

from service.status import ACTIVE_STATUSES, FINISHED_STATUSES, JOB_STATUSES, JobStatus
from service.store.attempts import normalize_metric_row
from service.store.cursor import decode_cursor, encode_cursor
from service.store.database import MIGRATIONS_DIR, Database, make_engine, normalize_url
from service.store.errors import (
    IdempotencyConflict,
    InvalidCursor,
    NotFound,
    QuotaExceeded,
    StaleAttempt,
    StoreError,
)
from service.store.facade import Store
from service.store.records import (
    ENQUEUE_FAILED,
    CheckpointRecord,
    JobRecord,
    LogRecord,
    MetricRecord,
    UserRecord,
    WorkerRecord,
)
from service.store.recovery import REPUBLISH_BACKOFF_MAX
from service.store.users import TOKEN_PREFIX, hash_token
from service.store.workers import queue_gpus, waiting_reason

__all__ = [
    "ACTIVE_STATUSES",
    "ENQUEUE_FAILED",
    "FINISHED_STATUSES",
    "JOB_STATUSES",
    "MIGRATIONS_DIR",
    "REPUBLISH_BACKOFF_MAX",
    "TOKEN_PREFIX",
    "CheckpointRecord",
    "Database",
    "IdempotencyConflict",
    "InvalidCursor",
    "JobRecord",
    "JobStatus",
    "LogRecord",
    "MetricRecord",
    "NotFound",
    "QuotaExceeded",
    "StaleAttempt",
    "Store",
    "StoreError",
    "UserRecord",
    "WorkerRecord",
    "decode_cursor",
    "encode_cursor",
    "hash_token",
    "make_engine",
    "normalize_metric_row",
    "normalize_url",
    "queue_gpus",
    "waiting_reason",
]
