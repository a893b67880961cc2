"""Sweeps: a ``sweeps`` table; jobs carry their sweep (``sweep_id``) and cell (``sweep_cell``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``sweeps`` and add the two job columns with their index."""
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("released", sa.Integer(), nullable=False),
        sa.Column("releasing", sa.Boolean(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.String(length=128), nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_sweeps_owner_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
        sa.UniqueConstraint(
            "owner_id", "idempotency_key", name=op.f("uq_sweeps_owner_id_idempotency_key")
        ),
    )
    op.create_index("ix_sweeps_owner_id_created_at_id", "sweeps", ["owner_id", "created_at", "id"])
    op.create_index("ix_sweeps_releasing", "sweeps", ["releasing"])
    op.add_column("jobs", sa.Column("sweep_id", sa.String(length=32), nullable=True))
    op.add_column("jobs", sa.Column("sweep_cell", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_sweep_id", "jobs", ["sweep_id"])


def downgrade() -> None:
    """Drop the job columns and the ``sweeps`` table."""
    op.drop_index("ix_jobs_sweep_id", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sweep_cell")
        batch.drop_column("sweep_id")
    op.drop_index("ix_sweeps_releasing", table_name="sweeps")
    op.drop_index("ix_sweeps_owner_id_created_at_id", table_name="sweeps")
    op.drop_table("sweeps")
