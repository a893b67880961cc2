"""InstanceNorm1d/2d/3d: drop-in twins of ``torch.nn.InstanceNorm1d/2d/3d``.

Each is a subclass of its torch.nn class (``InstanceNorm2d`` of ``nn.InstanceNorm2d``), recorded
by ``torch.fx`` as a ``call_module`` leaf; ``torch.jit.script`` compiles torch.nn's forward.
The computation is torch.nn's (``F.instance_norm``): outputs, gradients and running statistics
are bit-identical to torch.nn's. What normcore adds: clearer errors, an empty batch gives an
empty output (torch.nn raises or writes NaN statistics), and a channels_last 4-D input gives a
channels_last output.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf
from .batchnorm import _NormBase
from .channelwise import layout_of, restore_layout

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(_NormBase, nn.modules.instancenorm._InstanceNorm):
    """Per-sample, per-channel normalization over the spatial dims, as torch.nn's.

    Defaults differ from BatchNorm as in torch: ``affine=False``, ``track_running_stats=False``.
    With running stats tracked, they are averaged over the batch and used in eval mode.
    Subclasses set ``_no_batch_dim``: the rank of an unbatched input (C, *spatial).
    """

    _no_batch_dim: int = 0

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            bias=bias,
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
        version = local_metadata.get("version")
        # torch < 0.4 saved running stats even with track_running_stats=False
        if version is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {' and '.join(repr(k) for k in keys)} "
                    f"for {type(self).__name__} with track_running_stats=False; remove them "
                    "from the state dict, or set track_running_stats=True to use them."
                )
                for key in keys:
                    state_dict.pop(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply_instance_norm(self, input: Tensor) -> Tensor:
        use_input_stats = self.training or not self.track_running_stats
        if use_input_stats and math.prod(input.shape[2:]) == 1:
            raise ValueError(
                f"{self._layer_name()}: expected more than 1 spatial element when training, "
                f"got input of size {tuple(input.shape)}; instance statistics need at least 2 "
                "positions per channel (use BatchNorm, or LayerNorm over the channels)"
            )
        if input.numel() == 0:
            # an empty batch: an empty output, zero weight and bias gradients, the running
            # statistics left alone, as BatchNorm does (torch.nn's InstanceNorm raises an
            # IndexError with affine=True and writes NaN into tracked statistics)
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # torch.nn's computation (F.instance_norm), so outputs and gradients are bit-identical
        # to its; the faster channelwise routes reduce in another order
        out = F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_input_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        if input.dim() == 4 and not input.is_contiguous():
            out = restore_layout(out, layout_of(input))  # F.instance_norm returns NCHW
        return out

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each channel of each sample; accepts batched or unbatched input."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        nb = self._no_batch_dim
        if input.dim() not in (nb, nb + 1):
            raise ValueError(
                f"{self._layer_name()}: expected {nb}D (unbatched) or {nb + 1}D input "
                f"(got {input.dim()}D input of size {tuple(input.shape)})"
            )
        feature_dim = input.dim() - nb
        channels = input.shape[feature_dim]
        if channels != self.num_features:
            if self.affine or self.running_mean is not None:
                raise ValueError(
                    f"{self._layer_name()}: expected input with {self.num_features} channels "
                    f"(dim {feature_dim}), got {channels} channels in input of size "
                    f"{tuple(input.shape)}"
                )
            warnings.warn(
                f"{self._layer_name()}: input's size at dim={feature_dim} ({channels}) does not "
                "match num_features; it is not used because affine=False",
                stacklevel=2,
            )
        if input.dim() == nb:
            return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
        return self._apply_instance_norm(input)

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's InstanceNorm forward, what ``torch.jit.script`` compiles for this layer."""
        self._check_input_dim(input)
        if input.dim() == self._get_no_batch_dim():
            return self._instance_norm_script(input.unsqueeze(0)).squeeze(0)
        return self._instance_norm_script(input)

    def _instance_norm_script(self, input: Tensor) -> Tensor:
        momentum = self.momentum
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            momentum if momentum is not None else 0.0,
            self.eps,
        )


class InstanceNorm1d(_InstanceNorm, nn.InstanceNorm1d):
    """Instance normalization over (N, C, L) or unbatched (C, L) input."""

    _no_batch_dim = 2


class InstanceNorm2d(_InstanceNorm, nn.InstanceNorm2d):
    """Instance normalization over (N, C, H, W) or unbatched (C, H, W) input."""

    _no_batch_dim = 3


class InstanceNorm3d(_InstanceNorm, nn.InstanceNorm3d):
    """Instance normalization over (N, C, D, H, W) or unbatched (C, D, H, W) input."""

    _no_batch_dim = 4
