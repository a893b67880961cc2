"""Per-layer norm telemetry rows and job warnings (placeholder until the feature lands).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing yet: the schema change lands with its feature."""


def downgrade() -> None:
    """Nothing yet."""
