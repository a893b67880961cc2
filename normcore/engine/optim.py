"""Optimizers with parameter groups: no weight decay on norm parameters and biases by default."""

from __future__ import annotations

import torch
from torch import nn

from normcore.registry import kind_of
from normcore.spec import OptimSpec

__all__ = ["build_optimizer", "param_groups"]

# torch.nn's normalization bases; every kind in normcore's registry (a user's register_norm too)
# counts as well, whatever the shape of its parameters.
_TORCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def param_groups(
    model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False
) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    Not decayed (unless ``decay_norm_and_bias``): every parameter with at most one dimension
    (biases and the per-channel scale and shift of every norm layer) and every parameter of a
    torch.nn normalization module. Empty groups are left out.
    """
    no_decay_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, _TORCH_NORMS) or kind_of(m, exact=False) is not None
        for p in m.parameters()
    }
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if not decay_norm_and_bias and (p.ndim <= 1 or id(p) in no_decay_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimSpec) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over ``param_groups``; the lr is set by the schedule."""
    groups = param_groups(model, optim.weight_decay, optim.decay_norm_and_bias)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if optim.name == "sgd":
        return torch.optim.SGD(
            groups, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov
        )
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)
