"""Fair scheduling: which queued job a worker should take next, so no user starves another.

The broker carries one message per job, in submission order, so a user who queues many long jobs
first would hold every worker until they all end. A message is only a wake-up (the store is the
source of truth): the worker that receives one claims the *fairest* claimable job of that
message's queue instead, trying them in ``fair_order``. Every message still leads to at most one
claim and every job has a message, so no job is left behind: a job claimed through another's
message leaves its own message to wake a worker for the next one.

The order, fairest first: the owner with the fewest running jobs; then the owner whose jobs last
got a worker longest ago (never first); then the oldest job. It is round robin between users when
one worker serves them all, and keeps a user's own jobs first-in first-out.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from service.db import jobs
from service.status import JobStatus
from service.store.database import Database

# queued jobs looked at per claim; a queue longer than this is served oldest-first beyond it
FAIR_WINDOW = 500


class SchedulingStore(Database):
    """The claim order across users (see the module docstring)."""

    def fair_order(self, job_id: str, *, window: int = FAIR_WINDOW) -> list[str]:
        """Queued, claimable job ids of ``job_id``'s queue, fairest first.

        ``job_id`` itself is in the list when it is claimable; an empty list when it is unknown.
        """
        with self._read() as conn:
            queue = conn.execute(sa.select(jobs.c.queue).where(jobs.c.id == job_id)).scalar()
            if queue is None:
                return []
            queued = conn.execute(
                sa.select(jobs.c.id, jobs.c.owner_id, jobs.c.created_at)
                .where(
                    jobs.c.status == JobStatus.QUEUED,
                    jobs.c.queue == queue,
                    sa.not_(jobs.c.cancel_requested),
                )
                .order_by(jobs.c.created_at, jobs.c.id)
                .limit(window)
            ).all()
            owners = {row.owner_id for row in queued}
            if not owners:
                return []
            running = dict(
                conn.execute(
                    sa.select(jobs.c.owner_id, sa.func.count())
                    .where(jobs.c.status == JobStatus.RUNNING, jobs.c.owner_id.in_(owners))
                    .group_by(jobs.c.owner_id)
                ).all()
            )
            last_start = dict(
                conn.execute(
                    sa.select(jobs.c.owner_id, sa.func.max(jobs.c.started_at))
                    .where(jobs.c.started_at.is_not(None), jobs.c.owner_id.in_(owners))
                    .group_by(jobs.c.owner_id)
                ).all()
            )
        never = datetime.min

        def key(row: sa.Row) -> tuple[int, datetime, datetime, str]:
            started = last_start.get(row.owner_id) or never
            # SQLite hands back naive datetimes from max(); compare all of them naive
            started = started.replace(tzinfo=None)
            return (
                running.get(row.owner_id, 0),
                started,
                row.created_at.replace(tzinfo=None),
                row.id,
            )

        return [row.id for row in sorted(queued, key=key)]
