"""Deleting a job with everything recorded about it, and the disk a user's jobs hold."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import checkpoints, jobs, logs, norm_telemetry
from service.db import metrics as metrics_t
from service.store.database import Database
from service.store.records import JobRecord, to_job


class DeletionStore(Database):
    """Delete jobs; count the bytes a user's jobs hold (the disk quota's measure)."""

    def delete_job(self, job_id: str) -> JobRecord | None:
        """Delete a job and its metric rows, logs, checkpoint records and tags, in one
        transaction; returns the job as it was, or None if there was none.

        The job row goes too, and it is the fencing token's home: a worker still running the
        job gets NotFound from its next fenced write or heartbeat and stops (its supervisor
        kills the training process). Its files are the caller's to remove.
        """

        def tx(conn: Connection) -> JobRecord | None:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                return None
            # Explicit, not only ON DELETE CASCADE: a connection without SQLite's foreign_keys
            # pragma would otherwise leave the rows behind.
            for table in (metrics_t, logs, checkpoints, norm_telemetry):
                conn.execute(sa.delete(table).where(table.c.job_id == job_id))
            conn.execute(sa.delete(jobs).where(jobs.c.id == job_id))
            return to_job(row)

        return self._write(tx)

    def disk_usage(self, owner_id: int) -> int:
        """Bytes the user's jobs hold: the recorded sizes of their checkpoints plus the length
        of their log lines (characters; bytes for ASCII). Files a checkpoint record does not
        list (partial writes of a killed attempt) are not counted."""
        owned = sa.select(jobs.c.id).where(jobs.c.owner_id == owner_id).scalar_subquery()
        with self._read() as conn:
            ckpt = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(checkpoints.c.bytes), 0)).where(
                    checkpoints.c.job_id.in_(owned)
                )
            ).scalar_one()
            text = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(sa.func.length(logs.c.message)), 0)).where(
                    logs.c.job_id.in_(owned)
                )
            ).scalar_one()
        return int(ckpt) + int(text)
