"""The training engine: ``train(spec, workdir, callbacks, resume)`` and what it reports."""

from normcore.checkpoint import CheckpointInfo
from normcore.engine.callbacks import Callback, MetricRow, TrainingDiverged, TrainResult
from normcore.engine.loop import epoch_metric_names, train

__all__ = [
    "Callback",
    "CheckpointInfo",
    "MetricRow",
    "TrainResult",
    "TrainingDiverged",
    "epoch_metric_names",
    "train",
]
