"""The one table of norm kinds: everything normcore knows about each kind of norm layer.

A ``NormKind`` per name says how to build the kind (what ``make_norm`` and a job spec's
``model.norm`` call), which classes are of that kind (normcore's and their torch.nn twins, by
exact type, each with the input dims it is built for), and what the other parts may do with
its layers:

- ``family``: "batch" (BatchNorm, SyncBatchNorm, GhostBN, SplitBN), "renorm", "frozen",
  "instance", "group", "layer", "rms", ...; ``convert_norm`` carries momentum and
  track_running_stats within the batch and instance families.
- ``batch_stats``: normalizes with batch statistics in training (cannot train on batches of one
  sample; a conv before it needs no bias; ``fuse_conv_bn`` refuses it in training mode).
- ``foldable``: its eval forward is ``(x - running_mean) / sqrt(running_var + eps) * weight +
  bias``, so ``fuse_conv_bn`` folds it into the conv or linear before it.
- ``syncable``: ``convert_sync_norm`` (and ``SyncBatchNorm.convert_sync_batchnorm``) turns it
  into a SyncBatchNorm with the same parameters and buffers.
- ``recalibratable``: ``recalibrate_bn`` recomputes its running statistics (it updates them in
  training with ``momentum``, ``momentum=None`` being the cumulative average, as BatchNorm).
- ``per_channel``: it has a channel count and per-channel state, so ``convert_norm`` can swap
  it and ``norm_stats`` reports it (False for LocalResponseNorm, whose window spans channels).
- ``dims``: the input dims (1: (N, C) or (N, C, L); 2: (N, C, H, W); 3: volumes) the factory
  builds it for.

The factory (``normcore.factory``), the conversions (``normcore.convert``), folding
(``normcore.fuse``) and statistics (``normcore.stats``) all read this table; a kind added with
``normcore.register_norm`` takes part in all of them. Conversions, folding and syncing act on
exact classes: a subclass normcore does not know may do more in its forward (an activation)
and is left alone with a warning, unless it is registered itself.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase as _TorchNormBase
from torch.nn.modules.instancenorm import _InstanceNorm as _TorchInstanceNorm

from normcore import layers as L
from normcore.layers import syncbn as _syncbn

__all__ = [
    "DEFAULT_GROUPS",
    "NormKind",
    "add_kind",
    "available_norms",
    "class_dims",
    "get_kind",
    "is_norm_layer",
    "kind_classes",
    "kind_of",
    "kinds",
    "lookup_kind",
    "norm_kind",
]

DEFAULT_GROUPS = 32  # Wu & He (2018): 32 groups


@dataclass(frozen=True, eq=False)
class NormKind:
    """One kind of norm: its names, how to build it, its classes and what may be done with it.

    ``builder(num_channels, dims=..., **kwargs)`` when ``takes_dims``, else
    ``builder(num_channels, **kwargs)``. ``arg`` is the keyword the ``"name:value"`` form sets;
    ``signature()`` returns the callable whose signature lists the accepted keywords; ``check``
    raises ValueError for keyword values (and a channel count) the layer cannot take. ``classes``
    maps every class of this kind (normcore's and torch.nn's twins, exact types) to the input dims
    it is built for, or None when it takes any. See the module docstring for the flags.
    """

    name: str
    builder: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()
    classes: Mapping[type[nn.Module], int | None] = field(default_factory=dict)
    family: str = "other"
    batch_stats: bool = False
    foldable: bool = False
    syncable: bool = False
    recalibratable: bool = False
    per_channel: bool = True
    dims: tuple[int, ...] = (1, 2, 3)
    arg: str | None = None
    takes_dims: bool = False
    signature: Callable[[], Callable[..., Any]] | None = None
    check: Callable[[dict[str, Any], int | None], None] | None = None

    def class_for(self, dims: int) -> type[nn.Module]:
        """The first class of this kind built for ``dims`` (normcore's, listed first)."""
        for cls, d in self.classes.items():
            if d == dims:
                return cls
        raise ValueError(f"norm {self.name!r} has no layer for dims={dims}")


_REGISTRY: dict[str, NormKind] = {}  # canonical name -> kind
_LOOKUP: dict[str, str] = {}  # normalized name or alias -> canonical name
_BY_CLASS: dict[type[nn.Module], str] = {}  # class -> canonical name of its kind


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name).lower()


