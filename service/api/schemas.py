"""Request and response models of the HTTP API (the job spec itself is normcore.spec.JobSpec)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from normcore.spec import TAG_PATTERN
from service.status import FINISHED_STATUSES, JobStatus

FINISHED = FINISHED_STATUSES  # the terminal states, for older imports


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorOut(BaseModel):
    """Every error answer: ``detail`` is a message, or a list of field errors for a 422."""

    detail: str | list[FieldError] | dict[str, Any]


class FieldError(BaseModel):
    """One invalid field: where it is (``loc``) and what to change (``msg``)."""

    loc: list[str | int]
    msg: str
    type: str | None = None


class CheckpointOut(_Out):
    """A saved checkpoint: its name, when it was taken, its size and hash, the metrics then."""

    name: str
    epoch: int | None = None
    step: int | None = None
    bytes: int | None = None
    sha256: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime | None = None
    recalibrated_from: str | None = Field(
        default=None,
        description="For a recalibrated checkpoint: the checkpoint its BN statistics were "
        "recomputed from (POST .../recalibrate)",
    )
    recalibration: dict[str, Any] | None = Field(
        default=None,
        description="For a recalibrated checkpoint: batches asked for and used, and the "
        "original's validation metrics measured the same way (``original_metrics``)",
    )


class JobOut(_Out):
    """A job as listed: identity, owner, status and timestamps, and its spec."""

    id: str
    name: str
    owner_id: int | str
    status: JobStatus
    queue: str
    attempt: int
    error: str | None = None
    status_reason: str | None = None
    enqueue_error: str | None = Field(
        default=None,
        description="The broker's error of the last failed publish of a queued job (a reaper "
        "publishes it again); null once a message went out.",
    )
    cancel_requested: bool = False
    created_at: datetime
    updated_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    idempotency_key: str | None = None
    attempts: list[dict[str, Any]] = Field(
        default_factory=list, description="One entry per attempt: worker, times, outcome."
    )
    spec: dict[str, Any]
    note: str | None = Field(
        default=None, description="A free-text note for people (PATCH /jobs/{id}); null: none."
    )
    warnings: list[dict[str, Any]] = Field(
        default_factory=list,
        description='Warnings about the job, each {"code", "message", "source"}: source '
        '"validate" (submit-time checks) or "telemetry" (what the norm layers showed while it '
        "trained).",
    )


class JobDetail(JobOut):
    """A job with its last metric values and its checkpoints."""

    last_metrics: dict[str, Any] | None = None
    checkpoints: list[CheckpointOut] = Field(default_factory=list)


NOTE_MAX_CHARS = 2000
MAX_TAGS = 16
Tag = Annotated[str, Field(min_length=1, max_length=64, pattern=TAG_PATTERN)]


class JobPatch(BaseModel):
    """``PATCH /jobs/{id}``: new tags and/or a new note; a field left out is left unchanged."""

    model_config = ConfigDict(extra="forbid")

    tags: Annotated[list[Tag], Field(max_length=MAX_TAGS)] | None = Field(
        default=None,
        description="The job's tags, replacing the old ones (as at submit: at most 16, 1 to 64 "
        "characters each, letters, digits and `._:+-`; duplicates dropped); [] removes all.",
    )
    note: str | None = Field(
        default=None,
        max_length=NOTE_MAX_CHARS,
        description=f"A note for people, at most {NOTE_MAX_CHARS} characters (newlines and tabs "
        "allowed, no other control characters); null or an empty string removes it.",
    )

    @field_validator("note")
    @classmethod
    def _printable(cls, note: str | None) -> str | None:
        if note is not None and any(
            (ord(c) < 32 and c not in "\n\t") or 127 <= ord(c) < 160 for c in note
        ):
            raise ValueError("a note may hold newlines and tabs but no other control characters")
        return note

    @model_validator(mode="after")
    def _not_empty(self) -> JobPatch:
        if not self.model_fields_set:
            raise ValueError("nothing to change: give 'tags', 'note' or both")
        if "tags" in self.model_fields_set and self.tags is None:
            raise ValueError("tags must be a list ([] removes every tag), not null")
        return self


class JobPage(BaseModel):
    """One page of jobs, newest first; pass ``next`` as ``?cursor=`` for the following page."""

    items: list[JobOut]
    next: str | None = None


class MetricOut(_Out):
    """One metric row; ``seq`` grows with every write (a replaced row gets a new seq)."""

    seq: int
    step: int
    epoch: int | None = Field(default=None, description="The 1-based epoch the row belongs to.")
    split: str
    values: dict[str, Any]
    time: datetime | float | None = None
    attempt: int | None = Field(default=None, description="The attempt that wrote the row.")
    replaces: int | None = Field(
        default=None,
        description="The seq of the row of the same (split, step) this one supersedes (a "
        "resumed attempt rewrote it); null for a first write.",
    )


class NormRowOut(_Out):
    """One norm layer in one telemetry record (see ``normcore.telemetry.NormTelemetry``)."""

    seq: int
    step: int
    epoch: int
    trigger: str = Field(description='"start", "eval" or "steps" (spec.telemetry.every_steps).')
    layer: str
    values: dict[str, Any]
    time: float
    attempt: int | None = None


class NormPage(BaseModel):
    """Norm telemetry rows after ``?after=``; poll again with ``after=next``."""

    items: list[NormRowOut]
    next: int


class MetricPage(BaseModel):
    """Metric rows after ``?after=``; poll again with ``after=next``."""

    items: list[MetricOut]
    next: int


class LogOut(_Out):
    """One log line of a job."""

    seq: int = Field(validation_alias=AliasChoices("seq", "id"))
    time: datetime | float | None = None
    level: str
    message: str
    attempt: int | None = None


class LogPage(BaseModel):
    """Log lines after ``?after=``; poll again with ``after=next``."""

    items: list[LogOut]
    next: int


class NormLayerStats(BaseModel):
    """Running statistics of one normalization layer of a checkpoint."""

    model_config = ConfigDict(extra="allow")

    name: str
    kind: str
    class_name: str | None = Field(
        default=None,
        alias="class",
        description='The torch class ("BatchNorm2d"), the name every route uses for it.',
    )
    num_channels: int | None = None
    running_mean: list[float | None] | None = None
    running_var: list[float | None] | None = None
    summary: dict[str, Any] | None = None
    affine: dict[str, Any] | None = None


class StatsOut(BaseModel):
    """Per-layer running statistics of one checkpoint's normalization layers."""

    job_id: str
    checkpoint: str
    layers: list[NormLayerStats]


