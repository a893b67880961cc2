"""Fold eval-mode batch norm into the convolution or linear layer that feeds it.

A conv→BN pair is fused only when it is provably adjacent in the data flow: the model (or a
submodule) is traced with ``torch.fx`` and the BN's single input must be the conv's output, with
no other user of that output and each module called exactly once. Where fx cannot trace a
module, only consecutive children of a plain ``nn.Sequential`` are fused.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from normcore.convert import is_norm_layer
from normcore.layers import FrozenBatchNorm2d
from normcore.layers.batchnorm import _BatchNorm

__all__ = ["fold_bn_params", "fuse_conv_bn"]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# Every kind whose eval forward is (x - running_mean) / sqrt(running_var + eps) * weight + bias:
# torch.nn's BatchNorm*/SyncBatchNorm, normcore's BatchNorm*/SyncBatchNorm/GhostBatchNorm2d/
# BatchRenorm2d (all normcore _BatchNorm subclasses) and FrozenBatchNorm2d.
_BN_TYPES: tuple[type[nn.Module], ...] = (_TorchBatchNorm, _BatchNorm, FrozenBatchNorm2d)


def _is_bn(m: nn.Module) -> bool:
    """Whether ``m`` is a batch norm kind this module knows how to fold."""
    return isinstance(m, _BN_TYPES)


def _is_conv(m: nn.Module) -> bool:
    return type(m) in _CONV_TYPES


def _bn_channels(bn: nn.Module) -> int | None:
    rm = getattr(bn, "running_mean", None)
    return None if rm is None else rm.numel()


def _out_channels(conv: nn.Module) -> int:
    return conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether the pair can be folded: known kinds, running stats present, channels match."""
    return (
        _is_conv(conv)
        and _is_bn(bn)
        and (not bn.training or isinstance(bn, FrozenBatchNorm2d))
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
) -> tuple[Tensor, Tensor]:
    """Return (weight, bias) of a conv/linear whose output equals ``bn(conv(x))`` in eval mode.

    ``weight`` has the output channels in dim 0 (Conv*d and Linear, any groups). The arithmetic is
    done in float64 and cast back to ``weight``'s dtype.
    """
    f64 = torch.float64
    scale = torch.rsqrt(running_var.to(f64) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(f64)
    shift = -running_mean.to(f64) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(f64)
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
    )
    requires_grad = conv.weight.requires_grad
    conv.weight = nn.Parameter(w, requires_grad=requires_grad)
    conv.bias = nn.Parameter(b, requires_grad=requires_grad)


class _Tracer(fx.Tracer):
    """fx tracer that keeps convs, linears and every norm layer (normcore's too) as leaf calls;
    normcore layers check their input's shape, which fx proxies cannot answer."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            _is_conv(m)
            or is_norm_layer(m)
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
        if (
            len(src.users) == 1
            and len(src.args) == 1
            and not src.kwargs
            and calls[id(conv)] == 1
            and calls[id(bn)] == 1
            and id(conv) not in touched
            and id(bn) not in touched
            and _foldable(conv, bn)
        ):
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


def fuse_conv_bn(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every eval-mode BN that directly follows a Conv1d/2d/3d or Linear into it.

    Handles torch.nn BatchNorm*/SyncBatchNorm and normcore's BatchNorm*, SyncBatchNorm,
    GhostBatchNorm2d, BatchRenorm2d (all plain BN in eval) and FrozenBatchNorm2d; convs without
    bias, BNs without affine and grouped/depthwise convs. A BN without running statistics is
    left in place. The folded BN becomes ``nn.Identity``; the model keeps its class and forward.

    Limits: Linear→BatchNorm1d assumes (N, features) input (on (N, L, F) input BN1d would
    normalize L, which no fold can express). Where fx cannot trace a module, its traceable
    children are traced on their own and plain nn.Sequential children fused by adjacency; a
    forward that also calls one of their convs from outside is not detected there (modules
    registered under two names are never fused).

    Args:
        model: the model, in eval mode.
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The fused model (``model`` itself when ``inplace``).

    Raises:
        ValueError: if ``model`` or any BN in it is in training mode (its batch statistics
            cannot be folded).
    """
    training = [
        n or "<root>"
        for n, m in model.named_modules()
        if m.training and (m is model or (_is_bn(m) and not isinstance(m, FrozenBatchNorm2d)))
    ]
    if training:
        raise ValueError(
            f"fuse_conv_bn needs an eval-mode model; in training mode: {', '.join(training[:5])}"
            " (call model.eval() first)"
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
