"""The store's typed errors: each carries a stable ``code`` (as MLflow's store errors do)."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of the store's own errors."""

    code = "STORE_ERROR"


class NotFound(StoreError, LookupError):
    """The job (or other object) does not exist."""

    code = "NOT_FOUND"


class StaleAttempt(StoreError):
    """A worker-side write carried an attempt that no longer owns the job."""

    code = "STALE_ATTEMPT"


class IdempotencyConflict(StoreError):
    """An Idempotency-Key was reused with a different request body."""

    code = "IDEMPOTENCY_CONFLICT"


class QuotaExceeded(StoreError):
    """A user already has ``active`` queued or running jobs and the limit is ``limit``."""

    code = "QUOTA_EXCEEDED"

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} active jobs; the limit is {limit}")
        self.active = active
        self.limit = limit


class InvalidCursor(StoreError, ValueError):
    """A ``list_jobs`` cursor that this store did not hand out (malformed in any way)."""

    code = "INVALID_CURSOR"


__all__ = [
    "IdempotencyConflict",
    "InvalidCursor",
    "NotFound",
    "QuotaExceeded",
    "StaleAttempt",
    "StoreError",
]
