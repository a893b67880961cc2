"""Norm telemetry: what the normalization layers of a model look like while it trains.

Three parts, all read-only on the model (no buffer, parameter or mode is left changed):

- :class:`NormTelemetry` records, per norm layer (``normcore.registry.is_norm_layer``), summaries
  over channels of its per-channel mean and variance, their drift since the previous record,
  dead channels, gamma/beta L2 norms and ``num_batches_tracked``. For layers that track running
  statistics the per-channel values are ``running_mean``/``running_var``; for batch-independent
  layers (GroupNorm, LayerNorm, InstanceNorm without tracking, FRN, ...) they are the mean and
  variance per channel of the layer's *input* on a fixed probe batch (forward hooks, eval mode,
  ``no_grad``): what a BatchNorm there would track.
- :func:`gap_probe`, the train/eval gap: validation loss and accuracy in eval mode (running
  statistics) and with batch statistics on batches of the training batch size, the buffers
  untouched (``torch.func.functional_call`` on copies of them).
- :class:`FiniteCheck`, a per-step check that every running statistic and gamma is finite
  (:class:`NormStatsNonFinite` names the layer), and :func:`collapsed_layers`.

Every summary is computed in float64 from the layer's tensors, so a test can recompute it from a
checkpoint's buffers exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normcore.registry import is_norm_layer, kind_of

__all__ = [
    "COLLAPSE_EPS_FACTOR",
    "DEAD_RELATIVE",
    "GAP_ACCURACY",
    "GAP_LOSS_RATIO",
    "GAP_PROBE_SAMPLES",
    "GAP_PROBE_SAMPLES_LARGE",
    "SMALL_BATCH",
    "FiniteCheck",
    "NormTelemetry",
    "channel_summary",
    "collapsed_layers",
    "dead_channels",
    "gap_probe",
    "gap_warning",
    "gn_advice",
    "gn_groups_for",
    "norm_layers",
    "relative_change",
    "uses_running_stats",
]

# A channel is dead when its variance (or |gamma|) is below this fraction of the layer's median.
# Relative, so it does not depend on the data's scale: 1e-3 of the median variance is a channel
# whose spread is ~3% of a typical channel's (sqrt(1e-3)); BatchNorm then divides noise by
# sqrt(var + eps) and amplifies it, and a |gamma| 1000x below its peers scales the channel's
# output to ~0 (the criterion network slimming prunes by; Liu et al. 2017, arXiv 1708.06519).
DEAD_RELATIVE = 1e-3
# Per-device batch under which the gap warning can fire: BatchNorm's error grows as the batch
# shrinks below 16 per device (Wu & He 2018, arXiv 1803.08494, Fig. 1); at 16 and above a gap is
# more likely a too-high momentum or a distribution shift than noisy batch statistics.
SMALL_BATCH = 16
# The gap is large when the accuracies with running and with batch statistics are 5 points or
# more apart (twice the ~2.5-point binomial noise of the probe's 128 samples at 90% accuracy),
# or one loss is 1.5x the other or more (a ratio also covers regression tasks and early epochs
# where accuracy says little).
GAP_ACCURACY = 0.05
GAP_LOSS_RATIO = 1.5
# Validation samples the gap probe runs (rounded down to whole training batches, at least one).
# Below SMALL_BATCH, where the warning reads the gap, 128 (the noise argument above); at larger
# batches the gap is only a series, and 64 keeps the probe within the cost goal of 5% of a
# resnet20 digits epoch (benchmarks/telemetry_cost.py).
GAP_PROBE_SAMPLES = 128
GAP_PROBE_SAMPLES_LARGE = 64
# A layer's variance has collapsed when its median running (or probe) variance is below this
# many times its eps: then eps, not the data, sets the scale the layer divides by.
COLLAPSE_EPS_FACTOR = 1.0
# Samples of the fixed probe batch for batch-independent layers.
ACT_PROBE_SAMPLES = 32
# Group counts the advice may suggest, best first: Wu & He (2018) find 32 groups best, and
# fewer groups (more channels per group) next; one channel per group is InstanceNorm.
GN_GROUP_CHOICES = (32, 16, 8, 4, 2)


def gn_groups_for(channels: Iterable[int]) -> int | None:
    """The largest of :data:`GN_GROUP_CHOICES` that divides every channel count in ``channels``
    and leaves more than one channel per group (LeNet's 8/16/128/64: 4; resnet20's 16/32/64:
    8); None when none does or no count is known (counts of 0 are ignored)."""
    counts = {int(c) for c in channels if c and int(c) > 0}
    if not counts:
        return None
    for groups in GN_GROUP_CHOICES:
        if all(c % groups == 0 and c // groups > 1 for c in counts):
            return groups
    return None


def gn_advice(channels: Iterable[int]) -> str | None:
    """The ``model.norm`` text of the GroupNorm to suggest for norm layers of these channel
    counts (``"gn:4"``; see :func:`gn_groups_for`), or None when no group count fits them all."""
    groups = gn_groups_for(channels)
    return None if groups is None else f"gn:{groups}"


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's norm layers (``registry.is_norm_layer``) with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if name and is_norm_layer(m)]


def uses_running_stats(module: nn.Module) -> bool:
    """Whether the layer tracks running statistics (BatchNorm-like with ``running_var``)."""
    return (
        bool(getattr(module, "track_running_stats", False))
        and isinstance(getattr(module, "running_var", None), Tensor)
        and isinstance(getattr(module, "running_mean", None), Tensor)
    )


def uses_batch_stats(module: nn.Module) -> bool:
    """Whether the layer normalizes with batch statistics in training (the gap probe's case)."""
    kind = kind_of(module, exact=False)
    if kind is not None:
        return kind.batch_stats and uses_running_stats(module)
    return uses_running_stats(module)


def channel_summary(values: Tensor, prefix: str) -> dict[str, float | int | None]:
    """Mean, population std, min and max over the finite entries of a per-channel vector, and
    the count of non-finite entries, all in float64; None when no entry is finite."""
    v = values.detach().double().flatten().cpu()
    finite = torch.isfinite(v)
    ok = v[finite]
    out: dict[str, float | int | None] = {f"{prefix}_nonfinite": int((~finite).sum())}
    if ok.numel() == 0:
        out.update({f"{prefix}_{k}": None for k in ("mean", "std", "min", "max")})
        return out
    out[f"{prefix}_mean"] = float(ok.mean())
    out[f"{prefix}_std"] = float(ok.std(unbiased=False))
    out[f"{prefix}_min"] = float(ok.min())
    out[f"{prefix}_max"] = float(ok.max())
    return out


def relative_change(new: Tensor, old: Tensor | None) -> float | None:
    """``||new - old||_2 / ||old||_2`` in float64; None without ``old``, on a shape change, when
    ``||old||`` is 0 (a running_mean's zero start: no relative change is defined) or when the
    result is not finite."""
    if old is None or old.shape != new.shape:
        return None
    n, o = new.detach().double().flatten().cpu(), old.detach().double().flatten().cpu()
    base = float(torch.linalg.vector_norm(o))
    if base == 0.0:
        return None
    value = float(torch.linalg.vector_norm(n - o)) / base
    return value if math.isfinite(value) else None


def dead_channels(values: Tensor) -> Tensor:
    """Boolean mask of channels whose |value| is below ``DEAD_RELATIVE`` times the layer's median
    |value| (non-finite entries are not dead; they are counted apart)."""
    a = values.detach().double().flatten().cpu().abs()
    finite = torch.isfinite(a)
    if not bool(finite.any()):
        return torch.zeros_like(a, dtype=torch.bool)
    median = float(a[finite].median())
    return finite & (a < DEAD_RELATIVE * median)


def _gamma_beta(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        weight if isinstance(weight, Tensor) else None,
        bias if isinstance(bias, Tensor) else None,
    )


def _channel_dim(module: nn.Module, x: Tensor) -> int:
    """The channel axis of a norm layer's input: 1, or the last for a plain nn.LayerNorm."""
    if isinstance(module, nn.LayerNorm) and type(module).__name__ != "LayerNorm2d":
        return x.dim() - 1
    return 1 if x.dim() > 1 else 0


@dataclass
class _ProbeStats:
    mean: Tensor
    var: Tensor


def _input_stats(module: nn.Module, x: Tensor) -> _ProbeStats:
    """Per-channel mean and population variance of a layer's input, in float64."""
    dim = _channel_dim(module, x)
    xc = x.detach().double().movedim(dim, 0).flatten(1)
    return _ProbeStats(xc.mean(1), xc.var(1, unbiased=False))


class NormTelemetry:
    """Records the norm layers of ``model``; call :meth:`record` at each telemetry point.

    ``probe``: a fixed input batch for the batch-independent layers (None: those layers get
    only their gamma/beta figures). Each record returns one dict per layer with ``layer``,
    ``kind`` (class name), ``source`` ("running" or "probe") and the values: ``mean_*`` and
    ``var_*`` summaries (see :func:`channel_summary`), ``mean_drift`` and ``var_drift``
    (:func:`relative_change` against the previous record; None on the first), ``dead_var``,
    ``dead_gamma`` and ``dead_channels`` (union; :func:`dead_channels`), ``gamma_norm``,
    ``beta_norm`` (L2, None without affine), ``num_batches_tracked`` (None without),
    ``channels`` and ``eps``.
    """

    def __init__(self, model: nn.Module, probe: Tensor | None = None) -> None:
        self.model = model
        self.layers = norm_layers(model)
        self.probe = probe
        self._previous: dict[str, tuple[Tensor, Tensor]] = {}

    def _probe_stats(self) -> dict[str, _ProbeStats]:
        wanted = [(n, m) for n, m in self.layers if not uses_running_stats(m)]
        if self.probe is None or not wanted:
            return {}
        found: dict[str, _ProbeStats] = {}
        handles = []
        for name, module in wanted:

            def hook(mod: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                if args and isinstance(args[0], Tensor):
                    found[_name] = _input_stats(mod, args[0])

            handles.append(module.register_forward_pre_hook(hook))
        modes = {m: m.training for m in self.model.modules()}
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(self.probe)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes.items():
                m.training = mode
        return found

    def record(self) -> list[dict[str, Any]]:
        """One dict per norm layer (see the class docstring); updates the drift baseline."""
        probed = self._probe_stats()
        out = []
        for name, module in self.layers:
            row: dict[str, Any] = {"layer": name, "kind": type(module).__name__}
            if uses_running_stats(module):
                row["source"] = "running"
                mean = module.running_mean.detach().double().cpu().clone()
                var = module.running_var.detach().double().cpu().clone()
            elif name in probed:
                row["source"] = "probe"
                mean, var = probed[name].mean.cpu(), probed[name].var.cpu()
            else:
                row["source"] = None
                mean = var = None
            gamma, beta = _gamma_beta(module)
            row["channels"] = int(
                mean.numel() if mean is not None else (gamma.numel() if gamma is not None else 0)
            )
            eps = getattr(module, "eps", None)
            row["eps"] = float(eps) if isinstance(eps, (int, float)) else None
            dead = torch.zeros(row["channels"], dtype=torch.bool)
            if mean is not None and var is not None:
                row.update(channel_summary(mean, "mean"))
                row.update(channel_summary(var, "var"))
                prev = self._previous.get(name)
                row["mean_drift"] = relative_change(mean, prev[0] if prev else None)
                row["var_drift"] = relative_change(var, prev[1] if prev else None)
                self._previous[name] = (mean, var)
                dead_var = dead_channels(var)
                row["dead_var"] = int(dead_var.sum())
                dead = dead | dead_var
            if gamma is not None:
                dead_gamma = dead_channels(gamma)
                row["dead_gamma"] = int(dead_gamma.sum())
                if dead_gamma.shape == dead.shape:
                    dead = dead | dead_gamma
                row["gamma_norm"] = float(torch.linalg.vector_norm(gamma.detach().double()))
            else:
                row["gamma_norm"] = None
            row["beta_norm"] = (
                float(torch.linalg.vector_norm(beta.detach().double()))
                if beta is not None
                else None
            )
            row["dead_channels"] = int(dead.sum())
            tracked = getattr(module, "num_batches_tracked", None)
            row["num_batches_tracked"] = int(tracked) if isinstance(tracked, Tensor) else None
            out.append(row)
        return out


def collapsed_layers(records: Iterable[dict[str, Any]]) -> list[str]:
    """Layers (of :meth:`NormTelemetry.record` dicts) whose variance collapsed: the largest
    channel variance ``var_max`` is below ``COLLAPSE_EPS_FACTOR * eps``, so every channel is
    divided by ~sqrt(eps) whatever its input."""
    out = []
    for r in records:
        eps, vmax = r.get("eps"), r.get("var_max")
        if eps is not None and vmax is not None and vmax < COLLAPSE_EPS_FACTOR * eps:
            out.append(str(r["layer"]))
    return out


# ----------------------------------------------------------------------------- finiteness


class FiniteCheck:
    """A per-step check that every running statistic and gamma of the model is finite.

    :meth:`flag` sums each running_var and gamma (one reduction per tensor, no host sync) and
    returns a 0-d bool tensor, True when all sums are finite; when it is False, :meth:`bad_layers` finds the
    layers with non-finite values (the engine then fails the run naming them). A sum can
    overflow to inf in float32 without a non-finite entry (values over ~1e34): the slow path
    then finds no layer and the run goes on.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensors: list[tuple[str, str, Tensor]] = []
        self.layers = norm_layers(model)
        for name, module in self.layers:
            # not running_mean: a non-finite batch mean makes that step's batch variance
            # non-finite too (var = mean((x - mean)^2)), so running_var catches it in the same
            # step, and a third fewer tensors to sum each step
            for attr in ("running_var", "weight"):
                t = getattr(module, attr, None)
                if isinstance(t, Tensor) and t.is_floating_point():
                    self.tensors.append((name, attr, t))

    def flag(self) -> Tensor | None:
        """A 0-d bool tensor on the model's device: all checked tensors are finite."""
        if not self.tensors:
            return None
        with torch.no_grad():
            sums = torch.stack([t.detach().sum() for _, _, t in self.tensors])
            return torch.isfinite(sums).all()

    def bad_layers(self) -> dict[str, list[str]]:
        """{layer: [non-finite tensor names]} by an element-wise check of running_mean,
        running_var and gamma (the slow path)."""
        bad: dict[str, list[str]] = {}
        for name, module in self.layers:
            for attr in ("running_mean", "running_var", "weight"):
                t = getattr(module, attr, None)
                if isinstance(t, Tensor) and not bool(torch.isfinite(t.detach()).all()):
                    bad.setdefault(name, []).append("gamma" if attr == "weight" else attr)
        return bad


# ----------------------------------------------------------------------------- gap probe


def _batch_stats_mode(model: nn.Module) -> dict[nn.Module, bool]:
    """Put the model in eval mode except its batch-statistics norm layers (train mode: they
    normalize with the batch's statistics); returns the previous modes to restore."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, m in norm_layers(model):
        if uses_batch_stats(m):
            m.training = True
    return modes


def gap_probe(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    classification: bool = True,
    inputs: Callable[[Tensor], Tensor] = lambda x: x,
) -> dict[str, float] | None:
    """Validation loss and accuracy in eval mode and with batch statistics, on the same samples.

    ``batches`` are (x, y) validation batches of the training batch size. Eval mode runs the
    model as it is; the batch-statistics pass runs it through ``torch.func.functional_call``
    with its batch-statistics norm layers in train mode and *copies* of every buffer, so the
    model's running statistics and ``num_batches_tracked`` stay bit-identical (dropout and the
    other layers stay in eval mode). Modes are restored.

    Returns ``{"val_loss_eval", "val_loss_batch", "gap_loss", and for classification
    "val_accuracy_eval", "val_accuracy_batch", "gap_accuracy"}`` (gap_loss = eval - batch,
    gap_accuracy = batch - eval: both positive when the running statistics do worse, negative
    when the batch statistics of a small batch do), or None when the model has no
    batch-statistics layer or there is no batch.
    """
    if not any(uses_batch_stats(m) for _, m in norm_layers(model)):
        return None
    params = dict(model.named_parameters())
    sums = {"eval_loss": 0.0, "batch_loss": 0.0, "eval_hit": 0.0, "batch_hit": 0.0}
    count = 0
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad():
            kept = [(inputs(x), y) for x, y in batches]
            if not kept:
                return None
            # eval mode does not depend on how samples are batched: one forward over all
            model.eval()
            x_all, y_all = torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept])
            out = model(x_all).float()
            count = int(y_all.shape[0])
            # the mean loss over all samples (a per-batch mean weighted by batch size is the same)
            sums["eval_loss"] = float(loss_fn(out, y_all)) * count
            if classification:
                sums["eval_hit"] = float((out.argmax(1) == y_all).sum())
            for x, y in kept:
                n = int(y.shape[0])
                _batch_stats_mode(model)
                buffers = {k: b.clone() for k, b in model.named_buffers()}
                out = torch.func.functional_call(model, (params, buffers), (x,)).float()
                sums["batch_loss"] += float(loss_fn(out, y)) * n
                if classification:
                    sums["batch_hit"] += float((out.argmax(1) == y).sum())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if count == 0:
        return None
    out_values = {
        "val_loss_eval": sums["eval_loss"] / count,
        "val_loss_batch": sums["batch_loss"] / count,
    }
    out_values["gap_loss"] = out_values["val_loss_eval"] - out_values["val_loss_batch"]
    if classification:
        out_values["val_accuracy_eval"] = sums["eval_hit"] / count
        out_values["val_accuracy_batch"] = sums["batch_hit"] / count
        out_values["gap_accuracy"] = (
            out_values["val_accuracy_batch"] - out_values["val_accuracy_eval"]
        )
    return out_values


def gap_is_large(gap: dict[str, float]) -> bool:
    """Whether the gap is large either way: accuracies ``GAP_ACCURACY`` or more apart, or one
    loss ``GAP_LOSS_RATIO`` times the other or more (see the constants for the reasons). Either
    sign is the symptom: the model behaves differently on running and on batch statistics."""
    if abs(gap.get("gap_accuracy", 0.0)) >= GAP_ACCURACY:
        return True
    losses = sorted((gap.get("val_loss_eval", 0.0), gap.get("val_loss_batch", 0.0)))
    return losses[0] > 0 and losses[1] >= GAP_LOSS_RATIO * losses[0]


def gap_warning(
    gap: dict[str, float] | None,
    per_device_batch: int,
    records: list[dict[str, Any]],
    *,
    top: int = 3,
) -> dict[str, str] | None:
    """A warning {"code": "train_eval_gap", "message", "source": "telemetry"} when the gap is
    large (:func:`gap_is_large`) and ``per_device_batch < SMALL_BATCH``, naming the ``top``
    running-statistics layers with the largest ``var_drift`` (then ``mean_drift``) in
    ``records``; None otherwise."""
    if gap is None or per_device_batch >= SMALL_BATCH or not gap_is_large(gap):
        return None

    def moved(r: dict[str, Any]) -> tuple[float, float]:
        return (r.get("var_drift") or 0.0, r.get("mean_drift") or 0.0)

    running = [r for r in records if r.get("source") == "running"]
    names = [str(r["layer"]) for r in sorted(running, key=moved, reverse=True)[:top]]
    gn = gn_advice(int(r.get("channels") or 0) for r in records)
    try_gn = f'GroupNorm (model.norm "{gn}")' if gn is not None else 'LayerNorm (model.norm "ln")'
    acc = ""
    if "gap_accuracy" in gap:
        acc = (
            f"val accuracy {gap['val_accuracy_eval']:.3f} with running statistics vs "
            f"{gap['val_accuracy_batch']:.3f} with batch statistics; "
        )
    message = (
        f"train/eval gap: {acc}val loss {gap['val_loss_eval']:.4f} vs "
        f"{gap['val_loss_batch']:.4f}, at {per_device_batch} samples per device. The running "
        f"statistics moved most in {', '.join(names) or 'no layer'}. Try {try_gn}, "
        "a larger data.batch_size, SyncBN over devices "
        "(resources.sync_bn with resources.gpus > 1), or precise BN "
        "(checkpoint.precise_bn_batches)."
    )
    return {"code": "train_eval_gap", "message": message, "source": "telemetry"}
