"""LayerNorm (twin of ``torch.nn.LayerNorm``) and LayerNorm2d (over C of an NCHW map)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from ._torch_tools import Proxy, fx_leaf
from .channelwise import _ln2d_torch, layer_norm_2d

__all__ = ["LayerNorm", "LayerNorm2d"]


class LayerNorm(nn.LayerNorm):
    """Layer normalization over the trailing ``normalized_shape`` dims; twin of torch.nn's.

    A subclass of ``torch.nn.LayerNorm``: same constructor, state dict and repr.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each sample over its trailing ``normalized_shape`` dims."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        n = len(self.normalized_shape)
        if tuple(input.shape[input.dim() - n :]) != self.normalized_shape or input.dim() < n:
            raise ValueError(
                f"LayerNorm({self.normalized_shape}): expected input of size "
                f"(*, {', '.join(map(str, self.normalized_shape))}), got input of size "
                f"{tuple(input.shape)}; for a (N, C, H, W) conv map use LayerNorm2d(C)"
            )
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's LayerNorm forward, what ``torch.jit.script`` compiles for this layer."""
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class LayerNorm2d(nn.Module):
    """Layer normalization over the channels of an (N, C, H, W) map at each position.

    Same parameters (``weight``, ``bias`` of shape (C,)) and numerics as ``torch.nn.LayerNorm(C)``
    applied to the NHWC permutation; the output has the input's shape and memory layout
    (channels_last stays channels_last, NCHW stays contiguous NCHW). The implementation is
    picked per device, layout and dtype (see ``normcore.layers.channelwise``).
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.normalized_shape = (num_channels,)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory_kwargs = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            if bias:
                self.bias = nn.Parameter(torch.empty(num_channels, **factory_kwargs))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set weight to 1 and bias to 0."""
        if self.elementwise_affine:
            init.ones_(self.weight)
            if self.bias is not None:
                init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each position's channel vector; returns NCHW in the input's layout."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        if input.dim() != 4 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"LayerNorm2d({self.num_channels}): expected (N, {self.num_channels}, H, W) "
                f"input, got input of size {tuple(input.shape)}"
            )
        if (
            not input.is_contiguous()
            and input.is_contiguous(memory_format=torch.channels_last)
            and input.shape[1] == self.num_channels
        ):
            # channels_last runs torch's kernel on the NHWC view on every device and dtype (the
            # table in channelwise, checked by a test); going straight there keeps the per-call
            # cost at or below timm's permute module, which small maps notice
            return _ln2d_torch(input, self.weight, self.bias, self.eps)
        return layer_norm_2d(input, self.weight, self.bias, self.eps)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch's LayerNorm on the NHWC view (the permute way), for TorchScript."""
        out = _ln2d_torch(input, self.weight, self.bias, self.eps)
        # the permute way returns a view; a copy in the input's layout, as the eager forward
        if input.is_contiguous():
            return out.contiguous()
        return out.clone(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )
