"""Fold eval-mode batch norm into the convolution or linear layer that feeds it.

A conv→BN pair is fused only when it is provably adjacent in the data flow: the model (or a
submodule) is traced with ``torch.fx`` and the BN's single input must be the conv's output, with
no other user of that output and each module called exactly once. Where fx cannot trace a
module, only consecutive children of a plain ``nn.Sequential`` are fused. Conv1d/2d/3d,
ConvTranspose1d/2d/3d and Linear (with BatchNorm1d) are folded; a conv that runs more than once
in a forward is refused with an error (folding would change its other calls; torch.fx's own
fuse gets this wrong, pytorch#104593).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, fx, nn

from normcore import registry
from normcore.convert import NormConversionWarning, is_norm_layer

__all__ = ["fold_bn_params", "fuse_conv_bn"]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_TRANSPOSED: tuple[type[nn.Module], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def _foldable_kind(m: nn.Module) -> registry.NormKind | None:
    """The kind of ``m`` if the registry says it folds: its eval forward is
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``. By exact class: a subclass
    may do more in its forward (an activation) and is never folded."""
    kind = registry.kind_of(m)
    return kind if kind is not None and kind.foldable else None


def _is_bn(m: nn.Module) -> bool:
    """Whether ``m`` is a batch norm kind this module knows how to fold."""
    return _foldable_kind(m) is not None


def _after_linear(m: nn.Module) -> bool:
    """Whether ``m`` may follow a Linear: its output features are the last dim, so only a BN
    over (N, C) (a foldable class built for 1-d input: BatchNorm1d)."""
    return registry.class_dims(m) == 1


def _stats_move(m: nn.Module) -> bool:
    """A foldable layer in training mode whose statistics move (not FrozenBatchNorm2d)."""
    kind = _foldable_kind(m)
    return kind is not None and kind.batch_stats and m.training


def _is_conv(m: nn.Module) -> bool:
    return type(m) in _CONV_TYPES or type(m) in _TRANSPOSED


def _bn_channels(bn: nn.Module) -> int | None:
    rm = getattr(bn, "running_mean", None)
    return None if rm is None else rm.numel()


def _out_channels(conv: nn.Module) -> int:
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether the pair can be folded: known kinds, running stats present, channels match.

    A Linear pairs with BatchNorm1d only (on (N, features) activations its channel dim is the
    Linear's output dim).
    """
    return (
        _is_conv(conv)
        and _is_bn(bn)
        and (not isinstance(conv, nn.Linear) or _after_linear(bn))
        and not _stats_move(bn)
        and getattr(bn, "running_var", None) is not None
        and _bn_channels(bn) == _out_channels(conv)
    )


