"""Artifacts built from checkpoints by workers: ONNX exports and recalibrated checkpoints.

A request finds or creates one ``artifacts`` row per (job, kind, checkpoint sha256, options):
the cache. A worker claims the row (queued, or running with an expired lease), renews its lease
while it works and finishes it once, fenced by its lease owner. A recalibration also records
its new checkpoint beside the original in ``checkpoints`` (written by the worker, not by a
training attempt, so outside the attempt fence).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.db import artifacts, checkpoints, jobs, utcnow
from service.store.database import Database, ts
from service.store.errors import NotFound
from service.store.records import to_record


class ArtifactKind(StrEnum):
    """What a worker builds from a checkpoint."""

    EXPORT = "export"  # an ONNX file with its equivalence certificate
    RECALIBRATE = "recalibrate"  # a new checkpoint with recomputed BN statistics


class ArtifactStatus(StrEnum):
    """The life of an artifact row."""

    QUEUED = "queued"  # requested, its message published (or about to be)
    RUNNING = "running"  # a worker holds its lease
    SUCCEEDED = "succeeded"  # built: ``path`` / ``result`` are final
    FAILED = "failed"  # the worker could not build it; ``error`` says why


@dataclass(frozen=True)
class ArtifactRecord:
    """An artifacts row as the API and worker read it."""

    id: str
    job_id: str
    kind: str
    checkpoint: str
    checkpoint_sha256: str
    options_key: str
    options: dict[str, Any]
    status: str
    error: str | None
    result: dict[str, Any] | None
    path: str | None
    sha256: str | None
    bytes: int | None
    enqueues: int
    runs: int
    lease_owner: str | None
    lease_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


def options_key(options: dict[str, Any]) -> str:
    """The canonical text of ``options`` (sorted keys, no spaces): part of the cache key."""
    return json.dumps(options, sort_keys=True, separators=(",", ":"))


def _to_artifact(row: Any) -> ArtifactRecord:
    return to_record(ArtifactRecord, row)


class ArtifactStore(Database):
    """Find-or-create, claim, renew and finish artifacts; record recalibrated checkpoints."""

    def request_artifact(
        self,
        job_id: str,
        *,
        kind: str,
        checkpoint: str,
        checkpoint_sha256: str,
        options: dict[str, Any],
    ) -> tuple[ArtifactRecord, bool]:
        """The artifact for this key, created queued if there is none; returns (it, created).

        Raises NotFound if the job is gone.
        """
        key = options_key(options)
        where = (
            artifacts.c.job_id == job_id,
            artifacts.c.kind == kind,
            artifacts.c.checkpoint_sha256 == checkpoint_sha256,
            artifacts.c.options_key == key,
        )

        def tx(conn: Connection) -> tuple[ArtifactRecord, bool]:
            row = conn.execute(sa.select(artifacts).where(*where)).first()
            if row is not None:
                return _to_artifact(row), False
            if conn.execute(sa.select(jobs.c.id).where(jobs.c.id == job_id)).first() is None:
                raise NotFound(f"job {job_id} not found")
            now = utcnow()
            conn.execute(
                sa.insert(artifacts).values(
                    id=uuid.uuid4().hex,
                    job_id=job_id,
                    kind=str(kind),
                    checkpoint=checkpoint,
                    checkpoint_sha256=checkpoint_sha256,
                    options_key=key,
                    options=options,
                    status=ArtifactStatus.QUEUED.value,
                    enqueues=0,
                    runs=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            return _to_artifact(conn.execute(sa.select(artifacts).where(*where)).one()), True

        try:
            return self._write(tx)
        except IntegrityError:  # a concurrent request created it first (PostgreSQL)
            with self._read() as conn:
                row = conn.execute(sa.select(artifacts).where(*where)).one()
            return _to_artifact(row), False

    def get_artifact(self, artifact_id: str) -> ArtifactRecord | None:
        """One artifact by id, or None."""
        with self._read() as conn:
            row = conn.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)).first()
        return _to_artifact(row) if row else None

    def list_artifacts(self, job_id: str, kind: str | None = None) -> list[ArtifactRecord]:
        """A job's artifacts (of one kind), oldest first."""
        query = sa.select(artifacts).where(artifacts.c.job_id == job_id)
        if kind is not None:
            query = query.where(artifacts.c.kind == kind)
        with self._read() as conn:
            rows = conn.execute(query.order_by(artifacts.c.created_at, artifacts.c.id)).all()
        return [_to_artifact(r) for r in rows]

    def mark_artifact_enqueued(self, artifact_id: str) -> None:
        """Count one more message published for the artifact."""

        def tx(conn: Connection) -> None:
            conn.execute(
                sa.update(artifacts)
                .where(artifacts.c.id == artifact_id)
                .values(enqueues=artifacts.c.enqueues + 1, updated_at=utcnow())
            )

        self._write(tx)

    def requeue_artifact(self, artifact_id: str) -> bool:
        """Put a failed artifact back to queued (a retry); True if it was failed."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(
                sa.update(artifacts)
                .where(
                    artifacts.c.id == artifact_id,
                    artifacts.c.status == ArtifactStatus.FAILED.value,
                )
                .values(
                    status=ArtifactStatus.QUEUED.value,
                    error=None,
                    finished_at=None,
                    updated_at=utcnow(),
                )
            )
            return res.rowcount > 0

        return self._write(tx)

    def claim_artifact(
        self, artifact_id: str, *, worker_id: str, lease_seconds: float
    ) -> ArtifactRecord | None:
        """Take the artifact for ``worker_id``: queued, or running with an expired lease.

        Returns it (running, ``runs`` counted) or None when it is done, held or gone.
        """

        def tx(conn: Connection) -> ArtifactRecord | None:
            now = utcnow()
            claimable = sa.or_(
                artifacts.c.status == ArtifactStatus.QUEUED.value,
                sa.and_(
                    artifacts.c.status == ArtifactStatus.RUNNING.value,
                    artifacts.c.lease_expires_at < ts(now),
                ),
            )
            res = conn.execute(
                sa.update(artifacts)
                .where(artifacts.c.id == artifact_id, claimable)
                .values(
                    status=ArtifactStatus.RUNNING.value,
                    lease_owner=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    runs=artifacts.c.runs + 1,
                    updated_at=now,
                )
            )
            if res.rowcount == 0:
                return None
            row = conn.execute(sa.select(artifacts).where(artifacts.c.id == artifact_id)).one()
            return _to_artifact(row)

        return self._write(tx)

    def renew_artifact(self, artifact_id: str, *, worker_id: str, lease_seconds: float) -> bool:
        """Extend the lease ``worker_id`` holds; False once another worker took it over."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(
                sa.update(artifacts)
                .where(
                    artifacts.c.id == artifact_id,
                    artifacts.c.lease_owner == worker_id,
                    artifacts.c.status == ArtifactStatus.RUNNING.value,
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
            )
            return res.rowcount > 0

        return self._write(tx)

    def finish_artifact(
        self,
        artifact_id: str,
        *,
        worker_id: str,
        status: ArtifactStatus,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        path: str | None = None,
        sha256: str | None = None,
        bytes: int | None = None,
    ) -> bool:
        """Write the outcome, if ``worker_id`` still holds the lease; True when written."""

        def tx(conn: Connection) -> bool:
            now = utcnow()
            res = conn.execute(
                sa.update(artifacts)
                .where(
                    artifacts.c.id == artifact_id,
                    artifacts.c.lease_owner == worker_id,
                    artifacts.c.status == ArtifactStatus.RUNNING.value,
                )
                .values(
                    status=status.value,
                    result=result,
                    error=error,
                    path=path,
                    sha256=sha256,
                    bytes=bytes,
                    lease_owner=None,
                    lease_expires_at=None,
                    finished_at=now,
                    updated_at=now,
                )
            )
            return res.rowcount > 0

        return self._write(tx)

    def add_derived_checkpoint(
        self,
        job_id: str,
        *,
        name: str,
        epoch: int,
        step: int,
        bytes: int,
        sha256: str,
        files: dict[str, Any],
        metrics: dict[str, Any],
        path: str,
    ) -> None:
        """Record a checkpoint a worker derived from another (a recalibration); replaces one of
        that name. Not fenced by attempt: it is written beside the training's own checkpoints,
        under a name training never uses. Raises NotFound if the job is gone."""

        def tx(conn: Connection) -> None:
            row = conn.execute(sa.select(jobs.c.attempt).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            conn.execute(
                sa.delete(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            )
            conn.execute(
                sa.insert(checkpoints).values(
                    job_id=job_id,
                    attempt=int(row.attempt),
                    name=name,
                    epoch=epoch,
                    step=step,
                    bytes=bytes,
                    sha256=sha256,
                    files=files,
                    metrics=metrics,
                    path=path,
                    created_at=utcnow(),
                )
            )

        self._write(tx)
