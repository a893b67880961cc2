"""A free-text note on a job, set with PATCH /jobs/{id} (the tags live in job_tags since 0004).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add ``jobs.note`` (nullable text; null: no note)."""
    op.add_column("jobs", sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop ``jobs.note`` (batch mode: SQLite rebuilds the table)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("note")
