"""Jobs as their owners see them: create (quota and idempotency in one transaction), read, list,
cancel, and the per-status counts."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.db import job_tags, jobs, users, utcnow
from service.status import ACTIVE_STATUSES, JOB_STATUSES, JobStatus
from service.store.cursor import decode_cursor, encode_cursor
from service.store.database import Database
from service.store.errors import IdempotencyConflict, NotFound, QuotaExceeded
from service.store.records import JobRecord, to_job


def _count_active(conn: Connection, owner_id: int) -> int:
    return int(
        conn.execute(
            sa.select(sa.func.count())
            .select_from(jobs)
            .where(jobs.c.owner_id == owner_id, jobs.c.status.in_(ACTIVE_STATUSES))
        ).scalar_one()
    )


class JobStore(Database):
    """Create, read, list and cancel jobs."""

    def create_job(
        self,
        *,
        owner_id: int,
        spec: dict[str, Any],
        name: str,
        queue: str,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        tags: Sequence[str] = (),
        max_active: int | None = None,
        status_reason: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job; with an idempotency key, return the earlier job instead.

        Returns (job, created). The same key with another request_hash raises
        IdempotencyConflict. With ``max_active``, a new job is refused with
        :class:`QuotaExceeded` when the owner already has that many queued or running jobs;
        the count and the insert are one transaction holding the owner's row lock
        (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the ``BEGIN IMMEDIATE`` write
        lock), so parallel submits never exceed the limit. A replay of an existing key is
        answered with its job whatever the count. ``tags`` go to the job_tags table.
        """
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
            raise ValueError("Idempotency-Key must be 1 to 255 characters")
        tag_list = sorted(set(tags))

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
            return to_job(row), False

        def tx(conn: Connection) -> tuple[JobRecord, bool]:
            if max_active is not None:
                # Serializes this owner's submits (other owners are not blocked).
                conn.execute(
                    sa.select(users.c.id).where(users.c.id == owner_id).with_for_update()
                ).first()
            found = existing(conn)
            if found is not None:
                return found
            if max_active is not None:
                active = _count_active(conn, owner_id)
                if active >= max_active:
                    raise QuotaExceeded(active, max_active)
            now = utcnow()
            job_id = uuid.uuid4().hex
            conn.execute(
                sa.insert(jobs).values(
                    id=job_id,
                    owner_id=owner_id,
                    name=name,
                    spec=spec,
                    status=JobStatus.QUEUED,
                    queue=queue,
                    attempt=0,
                    attempts=[],
                    cancel_requested=False,
                    status_reason=status_reason,
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
            if tag_list:
                conn.execute(sa.insert(job_tags), [{"job_id": job_id, "tag": t} for t in tag_list])
            return to_job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one()), True

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
        return to_job(row) if row else None

    def has_job(self, job_id: str, *, owner_id: int | None = None) -> bool:
        """True if the job exists (with owner_id: and that user owns it); reads its key only,
        never the spec or attempts a JobRecord decodes (a follower's poll needs no more)."""
        q = sa.select(jobs.c.id).where(jobs.c.id == job_id)
        if owner_id is not None:
            q = q.where(jobs.c.owner_id == owner_id)
        with self._read() as conn:
            return conn.execute(q).first() is not None

    def list_jobs(
        self,
        *,
        owner_id: int | None = None,
        status: str | None = None,
        name: str | None = None,
        tag: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Jobs newest first, ``limit`` at a time; returns (jobs, next cursor or None).

        Filters: ``owner_id``, ``status``, ``name`` (exact) and ``tag`` (jobs whose spec lists
        it). Raises ValueError for an unknown status, InvalidCursor (a ValueError) for a
        malformed cursor.
        """
        limit = max(1, min(int(limit), 1000))
        q = sa.select(jobs)
        if owner_id is not None:
            q = q.where(jobs.c.owner_id == owner_id)
        if status is not None:
            if status not in JOB_STATUSES:
                raise ValueError(f"unknown status {status!r}; one of {', '.join(JOB_STATUSES)}")
            q = q.where(jobs.c.status == status)
        if name is not None:
            q = q.where(jobs.c.name == name)
        if tag is not None:
            q = q.where(jobs.c.id.in_(sa.select(job_tags.c.job_id).where(job_tags.c.tag == tag)))
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
        items = [to_job(r) for r in rows[:limit]]
        nxt = encode_cursor(items[-1].created_at, items[-1].id) if len(rows) > limit else None
        return items, nxt

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a job: queued ones at once, running ones cooperatively; finished ones unchanged.

        Raises NotFound for an unknown job.
        """

        def tx(conn: Connection) -> JobRecord:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
                .values(
                    status=JobStatus.CANCELLED,
                    cancel_requested=True,
                    finished_at=now,
                    updated_at=now,
                    lease_owner=None,
                    lease_expires_at=None,
                    status_reason="cancelled while queued",
                    enqueue_error=None,
                    enqueue_failed_at=None,
                )
            )
            if res.rowcount == 0:
                conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.status == JobStatus.RUNNING,
                        sa.not_(jobs.c.cancel_requested),
                    )
                    .values(cancel_requested=True, updated_at=now, status_reason="cancel requested")
                )
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            return to_job(row)

        return self._write(tx)

    def set_labels(
        self,
        job_id: str,
        *,
        tags: Sequence[str] | None = None,
        note: str | None = None,
        set_note: bool = False,
    ) -> JobRecord:
        """Replace a job's tags (``tags`` not None) and/or its note (``set_note``; ``note``
        None or "" clears it), in one transaction; returns the job after the change.

        The tags go to the spec's ``tags`` (duplicates dropped, order kept) and to the job_tags
        table that ``list_jobs(tag=)`` reads. Validation (length, charset, count) is the
        caller's: the API checks them as at submit. Raises NotFound for an unknown job.
        """

        def tx(conn: Connection) -> JobRecord:
            row = conn.execute(
                sa.select(jobs.c.spec).where(jobs.c.id == job_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            values: dict[str, Any] = {"updated_at": utcnow()}
            if tags is not None:
                tag_list = list(dict.fromkeys(tags))
                values["spec"] = {**(row.spec or {}), "tags": tag_list}
                conn.execute(sa.delete(job_tags).where(job_tags.c.job_id == job_id))
                if tag_list:
                    conn.execute(
                        sa.insert(job_tags), [{"job_id": job_id, "tag": t} for t in tag_list]
                    )
            if set_note:
                values["note"] = note or None
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))
            return to_job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

        return self._write(tx)

    def set_status_reason(self, job_id: str, reason: str | None) -> None:
        """Set the human-readable reason shown beside the status (None clears it).

        Raises NotFound for an unknown job.
        """

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
        out: dict[str, int] = {str(s): 0 for s in JOB_STATUSES}
        out.update({str(status): int(count) for status, count in rows})
        return out

    def count_active(self, owner_id: int) -> int:
        """Queued plus running jobs of one user."""
        with self._read() as conn:
            return _count_active(conn, owner_id)
