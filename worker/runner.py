"""Run one job: claim it, train in a child process, supervise it, record the outcome.

The Celery process only supervises. Training runs in a child forked from the worker's warm fork
server (``worker/warm.py``: torch and normcore imported, CUDA never initialized; never a fork of
the Celery process, which imports no torch; ``spawn`` if the server cannot start), one attempt
per child. The child makes itself a process-group leader, sets its torch thread count
(``train_threads``, else chosen from the usable cores by ``worker/threads.py``: CPU runs are
bit-identical only at equal counts), limits its address space on CPU
(``train_memory_limit_bytes``: a job too big fails with an out-of-memory error, the worker lives
on), opens its own Store and calls ``normcore.train``. The parent renews the job's lease by heartbeat, turns a cancel request into SIGTERM to the child, then
SIGKILL to its group after ``cancel_grace_seconds``, and writes the final status from the JSON
outcome the child sends back over a pipe (no pickled objects cross it).

Worker shutdown (SIGTERM/SIGINT to ``python -m worker``) stops the child the same way but writes no
final status: the job stays ``running`` until its lease expires, then a reaper re-queues it and the
next attempt resumes from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normcore.procs import ExitCode, signal_group, signal_name
from service.settings import Settings
from service.status import JobStatus
from service.store import NotFound, StaleAttempt, Store
from worker import warm
from worker.threads import choose_train_threads

log = logging.getLogger("worker.runner")

DEFAULT_TRAIN_TARGET = "normcore:train"
# Exit codes of the training child (normcore.procs.ExitCode, shared with the data-parallel ranks).
EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_STALE = ExitCode.STALE
MAX_ERROR_CHARS = 4000


def worker_id() -> str:
    """This process's identity in job leases: ``hostname:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class ShutdownFlags:
    """Set from the worker's signal handlers: warm (stop the child gently) or cold (kill it)."""

    warm: threading.Event
    cold: threading.Event

    @classmethod
    def new(cls) -> ShutdownFlags:
        """Two fresh, unset events."""
        return cls(threading.Event(), threading.Event())


# ============================================================================ the child


def describe_error(exc: BaseException, *, data_root: str | Path, step: int) -> str:
    """A one-line error a user can act on (the traceback goes to the job's logs instead).

    ``step`` is the last completed training step; an out-of-memory error names the next one.
    """
    from normcore.engine import TrainingDiverged

    if isinstance(exc, TrainingDiverged):
        return str(exc)
    from normcore.data.loader import DataMemoryError

    if isinstance(exc, DataMemoryError):  # the data set, not the batch or the model
        return str(exc)
    if _is_oom(exc):
        wanted = _allocation(str(exc))
        return (
            f"out of memory at step {step + 1}{f' (tried to allocate {wanted})' if wanted else ''}"
            ": lower data.batch_size or model width"
        )
    if isinstance(exc, ValueError):  # spec and data errors are written for the user already
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        name = exc.filename
        if name is None:
            return str(exc) or "file not found"
        with contextlib.suppress(ValueError):
            name = Path(name).resolve().relative_to(Path(data_root).resolve()).as_posix()
        return f"file not found: {name} (paths are relative to the data root)"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    # torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
    # memory: you tried to allocate N bytes. Error code 12 (Cannot allocate memory)").
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _allocation(message: str) -> str | None:
    """The size an out-of-memory message says was asked for ("2.00 GiB"), if it says."""
    m = re.search(r"tried to allocate (\d+) bytes", message, re.IGNORECASE)
    if m:
        return f"{int(m.group(1)) / 2**30:.2f} GiB"
    m = re.search(r"tried to allocate ([\d.]+ ?[KMGT]i?B)", message, re.IGNORECASE)
    return m.group(1) if m else None


