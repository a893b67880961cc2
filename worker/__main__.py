"""``python -m worker``: migrate the store, start the reaper, run a Celery worker.

Stopping: SIGTERM or Ctrl-C starts Celery's warm shutdown. A running job's training child gets
SIGTERM and stops after its current step; the job is left ``running`` with its lease, which
expires within ``lease_seconds``, and a reaper (in any worker) re-queues it so the next attempt
resumes from its last checkpoint. A second Ctrl-C (or SIGQUIT) is a cold shutdown: the child is
killed at once, with the same recovery.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from service.settings import Settings, get_settings

_CUDA_PROBE = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"


def cuda_available() -> bool:
    """Whether torch sees a GPU, asked in a throwaway subprocess so CUDA never starts here."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CUDA_PROBE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def default_queues(settings: Settings) -> str:
    """``worker_queues`` as configured; left at its default, "gpu" is dropped on a box without CUDA."""
    queues = settings.queues
    if (
        "worker_queues" not in settings.model_fields_set
        and "gpu" in queues
        and not cuda_available()
    ):
        queues = [q for q in queues if q != "gpu"] or ["cpu"]
    return ",".join(queues)


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

    from service.store import Store

    store = Store.from_settings(settings)
    store.upgrade()
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    queues = args.queues or default_queues(settings)

    from worker.app import app
    from worker.reaper import Reaper

    reaper = Reaper(settings, store)
    reaper.start()
    # The CLI's --pool only takes Celery's own names; a pool class goes through the config.
    if args.concurrency == 1:
        app.conf.worker_pool = "worker.app:SupervisorPool"
        pool_args = []
    else:
        pool_args = ["--pool=threads"]
    hostname = args.hostname or f"normcore-{os.getpid()}@{socket.gethostname()}"
    try:
        app.worker_main(
            [
                "worker",
                *pool_args,
                f"--concurrency={args.concurrency}",
                f"--loglevel={args.loglevel}",
                f"--queues={queues}",
                f"--hostname={hostname}",
                # Gossip and mingle talk over broadcast exchanges we do not use; they only slow
                # the start (and the SQLite broker has no fanout).
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        reaper.stop()
        store.dispose()


if __name__ == "__main__":
    main()
