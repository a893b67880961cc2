"""SQLAlchemy models of the store: users, tokens, jobs, job tags, metrics, checkpoints, logs,
workers.

The same models serve SQLite and PostgreSQL. Datetimes are timezone-aware UTC in Python; SQLite
keeps them naive (always UTC) and :class:`UTCDateTime` restores the zone on the way out.
The Alembic migrations in ``service/migrations`` must match this metadata (a test checks it).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.status import ACTIVE_STATUSES, FINISHED_STATUSES, JOB_STATUSES, JobStatus

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid), never a BIGINT one.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that stores UTC and always returns aware UTC datetimes."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Refuse naive datetimes; convert to UTC (naive UTC for SQLite, which has no zones)."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to naive values (SQLite) and normalise aware ones to UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a constraint naming convention (stable names for migrations)."""

    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: sa.JSON(),
    }


class User(Base):
    """A person or service account that owns jobs."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    admin: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Token(Base):
    """An API token; only its sha256 is stored, never the token itself."""

    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Job(Base):
    """One training job; ``attempt`` is the fencing token of the worker that runs it."""

    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_owner_id_created_at_id", "owner_id", "created_at", "id"),
        sa.Index("ix_jobs_created_at_id", "created_at", "id"),
        sa.Index("ix_jobs_status", "status"),
        sa.Index("ix_jobs_owner_id_name", "owner_id", "name"),
        sa.UniqueConstraint("owner_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    # A service.status.JobStatus value (no CHECK constraint: a new state needs no migration).
    status: Mapped[str] = mapped_column(sa.String(16), default=JobStatus.QUEUED.value)
    queue: Mapped[str] = mapped_column(sa.String(64), default="cpu")
    attempt: Mapped[int] = mapped_column(sa.Integer, default=0)
    attempts: Mapped[list[dict[str, Any]]] = mapped_column(sa.JSON, default=list)
    error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    status_reason: Mapped[str | None] = mapped_column(sa.Text, default=None)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(sa.String(128), default=None)
    # The sweep that made this job, and its cell: {"run", "cell", "seed", "values"}.
    sweep_id: Mapped[str | None] = mapped_column(sa.String(32), default=None, index=True)
    sweep_cell: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    # When the job's message was last handed to the broker (None: the last publish failed), and
    # how many messages it got since it was last queued; the reaper republishes a queued job
    # whose message may be lost, backing off by that count.
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    enqueues: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    # The broker's error of the last failed publish of a queued job, and when (both None once a
    # message went out or a worker claimed the job): the "enqueue failed" state.
    enqueue_error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    enqueue_failed_at: Mapped[datetime | None] = mapped_column(default=None)
    # A free-text note for people (PATCH /jobs/{id}); None: no note.
    note: Mapped[str | None] = mapped_column(sa.Text, default=None)
    # Warnings about the job, [{"code", "message", "source"}]: submit-time checks ("validate")
    # and what norm telemetry saw while it trained ("telemetry"). None on jobs from before 0009.
    warnings: Mapped[list[dict[str, Any]] | None] = mapped_column(sa.JSON, default=list)


class Sweep(Base):
    """A grid of job specs times seeds; its runs become ordinary jobs, ``concurrency`` at a time.

    ``released`` runs (in run order) have been handed to the submit path; ``releasing`` stays
    True until every run has its job (the releaser's work list).
    """

    __tablename__ = "sweeps"
    __table_args__ = (
        sa.Index("ix_sweeps_owner_id_created_at_id", "owner_id", "created_at", "id"),
        sa.Index("ix_sweeps_releasing", "releasing"),
        sa.UniqueConstraint("owner_id", "idempotency_key"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    owner_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(200))
    request: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    runs: Mapped[int] = mapped_column(sa.Integer)
    released: Mapped[int] = mapped_column(sa.Integer, default=0)
    releasing: Mapped[bool] = mapped_column(sa.Boolean, default=True)
    cancel_requested: Mapped[bool] = mapped_column(sa.Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(255), default=None)
    request_hash: Mapped[str | None] = mapped_column(sa.String(128), default=None)


class JobTag(Base):
    """One tag of a job (from its spec's ``tags``), for ``GET /jobs?tag=``."""

    __tablename__ = "job_tags"
    __table_args__ = (sa.Index("ix_job_tags_tag_job_id", "tag", "job_id"),)

    job_id: Mapped[str] = mapped_column(
        sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class Metric(Base):
    """One metric row; ``seq`` is global and monotone, a row is unique per (job, split, step)."""

    __tablename__ = "metrics"
    __table_args__ = (
        sa.Index("ix_metrics_job_id_seq", "job_id", "seq"),
        sa.UniqueConstraint("job_id", "split", "step"),
        # Without AUTOINCREMENT SQLite reuses the largest rowid after a delete, and a replaced
        # row could come back under the seq a poller already saw.
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    split: Mapped[str] = mapped_column(sa.String(64))
    step: Mapped[int] = mapped_column(sa.BigInteger)
    epoch: Mapped[float] = mapped_column(sa.Float)
    values: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    time: Mapped[float] = mapped_column(sa.Float)
    # The seq of the row this one superseded (same job, split and step), so a follower that
    # read the old row knows this is its replacement; None for a first write.
    replaces: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    # Set by a resumed attempt on the rows past its checkpoint: hidden from every read, kept
    # only so the rewrite can name the seq it replaces (and dropped by that rewrite).
    discarded: Mapped[bool] = mapped_column(
        sa.Boolean, default=False, server_default=sa.false(), nullable=False
    )


class NormTelemetryRow(Base):
    """One norm layer in one telemetry record of a job (normcore.telemetry); ``seq`` is global
    and monotone like metrics' seq, a row is unique per (job, step, layer)."""

    __tablename__ = "norm_telemetry"
    __table_args__ = (
        sa.Index("ix_norm_telemetry_job_id_seq", "job_id", "seq"),
        sa.UniqueConstraint("job_id", "step", "layer"),
        {"sqlite_autoincrement": True},
    )

    seq: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    step: Mapped[int] = mapped_column(sa.BigInteger)
    epoch: Mapped[int] = mapped_column(sa.Integer)
    # "start", "eval" or "steps" (normcore.engine.NormRecord.trigger)
    trigger: Mapped[str] = mapped_column(sa.String(16))
    layer: Mapped[str] = mapped_column(sa.String(255))
    values: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    time: Mapped[float] = mapped_column(sa.Float)


class Checkpoint(Base):
    """A checkpoint saved by a job, with its sha256 and the metrics at save time."""

    __tablename__ = "checkpoints"
    __table_args__ = (sa.UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    name: Mapped[str] = mapped_column(sa.String(255))
    epoch: Mapped[int] = mapped_column(sa.Integer)
    step: Mapped[int] = mapped_column(sa.BigInteger)
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    files: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    path: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Log(Base):
    """One log line of a job."""

    __tablename__ = "logs"
    __table_args__ = (
        sa.Index("ix_logs_job_id_id", "job_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(sa.String(16))
    message: Mapped[str] = mapped_column(sa.Text)


class Worker(Base):
    """A worker process that registered itself: where it runs, what it has, when it last beat."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int] = mapped_column(sa.Integer)
    gpus: Mapped[int] = mapped_column(sa.Integer, default=0)
    gpu_names: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    memory_bytes: Mapped[int | None] = mapped_column(sa.BigInteger, default=None)
    queues: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    version: Mapped[str | None] = mapped_column(sa.String(64), default=None)


class GpuQueueSeen(Base):
    """A gpu queue (gpu, gpu2, ...) some worker with enough GPUs for it has ever served.

    Rows are never deleted: they tell "no GPU worker ever registered" (a CUDA job is refused at
    submit) from "GPU workers exist but none is live now" (the job waits, with a reason).
    """

    __tablename__ = "gpu_queues_seen"

    queue: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A file or checkpoint a worker builds from a checkpoint: an ONNX export or a recalibration.

    Cached by (job, kind, the checkpoint's sha256, options): a second request with the same
    options finds this row instead of starting a worker task. ``status`` runs queued -> running
    -> succeeded | failed; a running row whose lease expired may be claimed again.
    """

    __tablename__ = "artifacts"
    __table_args__ = (
        sa.UniqueConstraint("job_id", "kind", "checkpoint_sha256", "options_key"),
        sa.Index("ix_artifacts_job_id_created_at", "job_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(16))
    checkpoint: Mapped[str] = mapped_column(sa.String(255))
    checkpoint_sha256: Mapped[str] = mapped_column(sa.String(64))
    options_key: Mapped[str] = mapped_column(sa.String(255))
    options: Mapped[dict[str, Any]] = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.String(16), default="queued")
    error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    result: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    path: Mapped[str | None] = mapped_column(sa.Text, default=None)
    sha256: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    bytes: Mapped[int | None] = mapped_column(sa.BigInteger, default=None)
    enqueues: Mapped[int] = mapped_column(sa.Integer, default=0)
    runs: Mapped[int] = mapped_column(sa.Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


metadata = Base.metadata
users = User.__table__
tokens = Token.__table__
jobs = Job.__table__
sweeps = Sweep.__table__
job_tags = JobTag.__table__
metrics = Metric.__table__
checkpoints = Checkpoint.__table__
norm_telemetry = NormTelemetryRow.__table__
logs = Log.__table__
workers = Worker.__table__
gpu_queues_seen = GpuQueueSeen.__table__
artifacts = Artifact.__table__

__all__ = [
    "ACTIVE_STATUSES",
    "FINISHED_STATUSES",
    "JOB_STATUSES",
    "Base",
    "UTCDateTime",
    "artifacts",
    "checkpoints",
    "job_tags",
    "jobs",
    "logs",
    "metadata",
    "metrics",
    "norm_telemetry",
    "sweeps",
    "tokens",
    "users",
    "utcnow",
    "workers",
]
