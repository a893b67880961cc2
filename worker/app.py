"""The worker's Celery app and its tasks, ``normcore.run_job`` and ``normcore.run_artifact``.

Design choices (see ../shared/notes/celery-long-jobs.md for the pitfalls behind them):

- Pool: ``solo`` (``SupervisorPool`` below) for one job per worker process (one GPU each). The task itself only supervises
  a training child (forked from its warm fork server), so a prefork pool would add a forked process between the worker and
  the trainer for nothing, and its time limits and ``terminate`` are not what stops training here
  (SIGTERM to our child is). With solo the worker cannot consume control messages while a task
  runs; that is fine because cancellation goes through the store. ``--concurrency N > 1`` uses
  the ``threads`` pool instead: each thread supervises its own child (CPU-only boxes).
- Acks: early (``acks_late=False``). The store is the source of truth: a claimed job holds a
  lease renewed by heartbeat and the reaper re-queues it if the worker dies, within
  ``lease_seconds`` plus one reaper round. Late acks would need a visibility timeout longer than
  any job and would still redeliver a finished job's message after a kill -9 (the claim drops it).
- Prefetch: multiplier 1, and on Redis ``worker_disable_prefetch`` so a busy worker never sits on
  a second job another idle worker could start.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals
from celery.concurrency.solo import TaskPool as SoloPool

from service.queue import make_celery
from service.settings import get_settings
from service.store import Store
from worker import artifacts, runner

log = logging.getLogger("worker.app")

settings = get_settings()
app = make_celery(settings)
app.conf.update(
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    worker_concurrency=1,
    task_ignore_result=True,
    task_track_started=False,
    # Only the Redis transport supports it; the consumer warns and ignores it elsewhere.
    worker_disable_prefetch=settings.broker_url.startswith(("redis://", "rediss://")),
)

# Set by Celery's SIGTERM/SIGINT handlers (warm) and SIGQUIT / second Ctrl-C (cold).
SHUTDOWN = runner.ShutdownFlags.new()
_store: Store | None = None
# Set by ``python -m worker --api-beside`` (``normcore serve``): the API shares this host.
API_BESIDE = False


@signals.worker_shutting_down.connect
def _on_shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
    SHUTDOWN.warm.set()
    if how == "Cold":
        SHUTDOWN.cold.set()


class SupervisorPool(SoloPool):
    """The solo pool, whose "terminate a task" kills the running job's training child instead.

    Celery's cold shutdown (a second Ctrl-C, or SIGQUIT) cancels running tasks through the pool;
    the plain solo pool raises NotImplementedError there, inside our task. Under solo no control
    message is read while a task runs, so only a shutdown can get here.
    """

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Ask the supervisor loop to SIGKILL the training child's process group now."""
        SHUTDOWN.cold.set()


def get_store() -> Store:
    """The worker process's Store, created on first use."""
    global _store
    if _store is None:
        _store = Store.from_settings(settings)
    return _store


@app.task(name="normcore.run_job", acks_late=False, ignore_result=True)
def run_job(job_id: str) -> str:
    """Claim the job, train it in a supervised child process, record the final status."""
    return runner.run_job(job_id, settings, get_store(), flags=SHUTDOWN, api_beside=API_BESIDE)


@app.task(name="normcore.run_artifact", acks_late=False, ignore_result=True)
def run_artifact(artifact_id: str) -> str:
    """Claim an export or recalibration and build it in a child process (worker/artifacts.py)."""
    return artifacts.run_artifact(
        artifact_id, settings, get_store(), flags=SHUTDOWN, api_beside=API_BESIDE
    )
