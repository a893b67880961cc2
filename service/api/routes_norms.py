"""``GET /jobs/{id}/norms``: the norm telemetry of a job (normcore.telemetry), per record and layer.

Same paging contract as ``GET /jobs/{id}/metrics``: rows with ``seq > after`` in seq order,
``next`` the last seq read; ``max_points`` downsamples per (layer, value name) keeping each
bucket's extremes. Another user's job is a 404.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from starlette.concurrency import run_in_threadpool

from service.api.deps import CurrentUser, StoreDep, check_owned_job
from service.api.examples import NOT_FOUND, UNAUTHORIZED, error_response
from service.api.schemas import NormPage, NormRowOut

router = APIRouter(tags=["jobs"])

MAX_SEQ = 2**62
EXAMPLE_NORM_PAGE = {
    "items": [
        {
            "seq": 42,
            "step": 269,
            "epoch": 1,
            "trigger": "eval",
            "layer": "conv1.norm",
            "attempt": 1,
            "time": 1767225600.0,
            "values": {
                "kind": "BatchNorm2d",
                "class": "BatchNorm2d",
                "source": "running",
                "channels": 6,
                "eps": 1e-05,
                "mean_mean": 0.41,
                "mean_std": 0.22,
                "mean_min": 0.08,
                "mean_max": 0.73,
                "mean_nonfinite": 0,
                "var_mean": 3682.2,
                "var_std": 2522.2,
                "var_min": 711.0,
                "var_max": 7686.0,
                "var_nonfinite": 0,
                "mean_drift": None,
                "var_drift": 3681.2,
                "dead_var": 0,
                "dead_gamma": 0,
                "dead_channels": 0,
                "gamma_norm": 2.41,
                "beta_norm": 0.37,
                "num_batches_tracked": 269,
            },
        }
    ],
    "next": 42,
}


@router.get(
    "/jobs/{job_id}/norms",
    response_model=NormPage,
    summary="Norm telemetry rows (per record and norm layer) after a sequence number",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_NORM_PAGE}}},
        **UNAUTHORIZED,
        **NOT_FOUND,
        422: error_response(
            "A layer the job has no telemetry for (or an invalid or unknown query parameter)",
            "no norm telemetry for layer 'nope'; the job's layers: conv1.norm, conv2.norm",
        ),
    },
)
async def get_norms(
    job_id: str,
    user: CurrentUser,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    layer: Annotated[
        str | None,
        Query(min_length=1, max_length=255, description="Only this layer (e.g. conv1.norm)."),
    ] = None,
    max_points: Annotated[
        int | None,
        Query(
            ge=2,
            le=100_000,
            description="Downsample for plotting: every row after ``after`` (``limit`` is "
            "ignored), at most this many points per (layer, value name), each bucket keeping "
            "its minimum and maximum. ``next`` is the last seq read.",
        ),
    ] = None,
) -> Any:
    """Rows with ``seq > after``, oldest first; poll again with ``after=next``.

    Each row is one norm layer at one record (``trigger`` "start" before the first step,
    "eval" at each evaluation, "steps" every ``spec.telemetry.every_steps``); ``values`` holds
    the per-channel summaries, drift, dead channels, gamma/beta norms and
    ``num_batches_tracked`` (README, "Norm telemetry"); ``kind`` and ``class`` are both the
    torch class name (``class`` as on ``/stats``).

    ``layer`` naming no layer of the job's rows is a 422 that lists the real names; before the
    job has any telemetry rows every ``layer`` reads as an empty page (200).
    """

    def read() -> NormPage:
        with store.read_transaction():
            check_owned_job(store, user, job_id)
            if max_points is not None:
                rows, nxt = store.get_norms_downsampled(
                    job_id, max_points=max_points, after=after, layer=layer
                )
            else:
                rows, nxt = store.get_norms(job_id, after=after, limit=limit, layer=layer)
            known = store.norm_layers(job_id) if layer is not None and not rows else []
        if known and layer not in known:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"no norm telemetry for layer {layer!r}; the job's layers: {', '.join(known)}",
            )
        items = [NormRowOut.model_validate(r) for r in rows]
        for item in items:  # "class": the torch class, as on /stats (telemetry calls it "kind")
            if "kind" in item.values:
                item.values.setdefault("class", item.values["kind"])
        return NormPage(items=items, next=nxt)

    return await run_in_threadpool(read)
