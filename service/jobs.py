"""Submitting a job: validation beyond the spec's schema, quota, idempotency, enqueue.

``submit`` is what ``POST /jobs`` calls; it raises the domain errors of :mod:`service.errors`
(``app.py`` maps them to 422, 429, 409) and never touches HTTP.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normcore.spec import JobSpec
from service import disk, queue
from service.errors import Conflict, InvalidInput, LimitExceeded
from service.settings import Settings
from service.status import JobStatus
from service.store import (
    IdempotencyConflict,
    JobRecord,
    QuotaExceeded,
    Store,
    UserRecord,
    queue_gpus,
    waiting_reason,
)

if TYPE_CHECKING:
    from normcore.data.check import DataInfo
    from normcore.validate import ValidationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """What ``submit`` did: the job, and whether it was created now (False: an idempotent replay)."""

    job: JobRecord
    created: bool


def canonical_hash(spec: JobSpec) -> str:
    """sha256 of the canonical JSON of a validated spec: the Idempotency-Key request hash.

    Fields added after the first release are left out while they hold their default (empty
    ``tags``, ``model.stem_padding`` "zeros", ``telemetry.every_steps`` 0), so a spec hashes as
    it did before they existed and an Idempotency-Key replay across an upgrade still matches.
    """
    data = spec.model_dump(mode="json")
    if not data.get("tags"):
        data.pop("tags", None)
    if data.get("model", {}).get("stem_padding") == "zeros":
        data["model"].pop("stem_padding")
    if data.get("telemetry") == {"every_steps": 0}:
        data.pop("telemetry")
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_data_path(spec: JobSpec, data_root: Path) -> None:
    """Refuse a data.path that escapes the data root (symlinks included) or does not exist.

    Raises InvalidInput at ["data", "path"].
    """
    if not spec.data.path:
        return
    try:
        root = Path(data_root).resolve()
        target = (root / spec.data.path).resolve()
        exists = target.exists()
    except (OSError, RuntimeError, ValueError) as exc:  # name too long, symlink loop, ...
        raise InvalidInput(
            ["data", "path"],
            f"data.path {spec.data.path[:80]!r} cannot be resolved under the data root: "
            f"{getattr(exc, 'strerror', None) or type(exc).__name__}",
        ) from None
    if not target.is_relative_to(root):
        raise InvalidInput(
            ["data", "path"],
            f"data.path {spec.data.path!r} resolves outside the data root (through a symlink); "
            "give a path that stays under the data root",
        )
    if not exists:
        raise InvalidInput(
            ["data", "path"],
            f"data.path {spec.data.path!r} does not exist under the data root; "
            "copy the dataset there first or fix the path",
        )


def check_gpu_capacity(spec: JobSpec, store: Store, settings: Settings) -> str | None:
    """For a gpu-queue job: refuse (InvalidInput) more GPUs than the largest live gpu worker has.

    Returns the status_reason to store with the job: "waiting for a gpu worker: none is live"
    when no live worker with a GPU consumes the gpu queue but one with enough GPUs for the job's
    queue did at some time (the job is accepted and waits), else None. Where no such worker ever
    registered (``Store.gpu_queue_ever_served``) the job could only wait forever: InvalidInput
    at ["resources", "device"]. CPU jobs are not checked: there ``resources.gpus`` counts gloo
    processes.
    """
    queue_name = queue.queue_for(spec)
    if queue_name == "cpu":
        return None
    largest = store.max_live_gpus("gpu", live_within_seconds=settings.worker_live_seconds)
    if not largest and not store.gpu_queue_ever_served(queue_name):
        need = queue_gpus(queue_name)
        raise InvalidInput(
            ["resources", "device"],
            f"resources.device is 'cuda' but no worker with {need} GPU{'s' if need > 1 else ''} "
            "has ever registered with this deployment, so the job would wait forever: use "
            "resources.device 'cpu' or 'auto', or start a GPU worker first",
        )
    if not largest:
        return waiting_reason(queue_name)
    wanted = spec.resources.gpus
    if wanted > largest:
        raise InvalidInput(
            ["resources", "gpus"],
            f"resources.gpus={wanted} but the largest live gpu worker has {largest} "
            f"GPU{'s' if largest != 1 else ''}: ask for at most {largest}, or start a worker "
            f"with {wanted} GPUs",
        )
    return None


def count_parameters(spec: JobSpec) -> int:
    """Parameters of the model a spec builds, counted from the spec (nothing is built).

    ``normcore.models.size.count_parameters``: milliseconds and no memory even at the spec's
    limits, where building the model (on the meta device too) took seconds and grew the API.
    """
    from normcore.models.size import count_parameters as count_from_spec

    in_channels = spec.model.in_channels or spec.data.channels or 3
    return count_from_spec(spec.model, in_channels=in_channels)


def check_model_size(spec: JobSpec, settings: Settings) -> None:
    """Refuse (InvalidInput at ["model"]) a model over ``settings.max_model_parameters``."""
    try:
        params = count_parameters(spec)
    except ValueError as exc:  # a spec the builder refuses: say why, as for any bad field
        raise InvalidInput(["model"], str(exc)) from None
    limit = settings.max_model_parameters
    if params > limit:
        raise InvalidInput(
            ["model"],
            f"the model has {params:,} parameters and this server's limit is {limit:,}: "
            "lower model.width or model.depth",
        )


class OverMemoryBudget(InvalidInput):
    """The job's memory estimate is over the server's budget; the 422 carries every part in MB."""

    def __init__(self, msg: str, numbers: dict[str, float]) -> None:
        super().__init__(["data"], msg, "memory_budget")
        self.numbers = numbers

    @property
    def detail(self) -> list[dict[str, Any]]:
        """The one-item 422 list, with the numbers under ``ctx`` (pydantic's place for them)."""
        return [{**super().detail[0], "ctx": self.numbers}]


def check_runtime(spec: JobSpec, settings: Settings) -> None:
    """Refuse (InvalidInput at ["max_runtime"]) a max_runtime over the server's cap."""
    cap = settings.max_runtime_minutes
    if spec.max_runtime is not None and spec.max_runtime > cap:
        raise InvalidInput(
            ["max_runtime"],
            f"max_runtime is {spec.max_runtime:g} minutes and this server's cap is {cap:g}: "
            f"use a max_runtime of at most {cap:g} (or leave it out to get the cap)",
        )


def check_data_and_memory(spec: JobSpec, settings: Settings) -> DataInfo | None:
    """Check the spec against its data set and its memory estimate against the budget.

    ``normcore.data.check.check_data`` reads only headers and listings (batch larger than the
    train split, classes, channels, a reader pointed at another format, files that lie about
    their size); ``normcore.resources.estimate_memory`` counts data + model + activations on
    the meta device. Returns the data set's description (None when the estimate failed and
    was skipped). Raises InvalidInput naming the field, or OverMemoryBudget with the parts.
    """
    from normcore.data.check import DataCheckError, check_data
    from normcore.resources import MB, estimate_memory, over_budget_message

    try:
        info = check_data(spec, settings.data_root)
        estimate = estimate_memory(spec, info=info)
    except DataCheckError as exc:
        raise InvalidInput(list(exc.loc), str(exc)) from None
    except Exception:  # the estimate is advice: an op the meta device lacks must not 5xx
        log.warning(
            "memory estimate of a %s spec failed; not checked", spec.model.arch, exc_info=True
        )
        return None
    budget = settings.job_memory_budget()
    if budget is not None and estimate.total_bytes > budget:
        raise OverMemoryBudget(
            over_budget_message(estimate, budget),
            {**estimate.as_mb(), "budget_mb": round(budget / MB, 1)},
        )
    return info


def check_norm_batch(spec: JobSpec, info: DataInfo | None) -> None:
    """Refuse (InvalidInput at ["data", "batch_size"]) a per-device batch the norm layers cannot
    take: ``split_bn:K`` with a batch that K does not divide, or that gives a split of one
    sample where a layer sees one value per channel (``normcore.validate.check_norm_batch``)."""
    from normcore.data.check import DataCheckError
    from normcore.validate import check_norm_batch as check

    try:
        check(spec, info)
    except DataCheckError as exc:
        raise InvalidInput(list(exc.loc), str(exc)) from None


def run_checks(spec: JobSpec, settings: Settings) -> DataInfo | None:
    """The spec checks of ``submit`` that need no store: data path, keep_last, model size,
    runtime cap, data set and memory budget, the norm's constraints on the batch. Returns the
    data set's description (None when the memory estimate failed). Raises what each check
    raises (InvalidInput, OverMemoryBudget).
    """
    check_data_path(spec, settings.data_root)
    disk.check_keep_last(spec, settings)
    check_model_size(spec, settings)
    check_runtime(spec, settings)
    info = check_data_and_memory(spec, settings)
    check_norm_batch(spec, info)
    return info


def validate(spec: JobSpec, settings: Settings, store: Store) -> ValidationReport:
    """``POST /jobs/validate``: the submit checks (those of :func:`run_checks`, and the GPU
    capacity of this deployment's workers, :func:`check_gpu_capacity`), then
    ``normcore.validate.validate_spec``. A job that would be accepted but wait for a gpu
    worker says so in the report's notes.

    Raises InvalidInput (a bad field, or a model the shape trace cannot run) or
    OverMemoryBudget, as ``submit`` would.
    """
    from normcore.data.check import DataCheckError
    from normcore.validate import validate_spec

    info = run_checks(spec, settings)
    waiting = check_gpu_capacity(spec, store, settings)
    try:
        report = validate_spec(spec, settings.data_root, info=info)
    except DataCheckError as exc:
        raise InvalidInput(list(exc.loc), str(exc)) from None
    except Exception as exc:  # a meta-device op the model lacks: say so, never a 5xx
        log.warning("validation of a %s spec failed", spec.model.arch, exc_info=True)
        raise InvalidInput(
            ["model"], f"the spec cannot be traced without training: {exc}"
        ) from None
    if waiting is not None:
        report.notes.append(f"the job would be accepted and wait: {waiting}")
    return report


def submit_warnings(
    spec: JobSpec, settings: Settings, info: DataInfo | None
) -> list[dict[str, str]]:
    """The warnings ``validate`` gives ``spec``, as stored on the job (``{"code", "message",
    "source": "validate"}``); empty, with a log line, when the trace fails (advice only)."""
    from normcore.validate import validate_spec

    try:
        report = validate_spec(spec, settings.data_root, info=info)
    except Exception:
        log.warning("submit-time validation of a %s spec failed", spec.model.arch, exc_info=True)
        return []
    return [w.stored() for w in report.warnings]


def enqueue(store: Store, settings: Settings, job: JobRecord) -> None:
    """Publish the job; if the broker refuses, record that on the job and leave it to the reapers.

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
    if job.enqueue_error is not None:
        store.clear_enqueue_failed(job.id)


def submit(
    store: Store,
    settings: Settings,
    user: UserRecord,
    spec: JobSpec,
    idempotency_key: str | None = None,
) -> Submission:
    """Check, store and publish a job for ``user``; returns the job and whether it is new.

    Checks, in order: data.path under the data root; checkpoint.keep_last under the server's
    bound; the model's parameter count; max_runtime under the server's cap; the spec against
    its data set and its memory estimate against the budget; the norm's constraints on the
    per-device batch (split BN's splits, :func:`check_norm_batch`); GPU capacity of the live
    workers;
    the user's disk quota (:mod:`service.disk`). The warnings of ``normcore.validate`` (advice,
    never a refusal) are stored on a new job (``warnings``, source "validate"). Then one store
    transaction does idempotency and the active-job quota
    (``settings.max_active_jobs_per_user``) atomically with the insert. A replay (same key,
    same spec) returns the existing job, published again if its last publish failed.

    Raises InvalidInput (a bad field), LimitExceeded (the active-job quota: numbers active and
    limit; the disk quota: used and quota, in bytes), Conflict (the key was used for another
    spec).
    """
    info = run_checks(spec, settings)
    warnings = submit_warnings(spec, settings, info)
    waiting = check_gpu_capacity(spec, store, settings)
    disk.check_disk_quota(store, settings, user)
    try:
        job, created = store.create_job(
            owner_id=user.id,
            spec=spec.model_dump(mode="json"),
            name=spec.name,
            queue=queue.queue_for(spec),
            idempotency_key=idempotency_key,
            request_hash=canonical_hash(spec) if idempotency_key else None,
            tags=spec.tags,
            max_active=settings.max_active_jobs_per_user,
            status_reason=waiting,
        )
    except QuotaExceeded as exc:
        raise LimitExceeded(
            f"you have {exc.active} queued or running jobs and the limit is {exc.limit}; "
            "wait for some to finish or cancel them",
            active=exc.active,
            limit=exc.limit,
        ) from None
    except IdempotencyConflict:
        raise Conflict(
            f"Idempotency-Key {idempotency_key!r} was already used for a different job "
            "spec; use a new key for a new job"
        ) from None
    if created:
        for warning in warnings:  # before the publish: the job is answered with them
            store.add_job_warning(job.id, attempt=None, warning=warning)
    if created or (job.status is JobStatus.QUEUED and job.enqueue_error is not None):
        enqueue(store, settings, job)
    return Submission(store.get_job(job.id) or job, created)
