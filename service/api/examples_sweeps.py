"""Worked examples of the sweep routes for the OpenAPI document (``routes_sweeps``)."""

from __future__ import annotations

from typing import Any

EXAMPLE_SWEEP_REQUEST: dict[str, Any] = {
    "name": "norm-vs-batch",
    "base": {
        "model": {"arch": "lenet", "num_classes": 10},
        "data": {"dataset": "digits", "val_fraction": 0.2},
        "optim": {"name": "sgd", "lr": 0.05},
        "epochs": 3,
    },
    "grid": {"model.norm": ["bn", "gn:4", "none"], "data.batch_size": [2, 8, 32]},
    "seeds": [0, 1],
    "metric": "val_accuracy",
    "direction": "max",
    "concurrency": 4,
    "lr_rule": {"rule": "linear", "reference_batch": 32},
}

_CELL = {
    "cell": 0,
    "values": {"model.norm": "bn", "data.batch_size": 2},
    "label": "model.norm=bn, data.batch_size=2",
    "jobs": [
        {"run": 0, "seed": 0, "job_id": "3f2a9c0d5b7e4e1f8a6b2c4d9e0f1a2b", "status": "running"}
    ],
}
EXAMPLE_SWEEP: dict[str, Any] = {
    "id": "9b1deb4d3b7d4bad9bdd2b0d7b3dcb6d",
    "name": "norm-vs-batch",
    "status": "running",
    "runs": 18,
    "released": 4,
    "counts": {
        "queued": 3,
        "running": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
        "timed_out": 0,
    },
    "cancel_requested": False,
    "concurrency": 4,
    "metric": "val_accuracy",
    "direction": "max",
    "axes": ["model.norm", "data.batch_size"],
    "created_at": "2026-11-30T04:40:00Z",
    "updated_at": "2026-11-30T04:40:01Z",
    "request": EXAMPLE_SWEEP_REQUEST,
    "cells": [_CELL],
}
EXAMPLE_REPORT: dict[str, Any] = {
    "sweep_id": EXAMPLE_SWEEP["id"],
    "name": "norm-vs-batch",
    "metric": "val_accuracy",
    "direction": "max",
    "axes": ["model.norm", "data.batch_size"],
    "grid": EXAMPLE_SWEEP_REQUEST["grid"],
    "seeds": [0, 1],
    "std": "sample standard deviation over seeds (ddof=1); null when n < 2",
    "runs": 18,
    "finished": 18,
    "complete": True,
    "status_counts": {"succeeded": 18},
    "cells": [
        {
            "cell": 0,
            "values": {"model.norm": "bn", "data.batch_size": 2},
            "label": "model.norm=bn, data.batch_size=2",
            "n": 2,
            "final_mean": 0.41,
            "final_std": 0.09,
            "best_mean": 0.52,
            "best_std": 0.02,
            "best_epochs": [1, 2],
            "runs": [
                {
                    "run": 0,
                    "seed": 0,
                    "job_id": "3f2a9c0d5b7e4e1f8a6b2c4d9e0f1a2b",
                    "status": "succeeded",
                    "final": 0.3426,
                    "best": 0.507,
                    "best_epoch": 1,
                    "latest": 0.3426,
                    "epochs": 3,
                }
            ],
        }
    ],
}
