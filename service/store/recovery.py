"""Recovery: re-queue the jobs of lost workers, and republish queued jobs whose message may be lost.

A failed publish is state in two columns, ``enqueue_error`` and ``enqueue_failed_at`` (set by
:meth:`RecoveryStore.mark_enqueue_failed`, cleared once a message goes out or a worker claims the
job), never a message prefix.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import jobs, utcnow
from service.status import JobStatus
from service.store.attempts import history_close
from service.store.database import Database, ts

# A queued job is republished after republish_after, then after twice that, ... up to this factor.
REPUBLISH_BACKOFF_MAX = 64
_MAX_ERROR_CHARS = 2000


def describe_attempts(history: list[dict[str, Any]]) -> str:
    """One line per attempt: worker, start and end times, outcome; joined by "; "."""
    parts = [
        f"attempt {h.get('attempt')} on {h.get('worker') or '?'} "
        f"({h.get('started_at') or '?'} to {h.get('ended_at') or '?'}): {h.get('outcome')}"
        for h in history
    ]
    return "; ".join(parts)


class RecoveryStore(Database):
    """Expired leases and lost messages."""

    def requeue_expired(self, *, now: datetime | None = None, max_attempts: int) -> list[str]:
        """Reap running jobs whose lease expired; returns the ids put back in the queue.

        Back to queued while attempts remain; failed (with the attempt history in the error) once
        ``max_attempts`` attempts were used; cancelled if a cancel was requested. One
        transaction per job.
        """
        now = now or utcnow()
        with self._read() as conn:
            candidates = conn.execute(
                sa.select(jobs.c.id, jobs.c.attempt).where(
                    jobs.c.status == JobStatus.RUNNING, jobs.c.lease_expires_at < now
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
                    or row.status != JobStatus.RUNNING
                    or row.attempt != attempt
                    or row.lease_expires_at is None
                    or row.lease_expires_at >= now
                ):
                    return False
                history = history_close(list(row.attempts or []), attempt, "lost", now)
                # Clear the lease so the next claim need not wait for the wall clock to pass it.
                values: dict[str, Any] = {
                    "updated_at": now,
                    "attempts": history,
                    "lease_owner": None,
                    "lease_expires_at": None,
                }
                if row.cancel_requested:
                    values |= {
                        "status": JobStatus.CANCELLED,
                        "finished_at": now,
                        "status_reason": "cancel requested; worker lost",
                    }
                elif attempt >= max_attempts:
                    values |= {
                        "status": JobStatus.FAILED,
                        "finished_at": now,
                        "status_reason": None,
                        "error": f"worker lost on all {attempt} attempts "
                        f"(max_attempts={max_attempts}): {describe_attempts(history)}",
                    }
                else:
                    values |= {
                        "status": JobStatus.QUEUED,
                        "status_reason": f"worker lost; re-queued as attempt {attempt + 1}",
                        "enqueued_at": now,  # the caller publishes it
                        "enqueues": 1,
                    }
                conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**values))
                return values["status"] == JobStatus.QUEUED

            if self._write(tx):
                requeued.append(job_id)
        return requeued

    def mark_enqueue_failed(self, job_id: str, error: str) -> None:
        """Note that publishing a queued job failed: a reaper retries it on its next round.

        Sets ``enqueue_error`` (the broker's error, at most 2000 characters) and
        ``enqueue_failed_at``; the job's ``status_reason`` then reads "enqueue failed: <error>".
        Jobs that are not queued are left alone.
        """

        def tx(conn: Connection) -> None:
            now = utcnow()
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status == JobStatus.QUEUED)
                .values(
                    enqueued_at=None,
                    # a publish that did not happen does not count towards the backoff
                    enqueues=sa.case((jobs.c.enqueues > 0, jobs.c.enqueues - 1), else_=0),
                    enqueue_error=str(error)[:_MAX_ERROR_CHARS],
                    enqueue_failed_at=now,
                    updated_at=now,
                )
            )

        self._write(tx)

    def clear_enqueue_failed(self, job_id: str) -> None:
        """Forget a failed publish once the job's message went out (other reasons stay)."""

        def tx(conn: Connection) -> None:
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id, jobs.c.enqueue_error.is_not(None))
                .values(enqueue_error=None, enqueue_failed_at=None, updated_at=utcnow())
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
                    jobs.c.status == JobStatus.QUEUED,
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
            seen = sa.or_(jobs.c.enqueued_at.is_(None), jobs.c.enqueued_at < ts(due))

            def tx(
                conn: Connection, job_id: str = job_id, n: int = int(enqueues), seen: Any = seen
            ) -> bool:
                res = conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.id == job_id,
                        jobs.c.status == JobStatus.QUEUED,
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
