"""The states of a job, in one place: every module of service/ and worker/ spells them from here.

Modelled on procrastinate's job ``Status``: a ``str`` enum whose values are what the database
stores and the API answers, so ``JobStatus.QUEUED == "queued"`` and JSON sees plain strings.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """A job's state; the last four are terminal (the job never leaves them)."""

    # Stored and published (or due for a republish); waiting for a worker to claim it.
    QUEUED = "queued"
    # Claimed by a worker as attempt ``attempt``; its lease is kept alive by heartbeats, and a
    # reaper puts it back to QUEUED (or FAILED after max_attempts) when the lease expires.
    RUNNING = "running"
    # Training ended normally; the final checkpoint is recorded.
    SUCCEEDED = "succeeded"
    # Training raised, diverged, or the worker was lost on every allowed attempt; see ``error``.
    FAILED = "failed"
    # Cancelled by its owner or an admin: at once while queued, cooperatively while running.
    CANCELLED = "cancelled"
    # Stopped after its runtime limit (spec ``max_runtime`` or the server's cap), checkpointed.
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        """True for the terminal states."""
        return self in FINISHED_STATUSES

    @property
    def active(self) -> bool:
        """True for the states that count towards a user's active-job quota."""
        return self in ACTIVE_STATUSES


JOB_STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
ACTIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED_STATUSES: tuple[JobStatus, ...] = (
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELLED,
    JobStatus.TIMED_OUT,
)

__all__ = ["ACTIVE_STATUSES", "FINISHED_STATUSES", "JOB_STATUSES", "JobStatus"]
