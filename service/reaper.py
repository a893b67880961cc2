"""The reaper: re-queue jobs whose worker stopped renewing their lease.

Every worker process runs one as a daemon thread. Several reapers are harmless:
``store.requeue_expired`` is a single conditional UPDATE (lease expired and still running), so
each expired job is moved back to ``queued`` by exactly one of them, and only that one re-enqueues
it. Even a duplicate message would be dropped by ``claim_job``.

It also republishes queued jobs whose message never reached the broker (the API, or this
reaper, marks them with a status reason starting "enqueue failed"), so a broker outage at submit
time does not leave a job waiting forever.
"""

from __future__ import annotations

import logging
import threading

from service.queue import enqueue
from service.settings import Settings
from service.store import Store

log = logging.getLogger("worker.reaper")

# The status-reason prefix the API writes when a publish fails (service/api/routes_jobs.py).
ENQUEUE_FAILED = "enqueue failed"
# Republishing scans the queued jobs, so it runs every this many reaper rounds, not every one.
REPUBLISH_EVERY = 5


def _publish(store: Store, settings: Settings, job_id: str, queue: str) -> bool:
    """Enqueue a queued job; on a broker error mark it for republishing and return False."""
    try:
        enqueue(job_id, queue, settings)
    except Exception as exc:
        log.warning("reaper: enqueue of job %s failed: %r", job_id, exc)
        store.set_status_reason(job_id, f"{ENQUEUE_FAILED}: {exc}")
        return False
    return True


def reap_once(store: Store, settings: Settings) -> list[str]:
    """Re-queue every job whose lease expired, enqueue them again, return their ids."""
    job_ids = store.requeue_expired(max_attempts=settings.max_attempts)
    for job_id in job_ids:
        job = store.get_job(job_id)
        if job is None or job.status != "queued":
            continue
        if _publish(store, settings, job_id, job.queue):
            log.warning(
                "reaper: job %s lost its worker; re-queued as attempt %d", job_id, job.attempt + 1
            )
    return job_ids


def republish_unsent(store: Store, settings: Settings) -> list[str]:
    """Publish again every queued job marked "enqueue failed"; return the ids that went out."""
    sent: list[str] = []
    cursor: str | None = None
    while True:
        jobs, cursor = store.list_jobs(status="queued", limit=500, cursor=cursor)
        for job in jobs:
            if not (job.status_reason or "").startswith(ENQUEUE_FAILED):
                continue
            if _publish(store, settings, job.id, job.queue):
                store.set_status_reason(job.id, None)
                sent.append(job.id)
                log.warning("reaper: job %s had no message in the broker; published it", job.id)
        if cursor is None:
            return sent


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
        rounds = 0
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            rounds += 1
            try:
                reap_once(self.store, self.settings)
                if rounds % REPUBLISH_EVERY == 0:
                    republish_unsent(self.store, self.settings)
            except Exception as exc:  # store or broker down: try again next round
                log.warning("reaper: %r", exc)
