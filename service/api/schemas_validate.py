"""Response models of ``POST /jobs/validate`` and of the checkpoint diff route.

The numbers come from :mod:`normcore.validate` and :mod:`normcore.checkpoint_diff`; see there
for how each is computed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator


class ValidationWarningOut(BaseModel):
    """A warning about a spec: a stable code, the reason and what to try, the layers concerned."""

    code: str = Field(description="e.g. bn_small_batch, momentum_none_long_run, in_small_map.")
    message: str
    layers: list[str] = Field(default_factory=list)
    source: str = "validate"


class NormLayerReportOut(BaseModel):
    """One norm layer: what its statistics average over in training (see normcore.validate)."""

    name: str
    kind: str = Field(description="Registry name of the norm kind (bn, gn, in, ghost_bn, ...).")
    cls: str = Field(description="The layer's class (kept for older clients: see class).")
    class_name: str | None = Field(
        default=None,
        alias="class",
        description='The torch class ("BatchNorm2d"), the name /stats and /norms use.',
    )
    num_channels: int
    map_size: list[int] | None = Field(description="(H, W) of the layer's input; null for 2-d.")
    batch_stats: bool = Field(description="Normalizes with batch statistics in training.")
    synced: bool = Field(description="SyncBatchNorm: statistics pooled over all processes.")
    per_device_batch: int
    norm_batch: int | None = Field(
        description="Samples one statistics estimate pools: per device, x world size with "
        "SyncBN, the virtual batch of ghost BN, one split of split BN; null for "
        "batch-independent norms."
    )
    values_per_stat: int = Field(
        description="Values one channel's (group's) mean and variance average over."
    )
    momentum: float | None = Field(
        description="Running-statistics momentum (torch's convention); null when the layer "
        "keeps no running statistics or keeps a cumulative average (momentum=None)."
    )
    tracks_running_stats: bool
    half_life_steps: float | None = Field(
        description="ln 0.5 / ln(1 - momentum): steps after which a batch's weight has halved."
    )
    num_groups: int | None = None
    channels_per_group: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _class_from_cls(cls, data: Any) -> Any:
        if isinstance(data, dict) and "class" not in data and "cls" in data:
            return {**data, "class": data["cls"]}
        return data


class ValidateOut(BaseModel):
    """What a spec would do to its norm layers, computed without training."""

    arch: str
    norm: str
    world_size: int = Field(description="Data-parallel processes (resources.gpus).")
    per_device_batch: int
    global_batch: int = Field(description="Samples per optimizer step: per device x world size.")
    sync_bn: bool = Field(description="True when BatchNorm statistics span all processes.")
    num_train: int
    steps_per_epoch: int = Field(description="Full global batches per epoch (rest dropped).")
    epochs: int
    total_steps: int
    parameters: int
    memory_mb: dict[str, float] | None = Field(
        description="normcore.resources' estimate per part and in total, MiB; null if it failed."
    )
    layers: list[NormLayerReportOut]
    running_stats: dict[str, Any] = Field(
        description="Convention, momenta, half-life in steps and half-lives the run lasts."
    )
    warnings: list[ValidationWarningOut]
    notes: list[str]


class CheckpointRef(BaseModel):
    """One side of a diff: a job and one of its checkpoints."""

    job_id: str
    checkpoint: str


class CheckpointDiffOut(BaseModel):
    """Per module, per tensor: the change of this checkpoint (``a``) relative to ``against``
    (``b``, the reference).

    Float tensors: ``rel_l2`` (||a - b|| / ||b||), ``max_abs``, ``mean_abs``, ``norm_a``,
    ``norm_b``, in float64; ``num_batches_tracked``: ``a``, ``b`` and ``change`` (a - b).
    """

    a: CheckpointRef = Field(description="The checkpoint of the path.")
    b: CheckpointRef = Field(description="The reference checkpoint (?against=).")
    modules: dict[str, dict[str, dict[str, Any]]]
    summary: dict[str, Any] = Field(
        description="The modules whose weight, running_mean and running_var changed most."
    )
