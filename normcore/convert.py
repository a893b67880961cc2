"""Model surgery on normalization layers: swap their kind, freeze and unfreeze BN, sync BN.

Every function walks ``named_children`` recursively and replaces layers in place (detectron2's
``convert_frozen_batchnorm`` style); the model (or the replacement, when the model itself is a
norm layer) is returned. A layer registered under several names is converted once and the
replacement shared, so aliasing survives.

Conversions only replace the exact classes they know. A subclass of a norm layer (say a
BatchNorm2d whose forward also applies an activation) may do more than its base, and a
replacement built from the base would silently drop that: such a layer is left in place with
a ``NormConversionWarning`` naming its class and path, or refused with ``strict=True``.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase as _TorchNormBase
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from normcore import layers as L
from normcore.factory import NormSpec, make_norm, parse_norm
from normcore.layers.batchnorm import _BatchNorm, _NormBase
from normcore.layers.instancenorm import _InstanceNorm

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

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    _TorchNormBase,  # torch BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    _NormBase,  # normcore BatchNorm*, SyncBatchNorm, GhostBN, BatchRenorm, InstanceNorm*
    L.GroupNorm,
    L.LayerNorm,
    L.LayerNorm2d,
    L.FrozenBatchNorm2d,
    L.L2Norm,
    L.RMSNorm,
    L.RMSNorm2d,
    L.FilterResponseNorm2d,
    L.EvoNorm2dB0,
    L.EvoNorm2dS0,
)

# every norm class whose forward normcore knows, by exact type: anything else that is a norm
# layer (is_norm_layer) is a user's subclass, which conversions leave alone
_KNOWN: frozenset[type[nn.Module]] = frozenset(
    {
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.RMSNorm,
        L.BatchNorm1d,
        L.BatchNorm2d,
        L.BatchNorm3d,
        L.SyncBatchNorm,
        L.GhostBatchNorm2d,
        L.BatchRenorm2d,
        L.SplitBatchNorm2d,
        L.InstanceNorm1d,
        L.InstanceNorm2d,
        L.InstanceNorm3d,
        L.GroupNorm,
        L.LayerNorm,
        L.LayerNorm2d,
        L.RMSNorm,
        L.RMSNorm2d,
        L.FrozenBatchNorm2d,
        L.L2Norm,
        L.FilterResponseNorm2d,
        L.EvoNorm2dB0,
        L.EvoNorm2dS0,
    }
)


class NormConversionWarning(UserWarning):
    """A norm layer was left unconverted because normcore does not know its class."""


# BatchNorms that convert_sync_norm turns into SyncBatchNorm, by exact type (GhostBN,
# BatchRenorm and SplitBN keep their own training rule, so they are left alone)
_PLAIN_BN: frozenset[type[nn.Module]] = frozenset(
    {
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        L.BatchNorm1d,
        L.BatchNorm2d,
        L.BatchNorm3d,
        L.SyncBatchNorm,
    }
)
# what freeze_norm replaces: 2-D batch norms (SyncBatchNorm assumed to see 4-D input)
_BN2D: frozenset[type[nn.Module]] = frozenset(
    {
        nn.BatchNorm2d,
        nn.SyncBatchNorm,
        L.BatchNorm2d,
        L.SyncBatchNorm,
        L.GhostBatchNorm2d,
        L.BatchRenorm2d,
        L.SplitBatchNorm2d,
    }
)
# batch norms whose affine freeze_norm(stats=False) can freeze (their statistics keep moving)
_ANY_BN: frozenset[type[nn.Module]] = _PLAIN_BN | _BN2D
_UNFROZEN = "_normcore_unfrozen"  # attribute of a FrozenBatchNorm2d: the layer it replaced
_FROZEN_AFFINE = "_normcore_frozen_affine"  # attribute of a BN whose affine freeze_norm froze


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (torch.nn's or normcore's; not Identity)."""
    return isinstance(module, _NORM_TYPES)


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

    A layer made by ``convert_norm``/``convert_sync_norm`` from a dims-specific one (e.g.
    BatchNorm1d -> GroupNorm) remembers the old dims in a ``norm_dims`` attribute.
    """
    remembered = getattr(module, "norm_dims", None)
    if remembered in (1, 2, 3):
        return int(remembered)
    if isinstance(module, nn.LayerNorm | nn.RMSNorm | L.LayerNorm):
        return 1  # channels-last: the (N, C) or (N, L, C) world
    name = type(module).__name__
    for dims in (1, 2, 3):
        if name.endswith(f"{dims}d"):
            return dims
    return 2  # GroupNorm, SyncBatchNorm, L2Norm: conv maps are the common case


def _family(cls: Any) -> str | None:
    """'bn' for plain/sync/ghost batch norm, 'in' for instance norm, else None."""
    if not isinstance(cls, type):
        return None
    if issubclass(cls, _TorchBatchNorm | L.BatchNorm1d | L.BatchNorm2d | L.BatchNorm3d) or (
        issubclass(cls, L.SyncBatchNorm | L.GhostBatchNorm2d)
    ):
        return "bn"
    if issubclass(cls, _TorchInstanceNorm | _InstanceNorm):
        return "in"
    return None


_SPEC_FAMILY = {"bn": "bn", "sync_bn": "bn", "ghost_bn": "bn", "in": "in"}


def _target_info(spec: NormSpec) -> tuple[set[str], dict[str, Any], str | None, bool]:
    """(keywords the target accepts, keywords the spec sets, target family, is L2Norm)."""
    parsed = parse_norm(spec)
    if parsed.entry is not None:
        entry = parsed.entry
        fn: Callable[..., Any] = entry.signature() if entry.signature is not None else entry.builder
        family = _SPEC_FAMILY.get(entry.name)
        is_l2 = entry.name == "l2"
    else:
        assert parsed.target is not None
        fn = parsed.target
        family = _family(fn)
        is_l2 = isinstance(fn, type) and issubclass(fn, L.L2Norm)
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
    same_family = family is not None and family == _family(type(old))
    out: dict[str, Any] = {}
    if not isinstance(old, L.L2Norm) and not to_l2:  # L2Norm's eps clamps a norm, not a variance
        eps = getattr(old, "eps", None)
        if isinstance(eps, float | int) and not isinstance(eps, bool):
            out["eps"] = float(eps)
    affine = getattr(old, "affine", getattr(old, "elementwise_affine", None))
    if isinstance(affine, bool) and not isinstance(old, L.FrozenBatchNorm2d):
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
    if not isinstance(new, L.Identity | nn.Identity) and norm_dims(new) != norm_dims(old):
        new.norm_dims = norm_dims(old)


def _unknown_subclasses(
    model: nn.Module, bases: tuple[type[nn.Module], ...], known: frozenset[type[nn.Module]]
) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module that is an instance of ``bases`` but not a known class."""
    return [
        (name or "<model>", m)
        for name, m in model.named_modules()
        if isinstance(m, bases) and type(m) not in known
    ]


