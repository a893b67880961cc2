"""The Celery side both the API and the worker share: configuration, publishing, broker checks.

The broker only carries job ids; the store is the source of truth. The API publishes
``normcore.run_job`` by name (service never imports worker), so a duplicate or stale message is
harmless: the worker's ``Store.claim_job`` refuses it.

Routing: ``queue_for`` sends a spec whose ``resources.device`` is ``"cuda"`` to the ``gpu``
queue (``gpuK`` when it asks for ``resources.gpus = K > 1``: only workers with at least K GPUs
consume it) and everything else (``"cpu"`` and ``"auto"``) to ``cpu``. ``"auto"`` jobs still use CUDA
when the worker that takes them has it (GPU workers consume both queues by default); a lab
that wants auto jobs on GPUs only can run its GPU workers with ``--queues gpu`` and submit with
``device: "cuda"``.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from kombu import Connection, Exchange, Queue

from normcore.spec import JobSpec
from service.settings import Settings

TASK_NAME = "normcore.run_job"
# Exports and recalibrations (worker/artifacts.py): small CPU tasks on the cpu queue.
ARTIFACT_TASK_NAME = "normcore.run_artifact"
MAX_GPUS = 16  # JobSpec's bound on resources.gpus
GPU_QUEUES = ("gpu", *(f"gpu{k}" for k in range(2, MAX_GPUS + 1)))
QUEUES = ("cpu", *GPU_QUEUES)
_PING_TIMEOUT = 2.0

_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def is_redis(url: str) -> bool:
    """True for Redis broker URLs (redis://, rediss://, redis+socket://)."""
    return _scheme(url) in ("redis", "rediss", "redis+socket", "socket")


def is_sqlalchemy(url: str) -> bool:
    """True for kombu's SQLAlchemy transport (``sqla+<database url>``), e.g. the embedded broker."""
    scheme = _scheme(url)
    return scheme.startswith("sqla+") or scheme.startswith("sqlalchemy+")


def _sqlite_broker_path(url: str) -> Path | None:
    """The file of a ``sqla+sqlite:///path`` broker, else None."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in ("sqla+sqlite", "sqlalchemy+sqlite") or not rest.startswith("/"):
        return None
    path = rest[1:].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def prepare_sqlite_broker(settings: Settings) -> None:
    """Create the embedded broker's SQLite file in WAL mode (persistent in the file), and set
    how often a waiting worker polls it (``broker_poll_seconds``).

    kombu opens it with plain defaults (rollback journal, several fsyncs per message); WAL makes a
    publish one fsync and lets the worker poll while the API writes. No-op for other brokers.
    """
    path = _sqlite_broker_path(settings.broker_url)
    if path is None:
        return
    from kombu.transport import sqlalchemy as sqla_transport

    # kombu's SQLAlchemy transport passes every transport option to create_engine, so its
    # documented polling_interval can only be set on the class (one broker per process).
    sqla_transport.Transport.polling_interval = settings.broker_poll_seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def _transport_options(settings: Settings) -> dict[str, Any]:
    if is_redis(settings.broker_url):
        return {
            "visibility_timeout": int(settings.visibility_timeout_seconds),
            "health_check_interval": 10,
            "socket_keepalive": True,
        }
    if _sqlite_broker_path(settings.broker_url) is not None:
        # This transport hands its options to sqlalchemy.create_engine (see the notes), so only
        # engine arguments fit: wait for a locked SQLite file instead of failing the publish.
        return {"connect_args": {"timeout": 30.0}}
    return {}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The one Celery configuration the API (publisher) and the worker (consumer) both use.

    Early acks and prefetch 1: a message only wakes a worker up. Recovery is the store's job
    (leases renewed by heartbeat, reapers that re-queue expired jobs and republish lost
    messages), not the broker's, so a job never waits for a visibility timeout and a message is
    never redelivered to run a finished job again; the claim drops any duplicate. On Redis the
    visibility timeout is still set in all three places Celery and kombu read it, for any
    message a worker reserved and never acked.
    """
    config: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 4.0,
        "task_default_queue": "cpu",
        "task_queues": tuple(Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES),
        "task_create_missing_queues": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        # Only matters for late-acked tasks; kept so a late-ack experiment cannot run a task
        # twice in parallel after a lost connection.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_ignore_result": True,
        "result_backend": None,
        "task_track_started": False,
        "worker_send_task_events": False,
        "broker_transport_options": _transport_options(settings),
    }
    if is_redis(settings.broker_url):
        vt = int(settings.visibility_timeout_seconds)
        config["result_backend_transport_options"] = {"visibility_timeout": vt}
        config["visibility_timeout"] = vt
    return config


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured by :func:`celery_config` (the worker registers its task on it)."""
    prepare_sqlite_broker(settings)
    app = Celery("normcore", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def _publisher(settings: Settings) -> Celery:
    # One app per broker URL: its producer pool keeps the connection open between publishes.
    key = settings.broker_url
    app = _apps.get(key)
    if app is None:
        with _apps_lock:
            app = _apps.get(key)
            if app is None:
                app = _apps[key] = make_celery(settings)
    return app


def queue_for(spec: JobSpec | dict[str, Any]) -> str:
    """The queue a job goes to: for ``device: "cuda"``, ``gpu`` (one GPU) or ``gpuK`` (K > 1
    GPUs); else ``cpu``."""
    if isinstance(spec, dict):
        spec = JobSpec.model_validate(spec)
    if spec.resources.device != "cuda":
        return "cpu"
    return gpu_queue(spec.resources.gpus)


def gpu_queue(gpus: int) -> str:
    """The queue of jobs that need ``gpus`` CUDA devices on one worker."""
    if not 1 <= gpus <= MAX_GPUS:
        raise ValueError(f"gpus must be between 1 and {MAX_GPUS}, got {gpus}")
    return "gpu" if gpus == 1 else f"gpu{gpus}"


def gpu_queues(count: int) -> list[str]:
    """The gpu queues a worker with ``count`` GPUs serves: ``gpu`` and ``gpu2`` .. ``gpuN``."""
    return [gpu_queue(k) for k in range(1, min(count, MAX_GPUS) + 1)]


def enqueue(job_id: str, queue: str, settings: Settings) -> str:
    """Publish ``normcore.run_job(job_id)`` to ``queue``; returns the Celery task id.

    Raises ValueError for an unknown queue and the broker's error (after Celery's short publish
    retry) when the broker is down; the job row stays queued for the caller to report or retry.
    """
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; one of {', '.join(QUEUES)}")
    result = _publisher(settings).send_task(
        TASK_NAME, args=[job_id], queue=queue, routing_key=queue, ignore_result=True
    )
    return str(result.id)


def enqueue_artifact(artifact_id: str, settings: Settings) -> str:
    """Publish ``normcore.run_artifact(artifact_id)`` to the cpu queue; the Celery task id.

    Raises the broker's error when it is down (the artifact row stays queued; the next request
    for it publishes again).
    """
    result = _publisher(settings).send_task(
        ARTIFACT_TASK_NAME, args=[artifact_id], queue="cpu", routing_key="cpu", ignore_result=True
    )
    return str(result.id)


def _connection(settings: Settings) -> Connection:
    # One quick try: kombu's default_channel reads these failover keys (and the SQLAlchemy
    # transport drops them before create_engine).
    prepare_sqlite_broker(settings)
    options = dict(_transport_options(settings))
    options |= {"max_retries": 0, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
    if is_redis(settings.broker_url):
        options |= {"socket_connect_timeout": _PING_TIMEOUT, "socket_timeout": _PING_TIMEOUT}
    return Connection(settings.broker_url, connect_timeout=_PING_TIMEOUT, transport_options=options)


def broker_ping(settings: Settings) -> bool:
    """True if the broker answers within about two seconds."""
    try:
        with _connection(settings) as conn:
            channel = conn.default_channel
            if is_redis(settings.broker_url):
                channel.client.ping()
            else:
                channel.queue_declare(queue=QUEUES[0], passive=False)
        return True
    except Exception:
        return False


def queue_depths(settings: Settings) -> dict[str, int] | None:
    """Messages waiting (not yet delivered) per queue, or None if the broker can't say."""
    try:
        with _connection(settings) as conn:
            channel = conn.default_channel
            # Redis: LLEN of the queue's lists; SQLAlchemy: rows still visible in kombu_message.
            return {
                q: int(channel.queue_declare(queue=q, passive=False).message_count) for q in QUEUES
            }
    except Exception:
        return None


def queue_depth(settings: Settings) -> int | None:
    """Messages waiting in all queues together, or None if the broker can't say."""
    depths = queue_depths(settings)
    return None if depths is None else sum(depths.values())
