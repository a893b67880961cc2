"""Job routes: submit, list, read, metrics, logs, live events, cancel."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from normcore.spec import EXAMPLE_SPEC, JobSpec, spec_json_schema
from service import queue
from service.api.deps import (
    CurrentUser,
    OwnedJob,
    SettingsDep,
    StoreDep,
    owner_filter,
)
from service.api.schemas import (
    FINISHED,
    CheckpointOut,
    ErrorOut,
    JobDetail,
    JobOut,
    JobPage,
    JobStatus,
    LogOut,
    LogPage,
    MetricOut,
    MetricPage,
)
from service.store import ENQUEUE_FAILED, IdempotencyConflict, waiting_reason

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

EVENT_POLL_SECONDS = 0.5
MAX_SEQ = 2**62


_EXAMPLE_JOB: dict[str, Any] = {
    "id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e",
    "name": "resnet20-gn-digits",
    "owner_id": 1,
    "status": "running",
    "queue": "cpu",
    "attempt": 1,
    "error": None,
    "status_reason": None,
    "cancel_requested": False,
    "created_at": "2026-01-01T12:00:00Z",
    "updated_at": "2026-01-01T12:00:05Z",
    "started_at": "2026-01-01T12:00:01Z",
    "finished_at": None,
    "idempotency_key": None,
    "spec": EXAMPLE_SPEC,
}
_EXAMPLE_QUEUED = {
    **_EXAMPLE_JOB,
    "status": "queued",
    "attempt": 0,
    "started_at": None,
    "updated_at": "2026-01-01T12:00:00Z",
    "last_metrics": None,
    "checkpoints": [],
}
_EXAMPLE_DETAIL = {
    **_EXAMPLE_JOB,
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


def _err(description: str, example: Any) -> dict[str, Any]:
    return {
        "model": ErrorOut,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


NOT_FOUND = {404: _err("No such job (or it belongs to another user)", "job 'abc' not found")}
UNAUTHORIZED = {401: _err("Missing, invalid or revoked token", "invalid or revoked token")}


def canonical_hash(spec: JobSpec) -> str:
    """sha256 of the canonical JSON of a validated spec: the Idempotency-Key request hash."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _invalid(loc: list[str | int], msg: str, type_: str = "value_error") -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=[{"loc": loc, "msg": msg, "type": type_}],
    )


def check_data_path(spec: JobSpec, data_root: Path) -> None:
    """Refuse a data.path that escapes the data root (symlinks included) or does not exist."""
    if not spec.data.path:
        return
    root = Path(data_root).resolve()
    target = (root / spec.data.path).resolve()
    if not target.is_relative_to(root):
        raise _invalid(
            ["data", "path"],
            f"data.path {spec.data.path!r} resolves outside the data root (through a symlink); "
            "give a path that stays under the data root",
        )
    if not target.exists():
        raise _invalid(
            ["data", "path"],
            f"data.path {spec.data.path!r} does not exist under the data root; "
            "copy the dataset there first or fix the path",
        )


def check_gpu_capacity(spec: JobSpec, store: Any, settings: Any) -> str | None:
    """For a gpu-queue job: refuse (422) more GPUs than the largest live gpu worker has.

    Returns the status_reason to store with the job: "waiting for a gpu worker: none is live"
    when no live worker with a GPU consumes the gpu queue (the job is accepted and waits), else
    None. CPU jobs are not checked: there ``resources.gpus`` counts gloo processes.
    """
    queue_name = queue.queue_for(spec)
    if queue_name == "cpu":
        return None
    largest = store.max_live_gpus("gpu", live_within_seconds=settings.worker_live_seconds)
    if not largest:
        return waiting_reason(queue_name)
    wanted = spec.resources.gpus
    if wanted > largest:
        raise _invalid(
            ["resources", "gpus"],
            f"resources.gpus={wanted} but the largest live gpu worker has {largest} "
            f"GPU{'s' if largest != 1 else ''}: ask for at most {largest}, or start a worker "
            f"with {wanted} GPUs",
        )
    return None


def job_detail(store: Any, job: Any) -> JobDetail:
    """A JobDetail from a JobRecord plus its last metrics and checkpoints."""
    base = JobOut.model_validate(job).model_dump()
    return JobDetail(
        **base,
        last_metrics=store.last_metrics(job.id),
        checkpoints=[CheckpointOut.model_validate(c) for c in store.list_checkpoints(job.id)],
    )


def _active_replay(store: Any, owner_id: Any, key: str) -> bool:
    """Whether an active job of this owner already carries this Idempotency-Key."""
    for state in ("queued", "running"):
        jobs, _ = store.list_jobs(owner_id=owner_id, status=state, limit=200)
        if any(j.idempotency_key == key for j in jobs):
            return True
    return False


