"""Warm training processes: a fork server that has imported torch, normcore and the data readers.

A spawned training process spends seconds importing torch, normcore, scikit-learn and the store
before it trains (4.2 s on an idle 2-core machine, 10-20 s under load; issue 12). The worker
instead starts ``multiprocessing``'s fork server once, at its own start, with those modules
preloaded; each attempt is then a ``fork`` of that server: a fresh process (its own pid, process
group, memory limit and thread count, one attempt each) that starts training within a fraction of
a second of the claim.

CUDA stays safe: the fork server only imports modules. Importing torch neither initializes CUDA
nor calls the driver (``torch.cuda.is_available()`` would: it is never called here), and nothing
in the preloaded modules runs a torch operation, so no OpenMP thread pool exists to be broken by
the fork either: the server is single-threaded (``tests/worker/test_warm.py`` checks both). Each forked child initializes CUDA itself, after it has its job.

The server inherits the worker's environment, working directory and umask when it starts; its
children inherit them from it. It exits when the worker process does (multiprocessing's "alive"
pipe), so a training child whose worker was killed finds its parent gone (``os.getppid()``
changes) and stops, as a spawned child did.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import signal
import threading
import time

log = logging.getLogger("worker.warm")

# What a training process imports before it trains; a module that is not installed (the data
# extra's scikit-learn, pillow) is skipped by the fork server.
PRELOAD = [
    "torch",
    # torch.use_deterministic_algorithms (the engine's determinism()) imports inductor's config,
    # which pulls in dynamo: 6-7 s of imports on a loaded 2-core machine, at every job otherwise
    "torch._inductor.config",
    "normcore",
    "normcore.spec",
    "normcore.checkpoint",
    "normcore.engine.loop",
    "normcore.engine.distributed",
    "normcore.data.loader",
    "normcore.data.readers",
    "sklearn.datasets",
    "PIL.Image",
    "service.store",
    "worker.callbacks",
    "worker.runner",
]


def context() -> multiprocessing.context.ForkServerContext:
    """The ``forkserver`` context, with ``PRELOAD`` set for a server not started yet.

    The preload list is process-wide (one fork server per process) and only read when the
    server starts; a server some other code of this process started earlier keeps its own list.
    """
    ctx = multiprocessing.get_context("forkserver")
    assert isinstance(ctx, multiprocessing.context.ForkServerContext)
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start(*, wait: bool = False) -> threading.Thread:
    """Start the fork server now and let it import ``PRELOAD`` in the background.

    Returns the thread that waits for the imports (``wait`` joins it). Call it from the main
    thread, after the process's umask and environment are final: the server keeps the ones it
    started with. The server starts with SIGTERM ignored, so a SIGTERM to the worker's process
    group (``normcore serve`` stopping, ``kill -TERM -PGID``) leaves it, and with it the parent
    of a training child that is checkpointing before it stops, alive until the worker exits.
    A failure is logged; a job then starts the server itself or falls back to ``spawn``.
    """
    ctx = context()
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, signal.SIG_IGN) if main else None
    try:
        multiprocessing.forkserver.ensure_running()
    except Exception as exc:
        log.warning("training fork server did not start: %r; jobs start it themselves", exc)
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)

    def run() -> None:
        t0 = time.monotonic()
        try:
            # ensure_running returns once the server process exists; this first fork waits for
            # its imports, so that the first job does not.
            proc = ctx.Process(target=_noop, name="normcore-warmup", daemon=True)
            proc.start()
            proc.join()
        except Exception as exc:
            log.warning("training fork server warm-up failed: %r", exc)
            return
        log.info(
            "training fork server ready in %.1f s (torch, normcore imported)",
            time.monotonic() - t0,
        )

    thread = threading.Thread(target=run, name="normcore-forkserver-warmup", daemon=True)
    thread.start()
    if wait:
        thread.join()
    return thread


def _noop() -> None:
    """The warm-up child: proves the server has finished its imports."""
