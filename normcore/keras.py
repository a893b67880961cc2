"""Keras conventions: a normcore BatchNorm from the weights of a Keras BatchNormalization.

Keras' inference formula is ``gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) +
beta``, the same as torch's eval-mode batch norm, so the weights carry over one to one. What
differs is bookkeeping: Keras' ``momentum`` is the share of the old average that is kept
(``moving = momentum * moving + (1 - momentum) * batch``, default 0.99) where torch's is the share
of the batch that is mixed in (default 0.1); its default epsilon is 1e-3 (torch: 1e-5); and it
averages the biased batch variance where torch averages the unbiased one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from normcore.layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

__all__ = ["bn_from_keras"]

_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _vector(name: str, value: Any, dtype: torch.dtype | None) -> Tensor:
    t = torch.as_tensor(value)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(
            f"bn_from_keras: {name} must be a non-empty 1-D array, got shape {tuple(t.shape)}"
        )
    if dtype is None:
        dtype = t.dtype if t.dtype in (torch.float64, torch.float32) else torch.float32
    return t.to(dtype)


def bn_from_keras(
    *,
    moving_mean: Any,
    moving_variance: Any,
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-3,
    momentum: float = 0.99,
    dims: int = 2,
    dtype: torch.dtype | None = None,
) -> _BatchNorm:
    """A normcore BatchNorm (1d/2d/3d by ``dims``) whose eval output is Keras' inference output.

    Args:
        moving_mean, moving_variance: Keras' moving statistics (1-D arrays or tensors).
        gamma, beta: the scale and offset; None when the Keras layer had ``scale=False`` or
            ``center=False`` (both None gives ``affine=False``).
        epsilon: Keras' epsilon (default 1e-3), kept as ``eps``.
        momentum: Keras' momentum (default 0.99), stored as torch's ``1 - momentum``.
        dims: 1, 2 or 3 for BatchNorm1d/2d/3d; the channel axis is dim 1 (convert a Keras
            channels_last tensor with ``permute`` or use a channels_last memory format).
        dtype: the layer's dtype; default float64 if the statistics are float64, else float32.

    Returns:
        The BatchNorm in eval mode. Further training updates its statistics with torch's rule
        (unbiased batch variance, momentum ``1 - momentum``).
    """
    if dims not in _BN:
        raise ValueError(f"bn_from_keras: dims must be 1, 2 or 3, got {dims!r}")
    if isinstance(momentum, bool) or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"bn_from_keras: momentum must lie in [0, 1], got {momentum!r}")
    if not float(epsilon) > 0:
        raise ValueError(f"bn_from_keras: epsilon must be positive, got {epsilon!r}")
    mean = _vector("moving_mean", moving_mean, dtype)
    dtype = mean.dtype
    var = _vector("moving_variance", moving_variance, dtype)
    given = {
        name: _vector(name, value, dtype)
        for name, value in (("gamma", gamma), ("beta", beta))
        if value is not None
    }
    c = mean.numel()
    for name, t in (("moving_variance", var), *given.items()):
        if t.numel() != c:
            raise ValueError(f"bn_from_keras: {name} has {t.numel()} channels, moving_mean has {c}")
    if (var < 0).any():
        raise ValueError("bn_from_keras: moving_variance must not be negative")
    affine = bool(given)
    bn = _BN[dims](
        c,
        eps=float(epsilon),
        momentum=round(1.0 - float(momentum), 12),
        affine=affine,
        dtype=dtype,
    )
    with torch.no_grad():
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if affine:
            bn.weight.copy_(given.get("gamma", torch.ones(c, dtype=dtype)))
            bn.bias.copy_(given.get("beta", torch.zeros(c, dtype=dtype)))
    return bn.eval()