def _enqueue(store: Any, settings: Any, job: Any) -> None:
    """Publish the job; if the broker refuses, say so on the job and leave it to the reapers.

    The job is stored either way (the store is the source of truth), so the caller still gets
    it: a reaper publishes it on its next round once the broker answers again.
    """
    try:
        queue.enqueue(job.id, job.queue, settings)
    except Exception as exc:
        log.warning("enqueue of job %s failed, a reaper will retry: %r", job.id, exc)
        store.mark_enqueue_failed(
            job.id, f"{exc or type(exc).__name__}; published when the broker is back"
        )
        return
    if (job.status_reason or "").startswith(ENQUEUE_FAILED):
        store.clear_enqueue_failed(job.id)


def count_parameters(spec: JobSpec) -> int:
    """Parameters of the model a spec builds, counted on the meta device (no memory, ~10 ms)."""
    import torch

    from normcore.models import build_model

    in_channels = spec.model.in_channels or spec.data.channels or 3
    with torch.device("meta"):
        model = build_model(spec.model, in_channels=in_channels)
    return sum(p.numel() for p in model.parameters())


def check_model_size(spec: JobSpec, settings: Any) -> None:
    """Refuse (422) a model with more parameters than ``max_model_parameters``."""
    try:
        params = count_parameters(spec)
    except ValueError as exc:  # a spec the builder refuses: say why, as for any bad field
        raise _invalid(["model"], str(exc)) from None
    limit = settings.max_model_parameters
    if params > limit:
        raise _invalid(
            ["model"],
            f"the model has {params:,} parameters and this server's limit is {limit:,}: "
            "lower model.width or model.depth",
        )


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=JobDetail,
    summary="Submit a training job",
    responses={
        201: {
            "description": "Job stored and enqueued (broker down: stored, with status_reason "
            '"enqueue failed: ...", and published by a reaper once the broker is back)',
            "content": {"application/json": {"example": {**_EXAMPLE_QUEUED}}},
        },
        200: {
            "model": JobDetail,
            "description": "Same Idempotency-Key and body as before: the existing job",
        },
        400: _err("Malformed JSON", "malformed JSON body: Expecting value (line 1, column 1)"),
        **UNAUTHORIZED,
        409: _err(
            "Idempotency-Key reused with another body",
            "Idempotency-Key 'k1' was used for a different job spec",
        ),
        413: _err("Body over the size limit", "request body over 1000000 bytes"),
        422: _err(
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
        429: _err(
            "Too many active jobs",
            {"message": "too many active jobs", "active": 20, "limit": 20},
        ),
    },
)
def submit_job(
    spec: Annotated[
        JobSpec,
        Body(
            openapi_examples={
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
        ),
    ],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Retry-safe submission: the same key and body return the same job.",
        ),
    ] = None,
) -> Any:
    """Validate a job spec, store the job, enqueue it; 201 with the job.

    If the broker is down the job is still stored and returned (201), with ``status_reason``
    "enqueue failed: ..."; a reaper publishes it once the broker is back. A model over the
    server's parameter limit is refused (422). A CUDA job asking for more GPUs than the largest
    live gpu worker has is refused (422); one submitted while no gpu worker is live is accepted
    and waits, with the reason in ``status_reason``.
    """
    check_data_path(spec, settings.data_root)
    check_model_size(spec, settings)
    waiting = check_gpu_capacity(spec, store, settings)
    limit = settings.max_active_jobs_per_user
    active = store.count_active(user.id)
    if active >= limit and not (
        idempotency_key and _active_replay(store, user.id, idempotency_key)
    ):
        raise HTTPException(
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            detail={
                "message": f"you have {active} queued or running jobs and the limit is {limit}; "
                "wait for some to finish or cancel them",
                "active": active,
                "limit": limit,
            },
        )
    try:
        job, created = store.create_job(
            owner_id=user.id,
            spec=spec.model_dump(mode="json"),
            name=spec.name,
            queue=queue.queue_for(spec),
            idempotency_key=idempotency_key,
            request_hash=canonical_hash(spec) if idempotency_key else None,
        )
    except IdempotencyConflict:
        raise HTTPException(
            status_code=status.HTTP_409_CONFLICT,
            detail=f"Idempotency-Key {idempotency_key!r} was already used for a different job "
            "spec; use a new key for a new job",
        ) from None
    if created:
        if waiting is not None:
            store.set_status_reason(job.id, waiting)
        _enqueue(store, settings, job)
    else:
        response.status_code = status.HTTP_200_OK
        if job.status == "queued" and (job.status_reason or "").startswith(ENQUEUE_FAILED):
            _enqueue(store, settings, job)
    return job_detail(store, store.get_job(job.id) or job)


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List the caller's jobs, newest first",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"items": [_EXAMPLE_JOB], "next": "eyJ0IjoiMjAyNi0wMS0wMSJ9"}
                }
            }
        },
        **UNAUTHORIZED,
        400: _err("Invalid cursor", "invalid cursor"),
    },
)
def list_jobs(
    store: StoreDep,
    user: CurrentUser,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Any:
    """One page of the caller's jobs (an admin's: everyone's); follow ``next`` for more."""
    try:
        jobs, nxt = store.list_jobs(
            owner_id=owner_filter(user), status=status_, limit=limit, cursor=cursor
        )
    except ValueError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="invalid cursor") from None
    return JobPage(items=[JobOut.model_validate(j) for j in jobs], next=nxt)


