"""Jobs remember when their message was last published, so a lost message is published again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add jobs.enqueued_at and jobs.enqueues; queued jobs count as published now."""
    op.add_column("jobs", sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("jobs", sa.Column("enqueues", sa.Integer(), nullable=False, server_default="0"))
    # Jobs queued before this migration: due for a republish after one republish period.
    op.execute(
        sa.text("UPDATE jobs SET enqueued_at = updated_at, enqueues = 1 WHERE status = 'queued'")
    )


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueues")
        batch.drop_column("enqueued_at")
