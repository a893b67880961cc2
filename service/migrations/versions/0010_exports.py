"""Checkpoint exports and recalibrations: the ``artifacts`` table.

One row per (job, kind, checkpoint sha256, options): an ONNX export or a recalibrated
checkpoint built by a worker, with its status, result (the equivalence certificate, or the new
checkpoint's name and metrics), file and lease.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create ``artifacts``."""
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column(
            "job_id",
            sa.String(length=32),
            sa.ForeignKey("jobs.id", ondelete="CASCADE", name="fk_artifacts_job_id_jobs"),
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("checkpoint", sa.String(length=255), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("options_key", sa.String(length=255), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("bytes", sa.BigInteger(), nullable=True),
        sa.Column("enqueues", sa.Integer(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.UniqueConstraint(
            "job_id",
            "kind",
            "checkpoint_sha256",
            "options_key",
            name="uq_artifacts_job_id_kind_checkpoint_sha256_options_key",
        ),
    )
    op.create_index("ix_artifacts_job_id_created_at", "artifacts", ["job_id", "created_at"])


def downgrade() -> None:
    """Drop ``artifacts``."""
    op.drop_index("ix_artifacts_job_id_created_at", table_name="artifacts")
    op.drop_table("artifacts")
