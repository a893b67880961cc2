"""Job routes: submit, list, read, metrics, logs, live events, cancel.

Routes parse, call and return: the rules live in :mod:`service.jobs` (submit) and the store; the
OpenAPI examples in :mod:`service.api.examples`; domain errors become status codes in ``app.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from normcore.spec import NAME_PATTERN, TAG_PATTERN, JobSpec, spec_json_schema
from service import disk
from service import jobs as job_service
from service.api.deps import (
    CurrentUser,
    OwnedJob,
    SettingsDep,
    StoreDep,
    check_owned_job,
    owner_filter,
)
from service.api.examples import (
    EXAMPLE_DETAIL,
    EXAMPLE_EVENTS,
    EXAMPLE_JOB,
    EXAMPLE_LOG_PAGE,
    EXAMPLE_METRIC_PAGE,
    NOT_FOUND,
    SPEC_EXAMPLES,
    SUBMIT_RESPONSES,
    UNAUTHORIZED,
    error_response,
)
from service.api.headers import IdempotencyKey, LastEventId, last_event_seq
from service.api.schemas import (
    CheckpointOut,
    JobDetail,
    JobOut,
    JobPage,
    JobPatch,
    LogOut,
    LogPage,
    MetricOut,
    MetricPage,
)
from service.errors import Conflict
from service.status import FINISHED_STATUSES, JobStatus
from service.store import InvalidCursor, JobRecord, Store

router = APIRouter(tags=["jobs"])

EVENT_POLL_SECONDS = 0.5
# The largest metrics page read on the event loop itself (SQLite only); see get_metrics.
INLINE_READ_ROWS = 1000
MAX_SEQ = 2**62

# Kept for routes_checkpoints and older imports; the definitions live in examples.py.
_err = error_response
__all__ = ["NOT_FOUND", "UNAUTHORIZED", "_err", "job_detail", "router"]


def job_detail(store: Store, job: JobRecord) -> JobDetail:
    """A JobDetail from a JobRecord plus its last metrics and checkpoints."""
    base = JobOut.model_validate(job).model_dump()
    return JobDetail(
        **base,
        last_metrics=store.last_metrics(job.id),
        checkpoints=[CheckpointOut.model_validate(c) for c in store.list_checkpoints(job.id)],
    )


@router.post(
    "/jobs",
    status_code=status.HTTP_201_CREATED,
    response_model=JobDetail,
    summary="Submit a training job",
    responses=SUBMIT_RESPONSES,
)
def submit_job(
    spec: Annotated[JobSpec, Body(openapi_examples=SPEC_EXAMPLES)],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Validate a job spec, store the job, enqueue it; 201 with the job.

    If the broker is down the job is still stored and returned (201), with ``enqueue_error``
    set and ``status_reason`` "enqueue failed: ..."; a reaper publishes it once the broker is
    back. A model over the server's parameter limit is refused (422). A CUDA job asking for
    more GPUs than the largest live gpu worker has is refused (422); one submitted while no gpu
    worker is live is accepted and waits, with the reason in ``status_reason``. Over the
    active-job quota: 429 with the numbers.
    """
    done = job_service.submit(store, settings, user, spec, idempotency_key)
    if not done.created:
        response.status_code = status.HTTP_200_OK
    return job_detail(store, done.job)


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="List the caller's jobs, newest first",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {"items": [EXAMPLE_JOB], "next": "eyJ0IjoiMjAyNi0wMS0wMSJ9"}
                }
            }
        },
        **UNAUTHORIZED,
        400: error_response(
            "Invalid cursor",
            "invalid cursor: pass the 'next' value of the previous page unchanged",
        ),
    },
)
def list_jobs(
    store: StoreDep,
    user: CurrentUser,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=200,
            pattern=NAME_PATTERN,
            description="Only jobs of this name (a name a spec may have).",
        ),
    ] = None,
    tag: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=TAG_PATTERN,
            description="Only jobs whose spec lists this tag.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> Any:
    """One page of the caller's jobs (an admin's: everyone's); follow ``next`` for more."""
    try:
        jobs, nxt = store.list_jobs(
            owner_id=owner_filter(user),
            status=status_,
            name=name,
            tag=tag,
            limit=limit,
            cursor=cursor,
        )
    except InvalidCursor as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(exc)) from None
    return JobPage(items=[JobOut.model_validate(j) for j in jobs], next=nxt)


