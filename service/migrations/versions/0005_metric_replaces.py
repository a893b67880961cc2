"""Metric rows a resumed attempt rewrites name the row they replace: ``metrics.replaces`` (that
row's seq) and ``metrics.discarded`` (rows past a resume point, hidden until rewritten).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the two columns; existing rows are first writes, none discarded."""
    op.add_column("metrics", sa.Column("replaces", sa.BigInteger(), nullable=True))
    op.add_column(
        "metrics",
        sa.Column("discarded", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    """Drop the hidden rows (the old schema deleted them at once), then the columns."""
    op.execute(sa.text("DELETE FROM metrics WHERE discarded"))
    with op.batch_alter_table("metrics") as batch:
        batch.drop_column("discarded")
        batch.drop_column("replaces")
