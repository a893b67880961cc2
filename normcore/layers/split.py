"""SplitBatchNorm2d (AugMix-style auxiliary BN): each split of the batch has its own BN."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf
from .batchnorm import BatchNorm2d, SmallBatch

__all__ = ["SplitBatchNorm2d"]


class SplitBatchNorm2d(BatchNorm2d):
    """BatchNorm2d whose training batch is ``num_splits`` equal splits, each with its own BN.

    In training, split 0 (the first ``N / K`` samples: the clean images in AugMix) goes through
    this layer's own statistics and parameters, split ``i`` through ``aux_bn[i - 1]``; the
    outputs are concatenated in order. Eval mode uses the main BN alone. The main BN's state
    lives at the top level, so its keys are a BatchNorm2d's; the auxiliary BNs add
    ``aux_bn.<i>.*`` keys.

    A ``torch.nn.BatchNorm2d`` (as normcore's BatchNorm2d is), with BatchNorm2d's auxiliary
    layers: ``torch.optim.swa_utils.update_bn`` recomputes each split's statistics from its own
    split; torch's ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it (and each auxiliary BN)
    into torch's plain SyncBatchNorm, which drops the splitting (normcore's ``convert_sync_norm``
    leaves it alone).
    """

    def __init__(
        self,
        num_features: int,
        num_splits: int = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        small_batch: SmallBatch = "error",
    ) -> None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 2:
            raise ValueError(
                f"SplitBatchNorm2d: num_splits must be an int >= 2, got {num_splits!r}"
            )
        kw: dict[str, Any] = {
            "eps": eps,
            "momentum": momentum,
            "affine": affine,
            "track_running_stats": track_running_stats,
            "device": device,
            "dtype": dtype,
            "bias": bias,
            "small_batch": small_batch,
        }
        super().__init__(num_features, **kw)
        self.num_splits = num_splits
        self.aux_bn = nn.ModuleList(BatchNorm2d(num_features, **kw) for _ in range(num_splits - 1))

    def forward(self, input: Tensor) -> Tensor:
        """Training: normalize each split with its own BN; eval: the main BN alone."""
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        if not self.training:
            return super().forward(input)
        n = input.shape[0]
        if input.dim() != 4 or n % self.num_splits:
            raise ValueError(
                f"SplitBatchNorm2d({self.num_features}, num_splits={self.num_splits}): "
                f"expected (N, C, H, W) input with N divisible by {self.num_splits}, got input "
                f"of size {tuple(input.shape)}"
            )
        # tensor_split gives exactly num_splits parts, empty ones for an empty batch (split(0)
        # would give one), so every BN sees its part as torch's BatchNorm2d would
        parts = input.tensor_split(self.num_splits)
        outs = [super().forward(parts[0])]
        outs += [bn(part) for bn, part in zip(self.aux_bn, parts[1:], strict=True)]
        out = torch.cat(outs)
        if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"