def fold_bn_params(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Return (weight, bias) of a conv/linear whose output equals ``bn(conv(x))`` in eval mode.

    ``weight`` has the output channels in dim 0 (Conv*d and Linear, any groups), or, with
    ``transposed=True``, a ConvTranspose*d's (in, out / groups, *kernel) layout with
    ``groups`` groups. The arithmetic is done in float64 and cast back to ``weight``'s dtype.
    """
    f64 = torch.float64
    scale = torch.rsqrt(running_var.to(f64) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f64)
    shift = -running_mean.to(f64) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(f64)
    if transposed:
        # output channel g * (out / groups) + j lives in weight[g * (in / groups) + i, j]
        kernel = [1] * (weight.dim() - 2)
        w = weight.to(f64).reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        new_w = (w * scale.view(groups, 1, -1, *kernel)).reshape(weight.shape)
    else:
        new_w = weight.to(f64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    new_b = shift if bias is None else bias.to(f64) * scale + shift
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn`` into ``conv``'s parameters in place."""
    w, b = fold_bn_params(
        conv.weight,
        conv.bias,
        bn.running_mean,
        bn.running_var,
        float(bn.eps),
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        transposed=isinstance(conv, _TRANSPOSED),
        groups=getattr(conv, "groups", 1),
    )
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(w, requires_grad=requires_grad)
    conv.bias = nn.Parameter(b, requires_grad=requires_grad)


class _Tracer(fx.Tracer):
    """fx tracer that keeps convs, linears and every norm layer as leaf calls (normcore's norm
    layers make themselves call_module leaves under any tracer; this covers the rest)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            _is_conv(m)
            or is_norm_layer(m)
            or registry.kind_of(m, exact=False) is not None
            or type(m).__module__.startswith("normcore.layers")
            or super().is_leaf_module(m, module_qualified_name)
        )


def _fx_pairs(root: nn.Module) -> list[tuple[nn.Module, nn.Module]] | None:
    """Conv→BN pairs proven adjacent in ``root``'s traced graph, or None if it cannot be traced."""
    try:
        graph = _Tracer().trace(root)
    except Exception:  # any tracing failure means "not provable here", never an error
        return None

    calls: dict[int, int] = {}
    touched: set[int] = set()  # modules whose attributes the graph reads directly
    for node in graph.nodes:
        if node.op == "call_module":
            m = root.get_submodule(node.target)
            calls[id(m)] = calls.get(id(m), 0) + 1
        elif node.op == "get_attr":
            owner, _, _ = str(node.target).rpartition(".")
            touched.add(id(root.get_submodule(owner)) if owner else id(root))

    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        bn = root.get_submodule(node.target)
        src = node.args[0]
        if not _is_bn(bn) or not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = root.get_submodule(src.target)
        if not (
            len(src.users) == 1
            and len(src.args) == 1
            and not src.kwargs
            and id(conv) not in touched
            and id(bn) not in touched
            and _foldable(conv, bn)
        ):
            continue
        if calls[id(conv)] > 1:
            raise ValueError(
                f"fuse_conv_bn: {type(conv).__name__} {src.target!r} runs {calls[id(conv)]} "
                f"times in one forward and one of its calls feeds {type(bn).__name__} "
                f"{node.target!r}; folding the BN into it would change its other calls too "
                "(torch.fx's fuse gives wrong outputs here, pytorch#104593). Give each call "
                "its own module, or leave this pair unfused."
            )
        if calls[id(bn)] == 1:
            pairs.append((conv, bn))
    return pairs


def _sequential_pairs(seq: nn.Sequential) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Consecutive (conv, bn) children of a plain ``nn.Sequential`` (stock forward only)."""
    if type(seq).forward is not nn.Sequential.forward:
        return
    children = list(seq.children())
    for a, b in itertools.pairwise(children):
        if _foldable(a, b):
            yield a, b


def _collect_pairs(module: nn.Module, out: list[tuple[nn.Module, nn.Module]]) -> None:
    """Find fusable pairs: trace ``module`` with fx, else fall back to Sequential and recurse."""
    pairs = _fx_pairs(module)
    if pairs is not None:
        out.extend(pairs)
        return
    if isinstance(module, nn.Sequential):
        out.extend(_sequential_pairs(module))
    for child in module.children():
        if not (_is_conv(child) or _is_bn(child)):
            _collect_pairs(child, out)


def _replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace every registration of ``old`` in ``root`` (aliases included) with ``new``."""
    for _, m in list(root.named_modules(remove_duplicate=False)):
        for child_name, child in list(m.named_children()):
            if child is old:
                setattr(m, child_name, new)


def fuse_conv_bn(model: nn.Module, inplace: bool = False, *, strict: bool = False) -> nn.Module:
    """Fold every eval-mode BN that directly follows a conv or linear layer into it.

    Folds into Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (followed by BatchNorm1d).
    Handles every kind the registry marks foldable: torch.nn BatchNorm*/SyncBatchNorm and
    normcore's BatchNorm*, SyncBatchNorm, GhostBatchNorm2d, BatchRenorm2d, SplitBatchNorm2d
    (all plain BN in eval), FrozenBatchNorm2d, and yours; convs without bias, BNs without affine
    and grouped/depthwise convs. A BN
    without running statistics is left in place. The folded BN becomes ``nn.Identity``; the
    model keeps its class and forward. A BN subclass normcore does not know (its forward may
    add an activation) is never folded: it is reported with a ``NormConversionWarning``, or a
    ValueError with ``strict=True``.

    Limits: Linear→BatchNorm1d assumes (N, features) input (on (N, L, F) input BN1d would
    normalize L, which no fold can express). Where fx cannot trace a module, its traceable
    children are traced on their own and plain nn.Sequential children fused by adjacency; a
    forward that also calls one of their convs from outside is not detected there (modules
    registered under two names are never fused).

    Args:
        model: the model, in eval mode.
        inplace: modify ``model`` itself instead of a deep copy.
        strict: raise instead of warning about BN subclasses normcore does not know.

    Returns:
        The fused model (``model`` itself when ``inplace``).

    Raises:
        ValueError: if ``model`` or any BN in it is in training mode (its batch statistics
            cannot be folded), or if a conv or linear that feeds a BN runs more than once in
            one forward.
    """
    training = [
        n or "<root>"
        for n, m in model.named_modules()
        if (m is model and m.training) or _stats_move(m)
    ]
    if training:
        raise ValueError(
            f"fuse_conv_bn needs an eval-mode model; in training mode: {', '.join(training[:5])}"
            " (call model.eval() first)"
        )
    foldable = tuple(registry.kind_classes(lambda k: k.foldable))
    unknown = [
        f"{name or '<model>'!r} ({type(m).__module__}.{type(m).__qualname__})"
        for name, m in model.named_modules()
        if isinstance(m, foldable) and registry.kind_of(m) is None
    ]
    if unknown:
        message = (
            f"fuse_conv_bn: {', '.join(unknown)} subclass a batch norm but are not one normcore "
            "knows; their forward may do more than normalize, so they are not folded"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(
            message + " (strict=True makes this an error)", NormConversionWarning, stacklevel=2
        )
    if not inplace:
        model = copy.deepcopy(model)
    pairs: list[tuple[nn.Module, nn.Module]] = []
    _collect_pairs(model, pairs)
    # a module registered under two names may be called from a forward we could not trace
    registrations: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        registrations[id(m)] = registrations.get(id(m), 0) + 1
    for conv, bn in pairs:
        if registrations[id(conv)] > 1 or registrations[id(bn)] > 1:
            continue
        _fold_into(conv, bn)
        _replace_module(model, bn, nn.Identity())
    return model
