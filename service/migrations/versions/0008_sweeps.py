"""Sweeps and their cells; jobs carry their sweep and cell (placeholder until the feature lands).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing yet: the schema change lands with its feature."""


def downgrade() -> None:
    """Nothing yet."""
