"""Batch normalization layers that are drop-in twins of ``torch.nn.BatchNorm1d/2d/3d``.

Same constructor, parameter and buffer names, state dict and numerics as torch.nn (the forward
is ``F.batch_norm``); the difference is in the errors: a batch with one value per channel, a
wrong channel count or a wrong input rank raise a ``ValueError`` that names the layer and says
what to do about it.

Each is a subclass of its torch.nn class (``BatchNorm2d`` of ``nn.BatchNorm2d``, hence of
``nn.modules.batchnorm._BatchNorm``), so torch's tools that look for batch norms by class find
them: ``torch.optim.swa_utils.update_bn``, ``torch.func.replace_all_batch_norm_modules_``,
``nn.SyncBatchNorm.convert_sync_batchnorm`` (which makes torch's SyncBatchNorm of them; normcore's
``SyncBatchNorm.convert_sync_batchnorm`` makes normcore's), ``isinstance`` checks that freeze BN
or skip its weight decay. ``torch.fx`` records them as ``call_module`` leaves and
``torch.jit.script`` compiles torch.nn's forward (see ``_torch_tools``).

``_NormBase`` is what BatchNorm and InstanceNorm add to torch.nn's ``_NormBase``; ``_BatchNorm``
is the base for every batch-statistics layer in normcore (BatchNorm1d/2d/3d, SyncBatchNorm,
GhostBatchNorm2d, BatchRenorm2d, SplitBatchNorm2d).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf

__all__ = [
    "SMALL_BATCH_POLICIES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "_BatchNorm",
    "_NormBase",
]

SmallBatch = Literal["error", "running_stats"]
SMALL_BATCH_POLICIES: tuple[str, ...] = ("error", "running_stats")


def _blend_(running: Tensor, batch: Tensor, factor: float | Tensor) -> None:
    """``running = (1 - factor) * running + factor * batch`` in place (torch.nn's update rule).

    ``batch`` holds statistics accumulated in float32 (or float64); a half-precision buffer (a
    model cast with ``.half()``) is blended in the batch's dtype and rounded once, as torch's
    kernels do: a float16 variance of 9e4 times momentum 0.1 fits, 9e4 itself does not.
    """
    if running.dtype == batch.dtype:
        running.mul_(1.0 - factor).add_(batch * factor)
    else:
        running.copy_(running.to(batch.dtype) * (1.0 - factor) + batch * factor)


class _NormBase(nn.modules.batchnorm._NormBase):
    """What normcore's BatchNorm and InstanceNorm add to torch.nn's ``_NormBase``.

    torch.nn's base registers ``weight``/``bias`` (parameters) and ``running_mean``/
    ``running_var``/``num_batches_tracked`` (buffers), resets them and loads old state dicts;
    normcore's layers are subclasses of torch.nn's (``isinstance(normcore.BatchNorm2d(8),
    nn.BatchNorm2d)``), so every tool that looks for torch's batch norms finds them, and state
    dicts are torch.nn's by construction. This adds the layer's name for error messages.
    """

    def _layer_name(self) -> str:
        """Short description of this layer for error messages, e.g. ``BatchNorm2d(64)``."""
        return f"{type(self).__name__}({self.num_features})"


class _BatchNorm(_NormBase, nn.modules.batchnorm._BatchNorm):
    """Batch normalization over the channel dimension (dim 1), as ``torch.nn``'s ``_BatchNorm``.

    Subclasses set ``_input_dims`` (the accepted ``input.dim()`` values). Building blocks for
    subclasses: ``_check_input`` (rank, channels, one-value-per-channel), ``_use_batch_stats``,
    ``_small_batch_forward`` (the small-batch policy) and ``_average_factor`` (increments
    ``num_batches_tracked``, returns the momentum to use).

    ``small_batch`` says what a batch-statistics forward does with one value per channel:
    ``"error"`` (default) raises a ValueError that says what to do; ``"running_stats"``
    normalizes it with the running statistics (as in eval mode) and leaves every buffer,
    ``num_batches_tracked`` included, unchanged.
    """

    _input_dims: tuple[int, ...] = ()
    # (no class-level annotation for small_batch: TorchScript cannot read postponed ones)

    def __init__(
        self,
        num_features: int,
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
        if small_batch not in SMALL_BATCH_POLICIES:
            raise ValueError(
                f"{type(self).__name__}: small_batch must be 'error' or 'running_stats', "
                f"got {small_batch!r}"
            )
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
        self.small_batch = small_batch

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.small_batch != "error":
            text += f", small_batch={self.small_batch!r}"
        return text

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self._input_dims:
            want = " or ".join(f"{d}D" for d in self._input_dims)
            raise ValueError(
                f"{self._layer_name()}: expected {want} input (got {input.dim()}D input "
                f"of size {tuple(input.shape)})"
            )

    def _check_input(self, input: Tensor, batch_stats: bool) -> None:
        """Raise a ValueError naming this layer for inputs that torch.nn would reject."""
        # cheap tests first: this runs on every forward and must cost next to nothing
        if input.dim() not in self._input_dims:
            self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            self._check_channels(input)
        if batch_stats and input.numel() <= input.shape[1]:
            self._check_batch_size(input)

    def _check_channels(self, input: Tensor) -> None:
        # torch.nn only notices a channel mismatch when some per-channel tensor exists
        if self.weight is not None or self.bias is not None or self.running_mean is not None:
            raise ValueError(
                f"{self._layer_name()}: expected input with {self.num_features} channels "
                f"(dim 1), got {input.shape[1]} channels in input of size {tuple(input.shape)}"
            )

    def _check_batch_size(self, input: Tensor) -> None:
        if input.shape[0] * math.prod(input.shape[2:]) == 1:
            raise ValueError(
                f"{self._layer_name()}: expected more than 1 value per channel when "
                f"training, got input of size {tuple(input.shape)}. Batch statistics need "
                "at least 2 values per channel: use a batch size of 2 or more, call "
                ".eval() to normalize with the running statistics, pass "
                "small_batch='running_stats' to do that for such batches only, or use a norm "
                "that does not depend on the batch (GroupNorm, LayerNorm, FrozenBatchNorm2d)."
            )

    def _small_batch_forward(self, input: Tensor) -> Tensor | None:
        """Apply the small-batch policy to a batch-statistics input with <= 1 value per channel.

        Returns None for an empty batch (normalized as torch.nn does), the eval-mode output
        under ``"running_stats"`` (buffers untouched), and raises under ``"error"`` or when
        there are no running statistics to fall back on.
        """
        if input.shape[0] * math.prod(input.shape[2:]) != 1:
            return None
        rm, rv = self.running_mean, self.running_var
        if self.small_batch == "running_stats" and rm is not None and rv is not None:
            return F.batch_norm(input, rm, rv, self.weight, self.bias, False, 0.0, self.eps)
        self._check_batch_size(input)
        return None

    def _use_batch_stats(self) -> bool:
        """True when batch statistics normalize: in training, or when no buffers are kept."""
        return self.training or (self.running_mean is None and self.running_var is None)

    def _average_factor(self) -> float | Tensor:
        """Count this batch and return the running-average factor (torch.nn's rule).

        ``momentum=None`` gives the cumulative average ``1 / num_batches_tracked``: a Python
        float in eager mode, as torch.nn (``F.batch_norm`` then blends exactly as torch.nn's),
        a 0-dim float64 tensor while compiling (reading the count on the host would break a
        ``torch.compile`` graph).
        """
        momentum = self.momentum
        if self.training and self.track_running_stats:
            nbt = self.num_batches_tracked
            if nbt is not None:
                nbt.add_(1)
                if momentum is None:
                    # compiling: no host read, no graph break; meta (a shape trace): no value
                    if torch.compiler.is_compiling() or nbt.device.type == "meta":
                        return nbt.double().reciprocal()
                    return 1.0 / float(nbt)
        return 0.0 if momentum is None else momentum

    def _cumulative_batch_norm(
        self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, factor: Tensor
    ) -> Tensor:
        """Training batch norm whose buffer update uses a tensor ``factor`` (momentum=None).

        ``F.batch_norm`` with momentum 1 writes the batch mean and unbiased variance into
        scratch buffers exactly as it would blend them; they are then blended with tensor ops.
        """
        if running_mean is None or running_var is None or input.numel() == 0:
            # nothing to update (an empty batch leaves torch.nn's buffers unchanged too)
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, True, 0.0, self.eps
            )
        weight, bias = self.weight, self.bias
        if running_mean.dtype in (torch.float16, torch.bfloat16):
            # half buffers (a model cast with .half()): the scratch ones in float32, or a batch
            # variance float16 cannot hold (9e4) turns inf before the blend scales it down.
            # torch's kernel wants float32 affine parameters with float32 buffers
            running_dtype = torch.float32
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        else:
            running_dtype = running_mean.dtype
        batch_mean = torch.zeros_like(running_mean, dtype=running_dtype)
        batch_var = torch.ones_like(running_var, dtype=running_dtype)
        out = F.batch_norm(input, batch_mean, batch_var, weight, bias, True, 1.0, self.eps)
        with torch.no_grad():
            _blend_(running_mean, batch_mean, factor)
            _blend_(running_var, batch_var, factor)
        return out

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (N, C, *) per channel; update the running stats in training."""
        if torch.jit.is_scripting():
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        # _use_batch_stats + _check_input + _batch_norm inlined, each attribute read once:
        # for small inputs the Python overhead is what separates us from torch.nn
        training = self.training
        running_mean, running_var = self.running_mean, self.running_var
        batch_stats = training or (running_mean is None and running_var is None)
        if input.dim() not in self._input_dims:
            self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            self._check_channels(input)
        momentum = self.momentum
        factor = 0.0 if momentum is None else momentum
        if batch_stats and input.numel() <= input.shape[1]:
            small = self._small_batch_forward(input)
            if small is not None:
                return small
        if training:
            if self.track_running_stats:
                nbt = self.num_batches_tracked
                if nbt is not None:
                    nbt.add_(1)
                    if momentum is None:
                        if torch.compiler.is_compiling() or nbt.device.type == "meta":
                            # 1 / count as a tensor: no torch.compile graph break, and no host
                            # read of a meta tensor (normcore.validate's shape trace)
                            return self._cumulative_batch_norm(
                                input, running_mean, running_var, nbt.double().reciprocal()
                            )
                        # the Python float torch.nn passes: F.batch_norm then updates the buffers
                        # bit for bit as torch.nn (a tensor factor is rounded to float32 first)
                        factor = 1.0 / float(nbt)
            else:
                running_mean = running_var = None
        return F.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, batch_stats, factor, self.eps
        )

    def _forward_script(self, input: Tensor) -> Tensor:
        """torch.nn's BatchNorm forward, what ``torch.jit.script`` compiles for this layer.

        The same computation with torch.nn's errors: no small-batch policy, no normcore messages.
        """
        factor = 0.0
        momentum = self.momentum
        if momentum is not None:
            factor = momentum
        if self.training and self.track_running_stats:
            nbt = self.num_batches_tracked
            if nbt is not None:
                nbt.add_(1)
                if momentum is None:
                    factor = 1.0 / float(nbt)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            input,
            self.running_mean if use_buffers else None,
            self.running_var if use_buffers else None,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )

    def _batch_norm(self, input: Tensor, batch_stats: bool) -> Tensor:
        """torch.nn's BatchNorm forward on an already checked input."""
        factor = self._average_factor()
        # buffers are passed when they are updated (training and tracked) or used (eval)
        if not self.training or self.track_running_stats:
            running_mean, running_var = self.running_mean, self.running_var
        else:
            running_mean = running_var = None
        if isinstance(factor, Tensor):
            return self._cumulative_batch_norm(input, running_mean, running_var, factor)
        return F.batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            batch_stats,
            factor,
            self.eps,
        )


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    """Batch normalization over (N, C) or (N, C, L) input; twin of ``torch.nn.BatchNorm1d``."""

    _input_dims = (2, 3)


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch normalization over (N, C, H, W) input; twin of ``torch.nn.BatchNorm2d``."""

    _input_dims = (4,)


class BatchNorm3d(_BatchNorm, nn.BatchNorm3d):
    """Batch normalization over (N, C, D, H, W) input; twin of ``torch.nn.BatchNorm3d``."""

    _input_dims = (5,)
