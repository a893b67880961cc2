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

__all__ = ["ExitCode", "die_with_parent", "signal_group", "signal_name", "watch_parent"]


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


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that forked it exits
    (``prctl(PR_SET_PDEATHSIG)``, prctl(2)); False where that is not available (macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(
    parent_pid: int, what: str, grace: float, interval: float = 0.5
) -> threading.Thread:
    """Stop this process, as its supervisor would, once its parent ``parent_pid`` is gone.

    For a long-lived child of a supervisor that may itself die without stopping it (kill -9 of
    ``normcore serve``): the parent's death sends SIGTERM here, this process's own graceful
    stop (a worker's warm shutdown, uvicorn's), and ``grace`` seconds later its whole process
    group (when it leads one; else itself) gets SIGKILL. On Linux the SIGTERM comes from the
    kernel (``PR_SET_PDEATHSIG``, which fires when the forking *thread* exits: the parent must
    fork from its main thread); a daemon thread polling ``os.getppid()`` every ``interval``
    seconds covers other systems and enforces the grace. Call it first thing in the child: a
    parent already gone at that point counts too.
    """
    kernel = _set_pdeathsig(signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        print(f"normcore: the supervisor of {what} is gone, stopping", file=sys.stderr)
        if not kernel:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        print(f"normcore: {what} did not stop within {grace:g} s; killing it", file=sys.stderr)
        if os.getpgid(0) == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(ExitCode.ORPHAN)

    if kernel and os.getppid() != parent_pid:  # died before prctl: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=watch, name="normcore-death-watch", daemon=True)
    thread.start()
    return thread