def _report_unknown(what: str, found: list[tuple[str, nn.Module]], strict: bool) -> None:
    """Warn about (or, with ``strict``, refuse) the layers ``what`` leaves unconverted."""
    if not found:
        return
    names = ", ".join(
        f"{path!r} ({type(m).__module__}.{type(m).__qualname__})" for path, m in found
    )
    bases = sorted({c.__name__ for _, m in found for c in type(m).__mro__[1:] if c in _KNOWN})
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


def _replace(
    module: nn.Module, fn: Callable[[nn.Module], nn.Module | None], memo: dict[int, nn.Module]
) -> nn.Module:
    """Return ``fn(module)`` if it gives a replacement, else convert the children in place."""
    if id(module) in memo:
        return memo[id(module)]
    new = fn(module)
    if new is not None:
        memo[id(module)] = new
        return new
    memo[id(module)] = module
    for name, child in list(module.named_children()):
        replacement = _replace(child, fn, memo)
        if replacement is not child:
            setattr(module, name, replacement)
    return module


def convert_norm(
    model: nn.Module, to: NormSpec = "gn", *, dims: int | None = None, strict: bool = False
) -> nn.Module:
    """Replace every norm layer in ``model`` with the kind ``to`` describes (any make_norm spec).

    Channels come from each old layer; ``dims`` defaults to the old layer's (BatchNorm1d -> 1,
    LayerNorm -> 1, ...). Device, dtype, training flag, eps, affine and, where both kinds have
    them with equal shapes, the affine parameters (shared) and running statistics (copied) are
    kept; momentum and track_running_stats too when both are batch norms (or both instance
    norms). Keywords set in the spec win.

    Args:
        model: the model (converted in place) or a single norm layer.
        to: the new norm, e.g. ``"gn:8"``, ``"bn"``, ``"frozen_bn"``, ``nn.BatchNorm2d``.
        dims: force 1, 2 or 3 for every replacement.
        strict: raise ValueError, instead of warning, for a norm subclass normcore does not
            know (such layers are never replaced).

    Returns:
        ``model``, or the replacement if ``model`` itself is a norm layer.
    """
    parse_norm(to)  # fail on a bad spec before touching the model
    _report_unknown("convert_norm", _unknown_subclasses(model, _NORM_TYPES, _KNOWN), strict)

    def swap(m: nn.Module) -> nn.Module | None:
        if not is_norm_layer(m) or type(m) not in _KNOWN:
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

    return _replace(model, swap, {})


