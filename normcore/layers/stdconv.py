"""StdConv2d: a Conv2d with weight standardization (Qiao et al., 2019), for GN + WS nets."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StdConv2d"]


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardized per output channel before every convolution.

    ``W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)`` over the ``in/groups * kH * kW``
    weights of output channel ``o`` (biased variance), then ``conv2d(x, W_hat, bias)``. The
    stored ``weight`` stays unstandardized, so the state dict is a Conv2d's. Paired with
    GroupNorm it trains at micro-batch sizes (BiT uses it with GN everywhere).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,  # type: ignore[arg-type]
            device,
            dtype,
        )
        self.eps = eps

    def standardized_weight(self) -> Tensor:
        """The kernel the convolution uses: each output channel at mean 0, variance ~1."""
        w = self.weight
        # batch norm over a (1, out, fan_in) view is one fused mean/var/normalize pass
        flat = F.batch_norm(
            w.reshape(1, self.out_channels, -1), None, None, training=True, eps=self.eps
        )
        return flat.reshape_as(w)

    def forward(self, input: Tensor) -> Tensor:
        """Convolve ``input`` with the standardized kernel."""
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, eps: float = 1e-6) -> StdConv2d:
        """A StdConv2d with ``conv``'s configuration that shares its weight and bias."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
            eps=eps,
        )
        new.weight = conv.weight
        new.bias = conv.bias
        return new.train(conv.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"
