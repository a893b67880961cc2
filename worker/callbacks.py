"""Store-backed normcore callbacks for the training child: metric rows, logs, checkpoints, cancel.

Everything here runs in the spawned training process, never in the Celery process. Writes carry
the job's attempt (the fencing token): when the store refuses one with ``StaleAttempt`` another
attempt owns the job, so this process reports that and exits at once without writing anything else.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from normcore.engine import Callback
from service.status import JobStatus
from service.store import NotFound, StaleAttempt, Store

log = logging.getLogger("worker.callbacks")

# Latency target: a poller sees a metric row within about a second of the engine producing it.
FLUSH_INTERVAL_S = 0.5
# How often the child itself reads the cancel flag, so a cancel lands within 2 s even if the
# supervisor's heartbeat is slow (the supervisor also sends SIGTERM when its heartbeat sees it).
CANCEL_POLL_S = 0.5
# A store write that fails for another reason (database restarting) is retried this long.
WRITE_RETRY_S = 10.0
STALE_EXIT_CODE = 3
ORPHAN_EXIT_CODE = 4


def _finite(value: Any) -> Any:
    """JSON-safe metric value: NaN and infinities become None (PostgreSQL JSON refuses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # a 0-d tensor or numpy scalar
        return _finite(value.item())
    return value


class StoreLogHandler(logging.Handler):
    """A logging handler that queues records as the job's log lines (written by StoreCallback).

    The engine sends each of its lines both to logging and to ``on_log``; this handler keeps
    the one from logging (it has the level) and tells the callback to skip the twin.
    """

    def __init__(self, callback: StoreCallback, level: int = logging.INFO) -> None:
        super().__init__(level)
        self._callback = callback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            self._callback.log(message, level=record.levelname.lower())
            self._callback._logged_by_handler = message
        except Exception:
            self.handleError(record)


class StoreCallback(Callback):
    """A normcore ``Callback`` that streams metrics, logs and checkpoints of one attempt to the store.

    Metric rows and log lines are buffered and written in batches by a background thread every
    ``flush_interval`` seconds, and at once at epoch ends, checkpoints and the end of training.
    ``should_stop()`` turns True when ``stop_event`` is set (the SIGTERM handler sets it) or when
    the store says a cancel was requested.
    """

    def __init__(
        self,
        store: Store,
        job_id: str,
        attempt: int,
        *,
        artifact_dir: str | Path,
        stop_event: threading.Event | None = None,
        on_stale: Callable[[], None] | None = None,
        flush_interval: float = FLUSH_INTERVAL_S,
        cancel_poll: float = CANCEL_POLL_S,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.attempt = attempt
        self.artifact_dir = Path(artifact_dir).resolve()
        self.stop_event = stop_event or threading.Event()
        self.cancel_requested = False
        self.last_step = 0
        self._on_stale = on_stale
        self._flush_interval = flush_interval
        self._cancel_poll = cancel_poll
        self._metrics: list[dict[str, Any]] = []
        self._logs: list[tuple[str, str]] = []
        self._norms: list[dict[str, Any]] = []  # norm telemetry records (normcore.telemetry)
        self._buffer_lock = threading.Lock()  # guards the two buffers
        self._write_lock = threading.Lock()  # one writer at a time, so rows keep their order
        self._last_epoch: int | None = None
        self._logged_by_handler: str | None = None  # see StoreLogHandler
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._parent = os.getppid()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background flusher and cancel poller."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-flusher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the background thread and write whatever is still buffered."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.flush()

    def _run(self) -> None:
        next_poll = time.monotonic()
        while not self._closed.wait(self._flush_interval):
            if os.getppid() != self._parent:
                # The supervising worker died (kill -9, OOM killer): nobody renews the lease, so
                # the reaper will re-queue the job. Stop now instead of training as a zombie.
                print("worker: supervisor gone, stopping the training process", file=sys.stderr)
                os._exit(ORPHAN_EXIT_CODE)
            try:
                self.flush()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self._cancel_poll
                    self._poll_cancel()
            except Exception as exc:  # the store is down: keep the rows, try again next tick
                print(f"worker: store write failed, will retry: {exc!r}", file=sys.stderr)

    def _poll_cancel(self) -> None:
        job = self.store.get_job(self.job_id)
        if job is None or job.attempt != self.attempt or job.status != JobStatus.RUNNING:
            # Someone else owns the job now (the lease expired and it was re-queued or finished).
            self._stale()
            return
        if job.cancel_requested:
            self.cancel_requested = True
            self.stop_event.set()

    def _stale(self) -> None:
        """Another attempt owns the job: report and exit now, without another write."""
        if self._on_stale is not None:
            self._on_stale()
        sys.stderr.flush()
        os._exit(STALE_EXIT_CODE)

    # ------------------------------------------------------------------ writing

    def _write(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        """Call a fenced store method; exit on StaleAttempt, retry other errors for a while."""
        deadline = time.monotonic() + WRITE_RETRY_S
        delay = 0.2
        while True:
            try:
                return fn(self.job_id, attempt=self.attempt, **kwargs)
            except (StaleAttempt, NotFound):  # superseded, or the job was deleted
                self._stale()
            except Exception:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def flush(self) -> None:
        """Write buffered metric rows, then log lines, to the store."""
        with self._write_lock:
            with self._buffer_lock:
                metrics, self._metrics = self._metrics, []
                logs, self._logs = self._logs, []
                norms, self._norms = self._norms, []
            try:
                if metrics:
                    self._write(self.store.add_metrics, rows=metrics)
                    metrics = []
                if norms:
                    self._write(self.store.add_norms, records=norms)
                    norms = []
                if logs:
                    self._write(self.store.add_logs, lines=logs)
            except BaseException:
                with self._buffer_lock:  # put back what was not written, in order
                    self._metrics[:0] = metrics
                    self._norms[:0] = norms
                    self._logs[:0] = logs
                raise

    def log(self, message: str, *, level: str = "info") -> None:
        """Queue one line for the job's logs."""
        with self._buffer_lock:
            self._logs.append((level, message))

    # ------------------------------------------------------------------ normcore Callback

    def on_train_start(self, info: dict) -> None:
        """Record where the attempt starts and make its setup lines visible at once."""
        start = info.get("start_step", 0)
        total = info.get("total_steps", "?")
        self.log(f"training started (attempt {self.attempt}) at step {start} of {total}")
        if self.attempt > 1:
            dropped = self._write(self.store.discard_metrics_after, step=int(start))
            self._write(self.store.discard_norms_after, step=int(start))
            if dropped:
                self.log(
                    f"discarded {dropped} metric rows of earlier attempts past step {start}; "
                    "this attempt writes those steps again"
                )
        self.flush()

    def on_metrics(self, row: Any) -> None:
        """Buffer one metric row; flush at once at an epoch boundary or an eval row."""
        record = {
            "step": int(row.step),
            "epoch": int(row.epoch),
            "split": str(row.split),
            "values": _finite(dict(row.values)),
            "time": row.time,
        }
        epoch_changed = self._last_epoch is not None and record["epoch"] != self._last_epoch
        self._last_epoch = record["epoch"]
        if record["split"] == "train":
            self.last_step = max(self.last_step, record["step"])
        with self._buffer_lock:
            self._metrics.append(record)
        if record["split"] != "train" or epoch_changed:
            self.flush()

    def on_norms(self, record: Any) -> None:
        """Buffer one norm telemetry record (written with the next flush)."""
        layers = [_finite(dict(layer)) for layer in record.layers]
        with self._buffer_lock:
            self._norms.append(
                {
                    "step": int(record.step),
                    "epoch": int(record.epoch),
                    "trigger": str(record.trigger),
                    "time": float(record.time),
                    "layers": layers,
                }
            )

    def on_warning(self, warning: dict[str, str]) -> None:
        """Store a warning on the job at once (GET /jobs/{id} shows it while the job runs)."""
        self.flush()
        self._write(self.store.add_job_warning, warning=dict(warning))

    def on_checkpoint(self, ckpt: Any) -> None:
        """Flush metrics and record the checkpoint with its path relative to the artifact dir."""
        self.flush()
        path = Path(ckpt.path).resolve()
        try:
            rel = path.relative_to(self.artifact_dir).as_posix()
        except ValueError:
            rel = str(path)
        self._write(
            self.store.add_checkpoint,
            name=ckpt.name,
            epoch=int(ckpt.epoch),
            step=int(ckpt.step),
            bytes=int(ckpt.bytes),
            sha256=ckpt.sha256,
            files=dict(ckpt.files),
            metrics=_finite(dict(ckpt.metrics)),
            path=rel,
        )
        # the engine logs "checkpoint NAME saved (...)" itself, by name: no second line, no path
        self._forget_pruned()

    def _forget_pruned(self) -> None:
        """Drop the records of checkpoints whose folders the engine pruned (keep_last, resume)."""
        for record in self.store.list_checkpoints(self.job_id):
            if not (self.artifact_dir / record.path).is_dir():
                self._write(self.store.delete_checkpoint, name=record.name)

    def on_log(self, message: str) -> None:
        """Queue an engine message for the job's logs (unless the logging handler already did)."""
        if message == self._logged_by_handler:
            self._logged_by_handler = None
            return
        self.log(message)

    def should_stop(self) -> bool:
        """True once a cancel was requested or the process got SIGTERM."""
        return self.stop_event.is_set()

    def on_train_end(self, result: Any) -> None:
        """Write everything still buffered."""
        status = getattr(result, "status", "?")
        step = getattr(result, "global_step", self.last_step)
        self.log(f"training ended: {status} at step {step}")
        self.flush()