def _index_classes() -> None:
    """Rebuild the class index: each class belongs to the first kind that lists it."""
    _BY_CLASS.clear()
    for kind in _REGISTRY.values():
        for cls in kind.classes:
            _BY_CLASS.setdefault(cls, kind.name)


def add_kind(kind: NormKind, *, override: bool = False) -> None:
    """Add ``kind`` to the table; with ``override`` it replaces the kind of the same name.

    Raises ValueError when one of its names or aliases already names another kind. A class
    already listed by an earlier kind keeps that kind.
    """
    keys = {_key(kind.name), *(_key(a) for a in kind.aliases)}
    if not override:
        taken = sorted(k for k in keys if k in _LOOKUP)
        if taken:
            raise ValueError(
                f"cannot register norm {kind.name!r}: {', '.join(taken)} already names "
                f"{_LOOKUP[taken[0]]!r}; pass override=True to replace it"
            )
    else:
        old = _REGISTRY.pop(kind.name, None)
        if old is not None:
            for alias in (old.name, *old.aliases):
                _LOOKUP.pop(_key(alias), None)
    _REGISTRY[kind.name] = kind
    for k in keys:
        _LOOKUP[k] = kind.name
    _index_classes()


def available_norms() -> list[str]:
    """Canonical names of every registered norm, sorted."""
    return sorted(_REGISTRY)


def kinds() -> list[NormKind]:
    """Every registered kind, in registration order."""
    return list(_REGISTRY.values())


def lookup_kind(name: str) -> NormKind | None:
    """The kind ``name`` (or an alias; case, ``_`` and ``-`` ignored) names, or None."""
    canonical = _LOOKUP.get(_key(name))
    return None if canonical is None else _REGISTRY[canonical]


def get_kind(name: str) -> NormKind:
    """The kind ``name`` names; ValueError listing the valid names (and the closest) if none."""
    kind = lookup_kind(name)
    if kind is None:
        valid = ", ".join(available_norms())
        close = difflib.get_close_matches(_key(name), list(_LOOKUP), n=1, cutoff=0.6)
        hint = f"; did you mean {_LOOKUP[close[0]]!r}?" if close else ""
        raise ValueError(f"unknown norm {name!r}; valid: {valid}{hint}")
    return kind


def norm_kind(spec: str) -> NormKind:
    """The kind a name or alias names (``norm_kind("batch").syncable``); ValueError if none."""
    return get_kind(spec)


def kind_of(obj: nn.Module | type, *, exact: bool = True) -> NormKind | None:
    """The kind of a layer or class: of its exact class, or with ``exact=False`` of the nearest
    registered class in its MRO (a subclass of BatchNorm2d is then of kind "bn")."""
    cls = obj if isinstance(obj, type) else type(obj)
    name = _BY_CLASS.get(cls)
    if name is None and not exact:
        name = next((_BY_CLASS[c] for c in cls.__mro__[1:] if c in _BY_CLASS), None)
    return None if name is None else _REGISTRY.get(name)


def kind_classes(predicate: Callable[[NormKind], bool]) -> frozenset[type[nn.Module]]:
    """Every class of every kind ``predicate`` accepts (e.g. ``lambda k: k.foldable``)."""
    return frozenset(cls for kind in _REGISTRY.values() if predicate(kind) for cls in kind.classes)


