"""What a job produced, as the API reads it: metric rows, checkpoints, log lines."""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import checkpoints, jobs, logs
from service.db import metrics as metrics_t
from service.status import FINISHED_STATUSES
from service.store.database import Database
from service.store.downsample import select_extremes_columns
from service.store.records import (
    CheckpointRecord,
    LogRecord,
    MetricRecord,
    to_checkpoint,
    to_log,
    to_metric,
)

# Seqs per IN list (SQLite allows 32,766 bound parameters per statement).
_IN_CHUNK = 5000


class ResultStore(Database):
    """Reads of metrics, checkpoints and logs."""

    def get_metrics(
        self, job_id: str, *, after: int = 0, limit: int = 1000, final: bool = False
    ) -> tuple[list[MetricRecord], int]:
        """Metric rows with seq > after, in seq order; returns (rows, last seq or after).

        Rows a resume discarded are never returned. With ``final`` only rows no resume can
        rewrite any more: all of them once the job is finished, else those at or before the
        step of its newest recorded checkpoint (a resumed attempt starts from the newest valid
        checkpoint and rewrites only the rows past it), none before the first checkpoint. A
        job's rows are written in step order, so the final rows are a prefix of its rows in
        seq order and ``after=next`` polling misses none of them.
        """
        limit = max(1, min(int(limit), 10_000))
        live = (
            metrics_t.c.job_id == job_id,
            metrics_t.c.seq > after,
            metrics_t.c.discarded.is_(False),
        )
        with self._read() as conn:
            bound = self._final_step(conn, job_id) if final else None
            query = sa.select(metrics_t).where(*live)
            if bound is not None:
                query = query.where(metrics_t.c.step <= bound)
            rows = conn.execute(query.order_by(metrics_t.c.seq).limit(limit)).all()
        items = [to_metric(r) for r in rows]
        return items, (items[-1].seq if items else after)

    def get_metrics_downsampled(
        self, job_id: str, *, max_points: int, after: int = 0, final: bool = False
    ) -> tuple[list[MetricRecord], int]:
        """All live rows with seq > after (``final`` as in ``get_metrics``), reduced to at most
        ``max_points`` points per (split, value name) keeping each bucket's minimum and maximum
        (``service.store.downsample``); returns (rows, the last seq read or after), so
        ``after=next`` follows on from every row, kept or not.

        Reads the values as JSON text in seq order straight from the driver's
        cursor (no Row per row), decodes them as one JSON array and builds records only for the
        kept rows; 100,000 rows: benchmarks/ui_load.py.
        """
        cols = metrics_t.c
        query = sa.select(
            cols.seq, cols.step, cols.split, sa.cast(cols["values"], sa.Text).label("values")
        ).where(cols.job_id == job_id, cols.seq > after, cols.discarded.is_(False))
        with self._read() as conn:
            bound = self._final_step(conn, job_id) if final else None
            if bound is not None:
                query = query.where(cols.step <= bound)
            result = conn.execute(query.order_by(cols.seq))
            # Plain tuples from the DBAPI cursor: no column here has a result processor (the
            # values come as text), and a Row per row cost as much as the read itself.
            fetched = result.cursor.fetchall() if result.cursor is not None else []
            result.close()
            seqs = [r[0] for r in fetched]
            steps = [r[1] for r in fetched]
            splits = [r[2] for r in fetched]
            # One decode of a JSON array: a third of the time of a json.loads per row.
            parsed = json.loads("[" + ",".join(r[3] or "{}" for r in fetched) + "]")
            picks = select_extremes_columns(seqs, steps, splits, parsed, max_points)
            # The other columns of the kept rows only (their values are decoded already).
            wanted = sorted(seqs[i] for i, _ in picks)
            extra: dict[int, tuple[Any, ...]] = {}
            for k in range(0, len(wanted), _IN_CHUNK):
                query = sa.select(
                    cols.seq, cols.attempt, cols.epoch, cols.time, cols.replaces
                ).where(cols.job_id == job_id, cols.seq.in_(wanted[k : k + _IN_CHUNK]))
                result = conn.execute(query)
                extra.update((r[0], r) for r in (result.cursor.fetchall() if result.cursor else []))
                result.close()
        out = []
        for i, names in sorted(picks, key=lambda p: seqs[p[0]]):
            _, attempt, epoch, when, replaces = extra[seqs[i]]
            values = parsed[i]
            if names is not None:
                values = {k: v for k, v in values.items() if k in names}
            out.append(
                MetricRecord(
                    seq=seqs[i],
                    job_id=job_id,
                    attempt=attempt,
                    step=steps[i],
                    epoch=int(epoch),
                    split=splits[i],
                    values=values,
                    time=when,
                    replaces=replaces,
                )
            )
        return out, (max(seqs) if seqs else after)

    @staticmethod
    def _final_step(conn: Connection, job_id: str) -> int | None:
        """The last step whose rows are final (-1: none yet), or None when all are (the job
        finished, or is gone). Read before the rows, so a job finishing meanwhile only delays
        its last rows to the next poll."""
        status = conn.execute(sa.select(jobs.c.status).where(jobs.c.id == job_id)).scalar()
        if status is None or status in FINISHED_STATUSES:
            return None
        newest = conn.execute(
            sa.select(sa.func.max(checkpoints.c.step)).where(checkpoints.c.job_id == job_id)
        ).scalar()
        return -1 if newest is None else int(newest)

    def last_metrics(self, job_id: str) -> dict[str, Any] | None:
        """The latest row of each split: {split: {seq, step, epoch, values, time}}, or None.

        One index probe per split (its live row of the highest step, read backwards along the
        (job_id, split, step) index) after listing the splits from that index alone: a
        GROUP BY over the job's rows took 0.1-0.2 s at 100,000 rows.
        """
        cols = metrics_t.c
        with self._read() as conn:
            splits = conn.execute(
                sa.select(cols.split).where(cols.job_id == job_id).distinct()
            ).scalars()
            rows = []
            for split in sorted(splits):
                row = conn.execute(
                    sa.select(metrics_t)
                    .where(cols.job_id == job_id, cols.split == split, cols.discarded.is_(False))
                    .order_by(cols.step.desc())
                    .limit(1)
                ).first()
                if row is not None:
                    rows.append(row)
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
