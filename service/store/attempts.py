"""The worker's side: claim an attempt, keep its lease, and write fenced by that attempt.

Every write carries the job's ``attempt``; a write whose attempt no longer owns the job (a
zombie twin after a re-queue) raises :class:`StaleAttempt`. Each write locks the job row first,
so per-job sequence numbers follow commit order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import checkpoints, jobs, logs, utcnow
from service.db import metrics as metrics_t
from service.status import FINISHED_STATUSES, JobStatus
from service.store.database import Database, chunks, ts
from service.store.errors import NotFound, StaleAttempt
from service.store.records import JobRecord, to_job


def fence(conn: Connection, job_id: str, attempt: int, *, running: bool = True) -> Any:
    """Lock the job row and check ``attempt`` owns it; returns the row.

    Raises NotFound for an unknown job, StaleAttempt if another attempt owns it (or, with
    ``running``, if it is not running).
    """
    row = conn.execute(
        sa.select(jobs.c.status, jobs.c.attempt, jobs.c.attempts)
        .where(jobs.c.id == job_id)
        .with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    if row.attempt != attempt or (running and row.status != JobStatus.RUNNING):
        raise StaleAttempt(
            f"job {job_id}: attempt {attempt} is stale "
            f"(the job is {row.status} at attempt {row.attempt})"
        )
    return row


def _whole_epoch(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric row epoch must be an int, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"metric row epoch counts epochs and must be whole, got {value!r}")
    return int(value)


def normalize_metric_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Check and normalize one metric row: step int, split non-empty str, values a dict,
    epoch a whole number (an int; 2.0 is taken as 2), time Unix seconds (now if absent).

    Raises ValueError naming the bad key.
    """
    try:
        step = row["step"]
        split = row["split"]
        values = row["values"]
    except KeyError as exc:
        raise ValueError(f"metric row {row!r} lacks {exc.args[0]!r}") from None
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"metric row step must be an int, got {step!r}")
    if not isinstance(split, str) or not split:
        raise ValueError(f"metric row split must be a non-empty str, got {split!r}")
    if not isinstance(values, Mapping):
        raise ValueError(f"metric row values must be a dict, got {type(values).__name__}")
    when = row.get("time")
    if when is None:
        when = time.time()
    elif isinstance(when, datetime):
        when = when.timestamp()
    return {
        "step": step,
        "split": split,
        "epoch": _whole_epoch(row.get("epoch")),
        "values": dict(values),
        "time": float(when),
    }


def history_close(
    history: list[dict[str, Any]], attempt: int, outcome: str, ended: datetime
) -> list[dict[str, Any]]:
    """A copy of the attempt history with ``attempt`` ended at ``ended`` with ``outcome``."""
    out = [dict(h) for h in history]
    for h in reversed(out):
        if h.get("attempt") == attempt:
            h["ended_at"] = ended.isoformat()
            h["outcome"] = str(outcome)
            break
    else:
        out.append(
            {
                "attempt": attempt,
                "worker": None,
                "started_at": None,
                "ended_at": ended.isoformat(),
                "outcome": str(outcome),
            }
        )
    return out