@router.get(
    "/jobs/{job_id}",
    response_model=JobDetail,
    summary="A job: status, attempt, timestamps, error, last metrics, checkpoints",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_DETAIL}}},
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
                "application/json": {"example": {**EXAMPLE_DETAIL, "cancel_requested": True}}
            }
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def cancel_job(job: OwnedJob, store: StoreDep) -> Any:
    """Cooperative cancel: a queued job is cancelled at once, a running one is asked to stop."""
    return job_detail(store, store.request_cancel(job.id))


@router.patch(
    "/jobs/{job_id}",
    response_model=JobDetail,
    summary="Set a job's tags and note",
    responses={
        200: {"content": {"application/json": {"example": {**EXAMPLE_DETAIL, "note": "lr sweep"}}}},
        400: error_response("Malformed JSON", "malformed JSON body: Expecting value"),
        **UNAUTHORIZED,
        **NOT_FOUND,
        413: error_response("Body over the size limit", "request body over 1000000 bytes"),
        422: error_response(
            "A tag or note that breaks a rule, an unknown field, or nothing to change",
            [
                {
                    "loc": ["body", "tags", 0],
                    "msg": "String should match pattern '^[A-Za-z0-9][A-Za-z0-9._:+-]*$'",
                    "type": "string_pattern_mismatch",
                }
            ],
        ),
    },
)
def patch_job(job: OwnedJob, store: StoreDep, patch: JobPatch) -> Any:
    """Replace the tags (``tags``: the whole new list) and/or the note (``note``; null or ""
    removes it) of a job, in any status; a field left out is unchanged.

    Tags follow the submit rules (at most 16, 1 to 64 characters of letters, digits and
    ``._:+-``) and show in the spec's ``tags`` and in ``GET /jobs?tag=``. 422 names the field
    that breaks a rule; 404 for another user's job.
    """
    return job_detail(
        store,
        store.set_labels(
            job.id, tags=patch.tags, note=patch.note, set_note="note" in patch.model_fields_set
        ),
    )


@router.delete(
    "/jobs/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a job with its rows and files",
    responses={
        **UNAUTHORIZED,
        **NOT_FOUND,
        409: _err(
            "A run of a sweep: delete the sweep instead",
            "job 'abc' is run 3 of sweep 'def'; a sweep's runs are deleted with their sweep",
        ),
    },
)
def delete_job(job: OwnedJob, store: StoreDep, settings: SettingsDep) -> Response:
    """Delete the job, its metric rows, logs, checkpoints and files (owner or admin).

    A running job is stopped: its worker's next heartbeat or write finds the job gone, kills
    the training process and removes what it wrote since. 404 for another user's job; 409 for
    a run of a sweep (its sweep would lose a run: delete the sweep, DELETE /sweeps/{id}).
    """
    if (owner := store.sweep_of_job(job.id)) is not None:
        raise Conflict(
            f"job {job.id} is run {owner[1]} of sweep {owner[0]}; a sweep's runs are deleted "
            f"with their sweep: DELETE /sweeps/{owner[0]} (or cancel it: POST "
            f"/sweeps/{owner[0]}/cancel)"
        )
    disk.delete(store, settings, job.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/jobs/{job_id}/metrics",
    response_model=MetricPage,
    summary="Metric rows after a sequence number",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_METRIC_PAGE}}},
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
async def get_metrics(
    job_id: str,
    user: CurrentUser,
    store: StoreDep,
    after: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    final: Annotated[
        bool,
        Query(
            description="Only rows no resume can rewrite: each (split, step) once, with its "
            "final value (held until a checkpoint at or past its step, or the job's end)."
        ),
    ] = False,
    max_points: Annotated[
        int | None,
        Query(
            ge=2,
            le=100_000,
            description="Downsample for plotting: every row after ``after`` (``limit`` is "
            "ignored), at most this many points per (split, value name), each bucket keeping its "
            "minimum and maximum so spikes stay visible; a kept row's ``values`` holds only the "
            "names it was kept for. ``next`` is the last seq read.",
        ),
    ] = None,
) -> Any:
    """Rows with ``seq > after``, oldest first; poll again with ``after=next``.

    A row a resumed attempt rewrote comes again under a new seq, with ``replaces`` = the seq
    it supersedes; with ``final=true`` each (split, step) comes once (docs/service-contract.md,
    "Followers").
    """

    def read() -> MetricPage:
        # The ownership check and the rows on one connection (the hot path of every follower).
        with store.read_transaction():
            check_owned_job(store, user, job_id)
            if max_points is not None:
                rows, nxt = store.get_metrics_downsampled(
                    job_id, max_points=max_points, after=after, final=final
                )
            else:
                rows, nxt = store.get_metrics(job_id, after=after, limit=limit, final=final)
        return MetricPage(items=[MetricOut.model_validate(r) for r in rows], next=nxt)

    if store.dialect == "sqlite" and limit <= INLINE_READ_ROWS and max_points is None:
        # A local SQLite read of a small page takes less than handing it to the thread pool
        # (a hop, then GIL hand-offs between that thread and the event loop), and a WAL reader
        # never waits for a writer. Bigger pages, and PostgreSQL, go to the pool.
        return read()
    return await run_in_threadpool(read)


