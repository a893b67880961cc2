"""``POST /jobs/validate``: what a spec would do to its norm layers, without training it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body
from starlette.concurrency import run_in_threadpool

from normcore.spec import JobSpec
from service import jobs as job_service
from service.api.deps import CurrentUser, SettingsDep
from service.api.examples import SPEC_EXAMPLES, UNAUTHORIZED, error_response
from service.api.schemas_validate import ValidateOut

router = APIRouter(tags=["jobs"])


@router.post(
    "/jobs/validate",
    response_model=ValidateOut,
    summary="Check a spec without training: effective batch, momentum half-life, warnings",
    responses={
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
    user: CurrentUser,
) -> Any:
    """Run the submit-time checks on ``spec`` (422 where the submit would refuse it), then report,
    without training or storing anything: per norm layer the batch its statistics come from per
    device and globally (SyncBN: per-device x world size; ghost BN: its virtual batch), the map
    it sees, its momentum's half-life in steps; steps per epoch and in the run, the parameter
    count, the memory estimate, and warnings with their reasons. The same warnings are stored on
    a submitted job (``warnings``, source "validate").
    """
    del user  # signed-in users only; nothing of theirs is read
    report = await run_in_threadpool(job_service.validate, spec, settings)
    return report.to_dict()
