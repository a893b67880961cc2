"""Model surgery on normalization layers: swap their kind, freeze and unfreeze BN, sync BN.

Every function walks the model (detectron2's ``convert_frozen_batchnorm`` style) and replaces
layers in place; the model (or the replacement, when the model itself is a norm layer) is
returned. A layer registered under several names is converted once and the replacement shared,
so aliasing survives.

All or nothing: every replacement is checked and built before the model is touched
(``normcore._surgery``), so an error (a channel count the new kind cannot take, a BN without
running statistics to freeze) leaves the model exactly as it was: its modules, parameters,
buffers and state dict.

Which layers are norms, of which kind, and what can become what, is the table in
``normcore.registry`` (a kind you register takes part). Conversions only replace the exact
classes registered there. A subclass of a norm layer (say a BatchNorm2d whose forward also
applies an activation) may do more than its base, and a replacement built from the base would
silently drop that: such a layer is left in place with a ``NormConversionWarning`` naming its
class and path, or refused with ``strict=True``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from normcore import registry
from normcore._surgery import Swap, replace_modules
from normcore.factory import NormSpec, make_norm, parse_norm
from normcore.layers import BatchNorm2d, FrozenBatchNorm2d, Identity, L2Norm, SyncBatchNorm
from normcore.registry import NormKind, is_norm_layer

__all__ = [
    "NormConversionWarning",
    "convert_norm",
    "convert_sync_norm",
    "freeze_norm",
    "is_norm_layer",
    "norm_channels",
    "norm_dims",
    "unfreeze_norm",
]


class NormConversionWarning(UserWarning):
    """A norm layer was left unconverted because normcore does not know its class."""


_UNFROZEN = "_normcore_unfrozen"  # attribute of a FrozenBatchNorm2d: the layer it replaced
_FROZEN_AFFINE = "_normcore_frozen_affine"  # attribute of a BN whose affine freeze_norm froze


def _convertible(kind: NormKind) -> bool:
    """convert_norm replaces the layers of every per-channel kind."""
    return kind.per_channel


def _syncable(kind: NormKind) -> bool:
    return kind.syncable


def _trainable_bn(kind: NormKind) -> bool:
    """Batch norms whose statistics move in training (BatchNorm's eval forward, batch statistics
    in training): what freeze_norm freezes."""
    return kind.foldable and kind.batch_stats


def _frozen_2d(cls: type) -> bool:
    """What freeze_norm(stats=True) replaces: 2-D (or any-rank, e.g. SyncBatchNorm, assumed to
    see 4-D input) trainable batch norms."""
    kind = registry.kind_of(cls)
    return kind is not None and _trainable_bn(kind) and registry.class_dims(cls) in (2, None)


def norm_channels(module: nn.Module) -> int:
    """Number of channels a norm layer normalizes (num_features / num_channels / normalized_shape)."""
    for attr in ("num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        shape = tuple(shape)
        if len(shape) == 1:
            return int(shape[0])
        raise ValueError(
            f"cannot infer a channel count from {module!r}: normalized_shape {shape} spans "
            "more than one dimension"
        )
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 1:
        return weight.numel()
    raise ValueError(f"cannot infer the channel count of {type(module).__name__}")


def norm_dims(module: nn.Module) -> int:
    """Spatial dims a norm layer is built for: BatchNorm1d -> 1, LayerNorm -> 1, else 2 or 3.

    From the registry's table (each class with the dims it is built for). A layer made by
    ``convert_norm``/``convert_sync_norm`` from a dims-specific one (e.g. BatchNorm1d ->
    GroupNorm) remembers the old dims in a ``norm_dims`` attribute.
    """
    remembered = getattr(module, "norm_dims", None)
    if remembered in (1, 2, 3):
        return int(remembered)
    dims = registry.class_dims(module)
    if dims is not None:
        return dims
    name = type(module).__name__
    for d in (1, 2, 3):
        if name.endswith(f"{d}d"):
            return d
    return 2  # GroupNorm, SyncBatchNorm, L2Norm: conv maps are the common case


def _family(cls: Any) -> str | None:
    """The registry family of a class ("batch", "instance", ...), by its nearest registered
    class; None for anything else."""
    if not isinstance(cls, type):
        return None
    kind = registry.kind_of(cls, exact=False)
    return None if kind is None else kind.family


def _target_info(spec: NormSpec) -> tuple[set[str], dict[str, Any], str | None, bool]:
    """(keywords the target accepts, keywords the spec sets, target family, is L2Norm)."""
    parsed = parse_norm(spec)
    if parsed.entry is not None:
        entry = parsed.entry
        fn: Callable[..., Any] = entry.signature() if entry.signature is not None else entry.builder
        family: str | None = entry.family
        is_l2 = entry.family == "l2"
    else:
        assert parsed.target is not None
        fn = parsed.target
        family = _family(fn)
        is_l2 = isinstance(fn, type) and issubclass(fn, L2Norm)
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {p.name for p in params if p.kind in kinds}
    return accepted, dict(parsed.kwargs), family, is_l2


def _carried_kwargs(old: nn.Module, spec: NormSpec) -> dict[str, Any]:
    """Constructor keywords to take over from ``old``: those the target accepts and the spec
    leaves unset. eps and affine always; momentum and track_running_stats within a family."""
    accepted, given, family, to_l2 = _target_info(spec)
    same_family = family in ("batch", "instance") and family == _family(type(old))
    out: dict[str, Any] = {}
    if not isinstance(old, L2Norm) and not to_l2:  # L2Norm's eps clamps a norm, not a variance
        eps = getattr(old, "eps", None)
        if isinstance(eps, float | int) and not isinstance(eps, bool):
            out["eps"] = float(eps)
    affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))
    if isinstance(affine, bool) and not isinstance(old, FrozenBatchNorm2d):
        out["affine"] = out["elementwise_affine"] = affine
        if affine and getattr(old, "bias", None) is None:
            out["bias"] = False
    if same_family:
        if hasattr(old, "momentum"):
            out["momentum"] = old.momentum
        if isinstance(getattr(old, "track_running_stats", None), bool):
            out["track_running_stats"] = old.track_running_stats
    return {k: v for k, v in out.items() if k in accepted and k not in given}


def _like(old: nn.Module) -> Tensor | None:
    """A floating tensor of ``old`` giving the device and dtype the replacement should use."""
    for t in (*old.parameters(recurse=False), *old.buffers(recurse=False)):
        if t.is_floating_point():
            return t
    return None


@torch.no_grad()
def _transfer_state(old: nn.Module, new: nn.Module) -> None:
    """Move affine parameters and running statistics from ``old`` to ``new`` where both have
    them with equal shapes. Parameters are shared (optimizers keep working); into a buffer,
    or from a buffer, values are copied."""
    for name in ("weight", "bias"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if not isinstance(src, Tensor) or not isinstance(dst, Tensor) or src.shape != dst.shape:
            continue
        if isinstance(src, nn.Parameter) and name in new._parameters:
            setattr(new, name, src)
        else:
            dst.copy_(src.detach())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, Tensor) and isinstance(dst, Tensor) and src.shape == dst.shape:
            dst.copy_(src)


def _remember_dims(old: nn.Module, new: nn.Module) -> None:
    """Record ``old``'s dims on ``new`` when ``new``'s class does not say it (GroupNorm, ...)."""
    if not isinstance(new, Identity | nn.Identity) and norm_dims(new) != norm_dims(old):
        new.norm_dims = norm_dims(old)


def _unknown_subclasses(
    model: nn.Module, bases: frozenset[type[nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module that is an instance of one of ``bases`` but whose own
    class is of no registered kind: a subclass normcore does not know."""
    if not bases:
        return []
    classes = tuple(bases)
    return [
        (name or "<model>", m)
        for name, m in model.named_modules()
        if isinstance(m, classes) and registry.kind_of(m) is None
    ]