def _limit_memory(cfg: dict[str, Any]) -> str | None:
    """Apply ``train_memory_limit_bytes`` as RLIMIT_AS to a CPU run; returns a line to log.

    Not on CUDA: its driver reserves far more address space than it ever backs with memory.
    """
    limit = cfg.get("memory_limit_bytes")
    if not limit:
        return None
    device = (cfg["spec"].get("resources") or {}).get("device", "auto")
    if device == "cuda":
        return "train_memory_limit_bytes not applied: the job runs on CUDA"
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            return "train_memory_limit_bytes not applied: the job runs on CUDA"
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
    return f"address space limited to {int(limit) / 2**30:.2f} GiB (train_memory_limit_bytes)"


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _child_main(config_json: str, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of the training process: train one attempt and send back a JSON outcome."""
    os.setpgrp()  # our own group: the supervisor can SIGKILL us and everything we start at once
    cfg = json.loads(config_json)
    if cfg.get("read_timeout_s") is not None:
        from normcore.data.readers import READ_TIMEOUT_ENV

        os.environ[READ_TIMEOUT_ENV] = str(cfg["read_timeout_s"])
    threads = int(cfg.get("train_threads") or 0)
    if threads:
        # Before torch is imported, so its thread pools (and data-parallel ranks spawned from
        # here, which inherit the environment) start at this size.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(threads)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C in a terminal goes to the worker's group, not ours; the supervisor decides for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sent = threading.Lock()

    def report(outcome: dict[str, Any]) -> None:
        # Called once, from whichever thread ends the attempt first.
        if sent.acquire(blocking=False):
            with contextlib.suppress(OSError):
                conn.send_bytes(json.dumps(outcome).encode("utf-8"))

    code = _run_attempt(cfg, stop, report)
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown (torch's can take a while): the outcome is sent, the rows written.
    os._exit(code)


def _run_attempt(cfg: dict[str, Any], stop: threading.Event, report: Any) -> int:
    """Body of the child: everything after the process setup; returns the exit code."""
    from worker.callbacks import StoreCallback, StoreLogHandler

    job_id, attempt = cfg["job_id"], int(cfg["attempt"])
    store = Store(cfg["database_url"])
    callback = StoreCallback(
        store,
        job_id,
        attempt,
        artifact_dir=cfg["artifact_dir"],
        stop_event=stop,
        on_stale=lambda: report({"status": "stale"}),
    )
    handler = StoreLogHandler(callback)
    engine_log = logging.getLogger("normcore")
    engine_log.addHandler(handler)
    if engine_log.getEffectiveLevel() > logging.INFO:
        engine_log.setLevel(logging.INFO)
    callback.start()
    try:
        warm_from = cfg.get("fork_server_pid")
        callback.log(
            f"attempt {attempt} started on worker {cfg['worker_id']} (pid {os.getpid()}) "
            f"{time.time() - float(cfg.get('claimed_at') or time.time()):.2f} s after the claim, "
            + (
                f"forked from the warm fork server (pid {warm_from})"
                if warm_from
                else "spawned (cold start)"
            )
        )
        callback.flush()  # its time in the store is the phase's end (benchmarks/latency.py)
        import torch

        if cfg.get("train_threads"):
            torch.set_num_threads(int(cfg["train_threads"]))
        callback.log(
            f"torch threads {torch.get_num_threads()}"
            + (f": {cfg['threads_reason']}" if cfg.get("threads_reason") else "")
        )
        limited = _limit_memory(cfg)
        if limited:
            callback.log(limited)
        import normcore.spec

        spec = normcore.spec.JobSpec.model_validate(cfg["spec"])
        workdir = Path(cfg["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        resume = _find_resume(workdir, attempt, callback) if attempt > 1 else None
        train = _resolve(cfg["train_target"])
        limit = cfg.get("time_limit_s")
        if limit is not None:
            callback.log(
                f"time limit: {limit / 60:.2f} min left of this job's "
                f"{cfg['max_runtime_min']:g} min (max_runtime, all attempts together)"
            )
        result = train(
            spec,
            workdir,
            callbacks=[callback],
            resume=resume,
            data_root=Path(cfg["data_root"]),
            time_limit_s=limit,
        )
        callback.close()
        report(
            {
                "status": str(result.status),
                "global_step": int(result.global_step),
                "cancel_requested": callback.cancel_requested,
            }
        )
        return EXIT_OK
    except (StaleAttempt, NotFound):  # raised by a store call outside the callback's own guard
        report({"status": "stale"})
        return EXIT_STALE
    except BaseException as exc:
        error = describe_error(exc, data_root=cfg["data_root"], step=callback.last_step)
        callback.log(
            "training failed:\n" + "".join(traceback.format_exception(exc)).rstrip(),
            level="error",
        )
        with contextlib.suppress(Exception):
            callback.close()
        # Bounded, so the message fits the pipe's buffer before the parent reads it.
        report({"status": JobStatus.FAILED, "error": error[:MAX_ERROR_CHARS]})
        return EXIT_FAILED
    finally:
        engine_log.removeHandler(handler)
        with contextlib.suppress(Exception):
            store.dispose()


def _find_resume(workdir: Path, attempt: int, callback: Any) -> Path | None:
    """The newest checkpoint that verifies, logged into the job's logs; None starts over."""
    from normcore.checkpoint import latest_valid_checkpoint, read_meta

    ckpt = latest_valid_checkpoint(workdir, log=callback.log)
    if ckpt is None:
        callback.log(f"attempt {attempt}: no valid checkpoint in {workdir.name}, starting over")
        return None
    epoch = read_meta(ckpt).get("epoch", "?")
    callback.log(f"resuming attempt {attempt} from checkpoint {ckpt.name} at epoch {epoch}")
    return ckpt


# ============================================================================ the supervisor


class _Supervisor:
    """State of one supervised attempt (kept in an object so the loop stays readable)."""

    def __init__(
        self, store: Store, settings: Settings, job_id: str, attempt: int, flags: ShutdownFlags
    ) -> None:
        self.store = store
        self.settings = settings
        self.job_id = job_id
        self.attempt = attempt
        self.flags = flags
        self.cancel_seen = False
        self.stale = False
        self.term_sent_at: float | None = None
        # monotonic time after which the child is stopped as timed out, should its engine not
        # stop itself at the time limit (a step or a data load that outlasts it)
        self.deadline: float | None = None
        self.timed_out = False
        # the fork server died under the child: its real exit status is unknown
        self.server_lost = False

    def heartbeat(self) -> None:
        """Renew the lease; note a cancel request or a lost lease."""
        try:
            if self.store.heartbeat(
                self.job_id, attempt=self.attempt, lease_seconds=self.settings.lease_seconds
            ):
                self.cancel_seen = True
        except (StaleAttempt, NotFound):  # another attempt owns the job, or it was deleted
            self.stale = True
        except Exception as exc:
            # A store outage: keep training. If it lasts past the lease, the reaper re-queues the
            # job and our next heartbeat gets StaleAttempt.
            log.warning("job %s: heartbeat failed: %r", self.job_id, exc)

    def supervise(self, proc: Any) -> None:
        """Heartbeat and relay stop requests until the child exits."""
        hb_every = self.settings.heartbeat_seconds
        grace = self.settings.cancel_grace_seconds
        next_hb = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_hb:
                self.heartbeat()
                next_hb = now + hb_every
            if self.stale or self.flags.cold.is_set():
                # Another attempt owns the job (or a cold shutdown): no grace, no writes.
                signal_group(proc.pid, signal.SIGKILL)
                proc.join()
                return
            if self.deadline is not None and now >= self.deadline and self.term_sent_at is None:
                log.warning("job %s: past its time limit, stopping it", self.job_id)
                self.timed_out = True
            stopping = self.cancel_seen or self.flags.warm.is_set() or self.timed_out
            if stopping and self.term_sent_at is None:
                # SIGTERM goes to the child only, not its group: the engine's data-parallel ranks
                # (and data loader workers) would die of it and turn a cancel into a failure.
                # The child stops them itself; the whole group gets SIGKILL after the grace.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                self.term_sent_at = time.monotonic()
            if self.term_sent_at is not None and time.monotonic() - self.term_sent_at > grace:
                log.warning("job %s: child ignored SIGTERM for %.0fs, killing", self.job_id, grace)
                signal_group(proc.pid, signal.SIGKILL)
                proc.join()
                return
            # Short waits so a shutdown flag set by a signal handler is acted on promptly.
            timeout = max(0.0, min(next_hb - time.monotonic(), 0.2))
            multiprocessing.connection.wait([proc.sentinel], timeout=timeout)
            if proc.exitcode is not None:
                return


def run_job(
    job_id: str,
    settings: Settings,
    store: Store,
    *,
    flags: ShutdownFlags | None = None,
    train_target: str = DEFAULT_TRAIN_TARGET,
    api_beside: bool = False,
) -> str:
    """Claim ``job_id`` and run one attempt of it to the end; return what happened.

    Returns one of "duplicate" (not claimable: held by another worker, finished or cancelled),
    "succeeded", "cancelled", "failed", "stale" (another attempt took over; nothing written),
    "shutdown" (the worker is stopping; the job is left for the reaper) or "lost" (the fork
    server died under the child, whose exit status is then unknown: left for the reaper too). ``train_target`` is the
    ``module:function`` the child calls, ``normcore.train``'s signature. ``api_beside``: the
    API runs on this host (``normcore serve``), so the default thread count keeps a core for it.
    """
    flags = flags or ShutdownFlags.new()
    me = worker_id()
    claimed = claim(store, settings, job_id, me)
    if claimed is None:
        log.info("job %s: not claimable (duplicate delivery, running elsewhere or done)", job_id)
        return "duplicate"
    if claimed[0] != job_id:
        log.info("job %s: its message woke this worker for job %s (fair order)", job_id, claimed[0])
    job_id, attempt = claimed
    job = store.get_job(job_id)
    assert job is not None  # we hold its lease
    log.info("job %s: attempt %d claimed by %s", job_id, attempt, me)

    time_limit_s, max_runtime_min = _time_limit(job, settings)
    threads = choose_train_threads(
        settings.train_threads,
        concurrency=settings.worker_concurrency,
        api_beside=api_beside,
    )
    config = {
        "claimed_at": time.time(),
        "time_limit_s": time_limit_s,
        "max_runtime_min": max_runtime_min,
        "read_timeout_s": settings.data_read_timeout_seconds,
        "job_id": job_id,
        "attempt": attempt,
        "worker_id": me,
        "spec": job.spec,
        "database_url": settings.database_url,
        "artifact_dir": str(settings.artifact_dir),
        "data_root": str(settings.data_root),
        "workdir": str(settings.job_dir(job_id)),
        "train_target": train_target,
        "train_threads": threads.threads,
        "threads_reason": threads.reason,
        "memory_limit_bytes": settings.train_memory_limit(),
    }
    sup = _Supervisor(store, settings, job_id, attempt, flags)
    sup.deadline = time.monotonic() + time_limit_s + max(30.0, settings.cancel_grace_seconds)
    proc: Any = None
    recv_end, send_end = multiprocessing.Pipe(duplex=False)
    try:
        proc = _start_heartbeating(sup, config, send_end, name=f"normcore-train-{job_id[:8]}")
        send_end.close()  # so a dead child reads as EOF, not a hang
        sup.supervise(proc)
        outcome = _read_outcome(recv_end)
    except BaseException:
        # A hard shutdown or a bug in this loop: never leave the child running unsupervised.
        if proc is not None and proc.pid is not None:
            signal_group(proc.pid, signal.SIGKILL)
            proc.join(5)
        raise
    finally:
        recv_end.close()
        send_end.close()
    if proc.pid is not None:
        # Reap helpers the child left behind in its group (data loader workers and the like).
        # killpg only: the child itself is reaped, so its pid may already belong to someone else,
        # but a pgid is never reused while a member of its group lives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.exitcode == SERVER_LOST_EXIT and outcome is None and _gone(config_server_pid(proc)):
        sup.server_lost = True
    result = _record(store, sup, proc.exitcode, outcome)
    if result == "stale":
        _remove_if_deleted(store, settings, job_id)
    return result


def _start_heartbeating(
    sup: _Supervisor,
    config: dict[str, Any],
    send_end: multiprocessing.connection.Connection,
    *,
    name: str,
) -> Any:
    """``_start_child`` in a thread while this one keeps the lease: a fork server still busy
    with its imports (the worker just started) or restarting takes seconds, longer than a lease
    under load. The job is claimed first all the same: left queued, it would be published again
    (``republish_after_seconds``) and its duplicate message wake another worker for nothing."""
    box: dict[str, Any] = {}

    def start() -> None:
        try:
            box["proc"] = _start_child(config, send_end, name=name)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=start, name="normcore-child-start", daemon=True)
    thread.start()
    thread.join(sup.settings.heartbeat_seconds)
    while thread.is_alive():
        sup.heartbeat()
        thread.join(sup.settings.heartbeat_seconds)
    if "error" in box:
        raise box["error"]
    return box["proc"]


