"""What a job produced, as the API reads it: metric rows, checkpoints, log lines."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from service.db import checkpoints, logs
from service.db import metrics as metrics_t
from service.store.database import Database
from service.store.records import (
    CheckpointRecord,
    LogRecord,
    MetricRecord,
    to_checkpoint,
    to_log,
    to_metric,
)


class ResultStore(Database):
    """Reads of metrics, checkpoints and logs."""

    def get_metrics(
        self, job_id: str, *, after: int = 0, limit: int = 1000
    ) -> tuple[list[MetricRecord], int]:
        """Metric rows with seq > after, in seq order; returns (rows, last seq or after)."""
        limit = max(1, min(int(limit), 10_000))
        with self._read() as conn:
            rows = conn.execute(
                sa.select(metrics_t)
                .where(metrics_t.c.job_id == job_id, metrics_t.c.seq > after)
                .order_by(metrics_t.c.seq)
                .limit(limit)
            ).all()
        items = [to_metric(r) for r in rows]
        return items, (items[-1].seq if items else after)

    def last_metrics(self, job_id: str) -> dict[str, Any] | None:
        """The latest row of each split: {split: {seq, step, epoch, values, time}}, or None."""
        latest = (
            sa.select(metrics_t.c.split, sa.func.max(metrics_t.c.step).label("step"))
            .where(metrics_t.c.job_id == job_id)
            .group_by(metrics_t.c.split)
            .subquery()
        )
        with self._read() as conn:
            rows = conn.execute(
                sa.select(metrics_t)
                .join(
                    latest,
                    sa.and_(metrics_t.c.split == latest.c.split, metrics_t.c.step == latest.c.step),
                )
                .where(metrics_t.c.job_id == job_id)
                .order_by(metrics_t.c.split)
            ).all()
        if not rows:
            return None
        out: dict[str, Any] = {}
        for r in rows:
            m = to_metric(r)
            out[m.split] = {
                "seq": m.seq,
                "step": m.step,
                "epoch": m.epoch,
                "values": m.values,
                "time": m.time,
            }
        return out

    def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        """A job's checkpoints, oldest step first."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(checkpoints)
                .where(checkpoints.c.job_id == job_id)
                .order_by(checkpoints.c.step, checkpoints.c.id)
            ).all()
        return [to_checkpoint(r) for r in rows]

    def get_checkpoint(self, job_id: str, name: str) -> CheckpointRecord | None:
        """One checkpoint by name, or None."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(checkpoints).where(
                    checkpoints.c.job_id == job_id, checkpoints.c.name == name
                )
            ).first()
        return to_checkpoint(row) if row else None

    def get_logs(
        self, job_id: str, *, after: int = 0, limit: int = 1000
    ) -> tuple[list[LogRecord], int]:
        """Log lines with id > after, in order; returns (lines, last id or after)."""
        limit = max(1, min(int(limit), 10_000))
        with self._read() as conn:
            rows = conn.execute(
                sa.select(logs)
                .where(logs.c.job_id == job_id, logs.c.id > after)
                .order_by(logs.c.id)
                .limit(limit)
            ).all()
        items = [to_log(r) for r in rows]
        return items, (items[-1].id if items else after)
