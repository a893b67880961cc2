"""EvoNorm-B0 and EvoNorm-S0 (Liu et al., 2020, arXiv 2004.02967): norm and activation in one.

Both layers replace a BN-ReLU (or GN-ReLU) pair. Their parameters are ``weight`` (gamma),
``bias`` (beta) and ``v`` (the learned coefficient of the nonlinearity), each of shape (C,).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ._torch_tools import Proxy, fx_leaf
from .batchnorm import _blend_
from .fastops import maximum, scale_shift, variance

__all__ = ["EvoNorm2dB0", "EvoNorm2dS0"]

_SHAPE = (1, -1, 1, 1)


def _acc(x: Tensor) -> Tensor:
    """``x`` in a dtype fit for statistics: float32 for half precision, else unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_map(layer: nn.Module, input: Tensor, channels: int) -> None:
    if input.dim() != 4 or input.shape[1] != channels:
        raise ValueError(
            f"{type(layer).__name__}({channels}): expected (N, {channels}, H, W) input, got "
            f"input of size {tuple(input.shape)}"
        )


class EvoNorm2dB0(nn.Module):
    """EvoNorm-B0: ``y = x / max(sqrt(s_B^2 + eps), v * x + sqrt(s_I^2 + eps)) * weight + bias``.

    ``s_B^2`` is the batch variance per channel over (N, H, W) in training and the running
    variance in eval; ``s_I^2`` is the instance variance per sample and channel over (H, W);
    both biased. Training updates ``running_var = (1 - momentum) * running_var + momentum *
    s_B^2 * m / (m - 1)`` (unbiased, as BatchNorm; ``m = N * H * W``). No running mean: B0
    never subtracts one.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(momentum, bool) or not isinstance(momentum, int | float):
            raise ValueError(f"EvoNorm2dB0: momentum must be a number, got {momentum!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EvoNorm2dB0: momentum must lie in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = float(momentum)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        self.v = nn.Parameter(torch.empty(num_features, **kw))
        self.running_var: Tensor
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight 1, bias 0, v 1; running_var 1."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.ones_(self.v)
        with torch.no_grad():
            self.running_var.fill_(1.0)

    def forward(self, input: Tensor) -> Tensor:
        """Batch-and-instance normalization with its nonlinearity; updates running_var."""
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        _check_map(self, input, self.num_features)
        x = _acc(input)
        m = input.shape[0] * input.shape[2] * input.shape[3]
        if m == 0:  # an empty batch: nothing to normalize or to count
            return input * self.weight.view(_SHAPE) + self.bias.view(_SHAPE)
        if self.training:
            if m == 1:
                raise ValueError(
                    f"EvoNorm2dB0({self.num_features}): expected more than 1 value per channel "
                    f"when training, got input of size {tuple(input.shape)}; use a batch of 2 "
                    "or more, .eval(), or the batch-independent EvoNorm2dS0"
                )
            var_b = variance(x, (0, 2, 3))
            with torch.no_grad():
                _blend_(self.running_var, var_b.detach() * (m / (m - 1)), self.momentum)
        else:
            var_b = self.running_var.to(x.dtype)
        left = (var_b + self.eps).sqrt().view(_SHAPE)
        inst_std = (variance(x, (2, 3), keepdim=True) + self.eps).sqrt()
        right = scale_shift(x, self.v.to(x.dtype).view(_SHAPE), inst_std)
        y = x / maximum(left, right)
        out = scale_shift(
            y, self.weight.to(x.dtype).view(_SHAPE), self.bias.to(x.dtype).view(_SHAPE)
        )
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class EvoNorm2dS0(nn.Module):
    """EvoNorm-S0: ``y = x * sigmoid(v * x) / sqrt(s_G^2 + eps) * weight + bias``.

    ``s_G^2`` is the (biased) variance of each sample's group of ``C / num_groups`` channels
    over (C / G, H, W), as GroupNorm computes it; batch-independent, no buffers. The output
    keeps the input's memory layout.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if (
            isinstance(num_groups, bool)
            or not isinstance(num_groups, int)
            or num_groups < 1
            or num_features % num_groups
        ):
            raise ValueError(
                f"EvoNorm2dS0: num_features ({num_features}) must be divisible by num_groups "
                f"({num_groups!r})"
            )
        self.num_features = num_features
        self.num_groups = num_groups
        self.eps = eps
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        self.v = nn.Parameter(torch.empty(num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight 1, bias 0, v 1."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.ones_(self.v)

    def forward(self, input: Tensor) -> Tensor:
        """Swish-like gating by ``v``, divided by the group standard deviation."""
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        _check_map(self, input, self.num_features)
        x = _acc(input)
        n, c, h, w = x.shape
        g = self.num_groups
        # splitting C into (G, C/G) is a view in both NCHW and channels_last layouts
        var = variance(x.view(n, g, c // g, h, w), (2, 3, 4))
        inv_std = (var + self.eps).rsqrt()
        scale = inv_std.repeat_interleave(c // g, dim=1).view(n, c, 1, 1)
        scale = scale * self.weight.to(x.dtype).view(_SHAPE)
        gated = x * torch.sigmoid(x * self.v.to(x.dtype).view(_SHAPE))
        out = scale_shift(gated, scale, self.bias.to(x.dtype).view(_SHAPE))
        return out.to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}"