# What multiprocessing reports as a forked child's exit code when its fork server died and the
# real one cannot be read (popen_forkserver.Popen.poll).
SERVER_LOST_EXIT = 255


def config_server_pid(proc: Any) -> int | None:
    """The pid of the fork server ``proc`` was forked from (None for a spawned child)."""
    return getattr(proc, "normcore_server_pid", None)


def _gone(pid: int | None, wait: float = 2.0) -> bool:
    """True when ``pid`` names a process that has exited (missing, or a zombie not yet reaped)
    or does within ``wait`` seconds: a killed process closes its sockets a moment before the
    kernel marks it exited."""
    if pid is None:
        return False
    deadline = time.monotonic() + wait
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _fork_server_pid() -> int | None:
    """The pid of this process's multiprocessing fork server, if it runs (for the log line)."""
    server = getattr(multiprocessing.forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    return pid if isinstance(pid, int) else None


def _start_child(
    config: dict[str, Any], send_end: multiprocessing.connection.Connection, *, name: str
) -> Any:
    """Start the training child: forked from the warm fork server, else spawned (cold).

    Only the config's JSON and the pipe's write end cross to the child. A fork server that
    cannot start (or died and cannot be restarted) costs this job its warm start, nothing else.
    """
    try:
        ctx: Any = warm.context()
        multiprocessing.forkserver.ensure_running()  # no-op once it runs; its pid is known after
        warm_config = {**config, "fork_server_pid": _fork_server_pid()}
        proc = ctx.Process(
            target=_child_main, args=(json.dumps(warm_config), send_end), name=name, daemon=False
        )
        proc.start()
        proc.normcore_server_pid = warm_config["fork_server_pid"]
        return proc
    except OSError as exc:
        log.warning("warm fork server unavailable (%r): spawning a cold training process", exc)
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_child_main, args=(json.dumps(config), send_end), name=name, daemon=False
    )
    proc.start()
    return proc