class AttemptStore(Database):
    """Claims, leases, and the fenced writes of a running attempt."""

    def claim_job(self, job_id: str, *, worker_id: str, lease_seconds: float) -> int | None:
        """Atomically take a queued job: running, attempt += 1, lease set; returns the attempt.

        None if the job is not queued, cancel-requested, leased, or missing (a duplicate delivery).
        """

        def tx(conn: Connection) -> int | None:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.status == JobStatus.QUEUED,
                    sa.not_(jobs.c.cancel_requested),
                    sa.or_(jobs.c.lease_expires_at.is_(None), jobs.c.lease_expires_at < now),
                )
                .values(
                    status=JobStatus.RUNNING,
                    attempt=jobs.c.attempt + 1,
                    lease_owner=worker_id,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    started_at=sa.func.coalesce(jobs.c.started_at, ts(now)),
                    updated_at=now,
                    status_reason=None,
                    enqueue_error=None,
                    enqueue_failed_at=None,
                )
            )
            if res.rowcount != 1:
                return None
            row = conn.execute(
                sa.select(jobs.c.attempt, jobs.c.attempts).where(jobs.c.id == job_id)
            ).one()
            history = [dict(h) for h in row.attempts or []]
            history.append(
                {
                    "attempt": row.attempt,
                    "worker": worker_id,
                    "started_at": now.isoformat(),
                    "ended_at": None,
                    "outcome": str(JobStatus.RUNNING),
                }
            )
            conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(attempts=history))
            return int(row.attempt)

        return self._write(tx)

    def heartbeat(self, job_id: str, *, attempt: int, lease_seconds: float) -> bool:
        """Renew the lease of a running attempt; returns cancel_requested. Stale: StaleAttempt."""

        def tx(conn: Connection) -> bool:
            now = utcnow()
            res = conn.execute(
                sa.update(jobs)
                .where(
                    jobs.c.id == job_id,
                    jobs.c.attempt == attempt,
                    jobs.c.status == JobStatus.RUNNING,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
            )
            if res.rowcount != 1:
                fence(conn, job_id, attempt)  # raises NotFound or StaleAttempt
            return bool(
                conn.execute(
                    sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)
                ).scalar_one()
            )

        return self._write(tx)

    def add_metrics(self, job_id: str, *, attempt: int, rows: Sequence[Mapping[str, Any]]) -> None:
        """Upsert metric rows (keys step, epoch, split, values, time) per (job, split, step).

        A replaced row (live, or discarded by a resume) is deleted and inserted anew, so it gets
        a new, larger seq and ``replaces`` = the seq it supersedes; rows of one call get
        ascending seqs in step order. Raises ValueError for a malformed row (see
        :func:`normalize_metric_row`), StaleAttempt/NotFound as every fenced write.
        """
        normalized: dict[tuple[str, int], dict[str, Any]] = {}
        for raw in rows:
            r = normalize_metric_row(raw)
            normalized.pop((r["split"], r["step"]), None)  # the last duplicate wins
            normalized[(r["split"], r["step"])] = r
        ordered = sorted(normalized.values(), key=lambda r: r["step"])

        def tx(conn: Connection) -> None:
            fence(conn, job_id, attempt)
            if not ordered:
                return
            by_split: dict[str, list[int]] = {}
            for r in ordered:
                by_split.setdefault(r["split"], []).append(r["step"])
            old: dict[tuple[str, int], int] = {}
            for split, steps in by_split.items():
                for chunk in chunks(steps):
                    where = (
                        metrics_t.c.job_id == job_id,
                        metrics_t.c.split == split,
                        metrics_t.c.step.in_(list(chunk)),
                    )
                    for step, seq in conn.execute(
                        sa.select(metrics_t.c.step, metrics_t.c.seq).where(*where)
                    ):
                        old[(split, step)] = seq
                    conn.execute(sa.delete(metrics_t).where(*where))
            # One statement per row keeps seq assignment in this exact order on every backend.
            stmt = sa.insert(metrics_t)
            for r in ordered:
                replaces = old.get((r["split"], r["step"]))
                conn.execute(
                    stmt, {"job_id": job_id, "attempt": attempt, "replaces": replaces, **r}
                )

        self._write(tx)

    def discard_metrics_after(self, job_id: str, *, attempt: int, step: int) -> int:
        """Discard the job's metric rows past ``step`` (a resumed attempt starts there).

        Rows an earlier attempt wrote beyond the checkpoint a resume starts from describe
        training that no longer counts: they leave every read at once, and if the resumed
        attempt stops earlier (cancelled, failed) none of them linger. They stay stored, hidden,
        only so that the row rewriting a step can name the seq it replaces. Returns the count.
        """

        def tx(conn: Connection) -> int:
            fence(conn, job_id, attempt)
            res = conn.execute(
                sa.update(metrics_t)
                .where(
                    metrics_t.c.job_id == job_id,
                    metrics_t.c.step > step,
                    metrics_t.c.discarded.is_(False),
                )
                .values(discarded=True)
            )
            return int(res.rowcount or 0)

        return self._write(tx)

    def add_checkpoint(
        self,
        job_id: str,
        *,
        attempt: int,
        name: str,
        epoch: int,
        step: int,
        bytes: int,
        sha256: str,
        files: dict[str, Any],
        metrics: dict[str, Any],
        path: str,
    ) -> None:
        """Record a checkpoint (written, fsynced and hashed already); replaces one of that name."""
        values = {
            "job_id": job_id,
            "attempt": attempt,
            "name": name,
            "epoch": epoch,
            "step": step,
            "bytes": bytes,
            "sha256": sha256,
            "files": files,
            "metrics": metrics,
            "path": path,
        }

        def tx(conn: Connection) -> None:
            fence(conn, job_id, attempt)
            conn.execute(
                sa.delete(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            )
            conn.execute(sa.insert(checkpoints).values(**values, created_at=utcnow()))

        self._write(tx)

    def delete_checkpoint(self, job_id: str, *, attempt: int, name: str) -> bool:
        """Forget a checkpoint (keep_last pruned its files); True if one was recorded."""

        def tx(conn: Connection) -> bool:
            fence(conn, job_id, attempt)
            res = conn.execute(
                sa.delete(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            )
            return res.rowcount > 0

        return self._write(tx)

    def add_logs(self, job_id: str, *, attempt: int, lines: Sequence[tuple[str, str]]) -> None:
        """Append log lines (level, message) to a running attempt."""
        now = utcnow()
        params = [
            {
                "job_id": job_id,
                "attempt": attempt,
                "time": now,
                "level": str(level)[:16],
                "message": str(message),
            }
            for level, message in lines
        ]

        def tx(conn: Connection) -> None:
            fence(conn, job_id, attempt)
            for p in params:
                conn.execute(sa.insert(logs), p)

        self._write(tx)

    def finish_job(
        self, job_id: str, *, attempt: int, status: str, error: str | None = None
    ) -> JobRecord:
        """Record the final status of a running attempt; returns the job.

        ``status`` is a terminal :class:`JobStatus` (succeeded, failed, cancelled, timed_out),
        else ValueError. If the job is already finished at this attempt (a retried call, or the
        reaper cancelled it), nothing changes: the first final status wins. Any other mismatch:
        StaleAttempt.
        """
        if status not in FINISHED_STATUSES:
            raise ValueError(
                f"finish status must be one of {', '.join(FINISHED_STATUSES)}, not {status!r}"
            )
        final = JobStatus(status)

        def tx(conn: Connection) -> JobRecord:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id).with_for_update()).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            if row.attempt == attempt and row.status in FINISHED_STATUSES:
                return to_job(row)
            if row.attempt != attempt or row.status != JobStatus.RUNNING:
                raise StaleAttempt(
                    f"job {job_id}: attempt {attempt} is stale "
                    f"(the job is {row.status} at attempt {row.attempt})"
                )
            now = utcnow()
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    status=final,
                    error=error,
                    finished_at=now,
                    updated_at=now,
                    lease_expires_at=None,
                    status_reason=None,
                    attempts=history_close(list(row.attempts or []), attempt, final, now),
                )
            )
            return to_job(conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).one())

        return self._write(tx)
