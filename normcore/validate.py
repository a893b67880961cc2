"""What a job spec will do to its normalization layers, computed without training it.

:func:`validate_spec` builds the model on the meta device (shapes only, nothing allocated), runs
one forward at the per-device batch with a hook on every norm layer, and reports per layer:

- the batch its statistics come from. Per device that is ``data.batch_size`` (each of the
  ``resources.gpus`` data-parallel processes gets that many samples); with SyncBatchNorm over
  ``N`` processes the statistics pool ``N x batch_size`` samples; ghost BN pools one virtual
  batch, split BN one split. Gradient accumulation (which the spec does not offer) would not
  change any of these: it sums gradients over several forwards, each normalized on its own batch;
- the number of values each channel's statistics average over (batch x H x W of the map the
  layer sees), and that map's size;
- the running statistics' momentum and its half-life in optimizer steps. With torch's convention
  ``running = (1 - m) * running + m * batch``, a batch's weight halves after
  ``h = ln 0.5 / ln(1 - m)`` further steps (m = 0.1: 6.58 steps). ``momentum=None`` is torch's
  cumulative average: every batch since the start (or the last reset) weighs ``1 / n`` alike.

The report also carries steps per epoch (full global batches; the remainder is dropped, as the
engine does), the parameter count, the memory estimate of :mod:`normcore.resources`, and warnings
with their reasons (see :data:`THRESHOLDS`). The service runs the same function at submit and
stores the warnings on the job.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normcore.data.check import DataInfo, describe_data
from normcore.factory import parse_norm
from normcore.models.size import count_parameters
from normcore.registry import is_norm_layer, is_syncable, kind_of
from normcore.resources import estimate_memory
from normcore.spec import JobSpec, ModelSpec
from normcore.telemetry import gn_advice

__all__ = [
    "THRESHOLDS",
    "LayerReport",
    "ValidationReport",
    "ValidationWarning",
    "check_norm_batch",
    "half_life",
    "keeps_running_stats",
    "validate_spec",
]

# Thresholds of the warnings, with the reason for each value.
THRESHOLDS: dict[str, float] = {
    # Wu & He (2018, arXiv 1803.08494, Fig. 1): BN's ImageNet error rises steeply below 8
    # samples per device (and ~10 points at 2), while GN's stays flat.
    "min_bn_batch": 8,
    # InstanceNorm normalizes each channel of each sample over H x W values; below 16 (4x4) the
    # estimate is poor, at 1x1 the output is the bias alone (x - mean = 0).
    "min_in_values": 16,
    # momentum=None averages every batch since the start equally; once the run is longer than
    # this many epochs, more than half of the running statistics come from earlier weights.
    "max_cumulative_epochs": 2,
    # Share of the initial running statistics (mean 0, var 1) still left at the end of the run,
    # (1 - m) ** steps, above which eval mode uses statistics that never caught up.
    "max_initial_weight": 0.01,
    # torch's default momentum: the stale-statistics warning is for a momentum chosen smaller
    # than this (a slow average on a real run); with the default, only a run of under 44 steps
    # keeps over 1% of the initial statistics, and that is said in the report's notes instead.
    "default_momentum": 0.1,
}

GRAD_ACCUMULATION_NOTE = (
    "gradient accumulation would not change these batches: it sums gradients over several "
    "forwards, and each forward normalizes over its own batch"
)


def half_life(momentum: float | None) -> float | None:
    """Steps after which a batch's weight in the running statistics has halved.

    torch's convention ``running = (1 - m) * running + m * batch`` decays a batch's weight by
    ``(1 - m)`` per step, so ``h = ln 0.5 / ln(1 - m)`` (m = 0.1 gives 6.58). None for
    ``momentum=None`` (a cumulative average, no fixed half-life) and for m <= 0 (never updated);
    0.0 for m >= 1 (only the last batch counts).
    """
    if momentum is None or momentum <= 0:
        return None
    if momentum >= 1:
        return 0.0
    return math.log(0.5) / math.log1p(-momentum)


@dataclass(frozen=True)
class ValidationWarning:
    """A warning about the spec: a stable ``code``, a ``message`` with the reason and what to
    try, the norm ``layers`` it concerns, and its ``source`` ("validate")."""

    code: str
    message: str
    layers: list[str] = field(default_factory=list)
    source: str = "validate"

    def stored(self) -> dict[str, str]:
        """The ``{"code", "message", "source"}`` object kept in a job's ``warnings`` list."""
        return {"code": self.code, "message": self.message, "source": self.source}


