"""OpenAPI examples and documented error answers of the job routes (text only, no logic)."""

from __future__ import annotations

from typing import Any

from normcore.spec import EXAMPLE_SPEC
from service.api.schemas import ErrorOut, JobDetail

EXAMPLE_JOB: dict[str, Any] = {
    "id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e",
    "name": "resnet20-gn-digits",
    "owner_id": 1,
    "status": "running",
    "queue": "cpu",
    "attempt": 1,
    "error": None,
    "status_reason": None,
    "enqueue_error": None,
    "cancel_requested": False,
    "created_at": "2026-01-01T12:00:00Z",
    "updated_at": "2026-01-01T12:00:05Z",
    "started_at": "2026-01-01T12:00:01Z",
    "finished_at": None,
    "idempotency_key": None,
    "spec": EXAMPLE_SPEC,
}
EXAMPLE_QUEUED: dict[str, Any] = {
    **EXAMPLE_JOB,
    "status": "queued",
    "attempt": 0,
    "started_at": None,
    "updated_at": "2026-01-01T12:00:00Z",
    "last_metrics": None,
    "checkpoints": [],
}
EXAMPLE_DETAIL: dict[str, Any] = {
    **EXAMPLE_JOB,
    "last_metrics": {"train": {"loss": 0.41, "accuracy": 0.88}, "val": {"accuracy": 0.9}},
    "checkpoints": [
        {
            "name": "epoch-0001",
            "epoch": 1,
            "step": 45,
            "bytes": 1102336,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "metrics": {"val_accuracy": 0.9},
        }
    ],
}

SPEC_EXAMPLES: dict[str, Any] = {
    "resnet20-gn-digits": {
        "summary": "ResNet-20 with GroupNorm on digits",
        "value": EXAMPLE_SPEC,
    },
    "lenet-bn-synthetic": {
        "summary": "A two-epoch LeNet with BatchNorm on synthetic data",
        "value": {
            "name": "lenet-bn",
            "model": {"arch": "lenet", "norm": "bn"},
            "data": {"dataset": "synthetic", "batch_size": 16, "num_samples": 256},
            "epochs": 2,
        },
    },
}

EXAMPLE_METRIC_PAGE: dict[str, Any] = {
    "items": [
        {
            "seq": 42,
            "step": 45,
            "epoch": 1,
            "split": "val",
            "values": {"loss": 0.35, "accuracy": 0.9},
            "time": 1767268805.2,
            "attempt": 2,
            "replaces": 17,
        }
    ],
    "next": 42,
}
EXAMPLE_LOG_PAGE: dict[str, Any] = {
    "items": [
        {
            "seq": 7,
            "time": 1767268801.0,
            "level": "info",
            "message": "epoch 1/10 started",
            "attempt": 1,
        }
    ],
    "next": 7,
}
EXAMPLE_EVENTS = (
    'event: status\ndata: {"id": "3f2c...", "status": "running", '
    '"attempt": 1}\n\nevent: metric\nid: 42\ndata: {"seq": 42, "step": 45, '
    '"epoch": 1, "split": "val", "values": {"accuracy": 0.9}, "time": 1.0, "attempt": 1, '
    '"replaces": null}\n\n'
)


def error_response(description: str, example: Any) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry: an ErrorOut body with ``detail`` = ``example``."""
    return {
        "model": ErrorOut,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


NOT_FOUND = {
    404: error_response("No such job (or it belongs to another user)", "job 'abc' not found")
}
UNAUTHORIZED = {
    401: error_response("Missing, invalid or revoked token", "invalid or revoked token")
}
UNKNOWN_PARAMETER = {
    422: error_response(
        "An invalid or unknown query parameter",
        [
            {
                "loc": ["query", "colour"],
                "msg": "unknown query parameter 'colour'; this route takes: cursor, limit, "
                "name, status, tag",
                "type": "unknown_parameter",
            }
        ],
    )
}

SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    201: {
        "description": "Job stored and enqueued (broker down: stored, with enqueue_error set and "
        'status_reason "enqueue failed: ...", and published by a reaper once the broker is back)',
        "content": {"application/json": {"example": {**EXAMPLE_QUEUED}}},
    },
    200: {
        "model": JobDetail,
        "description": "Same Idempotency-Key and body as before: the existing job",
    },
    400: error_response(
        "Malformed JSON", "malformed JSON body: Expecting value (line 1, column 1)"
    ),
    **UNAUTHORIZED,
    409: error_response(
        "Idempotency-Key reused with another body",
        "Idempotency-Key 'k1' was used for a different job spec",
    ),
    413: error_response("Body over the size limit", "request body over 1000000 bytes"),
    422: error_response(
        "Invalid spec, a model over the parameter limit, or more resources.gpus than the "
        "largest live gpu worker has",
        [
            {
                "loc": ["model", "norm"],
                "msg": "unknown norm 'foo'; valid: bn, brn, frozen_bn, ghost_bn, gn, in, l2, "
                "ln, none, sync_bn",
                "type": "value_error",
            }
        ],
    ),
    429: error_response(
        "Too many active jobs",
        {"message": "too many active jobs", "active": 20, "limit": 20},
    ),
}
