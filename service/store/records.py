"""The records the store returns: frozen dataclasses, never live rows or ORM objects.

The tables (``service.db``) are kept apart from these entities; the mappers below turn a result
row into a record. Times are timezone-aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any, TypeVar

from service.db import utcnow
from service.status import FINISHED_STATUSES, JobStatus

ENQUEUE_FAILED = "enqueue failed"
"""Prefix of the ``status_reason`` shown for a queued job whose last publish failed (display
only: the state itself is the ``enqueue_error`` column)."""


@dataclass(frozen=True)
class UserRecord:
    """A user as the API sees it."""

    id: int
    name: str
    admin: bool
    created_at: datetime


@dataclass(frozen=True)
class JobRecord:
    """A job row. ``attempts`` is the history: [{attempt, worker, started_at, ended_at, outcome}].

    ``status_reason`` is the stored reason, except for a queued job whose last publish failed:
    then it reads "enqueue failed: <enqueue_error>" (the state is ``enqueue_error``, not the
    text). ``tags`` are the spec's tags, as stored in the job_tags table.
    """

    id: str
    owner_id: int
    name: str
    spec: dict[str, Any]
    status: JobStatus
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
    enqueue_error: str | None = None
    enqueue_failed_at: datetime | None = None
    note: str | None = None
    # [{"code", "message", "source"}]: submit-time checks and norm telemetry
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """True once the job is in a terminal state (succeeded, failed, cancelled, timed_out)."""
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class MetricRecord:
    """One metric row; ``epoch`` is the 1-based epoch of the row (an int); ``time`` Unix seconds."""

    seq: int
    job_id: str
    attempt: int
    step: int
    epoch: int
    split: str
    values: dict[str, Any]
    time: float
    replaces: int | None = None  # seq of the row of the same (split, step) this one superseded


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


_R = TypeVar("_R")


def to_record(cls: type[_R], row: Any) -> _R:
    """A frozen record from a result row whose columns carry the record's field names."""
    m = row._mapping
    return cls(**{f.name: m[f.name] for f in fields(cls)})  # type: ignore[arg-type]


def to_job(row: Any) -> JobRecord:
    """A JobRecord from a full ``jobs`` row."""
    m = row._mapping
    status = JobStatus(m["status"])
    enqueue_error = m["enqueue_error"]
    reason = m["status_reason"]
    if enqueue_error is not None and status is JobStatus.QUEUED:
        reason = f"{ENQUEUE_FAILED}: {enqueue_error}"
    return JobRecord(
        id=m["id"],
        owner_id=m["owner_id"],
        name=m["name"],
        spec=m["spec"],
        status=status,
        queue=m["queue"],
        attempt=m["attempt"],
        error=m["error"],
        status_reason=reason,
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
        enqueue_error=enqueue_error,
        enqueue_failed_at=m["enqueue_failed_at"],
        note=m.get("note"),  # absent from a row that selects named columns only
        warnings=list(m.get("warnings") or []),
    )


def to_user(row: Any) -> UserRecord:
    """A UserRecord from a row carrying the ``users`` columns."""
    m = row._mapping
    return UserRecord(
        id=m["id"], name=m["name"], admin=bool(m["admin"]), created_at=m["created_at"]
    )


def to_worker(row: Any) -> WorkerRecord:
    """A WorkerRecord from a ``workers`` row (JSON lists copied as lists of str)."""
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


def to_metric(row: Any) -> MetricRecord:
    """A MetricRecord; the stored epoch (a float column) comes back as an int."""
    m = row._mapping
    return MetricRecord(
        seq=m["seq"],
        job_id=m["job_id"],
        attempt=m["attempt"],
        step=m["step"],
        epoch=int(m["epoch"]),
        split=m["split"],
        values=m["values"],
        time=m["time"],
        replaces=m["replaces"],
    )


def to_checkpoint(row: Any) -> CheckpointRecord:
    """A CheckpointRecord from a ``checkpoints`` row."""
    return to_record(CheckpointRecord, row)


def to_log(row: Any) -> LogRecord:
    """A LogRecord from a ``logs`` row."""
    return to_record(LogRecord, row)
