"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import init

from ._torch_tools import Proxy, fx_leaf
from .fastops import maximum, scale_shift

__all__ = ["FilterResponseNorm2d"]


class FilterResponseNorm2d(nn.Module):
    """FRN + TLU over (N, C, H, W) input (arXiv 1911.09737), batch-independent.

    ``nu2 = mean_{h,w}(x^2)`` per sample and channel, ``x_hat = x / sqrt(nu2 + eps)``,
    ``y = weight * x_hat + bias`` and the TLU ``z = max(y, tau)``; ``weight``, ``bias`` and
    ``tau`` are per-channel parameters (1, 0, 0 at init). FRN does not subtract a mean: the
    learned threshold ``tau`` is what keeps the activation from being centred at zero. The
    output keeps the input's memory layout.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"FilterResponseNorm2d: eps must be positive, got {eps!r}")
        self.num_features = num_features
        self.eps = eps
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_features, **kw))
        self.tau = nn.Parameter(torch.empty(num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """weight 1, bias 0, tau 0 (the TLU starts as a ReLU)."""
        init.ones_(self.weight)
        init.zeros_(self.bias)
        init.zeros_(self.tau)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize by the mean square over (H, W), scale, shift, then threshold at tau."""
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        if input.dim() != 4 or input.shape[1] != self.num_features:
            raise ValueError(
                f"FilterResponseNorm2d({self.num_features}): expected (N, {self.num_features}, "
                f"H, W) input, got input of size {tuple(input.shape)}"
            )
        shape = (1, -1, 1, 1)
        acc = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        nu2 = acc.square().mean((2, 3), keepdim=True)
        # weight * rsqrt(nu2 + eps) is a per-(n, c) scale: one pass over the map for x * scale + b
        scale = (nu2 + self.eps).rsqrt() * self.weight.to(acc.dtype).view(shape)
        y = scale_shift(acc, scale, self.bias.to(acc.dtype).view(shape))
        return maximum(y, self.tau.to(acc.dtype).view(shape)).to(input.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
