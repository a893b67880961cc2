"""Sweeps in the store: create (idempotent), read, list, release runs, link jobs, cancel, delete.

A sweep's runs (cells x seeds, numbered 0..runs-1) become ordinary jobs through the service's
submit path, at most ``concurrency`` queued or running at a time. This part only keeps the
count: :meth:`SweepStore.reserve_runs` decides, under the sweep's row lock, which runs may get
a job now; the caller submits them (with an Idempotency-Key per run, so a run submitted twice
is one job) and links each job with :meth:`SweepStore.attach_sweep_job`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from service.db import jobs, sweeps, users, utcnow
from service.db import metrics as metrics_t
from service.status import ACTIVE_STATUSES
from service.store.database import Database, chunks
from service.store.errors import IdempotencyConflict, NotFound
from service.store.records import JobRecord, UserRecord, to_job, to_user


def run_key(sweep_id: str, run: int) -> str:
    """The Idempotency-Key of run ``run`` of a sweep: one job per run, whoever submits it."""
    return f"sweep-{sweep_id}-run-{run}"


@dataclass(frozen=True)
class SweepRecord:
    """A sweep row: ``request`` is the validated sweep request (base spec, grid, seeds, ...)."""

    id: str
    owner_id: int
    name: str
    request: dict[str, Any]
    runs: int
    released: int
    releasing: bool
    cancel_requested: bool
    created_at: datetime
    updated_at: datetime
    idempotency_key: str | None


def to_sweep(row: Any) -> SweepRecord:
    """A SweepRecord from a full ``sweeps`` row."""
    m = row._mapping
    return SweepRecord(
        id=m["id"],
        owner_id=m["owner_id"],
        name=m["name"],
        request=m["request"],
        runs=int(m["runs"]),
        released=int(m["released"]),
        releasing=bool(m["releasing"]),
        cancel_requested=bool(m["cancel_requested"]),
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        idempotency_key=m["idempotency_key"],
    )


@dataclass(frozen=True)
class SweepChild:
    """A sweep's job as the report needs it: the job and its ``sweep_cell``."""

    job: JobRecord
    cell: dict[str, Any]