def class_dims(obj: nn.Module | type) -> int | None:
    """The input dims a layer's class is built for (BatchNorm1d and LayerNorm: 1), or None."""
    cls = obj if isinstance(obj, type) else type(obj)
    for c in cls.__mro__:
        name = _BY_CLASS.get(c)
        if name is not None:
            return _REGISTRY[name].classes.get(c)
    return None


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer with a channel count: a layer of a registered
    per-channel kind (torch.nn's twins included) or of a subclass of one, or any subclass of
    torch.nn's BatchNorm/InstanceNorm base. Not Identity, not LocalResponseNorm."""
    if isinstance(module, _TorchNormBase):
        return True
    kind = kind_of(module, exact=False)
    return kind is not None and kind.per_channel


def is_syncable(module: nn.Module) -> bool:
    """Whether ``module``'s exact class is of a syncable kind (convert_sync_norm replaces it)."""
    kind = kind_of(module)
    return kind is not None and kind.syncable


def default_family(classes: Iterable[type]) -> str | None:
    """The family of classes of torch's BatchNorm ("batch") or InstanceNorm ("instance") bases;
    None for others."""
    classes = list(classes)
    if classes and all(issubclass(c, _TorchBatchNorm) for c in classes):
        return "batch"
    if classes and all(issubclass(c, _TorchInstanceNorm) for c in classes):
        return "instance"
    return None


# --------------------------------------------------------------------------- argument checks


def _need_int(label: str, key: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label}: {key} must be an integer >= {low}, got {value!r}")
    return value


def default_groups(num_channels: int) -> int:
    """32 groups, or the largest divisor of num_channels below 32 when 32 does not divide it."""
    if num_channels % DEFAULT_GROUPS == 0:
        return DEFAULT_GROUPS
    return max(d for d in range(1, min(DEFAULT_GROUPS, num_channels) + 1) if num_channels % d == 0)


def _check_gn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_groups" not in kwargs:
        return
    groups = _need_int("norm 'gn'", "num_groups", kwargs["num_groups"])
    if num_channels is not None and num_channels % groups != 0:
        raise ValueError(
            f"gn:{groups} needs num_channels divisible by {groups}, got {num_channels}; "
            f"divisors of {num_channels}: "
            f"{', '.join(str(d) for d in range(1, num_channels + 1) if num_channels % d == 0)}"
        )


def _check_ghost(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "virtual_batch_size" in kwargs:
        _need_int("norm 'ghost_bn'", "virtual_batch_size", kwargs["virtual_batch_size"], low=2)


def _check_brn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    for key, low in (("r_max", 1.0), ("d_max", 0.0)):
        value = kwargs.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
            raise ValueError(f"norm 'brn': {key} must be a number >= {low:g}, got {value!r}")
    for key in ("warmup_steps", "warmup_start"):
        if key in kwargs:
            _need_int("norm 'brn'", key, kwargs[key], low=0)


def _check_l2(kwargs: dict[str, Any], num_channels: int | None) -> None:
    value = kwargs.get("scale", 1.0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"norm 'l2': scale must be a number, got {value!r}")


def _check_evo_s0(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_groups" not in kwargs:
        return
    groups = _need_int("norm 'evo_s0'", "num_groups", kwargs["num_groups"])
    if num_channels is not None and num_channels % groups != 0:
        raise ValueError(
            f"evo_s0:{groups} needs num_channels divisible by {groups}, got {num_channels}"
        )


def _check_split(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "num_splits" in kwargs:
        _need_int("norm 'split_bn'", "num_splits", kwargs["num_splits"], low=2)


def _check_lrn(kwargs: dict[str, Any], num_channels: int | None) -> None:
    if "size" in kwargs:
        _need_int("norm 'lrn'", "size", kwargs["size"])


# --------------------------------------------------------------------------- built-in kinds

# class -> input dims; normcore's classes first (the factory builds the first one per dims)
_BN = {L.BatchNorm1d: 1, L.BatchNorm2d: 2, L.BatchNorm3d: 3}
_BN_TWINS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}
_IN = {L.InstanceNorm1d: 1, L.InstanceNorm2d: 2, L.InstanceNorm3d: 3}
_IN_TWINS = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}


def _dims_builder(kind_name: str) -> Callable[..., nn.Module]:
    def build(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
        return get_kind(kind_name).class_for(dims)(num_channels, **kwargs)

    build.__name__ = f"build_{kind_name}"
    return build


def _build_gn(num_channels: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    groups = default_groups(num_channels) if num_groups is None else num_groups
    return L.GroupNorm(groups, num_channels, **kwargs)


def _build_rms(num_channels: int, dims: int = 2, **kwargs: Any) -> nn.Module:
    if dims == 1:
        return L.RMSNorm(num_channels, **kwargs)
    if kwargs.get("eps", 0.0) is None:
        kwargs.pop("eps")  # "rms" on a map: RMSNorm2d's own default eps (1e-6)
    return L.RMSNorm2d(num_channels, **kwargs)


def _build_lrn(num_channels: int, size: int = 5, **kwargs: Any) -> nn.Module:
    # the window is over channels, so the channel count itself is not a parameter
    return L.LocalResponseNorm(size, **kwargs)


def _build_evo_s0(num_channels: int, num_groups: int | None = None, **kwargs: Any) -> nn.Module:
    groups = default_groups(num_channels) if num_groups is None else num_groups
    return L.EvoNorm2dS0(num_channels, groups, **kwargs)


def _class(cls: type[nn.Module]) -> Callable[[], Callable[..., Any]]:
    return lambda: cls


def _gn_signature(
    num_channels: int,
    num_groups: int | None = None,
    eps: float = 1e-5,
    affine: bool = True,
    device: Any = None,
    dtype: Any = None,
    *,
    bias: bool = True,
) -> None: ...


def _ln_signature(
    num_channels: int,
    eps: float = 1e-5,
    elementwise_affine: bool = True,
    bias: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> None: ...


def _rms_signature(
    num_channels: int,
    eps: float | None = None,
    elementwise_affine: bool = True,
    device: Any = None,
    dtype: Any = None,
) -> None: ...


def _lrn_signature(
    num_channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0
) -> None: ...


def _evo_s0_signature(
    num_channels: int,
    num_groups: int | None = None,
    eps: float = 1e-5,
    device: Any = None,
    dtype: Any = None,
) -> None: ...


def _builtin_kinds() -> list[NormKind]:
    batch = {"family": "batch", "batch_stats": True, "foldable": True, "recalibratable": True}
    map_2d = {"dims": (2,)}
    return [
        NormKind(
            "bn",
            _dims_builder("bn"),
            aliases=("batch", "batchnorm", "batch_norm", "bn1d", "bn2d", "bn3d"),
            classes={**_BN, **_BN_TWINS},
            syncable=True,
            takes_dims=True,
            signature=_class(L.BatchNorm2d),
            **batch,
        ),
        NormKind(
            "sync_bn",
            lambda num_channels, **kwargs: L.SyncBatchNorm(num_channels, **kwargs),
            aliases=("sync", "syncbn", "sync_batchnorm", "syncbatchnorm"),
            classes={L.SyncBatchNorm: None, nn.SyncBatchNorm: None},
            syncable=True,
            signature=_class(L.SyncBatchNorm),
            **batch,
        ),
        NormKind(
            "ghost_bn",
            L.GhostBatchNorm2d,
            aliases=("ghost", "gbn", "ghost_batchnorm", "ghostbatchnorm2d"),
            classes={L.GhostBatchNorm2d: 2},
            arg="virtual_batch_size",
            signature=_class(L.GhostBatchNorm2d),
            check=_check_ghost,
            **batch,
            **map_2d,
        ),
        NormKind(
            "brn",
            L.BatchRenorm2d,
            aliases=("batch_renorm", "batchrenorm", "renorm", "batchrenorm2d"),
            classes={L.BatchRenorm2d: 2},
            signature=_class(L.BatchRenorm2d),
            check=_check_brn,
            **{**batch, "family": "renorm"},  # its own momentum default (0.01)
            **map_2d,
        ),
        NormKind(
            "split_bn",
            L.SplitBatchNorm2d,
            aliases=("splitbn", "split_batchnorm", "splitbatchnorm2d", "aux_bn"),
            classes={L.SplitBatchNorm2d: 2},  # eval mode is its main BN alone: foldable
            arg="num_splits",
            signature=_class(L.SplitBatchNorm2d),
            check=_check_split,
            **batch,
            **map_2d,
        ),
        NormKind(
            "frozen_bn",
            L.FrozenBatchNorm2d,
            aliases=("frozen", "frozen_batchnorm", "frozenbatchnorm2d", "fbn"),
            classes={L.FrozenBatchNorm2d: 2},
            family="frozen",
            foldable=True,  # in training mode too: its statistics never move
            signature=_class(L.FrozenBatchNorm2d),
            **map_2d,
        ),
        NormKind(
            "gn",
            _build_gn,
            aliases=("group", "groupnorm", "group_norm"),
            classes={L.GroupNorm: None, nn.GroupNorm: None},
            family="group",
            arg="num_groups",
            signature=_class(_gn_signature),
            check=_check_gn,
        ),
        NormKind(
            "ln",
            _dims_builder("ln"),
            aliases=("layer", "layernorm", "layer_norm", "ln2d", "layernorm2d"),
            classes={L.LayerNorm: 1, L.LayerNorm2d: 2, nn.LayerNorm: 1},
            family="layer",
            takes_dims=True,
            dims=(1, 2),
            signature=_class(_ln_signature),
        ),
        NormKind(
            "in",
            _dims_builder("in"),
            aliases=("instance", "instancenorm", "instance_norm"),
            classes={**_IN, **_IN_TWINS},
            family="instance",
            recalibratable=True,  # when it tracks running statistics
            takes_dims=True,
            signature=_class(L.InstanceNorm2d),
        ),
        NormKind(
            "rms",
            _build_rms,
            aliases=("rmsnorm", "rms_norm"),
            classes={L.RMSNorm: 1, nn.RMSNorm: 1},
            family="rms",
            takes_dims=True,
            dims=(1, 2),
            signature=_class(_rms_signature),
        ),
        NormKind(
            "rms2d",
            L.RMSNorm2d,
            aliases=("rmsnorm2d", "rms_norm2d"),
            classes={L.RMSNorm2d: 2},
            family="rms",
            signature=_class(L.RMSNorm2d),
            **map_2d,
        ),
        NormKind(
            "lrn",
            _build_lrn,
            aliases=("local_response_norm", "localresponsenorm"),
            classes={L.LocalResponseNorm: None, nn.LocalResponseNorm: None},
            family="lrn",
            per_channel=False,
            arg="size",
            dims=(2, 3),
            signature=_class(_lrn_signature),
            check=_check_lrn,
        ),
        NormKind(
            "frn",
            L.FilterResponseNorm2d,
            aliases=("filter_response_norm", "filterresponsenorm2d", "frn_tlu"),
            classes={L.FilterResponseNorm2d: 2},
            family="frn",
            signature=_class(L.FilterResponseNorm2d),
            **map_2d,
        ),
        NormKind(
            "evo_b0",
            L.EvoNorm2dB0,
            aliases=("evonorm_b0", "evonorm2db0"),
            classes={L.EvoNorm2dB0: 2},
            family="evonorm",
            batch_stats=True,
            recalibratable=True,  # running_var only
            signature=_class(L.EvoNorm2dB0),
            **map_2d,
        ),
        NormKind(
            "evo_s0",
            _build_evo_s0,
            aliases=("evonorm_s0", "evonorm2ds0"),
            classes={L.EvoNorm2dS0: 2},
            family="evonorm",
            arg="num_groups",
            signature=_class(_evo_s0_signature),
            check=_check_evo_s0,
            **map_2d,
        ),
        NormKind(
            "l2",
            L.L2Norm,
            aliases=("l2norm", "l2_norm"),
            classes={L.L2Norm: None},
            family="l2",
            arg="scale",
            signature=_class(L.L2Norm),
            check=_check_l2,
        ),
        NormKind(
            "none",
            L.Identity,
            aliases=("identity", "id", "no", "null"),
            family="identity",
            per_channel=False,
            signature=_class(L.Identity),
        ),
    ]


for _kind in _builtin_kinds():
    add_kind(_kind)
del _kind

# SyncBatchNorm.convert_sync_batchnorm (in the layers, which cannot import this table) asks the
# table from now on, so kinds registered as syncable are converted there too
_syncbn.set_syncable_rule(is_syncable)
