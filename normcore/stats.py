"""Running statistics of normalization layers: precise-BN recalibration and JSON reports.

``recalibrate_bn`` recomputes every BN's running mean/var as exact averages over N batches
(fvcore's ``update_bn_stats``), across ranks too. ``check_norm_buffers`` finds ranks whose norm
buffers drifted apart. ``norm_stats`` / ``norm_stats_from_state_dict`` report them per layer as
JSON-able rows (the service serves a checkpoint's rows without building its model), and
``stats_drift`` compares two reports.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normcore import registry
from normcore.convert import is_norm_layer, norm_channels
from normcore.layers.batchnorm import _BatchNorm
from normcore.layers.frozen import FrozenBatchNorm2d

__all__ = [
    "check_norm_buffers",
    "has_recalibratable_layers",
    "norm_stats",
    "norm_stats_from_state_dict",
    "recalibrate_bn",
    "stats_drift",
]


# --------------------------------------------------------------------------- precise BN


def _recalibratable(m: nn.Module) -> bool:
    """A layer ``recalibrate_bn`` recomputes: its training forward writes this batch's statistics
    into its running buffers when ``momentum=1`` (see ``recalibrate_bn`` for the list).

    The layers of the registry's recalibratable kinds (``normcore.registry``; a subclass counts
    by its nearest registered class, a kind you register with ``recalibratable=True`` too) that
    hold their running statistics: a ``running_var`` tensor, and a ``running_mean`` tensor
    unless the layer keeps none (EvoNorm-B0), with ``track_running_stats`` on where it has it.
    """
    kind = registry.kind_of(m, exact=False)
    if kind is None or not kind.recalibratable:
        return False
    if not getattr(m, "track_running_stats", True):
        return False
    has_mean, has_var = _stat_tensors(m)
    return has_var and (has_mean or not hasattr(m, "running_mean"))


def has_recalibratable_layers(model: nn.Module) -> bool:
    """Whether ``recalibrate_bn`` would recompute anything in ``model``: a layer keeping running
    statistics it can recompute (BatchNorm and its kin, a tracked InstanceNorm). False for a
    model of batch-independent norms (GroupNorm, LayerNorm, ...) or frozen ones. Works on the
    meta device (it reads no values)."""
    return any(_recalibratable(m) for m in model.modules())


def _stat_tensors(m: nn.Module) -> tuple[bool, bool]:
    """Whether ``m`` holds a ``running_mean`` and a ``running_var`` tensor."""
    return (
        isinstance(getattr(m, "running_mean", None), Tensor),
        isinstance(getattr(m, "running_var", None), Tensor),
    )


def _left_alone(m: nn.Module) -> bool:
    """A layer with running statistics that ``recalibrate_bn`` cannot recompute (and warns
    about). FrozenBatchNorm2d is not one: its statistics are fixed on purpose."""
    return any(_stat_tensors(m)) and not _recalibratable(m) and not isinstance(m, FrozenBatchNorm2d)


def _first_input(batch: Any) -> Any:
    """The model input in a batch: the batch itself, or the first item of an (x, y) pair."""
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("recalibrate_bn got an empty tuple as a batch")
        return batch[0]
    return batch


def _world_size(group: Any) -> int:
    """Ranks in ``group`` (the default group when None); 1 without torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _Sums:
    """One layer's per-batch statistics summed over a recalibration pass, fed by forward hooks.

    With ``momentum=1`` a training forward leaves exactly this batch's statistics in the
    running buffers; the post-hook adds them up. A call counts when its input is not empty and,
    for the layers that count batches (``num_batches_tracked``), when that count moved: a batch
    that fell back on the running statistics (``small_batch="running_stats"``) or an empty one
    (torch counts it, but it has no statistics) adds nothing. Sums stay on the device (no host
    sync per call), in float64 where the device has it.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        var = layer.running_var
        acc = torch.float32 if var.device.type == "mps" else torch.float64
        mean = getattr(layer, "running_mean", None)
        self.mean = None if mean is None else torch.zeros(mean.shape, dtype=acc, device=var.device)
        self.var = torch.zeros(var.shape, dtype=acc, device=var.device)
        self.count = torch.zeros((), dtype=acc, device=var.device)
        nbt = getattr(layer, "num_batches_tracked", None)
        # InstanceNorm has the buffer but its forward never counts; EvoNorm-B0 has none
        self.counts_batches = isinstance(layer, _TorchBatchNorm | _BatchNorm) and isinstance(
            nbt, Tensor
        )
        self._nonempty = False
        self._nbt: Tensor | None = None

    def before(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0] if args else None
        self._nonempty = not isinstance(x, Tensor) or x.numel() > 0
        if self.counts_batches:
            self._nbt = module.num_batches_tracked.clone()

    def after(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not (module.training and self._nonempty):
            return
        var = module.running_var.to(self.var.dtype)
        mean = None if self.mean is None else module.running_mean.to(self.var.dtype)
        if self.counts_batches:
            assert self._nbt is not None
            w = (module.num_batches_tracked - self._nbt).clamp(0, 1).to(self.var.dtype)
            # where, not w * stats: buffers a call did not write may hold anything
            var = torch.where(w > 0, var, 0.0)
            mean = None if mean is None else torch.where(w > 0, mean, 0.0)
            self.count.add_(w)
        else:
            self.count.add_(1.0)
        self.var.add_(var)
        if self.mean is not None and mean is not None:
            self.mean.add_(mean)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    *,
    process_group: Any = None,
) -> nn.Module:
    """Recompute the running statistics of every batch-statistics layer over ``num_batches``.

    Precise BN: for each layer, with ``K`` the batches that reached it,
    ``running_mean = (1/K) sum_k mu_k`` and ``running_var = (1/K) sum_k s2_k``, where ``mu_k``
    is the layer's mean over batch k and ``s2_k = m/(m-1) sigma2_k`` its unbiased variance (m
    values per channel): the inference statistics of Ioffe & Szegedy (2015, arXiv 1502.03167,
    Algorithm 2: ``E[x] = E_B[mu_B]``, ``Var[x] = m/(m-1) E_B[sigma2_B]``; seed 004, step 4),
    as fvcore's ``update_bn_stats`` computes them and Wu & Johnson (2021, "Rethinking 'Batch'
    in BatchNorm", arXiv 2105.07576, section 3) call PreciseBN. With equal batch sizes
    ``running_mean`` is the mean over all the data. The sums are taken in float64.

    Covered, each with the statistics its own training forward writes with ``momentum=1``:

    - BatchNorm1d/2d/3d, SyncBatchNorm (also synchronized across ranks), BatchRenorm2d,
      SplitBatchNorm2d (its main BN sees split 0; each ``aux_bn`` is covered in its own
      right), normcore's and torch.nn's, as above;
    - GhostBatchNorm2d: ``mu_k`` the batch mean, ``s2_k`` its size-weighted average of the
      virtual batches' unbiased variances;
    - InstanceNorm1d/2d/3d with ``track_running_stats=True`` (normcore's and torch.nn's):
      ``mu_k`` the batch average of the per-instance means, ``s2_k`` that of the per-instance
      unbiased variances (what ``F.instance_norm`` averages into its buffers);
    - EvoNorm2dB0: ``running_var`` only, the unbiased batch variance over (N, H, W).

    So are the layers of a kind registered with ``register_norm(..., recalibratable=True)``
    (the list is ``normcore.registry``'s table). Any other layer holding running statistics (a
    norm of your own, torchvision's FrozenBatchNorm2d) is left as it is, with a warning naming it; normcore's
    FrozenBatchNorm2d is left alone silently (fixed by design: ``unfreeze_norm`` first).

    How: each covered layer's statistics are reset, its ``momentum`` set to 1 (its buffers then
    hold the last batch's statistics) and forward hooks add them up; the model runs in train
    mode under ``no_grad``. Momentum and every module's training flag are restored afterwards.
    A call with an empty input, or one that fell back on the running statistics
    (``small_batch="running_stats"``), adds nothing. ``num_batches_tracked`` ends at its old
    value plus ``K`` for the BatchNorm kinds, as if trained (BatchRenorm2d's warm-up counts
    from 0 during the pass); InstanceNorm's, which training never moves, is kept. A layer no
    batch reached keeps its old statistics.

    Args:
        model: the model; modified in place (also returned).
        batches: iterable of input tensors or ``(x, y, ...)`` tuples; tensors are moved to
            the model's device.
        num_batches: how many batches to use (default: all of ``batches``), per rank.
        process_group: a torch.distributed group (``dist.group.WORLD`` for all ranks) whose
            ranks' statistics are combined: each layer's sums and counts are added over the
            ranks (one all-reduce), so every rank ends with the buffers one process gets over
            the union of all ranks' batches. Every rank of the group must call this, with any
            number of batches (zero included). None (default): each process keeps its own
            statistics. SyncBatchNorm layers synchronize in their forward, so with them every
            rank must run the same number of batches.

    Raises:
        ValueError: if no batch was seen (on any rank); the statistics are then unchanged.
    """
    alone = [(name, m) for name, m in model.named_modules() if _left_alone(m)]
    if alone:
        warnings.warn(
            "recalibrate_bn: left alone, not a layer it can recompute (see its docstring): "
            + ", ".join(f"{name or '<model>'} ({type(m).__name__})" for name, m in alone),
            stacklevel=2,
        )
    # their own training forwards run during the pass: their buffers are put back afterwards
    kept = [(b, b.clone()) for _, m in alone for b in m.buffers(recurse=False)]
    layers = [m for m in model.modules() if _recalibratable(m)]
    if not layers:
        return model
    distributed = process_group is not None and _world_size(process_group) > 1
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    flags = {m: m.training for m in model.modules()}
    saved = [
        (
            m.momentum,
            [b.clone() for b in _buffers_of(m)],
            None
            if getattr(m, "num_batches_tracked", None) is None
            else m.num_batches_tracked.clone(),
        )
        for m in layers
    ]
    sums = [_Sums(m) for m in layers]
    hooks = []
    for m, s in zip(layers, sums, strict=True):
        hooks.append(m.register_forward_pre_hook(s.before))
        hooks.append(m.register_forward_hook(s.after))
        _reset_stats(m)
        m.momentum = 1.0
    seen = 0
    counts: list[int] = [0] * len(layers)
    try:
        model.train()
        it = iter(batches) if num_batches is None else itertools.islice(batches, num_batches)
        for batch in it:
            x = _first_input(batch)
            if isinstance(x, Tensor):
                x = x.to(device)
            model(x)
            seen += 1
        total_seen = seen
        if distributed:
            total_seen = _combine_across_ranks(sums, seen, process_group, device)
        if total_seen == 0:
            raise ValueError("recalibrate_bn got no batches; the running statistics are unchanged")
        counts = [round(c) for c in torch.stack([s.count for s in sums]).tolist()]
    finally:
        for h in hooks:
            h.remove()
        for m, s, (momentum, buffers, nbt), n in zip(layers, sums, saved, counts, strict=True):
            m.momentum = momentum
            if n > 0:
                if s.mean is not None:
                    m.running_mean.copy_(s.mean / n)
                m.running_var.copy_(s.var / n)
            else:  # failed, or no batch reached this layer: keep what it had
                for b, old in zip(_buffers_of(m), buffers, strict=True):
                    b.copy_(old)
            if nbt is not None:
                m.num_batches_tracked.copy_(nbt + n if s.counts_batches else nbt)
        for b, old in kept:
            b.copy_(old)
        for m, flag in flags.items():
            m.training = flag
    if num_batches is not None and seen < num_batches:
        warnings.warn(
            f"recalibrate_bn: asked for {num_batches} batches, the data gave {seen}",
            stacklevel=2,
        )
    return model


def _buffers_of(m: nn.Module) -> list[Tensor]:
    """The running statistics ``m`` holds: [running_mean, running_var] or [running_var]."""
    return [t for t in (getattr(m, "running_mean", None), m.running_var) if isinstance(t, Tensor)]


def _reset_stats(m: nn.Module) -> None:
    """Running mean 0, variance 1, count 0, as ``reset_running_stats`` does."""
    for name, value in (("running_mean", 0.0), ("running_var", 1.0), ("num_batches_tracked", 0)):
        t = getattr(m, name, None)
        if isinstance(t, Tensor):
            t.fill_(value)


def _combine_across_ranks(sums: list[_Sums], seen: int, group: Any, device: torch.device) -> int:
    """Add every layer's sums and counts over the ranks of ``group``, in place.

    One all-reduce of ``[mean sums, var sums, count]`` per layer (float64) plus the batch count;
    returns the total number of batches.
    """
    parts: list[Tensor] = []
    for s in sums:
        if s.mean is not None:
            parts.append(s.mean)
        parts += [s.var, s.count.reshape(1)]
    parts.append(torch.tensor([float(seen)], dtype=torch.float64, device=device))
    flat = torch.cat([t.to(device, torch.float64).flatten() for t in parts])
    dist.all_reduce(flat, dist.ReduceOp.SUM, group=group)
    offset = 0
    for s in sums:
        for t in (s.mean, s.var, s.count):
            if t is None:
                continue
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
    return round(flat[offset].item())


@torch.no_grad()
def check_norm_buffers(model: nn.Module, group: Any = None) -> dict[str, float]:
    """The largest difference, across the ranks of ``group``, of each norm layer's buffers.

    Returns ``{layer name: max |a - b|}`` over every buffer of every norm layer that has
    buffers (running mean/var, num_batches_tracked, ...), the maximum over ranks minus the
    minimum, element by element; 0.0 means every rank holds the same values. A NaN counts as
    an infinite difference. Every rank of ``group`` must call it (two all-reduces); without
    torch.distributed every difference is 0.0. Divergent buffers mean the ranks evaluate
    different models (pytorch#13711): broadcast them, or recalibrate with a process group.
    """
    layers = []
    for name, m in model.named_modules():
        if not is_norm_layer(m):
            continue
        tensors = [b for b in m.buffers(recurse=False) if b is not None]
        if tensors:
            layers.append((name, tensors))
    if not layers:
        return {}
    if _world_size(group) <= 1:
        return {name: 0.0 for name, _ in layers}
    device = layers[0][1][0].device
    flat = torch.cat(
        [t.detach().to(device, torch.float64).flatten() for _, ts in layers for t in ts]
    )
    high = torch.nan_to_num(flat, nan=math.inf)
    low = torch.nan_to_num(flat, nan=-math.inf)
    dist.all_reduce(high, dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, dist.ReduceOp.MIN, group=group)
    diff = (high - low).nan_to_num(nan=math.inf)  # inf - inf: NaN on every rank
    out = {}
    offset = 0
    for name, ts in layers:
        size = sum(t.numel() for t in ts)
        part = diff[offset : offset + size]
        offset += size
        out[name or "<model>"] = float(part.max().item()) if size else 0.0
    return out


# --------------------------------------------------------------------------- reports


def _float(x: float) -> float | None:
    """JSON-safe float: NaN and infinities become None."""
    return x if math.isfinite(x) else None


def _floats(t: Tensor | None) -> list[float | None] | None:
    if t is None:
        return None
    return [_float(v) for v in t.detach().double().cpu().flatten().tolist()]


def _range(t: Tensor | None) -> dict[str, Any] | None:
    """mean/min/max of a stats vector (over its finite entries) and whether all are finite."""
    if t is None:
        return None
    v = t.detach().double().cpu().flatten()
    finite = v[torch.isfinite(v)]
    if finite.numel() == 0:
        return {"mean": None, "min": None, "max": None, "finite": v.numel() == 0}
    return {
        "mean": _float(finite.mean().item()),
        "min": _float(finite.min().item()),
        "max": _float(finite.max().item()),
        "finite": finite.numel() == v.numel(),
    }


def _moments(t: Tensor | None) -> dict[str, float | None] | None:
    """mean and (population) std of an affine parameter."""
    if t is None:
        return None
    v = t.detach().double().cpu().flatten()
    if v.numel() == 0:
        return {"mean": None, "std": None}
    return {
        "mean": _float(v.mean().item()),
        "std": _float(v.std(correction=0).item()),
    }


def _row(
    name: str,
    kind: str,
    cls: str | None,
    num_channels: int | None,
    mean: Tensor | None,
    var: Tensor | None,
    nbt: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> dict[str, Any]:
    has_stats = mean is not None and var is not None
    has_affine = weight is not None or bias is not None
    return {
        "name": name,
        "kind": kind,
        "class": cls,
        "num_channels": num_channels,
        "running_mean": _floats(mean) if has_stats else None,
        "running_var": _floats(var) if has_stats else None,
        "summary": {
            "running_mean": _range(mean) if has_stats else None,
            "running_var": _range(var) if has_stats else None,
            "num_batches_tracked": None if nbt is None else int(nbt.item()),
        },
        "affine": ({"weight": _moments(weight), "bias": _moments(bias)} if has_affine else None),
    }


def norm_stats(model: nn.Module) -> list[dict[str, Any]]:
    """One JSON-able row per norm layer of ``model``, in module order.

    Row keys: ``name`` (module path, ``""`` for the model itself), ``kind`` and ``class``
    (both the torch class name, e.g. "BatchNorm2d"; ``class`` is the name every route uses
    for it, ``kind`` is kept for older clients), ``num_channels``, ``running_mean``/``running_var`` (lists of floats, None without running
    stats), ``summary`` ({running_mean, running_var: {mean, min, max, finite}},
    num_batches_tracked) and ``affine`` ({weight, bias: {mean, std}} or None). Non-finite
    numbers are reported as None (with ``finite: false``) so the rows are strict JSON.
    """
    rows = []
    for name, m in model.named_modules():
        if not is_norm_layer(m):
            continue
        try:
            channels: int | None = norm_channels(m)
        except ValueError:
            channels = None
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        rows.append(
            _row(
                name,
                type(m).__name__,
                type(m).__name__,
                channels,
                getattr(m, "running_mean", None),
                getattr(m, "running_var", None),
                getattr(m, "num_batches_tracked", None),
                weight if isinstance(weight, Tensor) else None,
                bias if isinstance(bias, Tensor) else None,
            )
        )
    return rows


_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def norm_stats_from_state_dict(
    state_dict: Mapping[str, Tensor], classes: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """The ``norm_stats`` rows of a model, computed from its flat state dict alone.

    ``kind`` is then the family of state the keys show (below), not the class; ``class`` is
    the torch class name from ``classes`` ({module path: class name}, e.g. what
    :func:`norm_classes` gives for the model the state dict came from), None where unknown.

    Keys are grouped by prefix (``<prefix>.running_mean`` ...). A prefix with running_mean
    and running_var is a ``"batchnorm"`` (BN kinds, FrozenBN, tracked InstanceNorm); one with
    only a 1-D ``weight`` and a 1-D ``bias`` of the same length is an ``"affine_norm"``
    (GroupNorm, LayerNorm, untracked affine InstanceNorm). Weight-only layers (L2Norm) cannot
    be told from other parameters and are not reported; neither are norms with no state.
    Rows are in natural order of their names (``2.bn`` before ``10.bn``): a safetensors file
    does not keep the module order.
    """
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _KEYS and isinstance(value, Tensor):
            groups.setdefault(prefix, {})[leaf] = value
    rows = []
    for prefix, g in groups.items():
        mean, var = g.get("running_mean"), g.get("running_var")
        weight, bias = g.get("weight"), g.get("bias")
        if mean is not None and var is not None and mean.dim() == 1 and var.shape == mean.shape:
            kind, channels = "batchnorm", mean.numel()
        elif (
            mean is None
            and var is None
            and weight is not None
            and bias is not None
            and weight.dim() == 1
            and weight.shape == bias.shape
        ):
            kind, channels = "affine_norm", weight.numel()
        else:
            continue
        cls = (classes or {}).get(prefix)
        nbt = g.get("num_batches_tracked")
        rows.append(_row(prefix, kind, cls, channels, mean, var, nbt, weight, bias))
    return sorted(rows, key=lambda r: _natural_key(r["name"]))


def norm_classes(model: nn.Module) -> dict[str, str]:
    """{module path: torch class name} of every norm layer of ``model`` (the ``class`` column
    of :func:`norm_stats_from_state_dict`); works on a model built on the meta device."""
    return {name: type(m).__name__ for name, m in model.named_modules() if is_norm_layer(m)}


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key treating numeric path parts as numbers: ``layer2.10`` after ``layer2.9``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.]", name)]


def _diff(a: list[float | None] | None, b: list[float | None] | None) -> dict[str, Any] | None:
    """Mean/max absolute change and relative L2 change ``||b - a|| / ||a||`` of two vectors."""
    if a is None or b is None or len(a) != len(b):
        return None
    ta = torch.tensor([math.nan if v is None else v for v in a], dtype=torch.float64)
    tb = torch.tensor([math.nan if v is None else v for v in b], dtype=torch.float64)
    d = (tb - ta).abs()
    if d.numel() == 0:
        return None
    norm_a = ta.norm().item()
    rel = d.norm().item() / norm_a if norm_a > 0 else (0.0 if d.norm().item() == 0 else math.inf)
    return {
        "abs_mean": _float(d.mean().item()),
        "abs_max": _float(d.max().item()),
        "rel": _float(rel),
    }


def stats_drift(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer change of the running statistics from report ``a`` to report ``b``.

    Rows (in ``a``'s order, then layers only in ``b``): ``name``, ``kind`` (from ``b`` when
    present), ``status`` ("both", "only_a", "only_b"), ``mean`` and ``var`` drift
    (``{abs_mean, abs_max, rel}``; None when a side lacks running stats or channel counts
    differ) and the change of ``num_batches_tracked``.
    """
    by_name_b = {r["name"]: r for r in b}
    names_a = {r["name"] for r in a}
    out = []
    for ra in a:
        rb = by_name_b.get(ra["name"])
        if rb is None:
            out.append(_drift_row(ra, None, "only_a"))
        else:
            out.append(_drift_row(ra, rb, "both"))
    out.extend(_drift_row(None, rb, "only_b") for rb in b if rb["name"] not in names_a)
    return out


def _drift_row(ra: dict[str, Any] | None, rb: dict[str, Any] | None, status: str) -> dict[str, Any]:
    ref = rb if rb is not None else ra
    assert ref is not None
    row: dict[str, Any] = {
        "name": ref["name"],
        "kind": ref["kind"],
        "status": status,
        "mean": None,
        "var": None,
        "num_batches_tracked": None,
    }
    if ra is not None and rb is not None:
        row["mean"] = _diff(ra["running_mean"], rb["running_mean"])
        row["var"] = _diff(ra["running_var"], rb["running_var"])
        na = ra["summary"]["num_batches_tracked"]
        nb = rb["summary"]["num_batches_tracked"]
        if na is not None and nb is not None:
            row["num_batches_tracked"] = nb - na
    return row
