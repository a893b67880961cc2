"""State as columns: a failed publish is ``jobs.enqueue_error``/``enqueue_failed_at`` (no longer a
status_reason prefix); job tags for ``GET /jobs?tag=``; an index for ``GET /jobs?name=``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_PREFIX = "enqueue failed: "


def upgrade() -> None:
    """Add the columns, move "enqueue failed: ..." reasons into them, create job_tags."""
    op.add_column("jobs", sa.Column("enqueue_error", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("enqueue_failed_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_jobs_owner_id_name", "jobs", ["owner_id", "name"])
    # substr is 1-based on both SQLite and PostgreSQL.
    op.execute(
        sa.text(
            "UPDATE jobs SET enqueue_error = substr(status_reason, :start), "
            "enqueue_failed_at = updated_at, status_reason = NULL "
            "WHERE status = 'queued' AND status_reason LIKE :pattern"
        ).bindparams(start=len(_PREFIX) + 1, pattern=_PREFIX + "%")
    )
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("tag", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_tags_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "tag", name=op.f("pk_job_tags")),
    )
    op.create_index("ix_job_tags_tag_job_id", "job_tags", ["tag", "job_id"])


def downgrade() -> None:
    """Drop job_tags and the columns; a pending failed publish goes back to status_reason."""
    op.drop_index("ix_job_tags_tag_job_id", table_name="job_tags")
    op.drop_table("job_tags")
    op.execute(
        sa.text(
            "UPDATE jobs SET status_reason = :prefix || enqueue_error "
            "WHERE enqueue_error IS NOT NULL AND status = 'queued'"
        ).bindparams(prefix=_PREFIX)
    )
    op.drop_index("ix_jobs_owner_id_name", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("enqueue_failed_at")
        batch.drop_column("enqueue_error")
