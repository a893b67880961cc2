"""The gpu queues a worker with enough GPUs has ever served: ``gpu_queues_seen``.

A CUDA job on a deployment where no GPU worker ever registered is refused at submit; one whose
GPU workers are only down or busy waits. Existing workers rows seed the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _queue_gpus(queue: str) -> int:
    if queue == "gpu":
        return 1
    if queue.startswith("gpu") and queue[3:].isdigit():
        return int(queue[3:])
    return 0


def upgrade() -> None:
    """Create the table and record the gpu queues of the workers registered now."""
    table = op.create_table(
        "gpu_queues_seen",
        sa.Column("queue", sa.String(length=16), primary_key=True),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    conn = op.get_bind()
    seen: set[str] = set()
    for gpus, queues in conn.execute(sa.text("SELECT gpus, queues FROM workers")).all():
        names = json.loads(queues) if isinstance(queues, str) else (queues or [])
        seen |= {q for q in names if 1 <= _queue_gpus(str(q)) <= int(gpus or 0)}
    if seen:
        now = datetime.now(UTC)
        conn.execute(sa.insert(table), [{"queue": q, "first_seen_at": now} for q in sorted(seen)])


def downgrade() -> None:
    """Drop the table."""
    op.drop_table("gpu_queues_seen")
