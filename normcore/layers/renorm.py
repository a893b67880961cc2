"""BatchRenorm2d (Ioffe, 2017): batch norm corrected towards the running statistics."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._torch_tools import Proxy, fx_leaf
from .batchnorm import SmallBatch, _BatchNorm, _blend_
from .fastops import scale_shift

__all__ = ["BatchRenorm2d"]


class BatchRenorm2d(_BatchNorm, nn.BatchNorm2d):
    """Batch renormalization over (N, C, H, W) input; state dict as ``BatchNorm2d``.

    Training normalizes with the batch statistics and corrects towards the running ones:
    ``x_hat = (x - mu_B) / sigma_B * r + d`` with ``r = clip(sigma_B / sigma, 1/r_max, r_max)``
    and ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``, both without gradient, where
    ``sigma = sqrt(running_var + eps)`` and ``mu = running_mean`` as they were before this
    batch. Running statistics are then updated exactly as BatchNorm updates them; eval mode
    normalizes with them. With ``r_max=1, d_max=0`` this is BatchNorm2d.

    Warm-up (r, d are meaningless until the running statistics settle): with ``t`` the number
    of training batches seen before this one (``num_batches_tracked``), the limits in use are
    ``1 + (r_max - 1) * p`` and ``d_max * p`` where ``p = clip((t - warmup_start) /
    warmup_steps, 0, 1)`` (``p = 1`` once ``t >= warmup_start`` when ``warmup_steps=0``).
    So the layer is plain BatchNorm for the first ``warmup_start`` batches, and the limits
    then widen linearly to ``(r_max, d_max)`` over ``warmup_steps`` batches.

    A subclass of ``torch.nn.BatchNorm2d`` (its eval mode is one), so torch's tools treat it as
    a batch norm: ``torch.optim.swa_utils.update_bn`` recomputes its running statistics (and
    resets ``num_batches_tracked``, which restarts the warm-up if training goes on);
    ``torch.func.replace_all_batch_norm_modules_`` removes them, after which it is plain
    BatchNorm (there is nothing to renormalize towards); torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` turns it into torch's plain SyncBatchNorm
    (normcore's ``convert_sync_norm`` leaves it alone).
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.01,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        warmup_start: int = 500,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        small_batch: SmallBatch = "error",
    ) -> None:
        if not r_max >= 1.0 or not d_max >= 0.0:
            raise ValueError(
                f"BatchRenorm2d: need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}"
            )
        if warmup_steps < 0 or warmup_start < 0:
            raise ValueError(
                f"BatchRenorm2d: warmup_steps and warmup_start must be >= 0, got "
                f"{warmup_steps} and {warmup_start}"
            )
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            True,
            device=device,
            dtype=dtype,
            bias=bias,
            small_batch=small_batch,
        )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start = int(warmup_start)

    def limits(self) -> tuple[Tensor, Tensor]:
        """The (r_max, d_max) in use for the next training batch, after the warm-up schedule."""
        assert self.num_batches_tracked is not None
        t = (self.num_batches_tracked - self.warmup_start).to(torch.float64)
        if self.warmup_steps > 0:
            p = (t / self.warmup_steps).clamp(0.0, 1.0)
        else:
            p = (t >= 0).to(torch.float64)
        return 1.0 + (self.r_max - 1.0) * p, self.d_max * p

    @staticmethod
    def _snapshot(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """Copies of the running statistics as they are before this batch's update.

        Under torch.compile (inductor, torch 2.13) a plain clone is not enough: the partitioner
        recomputes r and d in the backward from the buffers themselves, which the forward has
        already overwritten, and the gradients come out wrong. A reduction's output is saved
        rather than recomputed, so there the copy goes through an exact one (max of equal
        values).
        """
        if not torch.compiler.is_compiling():
            return mean.clone(), var.clone()
        both = torch.stack((mean, var)).unsqueeze(0).expand(8, 2, mean.numel()).amax(0)
        return both[0], both[1]

    def forward(self, input: Tensor) -> Tensor:
        """Renormalize with batch statistics in training; normalize with running ones in eval."""
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input)
        self._check_input(input, False)
        if self.training and input.numel() <= input.shape[1]:
            small = self._small_batch_forward(input)
            if small is not None:
                return small
        if not self.training or input.numel() == 0 or self.running_mean is None:
            # without running statistics (torch.func.replace_all_batch_norm_modules_ removes
            # them for vmap) there is nothing to renormalize towards: plain batch norm
            return self._batch_norm(input, self.training)
        assert self.running_mean is not None and self.running_var is not None
        r_max, d_max = self.limits()
        factor = self._average_factor()
        with torch.no_grad():
            old_mean, old_var = self._snapshot(self.running_mean, self.running_var)
            old_std = (old_var + self.eps).sqrt()
        # one fused pass: x_hat, the batch mean and 1/sqrt(var_B + eps), and the running
        # statistics updated exactly as BatchNorm updates them (r and d use the old ones)
        if isinstance(factor, Tensor):
            # momentum=None: scratch buffers take the batch statistics (momentum 1), then
            # they are blended with the tensor factor (compile-safe, no host sync)
            # float32 scratch for half buffers: a float16 one cannot hold a variance of 9e4
            acc = torch.promote_types(self.running_mean.dtype, torch.float32)
            batch_mean = torch.zeros_like(self.running_mean, dtype=acc)
            batch_var = torch.ones_like(self.running_var, dtype=acc)
            x_hat, mean, invstd = torch.native_batch_norm(
                input, None, None, batch_mean, batch_var, True, 1.0, self.eps
            )
            with torch.no_grad():
                _blend_(self.running_mean, batch_mean, factor)
                _blend_(self.running_var, batch_var, factor)
        else:
            x_hat, mean, invstd = torch.native_batch_norm(
                input, None, None, self.running_mean, self.running_var, True, factor, self.eps
            )
        with torch.no_grad():
            r_max, d_max = r_max.to(old_std.dtype), d_max.to(old_std.dtype)
            r = torch.clamp(invstd.reciprocal() / old_std, 1.0 / r_max, r_max)
            d = torch.clamp((mean - old_mean) / old_std, -d_max, d_max)
        # r and d are constants for autograd. no_grad alone is not enough under torch.compile
        # (aot_eager and inductor, torch 2.13): gradient leaked through r once the running
        # statistics had moved, giving wrong weight and input gradients; detach is honoured
        r, d = r.detach(), d.detach()
        # y = w * (x_hat * r + d) + b as one per-channel scale and shift (r, d: constants)
        scale, shift = r, d
        if self.weight is not None:
            scale, shift = self.weight * r, self.weight * d
        if self.bias is not None:
            shift = shift + self.bias
        shape = (1, -1, 1, 1)
        return scale_shift(
            x_hat, scale.to(x_hat.dtype).view(shape), shift.to(x_hat.dtype).view(shape)
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, warmup_start={self.warmup_start}"
        )