@dataclass(frozen=True)
class LayerReport:
    """One norm layer: what its statistics are computed over, in training.

    ``map_size`` is the (H, W) of its input (None for 2-d inputs); ``norm_batch`` the samples
    one statistics estimate pools (None for batch-independent norms); ``values_per_stat`` the
    values one channel's (or group's) mean and variance average over.
    """

    name: str
    kind: str
    cls: str
    num_channels: int
    map_size: list[int] | None
    batch_stats: bool
    synced: bool
    per_device_batch: int
    norm_batch: int | None
    values_per_stat: int
    momentum: float | None
    tracks_running_stats: bool
    half_life_steps: float | None
    num_groups: int | None = None
    channels_per_group: int | None = None


@dataclass
class ValidationReport:
    """What :func:`validate_spec` found; ``to_dict()`` is the JSON the API returns."""

    arch: str
    norm: str
    world_size: int
    per_device_batch: int
    global_batch: int
    sync_bn: bool
    num_train: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    parameters: int
    memory_mb: dict[str, float] | None
    layers: list[LayerReport]
    running_stats: dict[str, Any]
    warnings: list[ValidationWarning]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (warnings with their ``layers``)."""
        return asdict(self)


# --------------------------------------------------------------------------- the batch check


def check_norm_batch(spec: JobSpec, info: DataInfo | None = None) -> None:
    """Refuse a per-device batch the spec's norm layers cannot split as they must.

    Split BN (``"split_bn:K"``) cuts each training batch into K equal splits and raises at the
    first forward when ``data.batch_size`` is not a multiple of K. Every batch a layer sees in
    training has exactly ``data.batch_size`` samples: the loader drops the last partial batch,
    precise BN, recalibration and the gap probe use whole batches, and under data parallel
    each process gets ``data.batch_size`` (split BN is never synced). So the per-device batch is
    what must divide. With ``info`` (the data set, for the input size) a split of one sample is
    refused too where a layer sees one value per channel (a 2-d feature or a 1x1 map): batch
    statistics of one value have no variance. Ghost BN has no such constraint: a last, smaller
    virtual batch is normalized on its own (merged into the one before if it is a single value).

    Raises:
        normcore.data.check.DataCheckError: at ("data", "batch_size"), saying why and what to
            use instead.
    """
    from normcore.data.check import DataCheckError

    parsed = parse_norm(spec.model.norm)
    if getattr(parsed.entry, "name", None) != "split_bn":
        return
    splits = int(parsed.kwargs.get("num_splits", 2))
    batch = spec.data.batch_size
    norm = spec.model.norm if isinstance(spec.model.norm, str) else str(spec.model.norm)
    flat = _flat_batch_layers(spec, info)
    least = splits * (2 if flat else 1)  # the smallest batch every split can train on
    if batch % splits:
        lower, upper = batch - batch % splits, batch + splits - batch % splits
        choices = f"{lower} or {upper}" if lower >= least else f"{max(upper, least)}"
        raise DataCheckError(
            ("data", "batch_size"),
            f"data.batch_size {batch} is not divisible by the {splits} splits of model.norm "
            f"{norm!r}: split BN cuts every training batch (per device) into {splits} equal "
            f"parts and would fail at the first step. Use a data.batch_size of {choices}, or a "
            "num_splits that divides it.",
        )
    if flat and batch < least:
        raise DataCheckError(
            ("data", "batch_size"),
            f"data.batch_size {batch} with model.norm {norm!r} gives each split one sample, "
            f"and {', '.join(flat[:4])}{' and more' if len(flat) > 4 else ''} see one value "
            "per channel: batch statistics of a single value have no variance, so training "
            f"fails at the first step. Use a data.batch_size of at least {least}.",
        )


def _flat_batch_layers(spec: JobSpec, info: DataInfo | None) -> list[str]:
    """The batch-statistics norm layers that see one value per channel and sample (a 2-d
    feature or a 1x1 map), from the cached shape trace; [] without ``info`` or when the trace
    fails (its errors are :func:`validate_spec`'s to report)."""
    if info is None:
        return []
    in_channels = spec.model.in_channels or info.channels
    h, w = info.image_size
    try:
        model_json = _trace_model(spec.model).model_dump_json()
        rows = _norm_layers(model_json, spec.data.batch_size, in_channels, h, w)
    except Exception:
        return []
    return [row[0] for row in rows if row[9] and math.prod(row[4][2:]) == 1]


# --------------------------------------------------------------------------- the shape trace


def _trace_model(model_spec: ModelSpec) -> ModelSpec:
    """``model_spec`` with split BN swapped for a BN of the same momentum, for the trace only.

    Split BN builds K BatchNorms per layer; at wide widths its meta build costs seconds (see
    ``normcore.resources._shape_stand_in``). Its splits are taken from the spec instead.
    """
    parsed = parse_norm(model_spec.norm)
    if getattr(parsed.entry, "name", None) != "split_bn":
        return model_spec
    stand_in: dict[str, Any] = {"type": "bn"}
    for key in ("momentum", "track_running_stats"):
        if key in parsed.kwargs:
            stand_in[key] = parsed.kwargs[key]
    return model_spec.model_copy(update={"norm": stand_in})


@functools.lru_cache(maxsize=256)
def _keeps_running_stats(model_json: str, in_channels: int) -> bool:
    from normcore.models import build_model
    from normcore.stats import has_recalibratable_layers

    spec = ModelSpec.model_validate_json(model_json)
    with torch.device("meta"):
        model = build_model(_trace_model(spec), in_channels=in_channels)
    return has_recalibratable_layers(model)


def keeps_running_stats(model_spec: ModelSpec, in_channels: int = 3) -> bool:
    """Whether the model of ``model_spec`` has a layer keeping running statistics that a
    recalibration (precise BN) recomputes: ``normcore.stats.has_recalibratable_layers``, the
    test the worker applies before one. Built on the meta device (nothing allocated; cached).
    GroupNorm, LayerNorm and the other batch-independent norms keep none.

    Raises:
        ValueError: the spec cannot be built.
    """
    return _keeps_running_stats(model_spec.model_dump_json(), in_channels)


@functools.lru_cache(maxsize=256)
def _norm_layers(
    model_json: str, batch: int, in_channels: int, h: int, w: int
) -> tuple[tuple[Any, ...], ...]:
    """Per norm layer (module order): (name, kind, class, channels, input shape, momentum,
    tracks running stats, virtual batch, groups), from one meta-device forward in train mode.
    Cached: the same model and batch are validated again and again."""
    from normcore.models import build_model

    spec = ModelSpec.model_validate_json(model_json)
    with torch.device("meta"):
        model = build_model(spec, in_channels=in_channels)
    model.train()
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            seen.setdefault(names[module], tuple(inputs[0].shape))

    norms = [(n, m) for n, m in model.named_modules() if n and is_norm_layer(m)]
    for _, m in norms:
        handles.append(m.register_forward_pre_hook(hook))
    try:
        model(torch.empty(batch, in_channels, h, w, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, m in norms:
        if name not in seen:
            continue  # a norm the forward never calls (a nested part of another norm)
        kind = kind_of(m, exact=False)
        channels = getattr(m, "num_features", None) or getattr(m, "num_channels", None)
        rows.append(
            (
                name,
                kind.name if kind is not None else type(m).__name__,
                type(m).__name__,
                int(channels or seen[name][1]),
                seen[name],
                getattr(m, "momentum", None),
                bool(getattr(m, "track_running_stats", False)),
                getattr(m, "virtual_batch_size", None),
                getattr(m, "num_groups", None),
                bool(kind is not None and kind.batch_stats),
                is_syncable(m),
            )
        )
    return tuple(rows)


def _layer_reports(spec: JobSpec, in_channels: int, h: int, w: int) -> list[LayerReport]:
    """Trace the model and turn each norm layer's input shape into a :class:`LayerReport`."""
    from normcore.engine.distributed import wants_sync_bn

    world = max(1, spec.resources.gpus)
    batch = spec.data.batch_size
    parsed = parse_norm(spec.model.norm)
    split = parsed.entry is not None and parsed.entry.name == "split_bn"
    splits = int(parsed.kwargs.get("num_splits", 2)) if split else 1
    synced_run = world > 1 and wants_sync_bn(spec)
    trace_spec = _trace_model(spec.model)
    rows = _norm_layers(trace_spec.model_dump_json(), batch, in_channels, h, w)
    out = []
    for name, kind, cls, channels, shape, momentum, tracks, vbs, groups, batch_stats, sync in rows:
        spatial = list(shape[2:]) if len(shape) > 2 else None
        pixels = math.prod(shape[2:]) if len(shape) > 2 else 1
        synced = batch_stats and synced_run and sync
        norm_batch: int | None = None
        if batch_stats:
            norm_batch = batch * world if synced else batch
            if vbs is not None:
                norm_batch = min(int(vbs), batch)
            if split:
                kind, cls, norm_batch = "split_bn", "SplitBatchNorm2d", batch // splits
        per_group = channels // groups if groups else None
        if batch_stats:
            values = (norm_batch or 1) * pixels
        elif kind in ("gn", "evo_s0") and per_group:
            values = per_group * pixels
        elif kind == "ln":
            values = channels * pixels
        else:  # instance-like: one channel of one sample
            values = pixels
        has_stats = tracks and (batch_stats or kind == "in")
        out.append(
            LayerReport(
                name=name,
                kind=kind,
                cls=cls,
                num_channels=channels,
                map_size=spatial,
                batch_stats=batch_stats,
                synced=synced,
                per_device_batch=batch,
                norm_batch=norm_batch,
                values_per_stat=int(values),
                momentum=momentum if has_stats else None,
                tracks_running_stats=has_stats,
                half_life_steps=half_life(momentum) if has_stats else None,
                num_groups=groups,
                channels_per_group=per_group,
            )
        )
    return out


# --------------------------------------------------------------------------- warnings


def _names(layers: list[LayerReport], limit: int = 6) -> str:
    shown = ", ".join(r.name for r in layers[:limit])
    return shown + (f" and {len(layers) - limit} more" if len(layers) > limit else "")


def _warnings(
    spec: JobSpec, layers: list[LayerReport], total_steps: int, steps_per_epoch: int
) -> list[ValidationWarning]:
    """The warnings of a traced spec; each message says why and what to try."""
    out: list[ValidationWarning] = []
    world = max(1, spec.resources.gpus)
    min_batch = int(THRESHOLDS["min_bn_batch"])
    gn = gn_advice(r.num_channels for r in layers)  # a group count every norm layer fits
    independent = f'"{gn}", "ln"' if gn is not None else '"ln"'
    small = [r for r in layers if r.batch_stats and (r.norm_batch or 0) < min_batch]
    if small:
        sizes = sorted({r.norm_batch for r in small if r.norm_batch is not None})
        out.append(
            ValidationWarning(
                "bn_small_batch",
                f"batch-statistics norm layers ({_names(small)}) estimate their mean and "
                f"variance from {', '.join(map(str, sizes))} sample(s) per step, under "
                f"{min_batch}: below that BatchNorm's error rises steeply (Wu & He 2018) and "
                "its running statistics drift from what eval sees. Try a larger "
                f"data.batch_size, a batch-independent norm ({independent})"
                + (", or resources.sync_bn to pool all processes" if world > 1 else "")
                + ".",
                [r.name for r in small],
            )
        )
    if spec.resources.sync_bn and world == 1:
        out.append(
            ValidationWarning(
                "sync_bn_one_process",
                "resources.sync_bn has no effect with one process (resources.gpus=1): "
                "statistics are already those of the whole batch.",
            )
        )
    cumulative = [r for r in layers if r.tracks_running_stats and r.momentum is None]
    epochs_limit = THRESHOLDS["max_cumulative_epochs"]
    if cumulative and steps_per_epoch and total_steps > epochs_limit * steps_per_epoch:
        last_share = steps_per_epoch / total_steps
        out.append(
            ValidationWarning(
                "momentum_none_long_run",
                f"momentum=None in {_names(cumulative)} keeps a cumulative average: all "
                f"{total_steps} steps weigh alike, so the last epoch makes up only "
                f"{last_share:.0%} of the running statistics eval uses, the rest coming from "
                "earlier weights. Use a momentum (0.1, or 0.01 for long runs), or recompute "
                "the statistics at the end (checkpoint.precise_bn_batches).",
                [r.name for r in cumulative],
            )
        )
    slow = [
        r
        for r in layers
        if r.tracks_running_stats
        and r.momentum is not None
        and 0 < r.momentum < THRESHOLDS["default_momentum"]
        and (1 - r.momentum) ** total_steps > THRESHOLDS["max_initial_weight"]
    ]
    if slow and total_steps > 0:
        m = slow[0].momentum
        assert m is not None
        left = (1 - m) ** total_steps
        out.append(
            ValidationWarning(
                "running_stats_stale",
                f"momentum {m:g} in {_names(slow)} has a half-life of "
                f"{half_life(m):.1f} steps and the run lasts {total_steps} steps: "
                f"{left:.1%} of the initial running statistics (mean 0, var 1) remain at the "
                "end, so eval mode normalizes with statistics that never caught up. Use a "
                "larger momentum or checkpoint.precise_bn_batches.",
                [r.name for r in slow],
            )
        )
    min_values = int(THRESHOLDS["min_in_values"])
    tiny = [r for r in layers if r.kind == "in" and r.values_per_stat < min_values]
    if tiny:
        ones = [r for r in tiny if r.values_per_stat == 1]
        reason = (
            "on a 1x1 map x - mean is 0, so the layer outputs its bias alone and erases the signal"
            if ones
            else f"each statistic averages fewer than {min_values} values"
        )
        maps = sorted({"x".join(map(str, r.map_size or [1])) for r in tiny})
        out.append(
            ValidationWarning(
                "in_small_map",
                f"InstanceNorm in {_names(tiny)} sees {', '.join(maps)} maps: {reason}. Use a "
                f"larger data.image_size, or {independent.replace(', ', '/')} for these "
                "layers.",
                [r.name for r in tiny],
            )
        )
    one_per_group = [r for r in layers if r.kind in ("gn", "evo_s0") and r.channels_per_group == 1]
    if one_per_group:
        out.append(
            ValidationWarning(
                "gn_one_channel_per_group",
                f"GroupNorm in {_names(one_per_group)} has as many groups as channels, one "
                "channel per group: that is InstanceNorm, which discards each channel's "
                "per-sample contrast (Wu & He 2018 find 32 groups or 16 channels per group "
                "best). Use fewer groups.",
                [r.name for r in one_per_group],
            )
        )
    return out


# --------------------------------------------------------------------------- the report


def validate_spec(
    spec: JobSpec | dict[str, Any],
    data_root: str | Path | None = None,
    *,
    info: DataInfo | None = None,
) -> ValidationReport:
    """Report what ``spec`` does to its norm layers, without training (see the module doc).

    ``info`` is the data set as ``normcore.data.check`` described it; without it, it is read
    from headers under ``data_root``.

    Raises:
        pydantic.ValidationError: ``spec`` is a dict that is not a valid JobSpec.
        normcore.data.check.DataCheckError: the data set cannot be described, the model
            cannot take its images, or its norm cannot take the per-device batch
            (:func:`check_norm_batch`; ``loc`` names the field).
    """
    from normcore.data.check import DataCheckError

    spec = spec if isinstance(spec, JobSpec) else JobSpec.model_validate(spec)
    info = info if info is not None else describe_data(spec, data_root)
    check_norm_batch(spec, info)
    world = max(1, spec.resources.gpus)
    batch = spec.data.batch_size
    in_channels = spec.model.in_channels or info.channels
    h, w = info.image_size
    try:
        layers = _layer_reports(spec, in_channels, h, w)
    except ValueError as exc:
        raise DataCheckError(("model",), str(exc)) from None
    except RuntimeError as exc:
        raise DataCheckError(
            ("data", "image_size"),
            f"{spec.model.arch} cannot take {h}x{w} images: {str(exc).splitlines()[0]}",
        ) from None
    try:
        estimate = estimate_memory(spec, info=info)
        parameters, memory_mb = estimate.parameters, estimate.as_mb()
    except DataCheckError:
        raise
    except Exception:  # an op the meta device lacks: the rest of the report still holds
        parameters = count_parameters(spec.model, in_channels=in_channels)
        memory_mb = None
    steps_per_epoch = info.num_train // (batch * world)
    total_steps = steps_per_epoch * spec.epochs
    tracked = [r for r in layers if r.tracks_running_stats]
    momenta = sorted({r.momentum for r in tracked if r.momentum is not None})
    running: dict[str, Any] = {
        "convention": "torch: running = (1 - momentum) * running + momentum * batch",
        "layers_tracking": len(tracked),
        "momenta": momenta,
        "cumulative": any(r.momentum is None for r in tracked),
        "half_life_steps": half_life(momenta[0]) if len(momenta) == 1 else None,
        "half_lives_in_run": None,
    }
    if len(momenta) == 1:
        h_steps = half_life(momenta[0])
        running["half_lives_in_run"] = total_steps / h_steps if h_steps else None
    if running["cumulative"]:
        running["cumulative_meaning"] = (
            "momentum=None: a cumulative average, every batch since the start weighs 1/n; "
            f"after {total_steps} steps the last epoch is "
            f"{(steps_per_epoch / total_steps if total_steps else 0):.0%} of it"
        )
    notes = [GRAD_ACCUMULATION_NOTE]
    if len(momenta) == 1 and 0 < momenta[0] < 1:
        left = (1 - momenta[0]) ** total_steps
        if left > THRESHOLDS["max_initial_weight"]:
            notes.append(
                f"a short run: {left:.1%} of the initial running statistics (mean 0, var 1) "
                f"remain after {total_steps} steps of momentum {momenta[0]:g}"
            )
    if world > 1:
        notes.append(
            f"{world} data-parallel processes of {batch} samples: the optimizer step sees "
            f"{world * batch}; BatchNorm statistics "
            + (
                "pool all processes (SyncBatchNorm)"
                if any(r.synced for r in layers)
                else f"stay per process ({batch} samples) unless resources.sync_bn is set"
            )
        )
    return ValidationReport(
        arch=spec.model.arch,
        norm=spec.model.norm if isinstance(spec.model.norm, str) else str(spec.model.norm),
        world_size=world,
        per_device_batch=batch,
        global_batch=batch * world,
        sync_bn=any(r.synced for r in layers),
        num_train=info.num_train,
        steps_per_epoch=steps_per_epoch,
        epochs=spec.epochs,
        total_steps=total_steps,
        parameters=parameters,
        memory_mb=memory_mb,
        layers=layers,
        running_stats=running,
        warnings=_warnings(spec, layers, total_steps, steps_per_epoch),
        notes=notes,
    )
