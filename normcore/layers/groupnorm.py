"""GroupNorm: a drop-in twin of ``torch.nn.GroupNorm`` (a subclass) with errors that name the layer."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf
from .channelwise import layout_of, restore_layout

__all__ = ["GroupNorm"]


class GroupNorm(nn.GroupNorm):
    """Group normalization over (N, C, *) input (Wu & He, 2018); twin of ``torch.nn.GroupNorm``.

    Channels are split into ``num_groups`` groups, each normalized per sample, so the output
    does not depend on the batch size. A channels_last input gives a channels_last output on
    every device (torch's CPU kernel keeps the layout; elsewhere it is restored). A subclass
    of ``torch.nn.GroupNorm``: same constructor, state dict and repr.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(
                f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups "
                f"({num_groups})"
            )
        super().__init__(num_groups, num_channels, eps, affine, device, dtype, bias=bias)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each group of channels of each sample."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        if input.dim() < 2:
            raise ValueError(
                f"{self._layer_name()}: expected input of at least 2 dimensions (N, C, *), "
                f"got {input.dim()}D input of size {tuple(input.shape)}"
            )
        channels = input.shape[1]
        # torch.nn accepts any channel count divisible by the groups when there is no weight
        if channels % self.num_groups != 0 or (
            channels != self.num_channels and (self.weight is not None or self.bias is not None)
        ):
            raise ValueError(
                f"{self._layer_name()}: expected input with {self.num_channels} channels "
                f"(dim 1), got {channels} channels in input of size {tuple(input.shape)}"
            )
        out = F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)
        # torch's CPU kernel keeps channels_last; other devices return NCHW
        if not input.is_contiguous() and not input.is_cpu and input.dim() == 4:
            out = restore_layout(out, layout_of(input))
        return out

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's GroupNorm forward, what ``torch.jit.script`` compiles for this layer."""
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def _layer_name(self) -> str:
        return f"GroupNorm({self.num_groups}, {self.num_channels})"

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )
