"""A follower's poll as two plain DBAPI statements: the job's visibility, then its rows.

``GET /jobs/{id}/metrics?after=`` is the API's hottest request, and building, caching and
compiling two SQLAlchemy Core statements cost more than running them (a profile of the poll put
about half of the route's time there). The statements below are written once per dialect and
sent to the driver as they are, on one pooled connection. They read what
``JobStore.has_job`` and ``ResultStore.get_metrics`` (``final=False``) read, and the tests
compare the two paths row for row.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from sqlalchemy.engine import Engine

# Both statements only name columns of service.db's jobs and metrics tables.
_VISIBLE = "SELECT 1 FROM jobs WHERE id = {p}"
_VISIBLE_OWNED = "SELECT 1 FROM jobs WHERE id = {p} AND owner_id = {p}"
_ROWS = (
    "SELECT seq, step, epoch, split, {values}, time, attempt, replaces FROM metrics "
    "WHERE job_id = {p} AND seq > {p} AND NOT discarded ORDER BY seq LIMIT {p}"
)


class PollRow(NamedTuple):
    """One metric row as the poll returns it (the fields of ``MetricRecord`` a page shows)."""

    seq: int
    step: int
    epoch: int
    split: str
    values: dict[str, Any]
    time: float
    attempt: int
    replaces: int | None


class PollStatements:
    """The poll's SQL for one engine's dialect (``?`` for SQLite, ``%s`` for psycopg)."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        p = "?" if dialect.paramstyle == "qmark" else "%s"
        # JSON comes back as text on SQLite; psycopg decodes it itself.
        values = '"values"'
        self.engine = engine
        self.visible = _VISIBLE.format(p=p)
        self.visible_owned = _VISIBLE_OWNED.format(p=p)
        self.rows = _ROWS.format(p=p, values=values)

    def read(
        self, job_id: str, *, owner_id: int | None, after: int, limit: int
    ) -> list[PollRow] | None:
        """The live rows of ``job_id`` with seq > ``after``, oldest first, at most ``limit``;
        None when the job does not exist or (with ``owner_id``) belongs to someone else.

        Both statements run on one pooled connection; each sees committed data as of its start
        (as ``Database.read_transaction``). Raises the driver's errors unchanged.
        """
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            try:
                if owner_id is None:
                    cur.execute(self.visible, (job_id,))
                else:
                    cur.execute(self.visible_owned, (job_id, owner_id))
                if cur.fetchone() is None:
                    return None
                cur.execute(self.rows, (job_id, after, limit))
                fetched = cur.fetchall()
            finally:
                cur.close()
        finally:
            raw.close()  # back to the pool (rolled back: PostgreSQL began a transaction)
        return [
            PollRow(
                seq=r[0],
                step=r[1],
                epoch=int(r[2]),
                split=r[3],
                values=json.loads(r[4]) if isinstance(r[4], str | bytes) else r[4],
                time=r[5],
                attempt=r[6],
                replaces=r[7],
            )
            for r in fetched
        ]