def convert_sync_norm(
    module: nn.Module, process_group: Any = None, *, strict: bool = False
) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (torch.nn's and normcore's) and SyncBatchNorm with
    normcore's SyncBatchNorm on ``process_group``, sharing parameters and buffers (device,
    dtype, requires_grad, training flag, small-batch policy kept). GhostBN, BatchRenorm and
    SplitBN are left alone; a BatchNorm subclass normcore does not know is left in place with a
    ``NormConversionWarning`` (ValueError with ``strict=True``)."""
    bases = (_TorchBatchNorm, L.BatchNorm1d, L.BatchNorm2d, L.BatchNorm3d, L.SyncBatchNorm)
    _report_unknown("convert_sync_norm", _unknown_subclasses(module, bases, _KNOWN), strict)

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in _PLAIN_BN:
            return None
        affine = bool(m.affine)
        new = L.SyncBatchNorm(
            m.num_features,
            m.eps,
            m.momentum,
            affine,
            m.track_running_stats,
            process_group,
            bias=not affine or m.bias is not None,
            device="meta",  # every tensor is replaced by the old layer's own below
            small_batch=getattr(m, "small_batch", "error"),
        )
        for name in ("weight", "bias"):
            if name in new._parameters:
                setattr(new, name, getattr(m, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(m, name))
        if hasattr(m, "qconfig"):
            new.qconfig = m.qconfig
        _remember_dims(m, new)
        return new.train(m.training)

    return _replace(module, swap, {})


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

    ``unfreeze_norm`` undoes each mode and gives back the original kind (its class, momentum,
    eps and other settings). A batch norm subclass normcore does not know is left in place
    with a ``NormConversionWarning`` (ValueError with ``strict=True``). Raises ValueError for a
    BN without running statistics, or when neither ``stats`` nor ``affine`` is asked for.
    """
    if not stats and not affine:
        raise ValueError("freeze_norm: nothing to freeze; pass stats=True and/or affine=True")
    known = _BN2D if stats else _ANY_BN
    if stats:
        bases: tuple[type[nn.Module], ...] = (
            nn.BatchNorm2d,
            nn.SyncBatchNorm,
            L.BatchNorm2d,
            L.SyncBatchNorm,
            L.GhostBatchNorm2d,
            L.BatchRenorm2d,
        )
    else:
        bases = (_TorchBatchNorm, _BatchNorm)
    _report_unknown("freeze_norm", _unknown_subclasses(model, bases, _KNOWN), strict)

    if not stats:
        for m in model.modules():
            if type(m) in known and getattr(m, "weight", None) is not None:
                flags = {n: p.requires_grad for n, p in m.named_parameters(recurse=True)}
                for p in m.parameters():
                    p.requires_grad_(False)
                setattr(m, _FROZEN_AFFINE, flags)
        return model

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) not in known:
            return None
        frozen = L.FrozenBatchNorm2d.from_batchnorm(m)
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

    return _replace(model, swap, {})


def unfreeze_norm(model: nn.Module) -> nn.Module:
    """Undo ``freeze_norm``: every FrozenBatchNorm2d becomes a trainable batch norm again.

    A layer ``freeze_norm`` froze comes back as its original kind (class, momentum, eps, and
    every other setting, e.g. GhostBN's virtual batch size), holding the frozen layer's
    current statistics and affine values, on its device and dtype. A FrozenBatchNorm2d built
    any other way (e.g. loaded from a checkpoint) becomes a normcore BatchNorm2d with its eps
    and, if ``freeze_norm`` left one, its momentum. Affine parameters frozen with
    ``stats=False`` get their ``requires_grad`` back.
    """
    for m in model.modules():
        flags = m.__dict__.pop(_FROZEN_AFFINE, None)
        if flags is not None:
            for name, p in m.named_parameters(recurse=True):
                p.requires_grad_(flags.get(name, True))

    def swap(m: nn.Module) -> nn.Module | None:
        if type(m) is not L.FrozenBatchNorm2d:
            return None
        ref = m.running_mean
        original = m.__dict__.get(_UNFROZEN)
        if original is not None:
            bn = original.to(device=ref.device, dtype=ref.dtype)
        else:
            identity_affine = bool((m.weight == 1).all() and (m.bias == 0).all())
            # an affine=False BN froze to weight 1, bias 0; anything else needs affine
            affine = bool(getattr(m, "affine", True)) or not identity_affine
            bn = L.BatchNorm2d(
                m.num_features,
                eps=m.eps,
                momentum=getattr(m, "momentum", 0.1),
                affine=affine,
                device=ref.device,
                dtype=ref.dtype,
            )
        _transfer_state(m, bn)
        return bn.train(m.training)

    return _replace(model, swap, {})
