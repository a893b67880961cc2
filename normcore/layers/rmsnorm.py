"""RMSNorm (twin of ``torch.nn.RMSNorm``) and RMSNorm2d (over C of an NCHW map)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from ._torch_tools import Proxy, fx_leaf
from .channelwise import rms_norm_2d

__all__ = ["RMSNorm", "RMSNorm2d"]

# the dtype torch computes a half-precision norm in (its "opmath" type)
_OPMATH: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


def default_eps(dtype: torch.dtype) -> float:
    """The eps ``torch.nn.RMSNorm(eps=None)`` uses for input of ``dtype``.

    The machine epsilon of the op-math dtype: ``finfo(float32).eps`` (1.19e-7) for float16,
    bfloat16 and float32, ``finfo(float64).eps`` for float64 (torch.nn.RMSNorm's docstring;
    pytorch#155527), not ``finfo(dtype).eps``, which is 7.8e-3 for bfloat16.
    """
    return torch.finfo(_OPMATH.get(dtype, dtype)).eps


class RMSNorm(nn.RMSNorm):
    """Root-mean-square normalization over the trailing ``normalized_shape`` dims.

    ``y = x / sqrt(mean(x^2) + eps) * weight``; twin of ``torch.nn.RMSNorm`` (same constructor,
    ``weight`` parameter and state dict). ``eps=None`` means, as in torch.nn, the machine
    epsilon of the op-math dtype: ``torch.finfo(torch.float32).eps`` for float16, bfloat16 and
    float32 input, ``torch.finfo(torch.float64).eps`` for float64. A subclass of
    ``torch.nn.RMSNorm`` computing with ``F.rms_norm`` as it does: outputs and gradients are
    bit-identical to torch.nn's; an input of the wrong trailing shape is a ValueError that says
    what was expected.
    """

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each sample over its trailing ``normalized_shape`` dims."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        n = len(self.normalized_shape)
        if input.dim() < n or tuple(input.shape[input.dim() - n :]) != self.normalized_shape:
            raise ValueError(
                f"RMSNorm({self.normalized_shape}): expected input of size "
                f"(*, {', '.join(map(str, self.normalized_shape))}), got input of size "
                f"{tuple(input.shape)}; for a (N, C, H, W) conv map use RMSNorm2d(C)"
            )
        # torch.nn's computation, bit for bit (eps=None included); the faster "rows" route of
        # channelwise.rms_norm reduces in another order
        return F.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's RMSNorm forward, what ``torch.jit.script`` compiles for this layer."""
        return torch.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class RMSNorm2d(nn.Module):
    """RMS normalization over the channels of an (N, C, H, W) map at each position.

    ``y[n, :, h, w] = x[n, :, h, w] / sqrt(mean_c(x^2) + eps) * weight`` with a learnable
    per-channel ``weight``; equals ``torch.nn.RMSNorm(C)`` on the NHWC permutation (same
    ``weight``). The output has the input's memory layout (channels_last stays channels_last).
    ``eps=None`` picks torch.nn.RMSNorm's default (see ``default_eps``).
    """

    def __init__(
        self,
        num_channels: int,
        eps: float | None = 1e-6,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set weight to 1."""
        if self.weight is not None:
            init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each position's channel vector by its RMS; keeps the input's layout."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        if input.dim() != 4 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"RMSNorm2d({self.num_channels}): expected (N, {self.num_channels}, H, W) "
                f"input, got input of size {tuple(input.shape)}"
            )
        eps = default_eps(input.dtype) if self.eps is None else self.eps
        return rms_norm_2d(input, self.weight, eps)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch's RMSNorm on the NHWC view (the permute way), for TorchScript."""
        # torch.rms_norm takes eps=None (torch.nn.RMSNorm's default), which _rms2d_torch does not
        nhwc = input.permute(0, 2, 3, 1)
        out = torch.rms_norm(nhwc, [input.shape[1]], self.weight, self.eps).permute(0, 3, 1, 2)
        # the permute way returns a view; a copy in the input's layout, as the eager forward
        if input.is_contiguous():
            return out.contiguous()
        return out.clone(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
