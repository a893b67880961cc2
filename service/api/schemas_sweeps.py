"""Response models of the sweep routes (``routes_sweeps``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class SweepJobOut(BaseModel):
    """One run of a cell: its job, seed and status."""

    run: int
    seed: int
    job_id: str
    status: str


class SweepCellOut(BaseModel):
    """One cell of the grid: its values and the jobs of its runs so far."""

    cell: int
    values: dict[str, Any]
    label: str
    jobs: list[SweepJobOut]


class SweepOut(BaseModel):
    """A sweep's summary: status, progress and what it sweeps."""

    id: str
    name: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled.")
    runs: int = Field(description="Cells x seeds.")
    released: int = Field(description="Runs handed to the submit path so far.")
    counts: dict[str, int] = Field(
        description="The sweep's runs per status of their job; `deleted`: runs whose job went "
        "away after the sweep released every run (ended, no value)."
    )
    cancel_requested: bool
    concurrency: int
    metric: str
    direction: str
    axes: list[str]
    created_at: datetime
    updated_at: datetime


class SweepDetail(SweepOut):
    """A sweep with its request and its cells' jobs."""

    request: dict[str, Any]
    cells: list[SweepCellOut]


class SweepPage(BaseModel):
    """The caller's sweeps, newest first."""

    items: list[SweepOut]