class HealthOut(BaseModel):
    """Liveness answer."""

    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    """Readiness answer: whether the store and the broker answer."""

    status: Literal["ready", "unavailable"]
    store: bool
    broker: bool
    detail: str | None = None


ErrorOut.model_rebuild()


class WorkerOut(_Out):
    """A registered worker: node name, host, process, GPUs, memory, queues, heartbeat, liveness."""

    name: str = Field(description="The Celery node name, e.g. normcore-1234@gpu-box-1.")
    host: str
    pid: int
    gpus: int = Field(description="CUDA devices the worker sees (0 on a CPU-only worker).")
    gpu_names: list[str] = Field(default_factory=list)
    memory_bytes: int | None = Field(default=None, description="Physical memory of the host.")
    queues: list[str]
    started_at: datetime
    heartbeat_at: datetime
    version: str | None = None
    live: bool = Field(description="Heartbeat within NORMCORE_WORKER_LIVE_SECONDS.")


class WorkerList(BaseModel):
    """Every registered worker, live or not, by name."""

    items: list[WorkerOut]


class RecalibrateIn(BaseModel):
    """``POST .../recalibrate``: how many training batches the BN statistics are averaged over."""

    model_config = ConfigDict(extra="forbid")

    batches: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="Training batches of data.batch_size (at most one pass over the train split)",
    )


class ArtifactOut(_Out):
    """An export or recalibration a worker builds from a checkpoint, and where it stands."""

    id: str
    job_id: str
    kind: Literal["export", "recalibrate"]
    checkpoint: str
    checkpoint_sha256: str
    options: dict[str, Any]
    status: Literal["queued", "running", "succeeded", "failed"]
    error: str | None = None
    result: dict[str, Any] | None = Field(
        default=None,
        description="export: the equivalence certificate; recalibrate: the new checkpoint's "
        "name and metrics beside the original's",
    )
    sha256: str | None = None
    bytes: int | None = None
    enqueues: int = Field(description="Worker tasks published for it (a cache hit adds none)")
    runs: int = Field(description="Times a worker started building it")
    created_at: datetime
    finished_at: datetime | None = None
    status_url: str | None = None