class SweepStore(Database):
    """Sweep rows and the link between a sweep and its jobs."""

    def create_sweep(
        self,
        *,
        owner_id: int,
        name: str,
        request: dict[str, Any],
        runs: int,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[SweepRecord, bool]:
        """Insert a sweep with no run released; returns (sweep, created).

        With an idempotency key, an earlier sweep of that key is returned instead (created
        False); the same key with another ``request_hash`` raises IdempotencyConflict.
        Raises ValueError for ``runs < 1`` or a key over 255 characters.
        """
        if runs < 1:
            raise ValueError("a sweep has at least one run")
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
            raise ValueError("Idempotency-Key must be 1 to 255 characters")

        def existing(conn: Connection) -> tuple[SweepRecord, bool] | None:
            if idempotency_key is None:
                return None
            row = conn.execute(
                sa.select(sweeps).where(
                    sweeps.c.owner_id == owner_id, sweeps.c.idempotency_key == idempotency_key
                )
            ).first()
            if row is None:
                return None
            if row.request_hash != request_hash:
                raise IdempotencyConflict(
                    f"Idempotency-Key {idempotency_key!r} was used for a different sweep "
                    f"(sweep {row.id})"
                )
            return to_sweep(row), False

        def tx(conn: Connection) -> tuple[SweepRecord, bool]:
            found = existing(conn)
            if found is not None:
                return found
            now = utcnow()
            sweep_id = uuid.uuid4().hex
            conn.execute(
                sa.insert(sweeps).values(
                    id=sweep_id,
                    owner_id=owner_id,
                    name=name,
                    request=request,
                    runs=runs,
                    released=0,
                    releasing=True,
                    cancel_requested=False,
                    created_at=now,
                    updated_at=now,
                    idempotency_key=idempotency_key,
                    request_hash=request_hash,
                )
            )
            row = conn.execute(sa.select(sweeps).where(sweeps.c.id == sweep_id)).one()
            return to_sweep(row), True

        try:
            return self._write(tx)
        except IntegrityError:
            if idempotency_key is None:
                raise
            found = self._write(existing)  # a concurrent request with the key won the insert
            if found is None:
                raise
            return found

    def get_sweep(self, sweep_id: str, *, owner_id: int | None = None) -> SweepRecord | None:
        """A sweep by id; with owner_id, None unless that user owns it."""
        q = sa.select(sweeps).where(sweeps.c.id == sweep_id)
        if owner_id is not None:
            q = q.where(sweeps.c.owner_id == owner_id)
        with self._read() as conn:
            row = conn.execute(q).first()
        return to_sweep(row) if row else None

    def sweep_by_key(self, owner_id: int, idempotency_key: str) -> SweepRecord | None:
        """The owner's sweep created under ``idempotency_key``, or None."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(sweeps).where(
                    sweeps.c.owner_id == owner_id, sweeps.c.idempotency_key == idempotency_key
                )
            ).first()
        return to_sweep(row) if row else None

    def list_sweeps(self, *, owner_id: int | None = None, limit: int = 100) -> list[SweepRecord]:
        """Sweeps newest first (at most ``limit``, 1..1000); with owner_id, that user's only."""
        limit = max(1, min(int(limit), 1000))
        q = sa.select(sweeps)
        if owner_id is not None:
            q = q.where(sweeps.c.owner_id == owner_id)
        q = q.order_by(sweeps.c.created_at.desc(), sweeps.c.id.desc()).limit(limit)
        with self._read() as conn:
            return [to_sweep(r) for r in conn.execute(q).all()]

    def releasing_sweep_ids(self) -> list[str]:
        """Ids of the sweeps that still have runs without a job and are not cancelled."""
        with self._read() as conn:
            return list(
                conn.execute(
                    sa.select(sweeps.c.id).where(
                        sweeps.c.releasing.is_(True), sweeps.c.cancel_requested.is_(False)
                    )
                ).scalars()
            )

    def sweep_children(self, sweep_id: str) -> list[SweepChild]:
        """The sweep's jobs with their cells, in run order."""
        with self._read() as conn:
            rows = conn.execute(sa.select(jobs).where(jobs.c.sweep_id == sweep_id)).all()
        out = [SweepChild(to_job(r), dict(r._mapping["sweep_cell"] or {})) for r in rows]
        return sorted(out, key=lambda c: int(c.cell.get("run", 0)))

    def sweep_of_job(self, job_id: str) -> tuple[str, int] | None:
        """(sweep id, run number) of the sweep whose run ``job_id`` is, or None (a job of no
        sweep, an unknown job, or a job whose sweep row is gone)."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(jobs.c.sweep_id, jobs.c.sweep_cell)
                .join(sweeps, sweeps.c.id == jobs.c.sweep_id)
                .where(jobs.c.id == job_id)
            ).first()
        if row is None:
            return None
        return str(row.sweep_id), int((row.sweep_cell or {}).get("run", -1))

    def reserve_runs(self, sweep_id: str, concurrency: int) -> list[int]:
        """The runs that may be submitted now, in run order; takes new ones under the row lock.

        Active children (queued or running) plus released runs that have no job yet count
        against ``concurrency``; free slots release the next runs (``released`` grows). Runs
        released earlier whose job is missing (their submit failed or its process died) are
        returned again, first. A cancelled sweep gets none. When every run has a job,
        ``releasing`` turns False. Raises NotFound for an unknown sweep.
        """

        def tx(conn: Connection) -> list[int]:
            row = conn.execute(
                sa.select(sweeps).where(sweeps.c.id == sweep_id).with_for_update()
            ).first()
            if row is None:
                raise NotFound(f"sweep {sweep_id} not found")
            if row.cancel_requested or not row.releasing:
                return []
            children = conn.execute(
                sa.select(jobs.c.status, jobs.c.sweep_cell).where(jobs.c.sweep_id == sweep_id)
            ).all()
            have = {int((c.sweep_cell or {}).get("run", -1)) for c in children}
            active = sum(1 for c in children if c.status in ACTIVE_STATUSES)
            missing = [r for r in range(row.released) if r not in have]
            free = max(0, concurrency - active - len(missing))
            new = list(range(row.released, min(row.runs, row.released + free)))
            released = row.released + len(new)
            values: dict[str, Any] = {}
            if new:
                values.update(released=released, updated_at=utcnow())
            if released >= row.runs and not missing and not new:
                values.update(releasing=False, updated_at=utcnow())
            if values:
                conn.execute(sa.update(sweeps).where(sweeps.c.id == sweep_id).values(**values))
            return missing + new

        return self._write(tx)

    def attach_sweep_job(self, job_id: str, *, sweep_id: str, cell: dict[str, Any]) -> None:
        """Mark ``job_id`` as the sweep's job for ``cell`` (its run, cell, seed and values).

        Idempotent. Raises NotFound for an unknown job.
        """

        def tx(conn: Connection) -> None:
            res = conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(sweep_id=sweep_id, sweep_cell=cell)
            )
            if res.rowcount == 0:
                raise NotFound(f"job {job_id} not found")

        self._write(tx)

    def request_sweep_cancel(self, sweep_id: str) -> list[str]:
        """Stop releasing runs; returns the ids of the sweep's queued or running jobs.

        The caller cancels each (``request_cancel``). Raises NotFound for an unknown sweep.
        """

        def tx(conn: Connection) -> list[str]:
            res = conn.execute(
                sa.update(sweeps)
                .where(sweeps.c.id == sweep_id)
                .values(cancel_requested=True, updated_at=utcnow())
            )
            if res.rowcount == 0:
                raise NotFound(f"sweep {sweep_id} not found")
            return list(
                conn.execute(
                    sa.select(jobs.c.id).where(
                        jobs.c.sweep_id == sweep_id, jobs.c.status.in_(ACTIVE_STATUSES)
                    )
                ).scalars()
            )

        return self._write(tx)

    def delete_sweep_row(self, sweep_id: str) -> bool:
        """Delete the sweep row (its jobs are the caller's to delete first); True if it was."""

        def tx(conn: Connection) -> bool:
            res = conn.execute(sa.delete(sweeps).where(sweeps.c.id == sweep_id))
            return bool(res.rowcount)

        return self._write(tx)

    def metric_series(
        self, job_ids: Sequence[str], metric: str, *, split: str = "val"
    ) -> dict[str, list[tuple[int, int, float]]]:
        """Per job, the (step, epoch, value) of every live ``split`` row that has ``metric``,
        in step order (the engine writes one "val" row per epoch).

        Values that are not numbers are skipped. One query per 500 jobs.
        """
        out: dict[str, list[tuple[int, int, float]]] = {j: [] for j in job_ids}
        with self._read() as conn:
            for chunk in chunks(list(job_ids)):
                rows = conn.execute(
                    sa.select(
                        metrics_t.c.job_id,
                        metrics_t.c.step,
                        metrics_t.c.epoch,
                        metrics_t.c["values"],
                    )
                    .where(
                        metrics_t.c.job_id.in_(list(chunk)),
                        metrics_t.c.split == split,
                        metrics_t.c.discarded.is_(False),
                    )
                    .order_by(metrics_t.c.job_id, metrics_t.c.step)
                ).all()
                for r in rows:
                    value = (r.values or {}).get(metric)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        out[r.job_id].append((int(r.step), int(r.epoch), float(value)))
        return out

    def sweep_owner(self, sweep_id: str) -> UserRecord:
        """The user who owns the sweep (its runs are submitted as that user).

        Raises NotFound for an unknown sweep.
        """
        with self._read() as conn:
            row = conn.execute(
                sa.select(users)
                .join(sweeps, sweeps.c.owner_id == users.c.id)
                .where(sweeps.c.id == sweep_id)
            ).first()
        if row is None:
            raise NotFound(f"sweep {sweep_id} not found")
        return to_user(row)
