"""Registered workers: who consumes which queue with how many GPUs, and their heartbeats."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.db import gpu_queues_seen, jobs, utcnow, workers
from service.status import JobStatus
from service.store.database import Database
from service.store.records import WorkerRecord, to_worker


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


def _record_gpu_queue(conn: Connection, queue: str, now: datetime) -> None:
    """Remember that a worker with enough GPUs served ``queue`` (kept for good)."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    conn.execute(
        insert(gpu_queues_seen).values(queue=queue, first_seen_at=now).on_conflict_do_nothing()
    )


class WorkerStore(Database):
    """Worker registration, heartbeats and the live-worker queries."""

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
        worker counts only with at least one GPU). Raises ValueError for an empty or over-long
        name or negative gpus.
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
                if queue_gpus(queue) >= 1:
                    _record_gpu_queue(conn, queue, now)
                conn.execute(
                    sa.update(jobs)
                    .where(
                        jobs.c.status == JobStatus.QUEUED,
                        jobs.c.queue == queue,
                        jobs.c.status_reason == waiting_reason(queue),
                    )
                    .values(status_reason=None, updated_at=now)
                )
            return to_worker(conn.execute(sa.select(workers).where(workers.c.name == name)).one())

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
            return [to_worker(r) for r in conn.execute(q).all()]

    def max_live_gpus(
        self, queue: str | None = None, *, live_within_seconds: float = 30.0
    ) -> int | None:
        """Most GPUs of one live worker (consuming ``queue`` when given); None if none is live."""
        live = [
            w for w in self.list_workers(live_within_seconds) if queue is None or queue in w.queues
        ]
        return max((w.gpus for w in live), default=None)

    def gpu_queue_ever_served(self, queue: str) -> bool:
        """True if a worker with enough GPUs for ``queue`` ever registered to serve it."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(gpu_queues_seen.c.queue).where(gpu_queues_seen.c.queue == queue)
            ).first()
        return row is not None
