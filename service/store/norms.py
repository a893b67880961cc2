"""Norm telemetry rows (per job, record step and layer) and job warnings.

Rows follow the metrics contract: ``seq`` is global and monotone, a read returns rows with
``seq > after`` in seq order and ``next`` is the last seq read, so ``after=next`` polling misses
none. A row is unique per (job, step, layer): a rewrite (a resumed attempt recording the same
step again) deletes the old row and inserts a new one under a larger seq; a resumed attempt
first deletes the rows past the step it resumes from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from service.db import jobs, norm_telemetry
from service.store.attempts import fence
from service.store.database import Database
from service.store.downsample import select_extremes_columns

__all__ = ["NormRow", "NormStore", "normalize_warning"]

WARNING_KEYS = ("code", "message", "source")
_MAX_WARNINGS = 50


@dataclass(frozen=True)
class NormRow:
    """One norm layer in one telemetry record; ``values`` as ``normcore.telemetry`` makes them."""

    seq: int
    job_id: str
    attempt: int
    step: int
    epoch: int
    trigger: str
    layer: str
    values: dict[str, Any]
    time: float


def _to_row(row: Any) -> NormRow:
    m = row._mapping
    return NormRow(
        seq=m["seq"],
        job_id=m["job_id"],
        attempt=m["attempt"],
        step=m["step"],
        epoch=m["epoch"],
        trigger=m["trigger"],
        layer=m["layer"],
        values=m["values"],
        time=m["time"],
    )


def normalize_warning(warning: Mapping[str, Any]) -> dict[str, str]:
    """A warning as stored: {"code", "message", "source"}, each a non-empty str (message cut
    to 2000 characters). Raises ValueError for a missing or empty key."""
    out = {}
    for key in WARNING_KEYS:
        value = warning.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"warning {key!r} must be a non-empty str, got {value!r}")
        out[key] = value[:2000]
    return out


class NormStore(Database):
    """Writes (fenced by the attempt) and reads of norm telemetry, and job warnings."""

    def add_norms(self, job_id: str, *, attempt: int, records: Sequence[Mapping[str, Any]]) -> None:
        """Store telemetry records, each {"step", "epoch", "trigger", "time", "layers": [dict
        with "layer" and values]}, one row per layer, replacing rows of the same (step, layer).

        Raises ValueError for a malformed record, StaleAttempt/NotFound as every fenced write.
        """
        rows: dict[tuple[int, str], dict[str, Any]] = {}
        for rec in records:
            try:
                step, epoch = int(rec["step"]), int(rec["epoch"])
                trigger, at = str(rec["trigger"])[:16], float(rec["time"])
                layers = list(rec["layers"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"malformed norm record: {exc!r}") from None
            for layer in layers:
                values = {k: v for k, v in dict(layer).items() if k != "layer"}
                name = str(layer.get("layer", ""))[:255]
                if not name:
                    raise ValueError("a norm record's layer has no name")
                rows.pop((step, name), None)  # the last duplicate wins
                rows[(step, name)] = {
                    "step": step,
                    "epoch": epoch,
                    "trigger": trigger,
                    "layer": name,
                    "values": values,
                    "time": at,
                }
        ordered = sorted(rows.values(), key=lambda r: r["step"])

        def tx(conn: Connection) -> None:
            fence(conn, job_id, attempt)
            if not ordered:
                return
            t = norm_telemetry.c
            for step in sorted({r["step"] for r in ordered}):
                names = [r["layer"] for r in ordered if r["step"] == step]
                conn.execute(
                    sa.delete(norm_telemetry).where(
                        t.job_id == job_id, t.step == step, t.layer.in_(names)
                    )
                )
            stmt = sa.insert(norm_telemetry)
            for r in ordered:  # one statement per row: seqs in this order on every backend
                conn.execute(stmt, {"job_id": job_id, "attempt": attempt, **r})

        self._write(tx)

    def discard_norms_after(self, job_id: str, *, attempt: int, step: int) -> int:
        """Delete the job's telemetry rows past ``step`` (a resumed attempt starts there);
        returns the count."""

        def tx(conn: Connection) -> int:
            fence(conn, job_id, attempt)
            res = conn.execute(
                sa.delete(norm_telemetry).where(
                    norm_telemetry.c.job_id == job_id, norm_telemetry.c.step > step
                )
            )
            return int(res.rowcount or 0)

        return self._write(tx)

    def get_norms(
        self,
        job_id: str,
        *,
        after: int = 0,
        limit: int = 1000,
        layer: str | None = None,
    ) -> tuple[list[NormRow], int]:
        """Rows with seq > after (of one ``layer`` if given), in seq order; returns (rows, the
        last seq or after)."""
        limit = max(1, min(int(limit), 10_000))
        t = norm_telemetry.c
        query = sa.select(norm_telemetry).where(t.job_id == job_id, t.seq > after)
        if layer is not None:
            query = query.where(t.layer == layer)
        with self._read() as conn:
            rows = conn.execute(query.order_by(t.seq).limit(limit)).all()
        items = [_to_row(r) for r in rows]
        return items, (items[-1].seq if items else after)

    def norm_layers(self, job_id: str) -> list[str]:
        """The names of the layers the job has telemetry rows for, sorted; [] before any."""
        t = norm_telemetry.c
        query = sa.select(t.layer).where(t.job_id == job_id).distinct().order_by(t.layer)
        with self._read() as conn:
            return [str(name) for name in conn.execute(query).scalars()]

    def get_norms_downsampled(
        self, job_id: str, *, max_points: int, after: int = 0, layer: str | None = None
    ) -> tuple[list[NormRow], int]:
        """Every row with seq > after reduced to at most ``max_points`` points per (layer,
        value name), each bucket keeping its minimum and maximum (``service.store.downsample``;
        a kept row's ``values`` holds only the names it was kept for, plus the layer's non-
        numeric fields); returns (rows, the last seq read or after)."""
        t = norm_telemetry.c
        query = sa.select(norm_telemetry).where(t.job_id == job_id, t.seq > after)
        if layer is not None:
            query = query.where(t.layer == layer)
        with self._read() as conn:
            fetched = [_to_row(r) for r in conn.execute(query.order_by(t.seq))]
        picks = select_extremes_columns(
            [r.seq for r in fetched],
            [r.step for r in fetched],
            [r.layer for r in fetched],
            [r.values for r in fetched],
            max_points,
        )
        out = []
        for i, names in sorted(picks, key=lambda p: fetched[p[0]].seq):
            row = fetched[i]
            if names is not None:
                kept = {
                    k: v
                    for k, v in row.values.items()
                    if k in names or isinstance(v, str) or v is None
                }
                row = NormRow(**{**row.__dict__, "values": kept})
            out.append(row)
        return out, (fetched[-1].seq if fetched else after)

    def add_job_warning(
        self, job_id: str, *, attempt: int | None, warning: Mapping[str, Any]
    ) -> None:
        """Add a warning to the job, replacing one with the same (code, source); fenced by
        ``attempt`` unless it is None (submit time). Keeps the newest 50."""
        new = normalize_warning(warning)

        def tx(conn: Connection) -> None:
            if attempt is not None:
                fence(conn, job_id, attempt)
            current = conn.execute(sa.select(jobs.c.warnings).where(jobs.c.id == job_id)).scalar()
            kept = [
                w
                for w in (current or [])
                if (w.get("code"), w.get("source")) != (new["code"], new["source"])
            ]
            conn.execute(
                sa.update(jobs)
                .where(jobs.c.id == job_id)
                .values(warnings=[*kept, new][-_MAX_WARNINGS:])
            )

        self._write(tx)
