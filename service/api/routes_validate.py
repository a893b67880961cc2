"""``POST /jobs/validate``: what a spec would do to its norm layers, without training it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from normcore.spec import JobSpec
from service import jobs as job_service
from service.api.deps import CurrentUser, SettingsDep, StoreDep
from service.api.examples import SPEC_EXAMPLES, UNAUTHORIZED, error_response
from service.api.schemas_validate import ValidateOut

router = APIRouter(tags=["jobs"])

_LAYER = {
    "name": "conv1.norm",
    "kind": "bn",
    "cls": "BatchNorm2d",
    "class": "BatchNorm2d",
    "num_channels": 8,
    "map_size": [8, 8],
    "batch_stats": True,
    "synced": False,
    "per_device_batch": 4,
    "norm_batch": 4,
    "values_per_stat": 256,
    "momentum": 0.1,
    "tracks_running_stats": True,
    "half_life_steps": 6.58,
    "num_groups": None,
    "channels_per_group": None,
}
EXAMPLE_REPORT = {
    "arch": "lenet",
    "norm": "bn",
    "world_size": 1,
    "per_device_batch": 4,
    "global_batch": 4,
    "sync_bn": False,
    "num_train": 1437,
    "steps_per_epoch": 359,
    "epochs": 1,
    "total_steps": 359,
    "parameters": 63874,
    "memory_mb": {"data_mb": 0.9, "model_mb": 0.7, "activations_mb": 0.1, "total_mb": 1.7},
    "layers": [_LAYER],
    "running_stats": {
        "convention": "torch: running = (1 - momentum) * running + momentum * batch",
        "layers_tracking": 4,
        "momenta": [0.1],
        "cumulative": False,
        "half_life_steps": 6.58,
        "half_lives_in_run": 54.6,
    },
    "warnings": [
        {
            "code": "bn_small_batch",
            "message": "batch-statistics norm layers (conv1.norm, ...) estimate their mean and "
            "variance from 4 sample(s) per step, under 8: ...",
            "layers": ["conv1.norm"],
            "source": "validate",
        }
    ],
    "notes": ["gradient accumulation would not change these batches: ..."],
}


@router.post(
    "/jobs/validate",
    response_model=ValidateOut,
    summary="Check a spec without training: effective batch, momentum half-life, warnings",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_REPORT}}},
        400: error_response("Malformed JSON", "malformed JSON body: Expecting value"),
        **UNAUTHORIZED,
        422: error_response(
            "A field the submit would refuse",
            [
                {
                    "loc": ["model", "norm"],
                    "msg": "gn:7 does not divide the 16 channels of a layer",
                    "type": "value_error",
                }
            ],
        ),
    },
)
async def validate_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    settings: SettingsDep,
    store: StoreDep,
    user: CurrentUser,
) -> Any:
    """Run the submit-time checks on ``spec`` (422 where the submit would refuse it, this
    deployment's GPU workers included: a cuda job no gpu worker could ever take), then report,
    without training or storing anything: per norm layer the batch its statistics come from per
    device and globally (SyncBN: per-device x world size; ghost BN: its virtual batch), the map
    it sees, its momentum's half-life in steps; steps per epoch and in the run, the parameter
    count, the memory estimate, and warnings with their reasons. The same warnings are stored on
    a submitted job (``warnings``, source "validate").
    """
    del user  # signed-in users only; nothing of theirs is read
    report = await run_in_threadpool(job_service.validate, spec, settings, store)
    return report.to_dict()
