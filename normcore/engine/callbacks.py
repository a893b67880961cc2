"""What the engine reports: metric rows, results, errors, and the Callback hooks that receive them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from normcore.checkpoint import CheckpointInfo

__all__ = [
    "Callback",
    "CallbackList",
    "MetricRow",
    "NormRecord",
    "NormStatsNonFinite",
    "TrainResult",
    "TrainingDiverged",
]

logger = logging.getLogger("normcore.train")


@dataclass(frozen=True)
class MetricRow:
    """One row of metrics: split "train" after each step, split "val" at each epoch's last step.

    ``step`` is global and 1-based (step k = after k optimizer updates); ``epoch`` is 1-based;
    ``time`` is the wall-clock time (``time.time()``) the row was made.
    """

    step: int
    epoch: int
    split: str
    values: dict[str, float]
    time: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with the keys the service stores."""
        return asdict(self)


@dataclass(frozen=True)
class NormRecord:
    """One norm-telemetry record: a dict per norm layer (``normcore.telemetry.NormTelemetry``)
    at global ``step`` (0: before the first step) of ``epoch`` (0 before the first epoch ends);
    ``trigger`` is "start", "eval" or "steps" (every ``spec.telemetry.every_steps``)."""

    step: int
    epoch: int
    trigger: str
    layers: list[dict[str, Any]]
    time: float


@dataclass
class TrainResult:
    """The outcome of ``train``: status, progress, final metrics and the checkpoints it wrote."""

    status: Literal["succeeded", "cancelled", "timed_out"]
    epochs_completed: int
    global_step: int
    metrics: dict[str, float]
    checkpoints: list[CheckpointInfo]
    workdir: Path
    duration_s: float
    resumed_from: Path | None = None


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the message names the step, epoch and value."""

    def __init__(self, step: int, epoch: int, value: float) -> None:
        self.step, self.epoch, self.value = step, epoch, value
        super().__init__(
            f"training diverged: loss is {value} at step {step} (epoch {epoch}). "
            "Lower optim.lr, add warm-up (optim.warmup_epochs) or clip gradients (optim.grad_clip)."
        )


class NormStatsNonFinite(TrainingDiverged):
    """A running statistic or gamma of a norm layer became NaN or infinite.

    ``layers`` maps each layer's name to its non-finite tensors ("running_var", "gamma", ...).
    """

    def __init__(self, step: int, epoch: int, layers: dict[str, list[str]]) -> None:
        self.step, self.epoch, self.value, self.layers = step, epoch, float("nan"), layers
        named = "; ".join(f"{name} ({', '.join(t)})" for name, t in layers.items())
        ValueError.__init__(
            self,
            f"training diverged: non-finite norm statistics at step {step} (epoch {epoch}) in "
            f"{named}. Check the input data for extreme values, lower optim.lr, or clip "
            "gradients (optim.grad_clip).",
        )


class Callback:
    """Hooks the engine calls; every method is a no-op, override the ones you need.

    Exceptions raised in a hook propagate and end the run.
    """

    def on_train_start(self, info: dict[str, Any]) -> None:
        """Called once before the first step, with the run's setup (device, steps, resume)."""

    def on_metrics(self, row: MetricRow) -> None:
        """Called for every metric row (train rows each step, a val row each epoch)."""

    def on_norms(self, record: NormRecord) -> None:
        """Called with each norm-telemetry record (at the start, each evaluation, every K steps)."""

    def on_warning(self, warning: dict[str, str]) -> None:
        """Called with a warning about the run: {"code", "message", "source"} (also logged)."""

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        """Called after a checkpoint folder is completely written and renamed into place."""

    def on_log(self, message: str) -> None:
        """Called for each human-readable log line (also sent to logging 'normcore.train')."""

    def should_stop(self) -> bool:
        """Polled after every step; True cancels the run after the current step."""
        return False

    def on_train_end(self, result: TrainResult) -> None:
        """Called once with the result when the run ends without an exception."""


@dataclass
class CallbackList:
    """Fans each hook out to every callback in order; log lines also go to python logging."""

    callbacks: list[Callback] = field(default_factory=list)

    @classmethod
    def of(cls, callbacks: Iterable[Callback] | Callback | None) -> CallbackList:
        """Accept one callback, an iterable of them, or None."""
        if callbacks is None:
            return cls([])
        if isinstance(callbacks, Callback):
            return cls([callbacks])
        return cls(list(callbacks))

    def train_start(self, info: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info)

    def metrics(self, row: MetricRow) -> None:
        for cb in self.callbacks:
            cb.on_metrics(row)

    def norms(self, record: NormRecord) -> None:
        for cb in self.callbacks:
            cb.on_norms(record)

    def warning(self, warning: dict[str, str]) -> None:
        self.log(f"warning: {warning['message']}")
        for cb in self.callbacks:
            cb.on_warning(warning)

    def checkpoint(self, ckpt: CheckpointInfo) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(ckpt)

    def log(self, message: str, level: int = logging.INFO) -> None:
        logger.log(level, message)
        for cb in self.callbacks:
            cb.on_log(message)

    def should_stop(self) -> bool:
        # Poll every callback (no short-circuit) so each sees the same number of polls.
        return any([cb.should_stop() for cb in self.callbacks])

    def train_end(self, result: TrainResult) -> None:
        for cb in self.callbacks:
            cb.on_train_end(result)
