"""GhostBatchNorm2d (Hoffer et al., 2017): batch norm over virtual sub-batches."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .batchnorm import _BatchNorm

__all__ = ["GhostBatchNorm2d"]


class GhostBatchNorm2d(_BatchNorm):
    """BatchNorm2d whose batch statistics come from chunks of ``virtual_batch_size`` samples.

    Whenever batch statistics are used (training, or eval without running stats) the batch is
    split into consecutive chunks of ``virtual_batch_size`` samples, each normalized with its
    own mean and biased variance. A last, smaller chunk is normalized on its own, unless it
    has a single value per channel, in which case it joins the chunk before it.

    Running statistics get one update per forward (``num_batches_tracked`` += 1), with the
    chunk statistics averaged, weighted by chunk size: ``mean = sum(n_i * mean_i) / N`` and
    ``var = sum(n_i * var_i) / N`` where ``var_i`` is chunk i's unbiased variance
    (``m_i / (m_i - 1)`` correction with ``m_i`` values per channel). With one chunk
    (``virtual_batch_size >= N``) this is exactly BatchNorm2d.
    """

    _input_dims = (4,)

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or int(virtual_batch_size) < 2:
            raise ValueError(
                f"GhostBatchNorm2d: virtual_batch_size must be an integer >= 2, "
                f"got {virtual_batch_size!r}"
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
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, input: Tensor) -> Tensor:
        """Normalize each virtual batch with its own statistics (training) or running stats."""
        batch_stats = self._use_batch_stats()
        self._check_input(input, batch_stats)
        n = input.shape[0]
        if not batch_stats or n <= self.virtual_batch_size:
            return self._batch_norm(input, batch_stats)

        vbs = self.virtual_batch_size
        spatial = math.prod(input.shape[2:])
        full, rest = divmod(n, vbs)
        if rest * spatial == 1:  # a lone value per channel has no variance: merge it
            full -= 1
        head = full * vbs

        acc = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        x = input.to(acc)
        c = input.shape[1]
        outs, means, variances, counts = [], [], [], []
        if full > 0:
            # (k, vbs, C, H, W): one reduction over all chunks at once
            xh = x[:head].reshape(full, vbs, *x.shape[1:])
            var, mean = torch.var_mean(xh, dim=(1, 3, 4), correction=0, keepdim=True)
            outs.append(self._affine(xh, mean, var, (1, 1, c, 1, 1)).reshape(head, *x.shape[1:]))
            means.append(mean.reshape(full, c))
            variances.append(var.reshape(full, c))
            counts += [vbs] * full
        if head < n:
            xt = x[head:]
            var, mean = torch.var_mean(xt, dim=(0, 2, 3), correction=0, keepdim=True)
            outs.append(self._affine(xt, mean, var, (1, c, 1, 1)))
            means.append(mean.reshape(1, c))
            variances.append(var.reshape(1, c))
            counts.append(n - head)

        factor = self._average_factor()
        if self.training and self.track_running_stats:
            assert self.running_mean is not None and self.running_var is not None
            with torch.no_grad():
                w = torch.tensor(counts, dtype=acc, device=input.device).unsqueeze(1)
                m = w * spatial
                mean_all = (torch.cat(means) * w).sum(0) / n
                var_all = (torch.cat(variances) * m / (m - 1) * w).sum(0) / n
                rm, rv = self.running_mean, self.running_var
                rm.mul_(1.0 - factor).add_(mean_all.to(rm.dtype), alpha=factor)
                rv.mul_(1.0 - factor).add_(var_all.to(rv.dtype), alpha=factor)
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.to(input.dtype)

    def _affine(self, x: Tensor, mean: Tensor, var: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` as one scale and shift."""
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(x.dtype).view(shape)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(x.dtype).view(shape)
        return torch.addcmul(shift, x, scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"
