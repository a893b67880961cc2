"""Sweep operations: submit (every cell checked first), release runs, cancel, delete, detail.

Every run becomes an ordinary job through :func:`service.jobs.submit` (quota, fair scheduling,
idempotency, enqueue), with the Idempotency-Key :func:`~service.store.sweeps.run_key`, so a run
submitted twice (two releasers, a crash between submit and link) is still one job. Runs are
released at most ``concurrency`` queued or running at a time (:meth:`Store.reserve_runs`):
at submit, then by :func:`release` whenever a releaser looks (the API's loop,
:mod:`service.sweeps.releaser`, and every read of the sweep).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from service import disk
from service import jobs as job_service
from service.errors import Conflict, InvalidInput, LimitExceeded
from service.settings import Settings
from service.status import JobStatus
from service.store import IdempotencyConflict, Store, UserRecord
from service.store.sweeps import SweepRecord, run_key
from service.sweeps.grid import (
    Run,
    SweepRequest,
    build_spec,
    cell_label,
    recorded_metrics,
    run_of,
)

log = logging.getLogger(__name__)


def _cell_error(request: SweepRequest, run: Run, loc: list[Any], msg: str) -> InvalidInput:
    return InvalidInput(
        ["grid", run.cell, *loc],
        f"cell {run.cell} ({cell_label(run.values)}): {msg}",
        "invalid_cell",
    )


def check_cells(store: Store, settings: Settings, request: SweepRequest) -> None:
    """Build every cell's JobSpec (first seed) and run the submit checks on it.

    Raises InvalidInput at ["grid", cell, *field] naming the cell's values and what is wrong:
    a spec the schema refuses, a data path, keep_last, model size (a norm that does not fit a
    layer's channels), max_runtime, the data and memory checks, GPU capacity; and at
    ["metric"] when a cell's jobs do not record the sweep's ``metric``
    (:func:`~service.sweeps.grid.recorded_metrics`, listed in the message).
    """
    n_cells = len(request.product())
    for cell in range(n_cells):
        run = run_of(request, cell)
        try:
            spec = build_spec(request, run)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = [p for p in err.get("loc", ()) if isinstance(p, str | int)]
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            raise _cell_error(request, run, loc, msg) from None
        except ValueError as exc:
            raise _cell_error(request, run, [], str(exc)) from None
        names = recorded_metrics(spec)
        if request.metric not in names:
            where = f" (cell {run.cell}: {cell_label(run.values)})" if n_cells > 1 else ""
            raise InvalidInput(
                ["metric"],
                f"metric {request.metric!r} is not recorded by a {spec.task} job{where}: its "
                f"per-epoch rows hold {', '.join(names)}",
                "invalid_metric",
            )
        try:
            job_service.check_data_path(spec, settings.data_root)
            disk.check_keep_last(spec, settings)
            job_service.check_model_size(spec, settings)
            job_service.check_runtime(spec, settings)
            job_service.check_data_and_memory(spec, settings)
            job_service.check_gpu_capacity(spec, store, settings)
        except InvalidInput as exc:
            raise _cell_error(request, run, list(exc.loc), exc.msg) from None


def submit_sweep(
    store: Store,
    settings: Settings,
    user: UserRecord,
    request: SweepRequest,
    idempotency_key: str | None = None,
) -> tuple[SweepRecord, bool]:
    """Check every cell, store the sweep, release its first runs; returns (sweep, created).

    Raises InvalidInput (a cell, named), LimitExceeded (the disk quota), Conflict (the key was
    used for another sweep request). Nothing is stored when a check fails.
    """
    if idempotency_key is None or store.sweep_by_key(user.id, idempotency_key) is None:
        check_cells(store, settings, request)
        disk.check_disk_quota(store, settings, user)
    try:
        sweep, created = store.create_sweep(
            owner_id=user.id,
            name=request.name,
            request=request.model_dump(mode="json"),
            runs=request.runs,
            idempotency_key=idempotency_key,
            request_hash=request.request_hash() if idempotency_key else None,
        )
    except IdempotencyConflict:
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was already used for a different sweep "
            "request; use a new key for a new sweep"
        ) from None
    release(store, settings, sweep.id)
    return store.get_sweep(sweep.id) or sweep, created


def release(store: Store, settings: Settings, sweep_id: str) -> list[str]:
    """Submit the runs the concurrency limit lets go now; returns the job ids submitted.

    A run the submit path refuses for a limit (the owner's active-job or disk quota) waits for
    the next call; one it refuses as invalid (its data set went away since the sweep was
    checked) is logged and retried too, so the sweep shows it as not started.
    """
    sweep = store.get_sweep(sweep_id)
    if sweep is None or sweep.cancel_requested or not sweep.releasing:
        return []
    request = SweepRequest.model_validate(sweep.request)
    runs = store.reserve_runs(sweep_id, request.concurrency)
    if not runs:
        return []
    owner = store.sweep_owner(sweep_id)
    submitted: list[str] = []
    for number in runs:
        run = run_of(request, number)
        try:
            spec = build_spec(request, run)
            done = job_service.submit(
                store, settings, owner, spec, idempotency_key=run_key(sweep_id, number)
            )
        except (InvalidInput, LimitExceeded, Conflict, ValueError) as exc:
            log.warning("sweep %s: run %d not submitted yet: %s", sweep_id, number, exc)
            break
        store.attach_sweep_job(done.job.id, sweep_id=sweep_id, cell=run.as_json())
        submitted.append(done.job.id)
    return submitted


def release_all(store: Store, settings: Settings) -> int:
    """One releaser round over every sweep still releasing; returns the jobs submitted."""
    total = 0
    for sweep_id in store.releasing_sweep_ids():
        try:
            total += len(release(store, settings, sweep_id))
        except Exception as exc:  # one broken sweep must not stop the others
            log.warning("sweep %s: release failed: %r", sweep_id, exc)
    return total


def cancel_sweep(store: Store, sweep_id: str) -> list[str]:
    """Release no more runs and cancel every queued or running child; returns their ids."""
    ids = store.request_sweep_cancel(sweep_id)
    for job_id in ids:
        store.request_cancel(job_id)
    return ids


def delete_sweep(store: Store, settings: Settings, sweep_id: str) -> int:
    """Cancel the sweep, delete every child job (rows and files), then the sweep row.

    Returns the number of jobs deleted. A running child's worker finds its job gone and stops.
    """
    store.request_sweep_cancel(sweep_id)
    deleted = 0
    for child in store.sweep_children(sweep_id):
        deleted += int(disk.delete(store, settings, child.job.id))
    store.delete_sweep_row(sweep_id)
    return deleted


DELETED = "deleted"  # the count of runs whose job is gone, beside the job statuses


def deleted_runs(sweep: SweepRecord, children: int) -> int:
    """How many of the sweep's runs had a job that is gone, given its ``children`` count.

    Only a sweep that gave every run a job (``releasing`` False) can tell: while it releases, a
    run without a job is one not submitted yet (the releaser submits it, again if its job went
    away). ``DELETE /jobs/{id}`` refuses a sweep's run (409), so this counts jobs removed some
    other way (a sweep from before that rule, a row deleted by hand); such a run has ended.
    """
    if sweep.releasing:
        return 0
    return max(0, sweep.runs - children)


def sweep_status(sweep: SweepRecord, counts: dict[str, int]) -> str:
    """The sweep's status from its children's: queued, running, succeeded, failed, cancelled.

    ``counts`` is jobs per status, and ``deleted`` (:func:`deleted_runs`), runs whose job is gone,
    which count as ended. Succeeded: every run ended and every run that still has its job
    succeeded (at least one). Failed: every run ended otherwise. Cancelled: cancel was asked and
    no child is active. So a sweep always reaches a final status once its jobs have ended.
    """
    active = counts.get(JobStatus.QUEUED, 0) + counts.get(JobStatus.RUNNING, 0)
    ended = sum(v for k, v in counts.items() if k not in (JobStatus.QUEUED, JobStatus.RUNNING))
    if sweep.cancel_requested and not active:
        return "cancelled"
    if ended >= sweep.runs:
        remaining = sweep.runs - counts.get(DELETED, 0)
        succeeded = counts.get(JobStatus.SUCCEEDED, 0)
        return "succeeded" if remaining > 0 and succeeded == remaining else "failed"
    if counts.get(JobStatus.RUNNING, 0) or ended:
        return "running"
    return "queued"
