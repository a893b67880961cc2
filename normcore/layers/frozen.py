"""FrozenBatchNorm2d: batch norm with fixed statistics and affine parameters."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf

__all__ = ["FrozenBatchNorm2d"]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers (no gradients).

    Its output equals an eval-mode ``BatchNorm2d`` with the same state, in train mode too.
    State dicts load both ways with ``BatchNorm2d``: the buffers carry the same names
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``); a
    missing ``num_batches_tracked`` is filled in, and a state dict from ``affine=False`` BN
    (no weight or bias) loads as weight 1, bias 0.

    As torchvision's ``torchvision.ops.FrozenBatchNorm2d`` (and detectron2's), it is a plain
    ``nn.Module``, not a ``_BatchNorm``: torch's BN tools (``update_bn``,
    ``convert_sync_batchnorm``, ``replace_all_batch_norm_modules_``) leave it alone, as they
    leave torchvision's. Its state dict loads into torchvision's (which drops
    ``num_batches_tracked``) and torchvision's into it; same constructor (``num_features``,
    ``eps``) and repr; it scripts with TorchScript and is a ``call_module`` leaf for torch.fx.
    """

    _version = 2

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        kw = {"device": device, "dtype": dtype}
        self.weight: Tensor
        self.bias: Tensor
        self.running_mean: Tensor
        self.running_var: Tensor
        self.num_batches_tracked: Tensor
        self.register_buffer("weight", torch.ones(num_features, **kw))
        self.register_buffer("bias", torch.zeros(num_features, **kw))
        self.register_buffer("running_mean", torch.zeros(num_features, **kw))
        self.register_buffer("running_var", torch.ones(num_features, **kw))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> FrozenBatchNorm2d:
        """A FrozenBatchNorm2d with ``bn``'s statistics, affine parameters, eps, device, dtype.

        ``bn`` is any BatchNorm (normcore or torch.nn) that tracks running statistics.
        """
        running_mean = getattr(bn, "running_mean", None)
        running_var = getattr(bn, "running_var", None)
        if running_mean is None or running_var is None:
            raise ValueError(
                f"cannot freeze {bn!r}: it has no running statistics "
                "(track_running_stats=False); train it with tracking on, or use GroupNorm"
            )
        frozen = cls(
            int(bn.num_features),
            float(bn.eps),
            device=running_mean.device,
            dtype=running_mean.dtype,
        )
        with torch.no_grad():
            frozen.running_mean.copy_(running_mean)
            frozen.running_var.copy_(running_var)
            weight = getattr(bn, "weight", None)
            bias = getattr(bn, "bias", None)
            if weight is not None:
                frozen.weight.copy_(weight)
            if bias is not None:
                frozen.bias.copy_(bias)
            nbt = getattr(bn, "num_batches_tracked", None)
            if nbt is not None:
                frozen.num_batches_tracked.copy_(nbt)
        return frozen

    def forward(self, input: Tensor) -> Tensor:
        """Normalize with the stored statistics, exactly as eval-mode BatchNorm2d."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        if input.dim() != 4 or input.shape[1] != self.num_features:
            raise ValueError(
                f"FrozenBatchNorm2d({self.num_features}): expected (N, {self.num_features}, H, W) "
                f"input, got input of size {tuple(input.shape)}"
            )
        return F.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            False,
            0.0,
            self.eps,
        )

    def _forward_script(self, input: Tensor) -> Tensor:
        """The forward ``torch.jit.script`` compiles: eval-mode batch norm, without the check."""
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if prefix + "running_mean" in state_dict:
            fill = {
                "num_batches_tracked": self.num_batches_tracked,
                "weight": torch.ones_like(self.weight),
                "bias": torch.zeros_like(self.bias),
            }
            for name, default in fill.items():
                state_dict.setdefault(prefix + name, default)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
