"""The training engine: ``train(spec, workdir, callbacks, resume)`` and what it reports."""

from normcore.checkpoint import CheckpointInfo
from normcore.engine.callbacks import Callback, MetricRow, TrainingDiverged, TrainResult
from normcore.engine.loop import train

__all__ = [
    "Callback",
    "CheckpointInfo",
    "MetricRow",
    "TrainResult",
    "TrainingDiverged",
    "train",
]
