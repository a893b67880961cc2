"""Sweep routes: submit, list, read, report (JSON, CSV, SVG, PNG), cancel, delete.

The rules live in :mod:`service.sweeps`; a sweep that does not exist or belongs to another user
is a 404 (never a 403), as for jobs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Query, Response, status

from service.api.deps import CurrentUser, SettingsDep, StoreDep, owner_filter
from service.api.examples import UNAUTHORIZED, error_response
from service.api.examples_sweeps import EXAMPLE_REPORT, EXAMPLE_SWEEP, EXAMPLE_SWEEP_REQUEST
from service.api.headers import IdempotencyKey, is_plain_name
from service.api.schemas_sweeps import (
    SweepCellOut,
    SweepDetail,
    SweepJobOut,
    SweepOut,
    SweepPage,
)
from service.status import JobStatus
from service.store import Store, UserRecord
from service.store.sweeps import SweepRecord
from service.sweeps import figure, ops
from service.sweeps.grid import SweepRequest, cell_label
from service.sweeps.report import build_report, report_csv

router = APIRouter(tags=["sweeps"])

SWEEP_NOT_FOUND = {
    404: error_response("No such sweep (or it belongs to another user)", "sweep 'abc' not found")
}
SWEEP_OK = {"content": {"application/json": {"example": EXAMPLE_SWEEP}}}
MEDIA = {
    "csv": "text/csv; charset=utf-8",
    "svg": "image/svg+xml",
    "png": "image/png",
}


def owned_sweep(store: Store, user: UserRecord, sweep_id: str) -> SweepRecord:
    """The sweep if ``user`` may see it; a 404 otherwise."""
    sweep = None
    if is_plain_name(sweep_id):
        sweep = store.get_sweep(sweep_id, owner_id=owner_filter(user))
    if sweep is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"sweep {sweep_id[:80]!r} not found")
    return sweep


def _counts(store: Store, sweep: SweepRecord) -> tuple[dict[str, int], list[Any]]:
    children = store.sweep_children(sweep.id)
    counts = {str(s): 0 for s in JobStatus}
    for child in children:
        counts[str(child.job.status)] += 1
    counts[ops.DELETED] = ops.deleted_runs(sweep, len(children))
    return counts, children


def _summary(sweep: SweepRecord, counts: dict[str, int]) -> dict[str, Any]:
    request = SweepRequest.model_validate(sweep.request)
    return {
        "id": sweep.id,
        "name": sweep.name,
        "status": ops.sweep_status(sweep, counts),
        "runs": sweep.runs,
        "released": sweep.released,
        "counts": counts,
        "cancel_requested": sweep.cancel_requested,
        "concurrency": request.concurrency,
        "metric": request.metric,
        "direction": request.direction,
        "axes": request.axes,
        "created_at": sweep.created_at,
        "updated_at": sweep.updated_at,
    }


def sweep_detail(store: Store, sweep: SweepRecord) -> SweepDetail:
    """The sweep with its cells and each cell's jobs."""
    counts, children = _counts(store, sweep)
    request = SweepRequest.model_validate(sweep.request)
    cells = [
        SweepCellOut(cell=i, values=values, label=cell_label(values), jobs=[])
        for i, values in enumerate(request.cells())
    ]
    for child in children:
        index = int(child.cell.get("cell", -1))
        if 0 <= index < len(cells):
            cells[index].jobs.append(
                SweepJobOut(
                    run=int(child.cell.get("run", 0)),
                    seed=int(child.cell.get("seed", 0)),
                    job_id=child.job.id,
                    status=str(child.job.status),
                )
            )
    return SweepDetail(**_summary(sweep, counts), request=sweep.request, cells=cells)