@router.get(
    "/jobs/{job_id}/logs",
    response_model=LogPage,
    summary="The job's log lines",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_LOG_PAGE}}},
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


def _status_payload(job: JobRecord) -> str:
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


_EVENT_PAGE = 500


def _poll_events(
    store: Store, job_id: str, after: int, final: bool
) -> tuple[JobRecord | None, list[Any] | None, int]:
    """One tick of the event stream in one read transaction: the job (None: gone) and its
    first page of rows after ``after``, read from the same snapshot."""
    with store.read_transaction():
        job = store.get_job(job_id)
        if job is None:
            return None, None, after
        rows, nxt = store.get_metrics(job_id, after=after, limit=_EVENT_PAGE, final=final)
    return job, rows, nxt


async def job_events(
    request: Request, store: Store, job_id: str, after: int, final: bool = False
) -> AsyncIterator[ServerSentEvent]:
    """Poll the store and yield ``status`` and ``metric`` events until the job finishes
    (``final``: only final rows, as ``GET /jobs/{id}/metrics?final=true``)."""
    last_state: tuple[Any, ...] | None = None
    while True:
        job, rows, nxt = await run_in_threadpool(_poll_events, store, job_id, after, final)
        if job is None:
            return
        state = (job.status, job.attempt, job.cancel_requested, job.status_reason)
        if state != last_state:
            last_state = state
            yield ServerSentEvent(data=_status_payload(job), event="status")
        while True:
            if rows is None:
                rows, nxt = await run_in_threadpool(
                    store.get_metrics, job_id, after=after, limit=_EVENT_PAGE, final=final
                )
            for row in rows:
                payload = MetricOut.model_validate(row).model_dump(mode="json")
                yield ServerSentEvent(data=json.dumps(payload), event="metric", id=str(row.seq))
            after = nxt
            if len(rows) < _EVENT_PAGE:
                break
            rows = None
        if job.status in FINISHED_STATUSES:
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
            "content": {"text/event-stream": {"example": EXAMPLE_EVENTS}},
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
    last_event_id: LastEventId = None,
    final: Annotated[
        bool,
        Query(
            description="Only rows no resume can rewrite: each (split, step) once, with its "
            "final value (held until a checkpoint at or past its step, or the job's end)."
        ),
    ] = False,
) -> EventSourceResponse:
    """``status`` events on each change and a ``metric`` event per new row (id = seq).

    A reconnecting client's ``Last-Event-ID`` resumes after that seq. Rows are as in
    ``GET /jobs/{id}/metrics``: a rewritten row carries ``replaces``; ``final=true`` gives each
    (split, step) once.
    """
    resume = last_event_seq(last_event_id, max_seq=MAX_SEQ)  # clamped; a forged id is ignored
    if resume is not None:
        after = max(after, resume)
    return EventSourceResponse(job_events(request, store, job.id, after, final), ping=15)


@router.get(
    "/schema/jobspec",
    tags=["schema"],
    summary="The JSON schema of a job spec",
    responses={200: {"content": {"application/json": {"example": {"title": "JobSpec"}}}}},
)
def jobspec_schema() -> dict[str, Any]:
    """The JobSpec JSON schema, for clients that validate before submitting."""
    return spec_json_schema()