def _remove_if_deleted(store: Store, settings: Settings, job_id: str) -> None:
    """Remove the folder of a job deleted while this attempt ran (``DELETE /jobs/{id}``).

    The API removes the folder at once, but the training process may have written a checkpoint
    there before the deletion stopped it; with the child dead, this last writer removes it again.
    A store that cannot be read leaves the folder alone.
    """
    try:
        if store.get_job(job_id) is not None:
            return
    except Exception as exc:
        log.warning("job %s: cannot tell whether it was deleted: %r", job_id, exc)
        return
    shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)
    log.info("job %s: deleted while running; its folder is removed", job_id)


def claim(store: Store, settings: Settings, job_id: str, me: str) -> tuple[str, int] | None:
    """Claim a job for the message of ``job_id``: (the job claimed, its attempt), or None.

    With ``settings.fair_scheduling`` the fairest claimable job of the message's queue is taken
    (``Store.fair_order``: fewest running jobs of its owner, then the owner served longest ago,
    then the oldest), so one user's early jobs cannot starve another's; else ``job_id`` itself.
    """
    order = store.fair_order(job_id) if settings.fair_scheduling else []
    for candidate in [*order, job_id] if job_id not in order else order:
        attempt = store.claim_job(candidate, worker_id=me, lease_seconds=settings.lease_seconds)
        if attempt is not None:
            return candidate, attempt
    return None


