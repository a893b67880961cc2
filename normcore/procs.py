"""Process plumbing shared by normcore's two supervisors.

The worker supervises one training process per attempt (``worker/runner.py``) and the engine's
data-parallel trainer supervises one process per rank (``normcore/engine/distributed.py``). Both
need the same exit codes, the same way of signalling a child and its process group, and the same
watch that ends a child whose supervisor died (no orphan trains on unsupervised).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from enum import IntEnum

__all__ = ["ExitCode", "signal_group", "signal_name", "watch_parent"]


class ExitCode(IntEnum):
    """Exit codes of a supervised training process (a rank or the worker's training child)."""

    OK = 0  # the outcome was sent; the supervisor reads it
    FAILED = 1  # an error was raised (and sent, where the pipe still worked)
    STALE = 3  # the worker's child: another attempt owns the job, nothing more was written
    ORPHAN = 4  # the supervising process is gone; stopped instead of training unsupervised


def signal_name(num: int) -> str:
    """``"SIGKILL"`` for 9; ``"signal 99"`` for a number with no name here."""
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid``, or to ``pid`` alone before it has made
    its group (between its start and its ``os.setpgrp()``). A process already gone is ignored."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        # no such group yet (ProcessLookupError), or the pgid belongs to someone else's group
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def watch_parent(parent_pid: int, what: str, interval: float = 1.0) -> threading.Thread:
    """Exit this process with ``ExitCode.ORPHAN`` once its parent is no longer ``parent_pid``.

    A daemon thread polls ``os.getppid()`` every ``interval`` seconds (a reparented process
    sees another parent); ``what`` names this process in the line printed to stderr.
    """

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent_pid:
                print(f"normcore: the supervisor of {what} is gone, exiting", file=sys.stderr)
                os._exit(ExitCode.ORPHAN)

    thread = threading.Thread(target=watch, name="normcore-parent-watch", daemon=True)
    thread.start()
    return thread
