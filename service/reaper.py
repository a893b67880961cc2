"""The reaper: put jobs of dead workers back in the queue, and republish lost messages.

The API process runs one (``api_reaper``), and so does every worker process, as a daemon thread.
Several reapers are harmless: ``store.requeue_expired`` moves each expired job back to ``queued``
with one conditional UPDATE, and ``store.take_unpublished`` hands each job due for a republish
to one reaper only; even a duplicate message is dropped by the worker's ``claim_job``.

Each round (every ``reaper_interval_seconds``):

1. Jobs whose lease expired (their worker died or lost the store) go back to ``queued`` with
   attempt + 1 still to come, or fail after ``max_attempts``, and are published again.
2. Queued jobs whose message may be lost are published again: the publish failed (the broker was
   down), or the job is still unclaimed ``republish_after_seconds`` after its last publish (a
   worker acked the message and died before its claim, the broker lost it, the API died between
   storing and publishing), with a doubling wait so a job that merely waits gets few duplicates.
"""

from __future__ import annotations

import logging
import threading

from service.queue import enqueue
from service.settings import Settings
from service.status import JobStatus
from service.store import Store

log = logging.getLogger("service.reaper")


def publish(store: Store, settings: Settings, job_id: str, queue: str) -> bool:
    """Publish a queued job; on a broker error mark it for the next round and return False."""
    try:
        enqueue(job_id, queue, settings)
    except Exception as exc:
        log.warning("reaper: publishing job %s failed: %r", job_id, exc)
        store.mark_enqueue_failed(job_id, str(exc) or type(exc).__name__)
        return False
    return True


def reap_once(store: Store, settings: Settings) -> list[str]:
    """Re-queue every job whose lease expired and publish it; return the re-queued ids."""
    job_ids = store.requeue_expired(max_attempts=settings.max_attempts)
    broker_down = False
    for job_id in job_ids:
        job = store.get_job(job_id)
        if job is None or job.status != JobStatus.QUEUED:
            continue
        if broker_down:  # one failed publish a round is enough; the next round retries them
            store.mark_enqueue_failed(job_id, "broker unreachable")
        elif publish(store, settings, job_id, job.queue):
            log.warning(
                "reaper: job %s lost its worker; re-queued as attempt %d", job_id, job.attempt + 1
            )
        else:
            broker_down = True
    return job_ids


def republish_unpublished(store: Store, settings: Settings) -> list[str]:
    """Publish again every queued job whose message may be lost; return the ids sent."""
    taken = store.take_unpublished(after_seconds=settings.republish_after_seconds)
    sent: list[str] = []
    for i, (job_id, queue) in enumerate(taken):
        if not publish(store, settings, job_id, queue):
            for later_id, _ in taken[i + 1 :]:
                store.mark_enqueue_failed(later_id, "broker unreachable")
            break
        store.clear_enqueue_failed(job_id)
        sent.append(job_id)
        log.info("reaper: job %s still unclaimed; published it again", job_id)
    return sent


class Reaper:
    """A daemon thread running ``reap_once`` and ``republish_unpublished`` every interval."""

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
                republish_unpublished(self.store, self.settings)
            except Exception as exc:  # store or broker down: try again next round
                log.warning("reaper: %r", exc)
