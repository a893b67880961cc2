"""Per-layer norm telemetry rows (``norm_telemetry``) and job warnings (``jobs.warnings``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid), never a BIGINT one.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create ``norm_telemetry`` and add ``jobs.warnings`` (nullable JSON list)."""
    op.add_column("jobs", sa.Column("warnings", sa.JSON(), nullable=True))
    op.create_table(
        "norm_telemetry",
        sa.Column("seq", BigId, autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("layer", sa.String(length=255), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.Column("time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name="fk_norm_telemetry_job_id_jobs",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("seq", name="pk_norm_telemetry"),
        sa.UniqueConstraint("job_id", "step", "layer", name="uq_norm_telemetry_job_id_step_layer"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_norm_telemetry_job_id_seq", "norm_telemetry", ["job_id", "seq"])


def downgrade() -> None:
    """Drop ``norm_telemetry`` and ``jobs.warnings`` (batch mode: SQLite rebuilds jobs)."""
    op.drop_index("ix_norm_telemetry_job_id_seq", table_name="norm_telemetry")
    op.drop_table("norm_telemetry")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("warnings")