@router.get(
    "/jobs/{job_id}",
    response_model=JobDetail,
    summary="A job: status, attempt, timestamps, error, last metrics, checkpoints",
    responses={
        200: {"content": {"application/json": {"example": _EXAMPLE_DETAIL}}},
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def get_job(job: OwnedJob, store: StoreDep) -> Any:
    """The job with its last metric values and checkpoint list."""
    return job_detail(store, job)


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobDetail,
    summary="Ask a job to stop",
    responses={
        202: {
            "content": {
                "application/json": {"example": {**_EXAMPLE_DETAIL, "cancel_requested": True}}
            }
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def cancel_job(job: OwnedJob, store: StoreDep) -> Any:
    """Cooperative cancel: a queued job is cancelled at once, a running one is asked to stop."""
    return job_detail(store, store.request_cancel(job.id))


@router.get(
    "/jobs/{job_id}/metrics",
    response_model=MetricPage,
    summary="Metric rows after a sequence number",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "items": [
                            {
                                "seq": 42,
                                "step": 45,
                                "epoch": 1,
                                "split": "val",
                                "values": {"loss": 0.35, "accuracy": 0.9},
                                "time": 1767268805.2,
                            }
                        ],
                        "next": 42,
                    }
                }
            }
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def get_metrics(
    job: OwnedJob,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Rows with ``seq > after``, oldest first; poll again with ``after=next``."""
    rows, nxt = store.get_metrics(job.id, after=after, limit=limit)
    return MetricPage(items=[MetricOut.model_validate(r) for r in rows], next=nxt)


@router.get(
    "/jobs/{job_id}/logs",
    response_model=LogPage,
    summary="The job's log lines",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
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
                }
            }
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def get_logs(
    job: OwnedJob,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Any:
    """Log lines with ``seq > after``, oldest first."""
    rows, nxt = store.get_logs(job.id, after=after, limit=limit)
    return LogPage(items=[LogOut.model_validate(r) for r in rows], next=nxt)


def _status_payload(job: Any) -> str:
    return json.dumps(
        {
            "id": job.id,
            "status": job.status,
            "attempt": job.attempt,
            "error": job.error,
            "status_reason": job.status_reason,
            "cancel_requested": job.cancel_requested,
        }
    )


async def job_events(
    request: Request, store: Any, job_id: str, after: int
) -> AsyncIterator[ServerSentEvent]:
    """Poll the store and yield ``status`` and ``metric`` events until the job finishes."""
    last_state: tuple[Any, ...] | None = None
    while True:
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None:
            return
        state = (job.status, job.attempt, job.cancel_requested, job.status_reason)
        if state != last_state:
            last_state = state
            yield ServerSentEvent(data=_status_payload(job), event="status")
        while True:
            rows, nxt = await run_in_threadpool(store.get_metrics, job_id, after=after, limit=500)
            for row in rows:
                payload = MetricOut.model_validate(row).model_dump(mode="json")
                yield ServerSentEvent(data=json.dumps(payload), event="metric", id=str(row.seq))
            after = nxt
            if len(rows) < 500:
                break
        if job.status in FINISHED:
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_SECONDS)


@router.get(
    "/jobs/{job_id}/events",
    summary="Live server-sent events: status changes and metric rows",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "An event stream that ends when the job finishes",
            "content": {
                "text/event-stream": {
                    "example": 'event: status\ndata: {"id": "3f2c...", "status": "running", '
                    '"attempt": 1}\n\nevent: metric\nid: 42\ndata: {"seq": 42, "step": 45, '
                    '"epoch": 1, "split": "val", "values": {"accuracy": 0.9}, "time": 1.0}\n\n'
                }
            },
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
async def stream_events(
    request: Request,
    job: OwnedJob,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> EventSourceResponse:
    """``status`` events on each change and a ``metric`` event per new row (id = seq).

    A reconnecting client's ``Last-Event-ID`` resumes after that seq.
    """
    if last_event_id and last_event_id.strip().isdigit():
        # Clamped: a forged id beyond 64-bit range must not reach the database.
        after = max(after, min(int(last_event_id.strip()), MAX_SEQ))
    return EventSourceResponse(job_events(request, store, job.id, after), ping=15)


@router.get(
    "/schema/jobspec",
    tags=["schema"],
    summary="The JSON schema of a job spec",
    responses={200: {"content": {"application/json": {"example": {"title": "JobSpec"}}}}},
)
def jobspec_schema() -> dict[str, Any]:
    """The JobSpec JSON schema, for clients that validate before submitting."""
    return spec_json_schema()