@router.post(
    "/sweeps",
    status_code=status.HTTP_201_CREATED,
    response_model=SweepDetail,
    summary="Submit a sweep: a base spec, a grid of dotted fields, seeds",
    responses={
        201: SWEEP_OK,
        200: {"description": "An Idempotency-Key replay: the earlier sweep", **SWEEP_OK},
        400: error_response(
            "Malformed JSON", "malformed JSON body: Expecting value; send a JSON object"
        ),
        **UNAUTHORIZED,
        413: error_response("Body over the size limit", "request body over 1000000 bytes"),
        409: error_response(
            "The Idempotency-Key was used for another sweep request",
            "Idempotency-Key 'k' was already used for a different sweep request",
        ),
        429: error_response(
            "Over the disk quota", {"message": "your jobs hold ...", "used": 1, "quota": 1}
        ),
        422: error_response(
            "A cell that fails a submit check (the whole sweep is refused)",
            [
                {
                    "loc": ["grid", 2, "model"],
                    "msg": "cell 2 (model.norm=gn:7): gn:7 needs num_channels divisible by 7",
                    "type": "invalid_cell",
                }
            ],
        ),
    },
)
def submit_sweep(
    request: Annotated[
        SweepRequest,
        Body(openapi_examples={"norm-vs-batch": {"value": EXAMPLE_SWEEP_REQUEST}}),
    ],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Check every cell as ``POST /jobs`` would, store the sweep, release its first runs.

    Runs (cells x seeds) become ordinary jobs, at most ``concurrency`` queued or running at a
    time; with ``lr_rule`` the linear scaling rule sets each run's ``optim.lr``. A replay of an
    Idempotency-Key with the same request answers 200 with the earlier sweep.
    """
    sweep, created = ops.submit_sweep(store, settings, user, request, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK
    return sweep_detail(store, sweep)


@router.get(
    "/sweeps",
    response_model=SweepPage,
    summary="List the caller's sweeps",
    responses={
        200: {"content": {"application/json": {"example": {"items": [EXAMPLE_SWEEP]}}}},
        **UNAUTHORIZED,
    },
)
def list_sweeps(
    store: StoreDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """The caller's sweeps (an admin's: everyone's), newest first."""
    items = []
    for sweep in store.list_sweeps(owner_id=owner_filter(user), limit=limit):
        counts, _ = _counts(store, sweep)
        items.append(SweepOut(**_summary(sweep, counts)))
    return SweepPage(items=items)


@router.get(
    "/sweeps/{sweep_id}",
    response_model=SweepDetail,
    summary="A sweep: progress, cells, each cell's jobs",
    responses={200: SWEEP_OK, **UNAUTHORIZED, **SWEEP_NOT_FOUND},
)
def get_sweep(sweep_id: str, store: StoreDep, user: CurrentUser) -> Any:
    """The sweep's status, counts per job status, and each cell with its runs' jobs."""
    return sweep_detail(store, owned_sweep(store, user, sweep_id))


@router.get(
    "/sweeps/{sweep_id}/report",
    summary="The sweep's report: per cell final/best metric, mean and sd over seeds",
    responses={
        **UNAUTHORIZED,
        **SWEEP_NOT_FOUND,
        200: {
            "content": {
                "application/json": {"example": EXAMPLE_REPORT},
                "text/csv": {
                    "example": "cell,model.norm,data.batch_size,n,final_val_accuracy_mean,...\n"
                },
                "image/svg+xml": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            }
        },
    },
)
def get_report(
    sweep_id: str,
    store: StoreDep,
    user: CurrentUser,
    format: Annotated[Literal["json", "csv", "svg", "png"], Query()] = "json",
) -> Any:
    """JSON (default), CSV (one row per cell), or the figure as SVG or PNG.

    Partial while the sweep runs (``complete`` false): only succeeded runs count in n, means
    and standard deviations (sample, ddof=1).
    """
    sweep = owned_sweep(store, user, sweep_id)
    request = SweepRequest.model_validate(sweep.request)
    children = store.sweep_children(sweep.id)
    series = store.metric_series([c.job.id for c in children], request.metric)
    report = build_report(sweep, request, children, series)
    if format == "json":
        return report
    if format == "csv":
        body: bytes = report_csv(report).encode("utf-8")
    else:
        body = figure.render(report, format)
    headers = {"Content-Disposition": f'inline; filename="sweep-{sweep.id}.{format}"'}
    return Response(body, media_type=MEDIA[format], headers=headers)


@router.post(
    "/sweeps/{sweep_id}/cancel",
    response_model=SweepDetail,
    summary="Cancel a sweep: no more runs, every queued or running child cancelled",
    responses={200: SWEEP_OK, **UNAUTHORIZED, **SWEEP_NOT_FOUND},
)
def cancel_sweep(sweep_id: str, store: StoreDep, user: CurrentUser) -> Any:
    """Stop releasing runs and cancel every active child (running ones cooperatively)."""
    sweep = owned_sweep(store, user, sweep_id)
    ops.cancel_sweep(store, sweep.id)
    return sweep_detail(store, store.get_sweep(sweep.id) or sweep)


@router.delete(
    "/sweeps/{sweep_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a sweep with all its jobs",
    responses={**UNAUTHORIZED, **SWEEP_NOT_FOUND},
)
def delete_sweep(
    sweep_id: str, store: StoreDep, settings: SettingsDep, user: CurrentUser
) -> Response:
    """Cancel the sweep and delete it with every child job's rows and files."""
    sweep = owned_sweep(store, user, sweep_id)
    ops.delete_sweep(store, settings, sweep.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