def _time_limit(job: Any, settings: Settings) -> tuple[float, float]:
    """(seconds this attempt may train, the job's limit in minutes).

    The limit is the spec's ``max_runtime`` bounded by the server's ``max_runtime_minutes`` (the
    default too); earlier attempts' running time counts against it. At least a second is left,
    so an attempt that starts past the limit trains one step, checkpoints and ends timed_out.
    """
    from datetime import datetime

    own = (job.spec or {}).get("max_runtime")
    minutes = min(float(own), settings.max_runtime_minutes) if own else settings.max_runtime_minutes
    used = 0.0
    for entry in job.attempts or []:
        try:
            started = datetime.fromisoformat(str(entry["started_at"]))
            ended = datetime.fromisoformat(str(entry["ended_at"]))
        except (KeyError, TypeError, ValueError):
            continue  # this attempt (no end yet) or a malformed entry
        used += max(0.0, (ended - started).total_seconds())
    return max(1.0, minutes * 60.0 - used), minutes


def _read_outcome(conn: multiprocessing.connection.Connection) -> dict[str, Any] | None:
    try:
        if conn.poll(0):
            outcome = json.loads(conn.recv_bytes().decode("utf-8"))
            return outcome if isinstance(outcome, dict) else None
    except (EOFError, OSError, ValueError):
        pass
    return None


