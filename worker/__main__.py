"""``python -m worker``: migrate the store, register the worker, start the reaper, run Celery.

Queues: ``--queues`` (default ``NORMCORE_WORKER_QUEUES``, "cpu,gpu"). "gpu" is only consumed
where a CUDA device is found (counted in a throwaway subprocess, never in this process), so a
job for CUDA never runs on a CPU-only worker; a CPU-only worker asked for "gpu" alone exits.

Registration: the worker's row in the store (node name, host, pid, GPUs, memory, queues,
version) is written at start, refreshed every ``worker_heartbeat_seconds`` and removed at a
clean stop; ``GET /workers`` shows it to admins and the API sizes CUDA jobs against it.

Warm start: the worker starts a fork server that imports torch and normcore once
(``worker/warm.py``); each job's training process is forked from it within a fraction of a second.

Stopping: SIGTERM or Ctrl-C starts Celery's warm shutdown. A running job's training child gets
SIGTERM and stops after its current step; the job is left ``running`` with its lease, which
expires within ``lease_seconds``, and a reaper (the API's or any worker's) re-queues it so the
next attempt resumes from its last checkpoint. A second Ctrl-C (or SIGQUIT) is a cold shutdown:
the child is killed at once, with the same recovery.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import TYPE_CHECKING

from service.queue import gpu_queues
from service.settings import Settings, get_settings
from service.store import queue_gpus

if TYPE_CHECKING:
    from worker.registry import GpuInfo


def expand_gpu_queues(queues: list[str], gpu_count: int) -> list[str]:
    """``queues`` with ``gpu`` standing for every gpu queue ``gpu_count`` GPUs serve (``gpu``,
    ``gpu2`` .. ``gpuN``: a job asking for K GPUs only reaches workers with K or more), and
    without the gpu queues this machine cannot serve."""
    out: list[str] = []
    for q in queues:
        for name in gpu_queues(gpu_count) if q == "gpu" else [q]:
            if gpu_count >= queue_gpus(name) and name not in out:
                out.append(name)
    return out


def choose_queues(requested: str | None, settings: Settings) -> tuple[list[str], GpuInfo | None]:
    """The queues to consume and, when "gpu" was asked for, the GPUs found.

    "gpu" is dropped on a machine without CUDA (with a warning when it was asked for
    explicitly): jobs for CUDA must never land on a CPU-only worker. Raises SystemExit when
    nothing is left to consume.
    """
    if requested:
        queues = [q.strip() for q in requested.split(",") if q.strip()]
    else:
        queues = settings.queues
    if not any(queue_gpus(q) for q in queues):
        return queues, None
    from worker.registry import probe_gpus

    gpus = probe_gpus()
    queues = expand_gpu_queues(queues, gpus.count)
    if gpus.count == 0:
        explicit = requested or "worker_queues" in settings.model_fields_set
        if explicit:
            print(
                "python -m worker: no CUDA device here, so the gpu queue is not consumed "
                "(jobs for CUDA never run on a CPU-only worker)",
                file=sys.stderr,
            )
        if not queues:
            raise SystemExit(
                "python -m worker: --queues gpu needs a CUDA device and this machine has none; "
                "use --queues cpu"
            )
    return queues, gpus


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of ``python -m worker``."""
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Migrate the store, start the reaper and run a Celery worker for normcore jobs.",
    )
    parser.add_argument(
        "--queues", "-Q", help="comma-separated queues (default: cpu,gpu; cpu without CUDA)"
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=1,
        help="jobs at once (default 1 = one job per process, one GPU; >1 uses a thread pool)",
    )
    parser.add_argument(
        "--api-beside",
        action="store_true",
        help="the API runs on this host too (normcore serve passes it): the default training "
        "thread count keeps a core for it",
    )
    parser.add_argument(
        "--supervisor-pid",
        type=int,
        default=None,
        help="stop when this process (normcore serve, our parent) dies, however it dies",
    )
    parser.add_argument("--loglevel", "-l", default="info", help="Celery log level (default info)")
    parser.add_argument(
        "--hostname", "-n", default=None, help="worker node name (default normcore-PID@host)"
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the worker until it is told to stop."""
    args = parse_args(argv)
    settings = get_settings()
    if args.supervisor_pid is not None:
        from normcore.procs import die_with_parent

        # As the supervisor's stop would: SIGTERM (warm shutdown), then SIGKILL after its grace.
        grace = settings.cancel_grace_seconds + 5
        die_with_parent(args.supervisor_pid, "the worker", grace)
    settings.worker_concurrency = args.concurrency  # sizes the default training memory limit

    from service.store import Store

    store = Store.from_settings(settings)
    store.upgrade()
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    queues, gpus = choose_queues(args.queues, settings)
    hostname = args.hostname or f"normcore-{os.getpid()}@{socket.gethostname()}"

    from service.reaper import Reaper
    from worker import app as app_module
    from worker import warm
    from worker.app import app
    from worker.registry import WorkerRegistry

    app_module.API_BESIDE = args.api_beside
    # Before Celery: the fork server imports torch and normcore while the worker connects, so
    # the first job starts warm too.
    warm.start()

    registry = WorkerRegistry(settings, store, name=hostname, queues=queues, gpus=gpus)
    registry.start()
    reaper = Reaper(settings, store)
    reaper.start()
    # The CLI's --pool only takes Celery's own names; a pool class goes through the config.
    if args.concurrency == 1:
        app.conf.worker_pool = "worker.app:SupervisorPool"
        pool_args = []
    else:
        pool_args = ["--pool=threads"]
    try:
        app.worker_main(
            [
                "worker",
                *pool_args,
                f"--concurrency={args.concurrency}",
                f"--loglevel={args.loglevel}",
                f"--queues={','.join(queues)}",
                f"--hostname={hostname}",
                # Gossip and mingle talk over broadcast exchanges we do not use; they only slow
                # the start (and the SQLite broker has no fanout).
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        reaper.stop()
        registry.stop()
        store.dispose()


if __name__ == "__main__":
    main()
