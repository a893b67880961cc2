"""The reaper: re-queue jobs whose worker stopped renewing their lease.

Every worker process runs one as a daemon thread. Several reapers are harmless:
``store.requeue_expired`` is a single conditional UPDATE (lease expired and still running), so
each expired job is moved back to ``queued`` by exactly one of them, and only that one re-enqueues
it. Even a duplicate message would be dropped by ``claim_job``.
"""

from __future__ import annotations

import logging
import threading

from service.queue import enqueue
from service.settings import Settings
from service.store import Store

log = logging.getLogger("worker.reaper")


def reap_once(store: Store, settings: Settings) -> list[str]:
    """Re-queue every job whose lease expired, enqueue them again, return their ids."""
    job_ids = store.requeue_expired(max_attempts=settings.max_attempts)
    for job_id in job_ids:
        job = store.get_job(job_id)
        if job is None or job.status != "queued":
            continue
        enqueue(job_id, job.queue, settings)
        log.warning(
            "reaper: job %s lost its worker; re-queued as attempt %d", job_id, job.attempt + 1
        )
    return job_ids


class Reaper:
    """A daemon thread calling ``reap_once`` every ``reaper_interval_seconds``."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store.from_settings(settings)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="normcore-reaper", daemon=True)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait for it."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            try:
                reap_once(self.store, self.settings)
            except Exception as exc:  # store or broker down: try again next round
                log.warning("reaper: %r", exc)
