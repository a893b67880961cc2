"""LocalResponseNorm: a drop-in twin of ``torch.nn.LocalResponseNorm`` (AlexNet's LRN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf

__all__ = ["LocalResponseNorm"]


class LocalResponseNorm(nn.LocalResponseNorm):
    """``b_c = a_c / (k + alpha / n * sum_{c' near c} a_{c'}^2) ** beta`` over ``size`` channels.

    The window spans channels ``c - size // 2 .. c + (size - 1) // 2`` (zero-padded at the
    edges), as in ``torch.nn.LocalResponseNorm``, of which it is a subclass; no parameters or
    buffers. Seed 004 notes that BatchNorm replaced LRN in later networks; this layer is here
    to run the old ones.
    """

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"LocalResponseNorm: size must be a positive int, got {size!r}")
        super().__init__(size, alpha, beta, k)

    def forward(self, input: Tensor) -> Tensor:
        """Divide each channel by the local sum of squares across neighbouring channels."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        if input.dim() < 3:
            raise ValueError(
                f"LocalResponseNorm({self.size}): expected input (N, C, *) with at least 3 "
                f"dimensions, got {input.dim()}D input of size {tuple(input.shape)}"
            )
        if input.dtype in (torch.float16, torch.bfloat16):
            # squares and their window sums in float32: in float16, 300^2 overflows (torch's
            # own LRN returns zeros there), and torch's CPU pooling has no half kernel at all
            out = F.local_response_norm(input.float(), self.size, self.alpha, self.beta, self.k)
            return out.to(input.dtype)
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's LocalResponseNorm forward, what ``torch.jit.script`` compiles."""
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return "{size}, alpha={alpha}, beta={beta}, k={k}".format(**self.__dict__)