def _record(
    store: Store, sup: _Supervisor, exitcode: int | None, outcome: dict[str, Any] | None
) -> str:
    """Write the final status of the attempt from the child's outcome and exit code."""
    job_id, attempt = sup.job_id, sup.attempt
    outcome = outcome or {}
    status = outcome.get("status")
    if sup.stale or status == "stale":
        log.warning("job %s: attempt %d lost its lease; wrote nothing", job_id, attempt)
        return "stale"
    if status == JobStatus.SUCCEEDED and exitcode == EXIT_OK:
        return _finish(store, job_id, attempt, JobStatus.SUCCEEDED, None)
    if status == JobStatus.TIMED_OUT or (sup.timed_out and not sup.cancel_seen):
        step = outcome.get("global_step")
        where = f" at step {step}" if step is not None else ""
        saved = (
            "; the checkpoint written then holds that step"
            if status == JobStatus.TIMED_OUT
            else "; it did not stop by itself, so the newest checkpoint is from before"
        )
        error = f"stopped at its time limit (max_runtime){where}{saved}"
        return _finish(store, job_id, attempt, JobStatus.TIMED_OUT, error)
    if status == JobStatus.FAILED:
        return _finish(
            store, job_id, attempt, JobStatus.FAILED, str(outcome.get("error") or "failed")
        )
    # The child stopped early (status "cancelled") or died without a word (status None).
    cancel = sup.cancel_seen or bool(outcome.get("cancel_requested"))
    if cancel or _cancel_requested(store, job_id):
        return _finish(store, job_id, attempt, JobStatus.CANCELLED, None)
    if sup.server_lost:
        _safe_log(
            store,
            job_id,
            attempt,
            "the worker's training fork server died under this attempt (killed from outside?); "
            "the job is re-queued when its lease expires and resumes from its last checkpoint",
        )
        log.error("job %s: the training fork server died; left for the reaper to re-queue", job_id)
        return "lost"
    if sup.flags.warm.is_set() or sup.flags.cold.is_set():
        _safe_log(
            store,
            job_id,
            attempt,
            "worker shut down mid-training; the job is re-queued when its lease expires "
            "and resumes from its last checkpoint",
        )
        log.warning("job %s: worker shutting down; left for the reaper to re-queue", job_id)
        return "shutdown"
    if status == JobStatus.CANCELLED:
        error = "training process stopped by SIGTERM from outside the worker, without a cancel"
    elif exitcode is not None and exitcode < 0:
        num = -exitcode
        error = f"training process killed by signal {num} ({signal_name(num)})"
    else:
        error = f"training process exited with code {exitcode} and no result; see the job's logs"
    return _finish(store, job_id, attempt, JobStatus.FAILED, error)


def _cancel_requested(store: Store, job_id: str) -> bool:
    with contextlib.suppress(Exception):
        job = store.get_job(job_id)
        return bool(job is not None and job.cancel_requested)
    return False


def _safe_log(store: Store, job_id: str, attempt: int, message: str) -> None:
    with contextlib.suppress(Exception):
        store.add_logs(job_id, attempt=attempt, lines=[("warning", message)])


def _finish(store: Store, job_id: str, attempt: int, status: str, error: str | None) -> str:
    try:
        store.finish_job(job_id, attempt=attempt, status=status, error=error)
    except (StaleAttempt, NotFound):
        log.warning(
            "job %s: attempt %d is stale, final status %s not written", job_id, attempt, status
        )
        return "stale"
    log.info("job %s: attempt %d %s%s", job_id, attempt, status, f": {error}" if error else "")
    return status