def _report_unknown(what: str, found: list[tuple[str, nn.Module]], strict: bool) -> None:
    """Warn about (or, with ``strict``, refuse) the layers ``what`` leaves unconverted."""
    if not found:
        return
    names = ", ".join(
        f"{path!r} ({type(m).__module__}.{type(m).__qualname__})" for path, m in found
    )
    bases = sorted(
        {c.__name__ for _, m in found for c in type(m).__mro__[1:] if registry.kind_of(c)}
    )
    message = (
        f"{what}: {len(found)} layer(s) subclass a norm class normcore knows "
        f"({', '.join(bases) or 'a norm base'}) but are not one: {names}. Their forward may do "
        "more than the base (an activation, a different statistic), which a replacement would "
        "drop, so they are left as they are; convert them yourself"
    )
    if strict:
        raise ValueError(message + ".")
    warnings.warn(
        message + ", or pass strict=True to make this an error.",
        NormConversionWarning,
        stacklevel=3,
    )


def convert_norm(
    model: nn.Module, to: NormSpec = "gn", *, dims: int | None = None, strict: bool = False
) -> nn.Module:
    """Replace every norm layer in ``model`` with the kind ``to`` describes (any make_norm spec).

    Channels come from each old layer; ``dims`` defaults to the old layer's (BatchNorm1d -> 1,
    LayerNorm -> 1, ...). Device, dtype, training flag, eps, affine and, where both kinds have
    them with equal shapes, the affine parameters (shared) and running statistics (copied) are
    kept; momentum and track_running_stats too when both are batch norms (or both instance
    norms). Keywords set in the spec win. Every replacement is built before any is put in: if
    one cannot be (``"gn:32"`` for a 72-channel layer), the ValueError leaves ``model`` as it
    was.

    Args:
        model: the model (converted in place) or a single norm layer.
        to: the new norm, e.g. ``"gn:8"``, ``"bn"``, ``"frozen_bn"``, ``nn.BatchNorm2d``.
        dims: force 1, 2 or 3 for every replacement.
        strict: raise ValueError, instead of warning, for a norm subclass normcore does not
            know (such layers are never replaced).

    Returns:
        ``model``, or the replacement if ``model`` itself is a norm layer.
    """
    parse_norm(to)  # fail on a bad spec before looking at the model
    convertible = registry.kind_classes(_convertible)
    _report_unknown("convert_norm", _unknown_subclasses(model, convertible), strict)

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in convertible:
            return None
        new = make_norm(
            to,
            norm_channels(m),
            dims=norm_dims(m) if dims is None else dims,
            **_carried_kwargs(m, to),
        )
        ref = _like(m)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        _transfer_state(m, new)
        _remember_dims(m, new)
        return new.train(m.training)

    return replace_modules(model, swap)


def convert_sync_norm(
    module: nn.Module, process_group: Any = None, *, strict: bool = False
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch.nn's and normcore's) and SyncBatchNorm, and every
    layer of a kind registered as syncable, with normcore's SyncBatchNorm on ``process_group``,
    sharing parameters and buffers (device, dtype, requires_grad, training flag, small-batch
    policy kept). GhostBN, BatchRenorm and SplitBN are left alone (they keep their own training
    rule); a BatchNorm subclass normcore does not know is left in place with a
    ``NormConversionWarning`` (ValueError with ``strict=True``). The same conversion as
    ``normcore.SyncBatchNorm.convert_sync_batchnorm``; all or nothing, as every conversion."""
    syncable = registry.kind_classes(_syncable)
    _report_unknown("convert_sync_norm", _unknown_subclasses(module, syncable), strict)
    return SyncBatchNorm.convert_sync_batchnorm(module, process_group)


def freeze_norm(
    model: nn.Module, stats: bool = True, affine: bool = True, *, strict: bool = False
) -> nn.Module:
    """Freeze the batch norms of ``model``: their statistics, their affine parameters, or both.

    - ``stats=True, affine=True`` (default): every 2-D BatchNorm (BatchNorm2d, SyncBatchNorm,
      GhostBN, BatchRenorm, SplitBN; torch.nn's and normcore's) becomes a FrozenBatchNorm2d
      carrying its statistics, affine and eps as buffers: no gradients, no updates.
    - ``stats=True, affine=False`` (fine-tuning): the same FrozenBatchNorm2d, but ``weight`` and
      ``bias`` stay the old layer's trainable Parameters (optimizers keep working). The
      statistics never move, however often ``model.train()`` is called; gamma and beta train.
    - ``stats=False, affine=True``: every batch norm (1-d, 2-d and 3-d) keeps updating its
      statistics in training, but its weight and bias get ``requires_grad=False``.

    The batch norms are the layers of the registry's kinds that fold like BatchNorm and use
    batch statistics. ``unfreeze_norm`` undoes each mode and gives back the original kind (its class,
    momentum, eps and other settings). A batch norm subclass normcore does not know is left in
    place with a ``NormConversionWarning`` (ValueError with ``strict=True``). Raises ValueError
    for a BN without running statistics (leaving the model as it was), or when neither
    ``stats`` nor ``affine`` is asked for.
    """
    if not stats and not affine:
        raise ValueError("freeze_norm: nothing to freeze; pass stats=True and/or affine=True")
    trainable = registry.kind_classes(_trainable_bn)
    known = frozenset(c for c in trainable if _frozen_2d(c)) if stats else trainable
    _report_unknown("freeze_norm", _unknown_subclasses(model, known), strict)

    if not stats:
        layers = [
            m
            for m in dict.fromkeys(model.modules())
            if type(m) in known and getattr(m, "weight", None) is not None
        ]
        flags = [{n: p.requires_grad for n, p in m.named_parameters(recurse=True)} for m in layers]
        for m, flag in zip(layers, flags, strict=True):
            for p in m.parameters():
                p.requires_grad_(False)
            setattr(m, _FROZEN_AFFINE, flag)
        return model

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in known:
            return None
        frozen = FrozenBatchNorm2d.from_batchnorm(m)
        if not affine:
            # keep the old layer's Parameters: gamma and beta go on training
            for name in ("weight", "bias"):
                param = getattr(m, name, None)
                if isinstance(param, nn.Parameter):
                    delattr(frozen, name)
                    frozen.register_parameter(name, param)
        frozen.momentum = m.momentum
        frozen.affine = bool(m.affine)
        # the layer itself, unregistered (not in state_dict or modules()): unfreeze_norm
        # gives it back with its class and settings
        object.__setattr__(frozen, _UNFROZEN, m)
        return frozen.train(m.training)

    return replace_modules(model, swap)


def unfreeze_norm(model: nn.Module) -> nn.Module:
    """Undo ``freeze_norm``: every FrozenBatchNorm2d becomes a trainable batch norm again.

    A layer ``freeze_norm`` froze comes back as its original kind (class, momentum, eps, and
    every other setting, e.g. GhostBN's virtual batch size), holding the frozen layer's
    current statistics and affine values, on its device and dtype. A FrozenBatchNorm2d built
    any other way (e.g. loaded from a checkpoint) becomes a normcore BatchNorm2d with its eps
    and, if ``freeze_norm`` left one, its momentum. Affine parameters frozen with
    ``stats=False`` get their ``requires_grad`` back. All or nothing: the new layers are built
    before the model (or the layers it held before freezing) is touched.
    """

    def swap(m: nn.Module) -> nn.Module | Swap | None:
        if type(m) is not FrozenBatchNorm2d:
            return None
        ref = m.running_mean
        original = m.__dict__.get(_UNFROZEN)
        if original is not None:
            # the original is the model's again only at the commit: move and fill it there

            def restore(frozen: nn.Module = m, bn: nn.Module = original) -> None:
                bn.to(device=frozen.running_mean.device, dtype=frozen.running_mean.dtype)
                _transfer_state(frozen, bn)
                bn.train(frozen.training)

            return Swap(original, restore)
        identity_affine = bool((m.weight == 1).all() and (m.bias == 0).all())
        # an affine=False BN froze to weight 1, bias 0; anything else needs affine
        affine = bool(getattr(m, "affine", True)) or not identity_affine
        bn = BatchNorm2d(
            m.num_features,
            eps=m.eps,
            momentum=getattr(m, "momentum", 0.1),
            affine=affine,
            device=ref.device,
            dtype=ref.dtype,
        )
        _transfer_state(m, bn)
        return bn.train(m.training)

    result = replace_modules(model, swap)
    for m in result.modules():
        flags = m.__dict__.pop(_FROZEN_AFFINE, None)
        if flags is not None:
            for name, p in m.named_parameters(recurse=True):
                p.requires_grad_(flags.get(name, True))
    return result
