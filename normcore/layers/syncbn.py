"""SyncBatchNorm: batch normalization whose statistics span a torch.distributed process group.

Unlike ``torch.nn.SyncBatchNorm`` this works with gloo on CPU as well as NCCL on GPU: the
statistics and gradient reductions are written with plain tensor ops and collectives.

It is a subclass of ``nn.modules.batchnorm._BatchNorm``, so torch's batch-norm tools
(``update_bn``, ``replace_all_batch_norm_modules_``, ``isinstance`` checks) see it, but not of
``torch.nn.SyncBatchNorm``: DistributedDataParallel refuses any ``nn.SyncBatchNorm`` in a CPU
model ("SyncBatchNorm layers only work with GPU modules"), which would rule out the gloo/CPU
synchronization this layer exists for.

Converting a model: ``SyncBatchNorm.convert_sync_batchnorm(model)`` (normcore's, as
``normcore.convert_sync_norm``) makes normcore's SyncBatchNorm of every plain batch norm, torch.nn's
and normcore's. torch's own ``nn.SyncBatchNorm.convert_sync_batchnorm`` makes torch's class of
every ``_BatchNorm`` it finds, normcore's included (GhostBatchNorm2d, BatchRenorm2d and
SplitBatchNorm2d too, which then lose their own training rule): use normcore's for normcore
models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

from normcore._surgery import replace_modules
from normcore.layers._torch_tools import Proxy, fx_leaf
from normcore.layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, SmallBatch, _BatchNorm

__all__ = ["SyncBatchNorm", "sync_batch_norm"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the statistics are accumulated in: at least float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _all_gather(t: Tensor, group: Any, world_size: int) -> Tensor:
    """All-gather a 1-D tensor from every rank into a ``(world_size, numel)`` tensor."""
    # gloo has no all_gather_into_tensor; the list form works on every backend.
    if t.device.type == "cpu" or dist.get_backend(group) == "gloo":
        parts = [torch.empty_like(t) for _ in range(world_size)]
        dist.all_gather(parts, t, group=group)
        return torch.stack(parts)
    out = t.new_empty(world_size * t.numel())
    dist.all_gather_into_tensor(out, t, group=group)
    return out.view(world_size, t.numel())


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over the union of every rank's batch.

    Forward all-gathers per-rank ``[mean, M2, count]`` (M2 = sum of squared deviations from the
    local mean) and merges them with Chan's parallel formula, so uneven and empty per-rank
    batches are exact. Backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mean))``.
    Parameter gradients are the *local* contributions (as in torch.nn.SyncBatchNorm): their sum
    over ranks is the gradient of the summed loss; DDP's all-reduce does that summing (and
    divides by the world size).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float | Tensor,
        process_group: Any,
        world_size: int,
    ) -> Tensor:
        c = x.shape[1]
        acc = _acc_dtype(x.dtype)
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)
        n_local = x.numel() // c if c else 0

        xa = x.to(acc)
        if n_local > 0:
            mean_l = xa.sum(dims) / n_local
            m2_l = (xa - mean_l.view(shape)).square().sum(dims)
        else:
            # an empty rank still joins the collective, contributing count 0
            mean_l = xa.new_zeros(c)
            m2_l = xa.new_zeros(c)
        local = torch.cat([mean_l, m2_l, xa.new_full((1,), float(n_local))])
        gathered = _all_gather(local, process_group, world_size)
        means, m2s, counts = gathered[:, :c], gathered[:, c : 2 * c], gathered[:, 2 * c :]

        n = counts.sum()
        mean = (counts * means).sum(0) / n.clamp(min=1)
        m2 = (m2s + counts * (means - mean).square()).sum(0)
        var = m2 / n.clamp(min=1)
        invstd = torch.rsqrt(var + eps)

        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                # with <= 1 value per channel over the whole group there is no variance to
                # average in: keep the buffers (decided on device, without a host sync)
                ok = n > 1
                unbiased = m2 / (n - 1).clamp(min=1)
                # blended in the accumulation dtype and rounded once: a float16 buffer takes
                # momentum * 9e4 but not 9e4 itself
                new_mean = running_mean.to(acc) * (1.0 - momentum) + mean * momentum
                new_var = running_var.to(acc) * (1.0 - momentum) + unbiased * momentum
                running_mean.copy_(torch.where(ok, new_mean, running_mean.to(acc)))
                running_var.copy_(torch.where(ok, new_var, running_var.to(acc)))

        scale = invstd if weight is None else invstd * weight.to(acc)
        y = (xa - mean.view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)

        ctx.save_for_backward(x, weight, mean, invstd, n)
        ctx.process_group = process_group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd, n = ctx.saved_tensors
        c = x.shape[1]
        acc = mean.dtype
        dims = [0, *range(2, x.dim())]
        shape = [1, c] + [1] * (x.dim() - 2)

        dy = grad_out.to(acc)
        xmu = x.to(acc) - mean.view(shape)
        # sums over an empty local batch are zeros, so an empty rank needs no special case
        sum_dy = dy.sum(dims)
        sum_dy_xmu = (dy * xmu).sum(dims)

        grad_weight = grad_bias = grad_input = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(ctx.bias_dtype)

        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(combined, dist.ReduceOp.SUM, group=ctx.process_group)
            sum_dy, sum_dy_xmu = combined[:c], combined[c:]
            nf = n.clamp(min=1)
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_input = (
                dy
                - (sum_dy / nf).view(shape)
                - xmu * (invstd.square() * sum_dy_xmu / nf).view(shape)
            ) * scale.view(shape)
            grad_input = grad_input.to(x.dtype)

        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


def sync_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
    process_group: Any = None,
) -> Tensor:
    """Training-mode batch norm with statistics over ``process_group`` (default: the world).

    Updates ``running_mean``/``running_var`` in place with ``momentum`` (unbiased variance over
    the total count) when they are given. Falls back to ``F.batch_norm`` when torch.distributed
    is not initialized or the group has a single rank.
    """
    world = _world_group()
    group = process_group if process_group is not None else world
    world_size = dist.get_world_size(group) if world is not None else 1
    if world_size <= 1:
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, True, momentum, eps
        )
    return _SyncBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, eps, momentum, group, world_size
    )


def _world_group() -> Any:
    """The default process group, or None when torch.distributed is not usable."""
    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span a process group (gloo/CPU and NCCL/GPU).

    Same signature, state dict and repr as ``torch.nn.SyncBatchNorm``; a subclass of torch's
    ``_BatchNorm`` but not of ``nn.SyncBatchNorm``, which DDP refuses on CPU (see the module
    docstring); accepts 2D-5D input. In eval mode, or without an initialized process group of
    more than one rank, it is exactly ``BatchNorm``. Parameter gradients are local (sum them
    across ranks, as DDP does). Under ``torch.jit.script`` (which torch.nn's SyncBatchNorm does
    not support) it is an eval-mode BatchNorm: TorchScript has no process groups, so a scripted
    one raises in training mode.
    """

    _input_dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        small_batch: SmallBatch = "error",
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
            small_batch=small_batch,
        )
        self.process_group = process_group

    def _sync_target(self) -> tuple[Any, int] | None:
        """(group, world size) when this forward must synchronize, else None."""
        world = _world_group()
        if not self.training or world is None:
            return None
        group = self.process_group if self.process_group is not None else world
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (N, C, *) with statistics over every rank's batch when training."""
        if torch.jit.is_scripting():
            if self.training:
                raise RuntimeError(
                    "normcore.SyncBatchNorm under TorchScript normalizes in eval mode only "
                    "(TorchScript has no process groups): call .eval() on it"
                )
            return self._forward_script(input)
        if type(input) is not Tensor and isinstance(input, Proxy):  # torch.fx: a call_module
            return fx_leaf(self, input, self._forward_script)
        target = self._sync_target()
        if target is None:
            return super().forward(input)
        group, world_size = target
        # one value per channel on this rank is fine: the statistics combine all ranks
        self._check_input(input, batch_stats=False)
        factor = self._average_factor()
        track = self.track_running_stats
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.eps,
            factor,
            group,
            world_size,
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, process_group: Any = None) -> SyncBatchNorm:
        """A SyncBatchNorm on ``process_group`` holding ``bn``'s own parameters and buffers.

        ``bn`` is a batch norm of torch.nn or normcore (anything with BatchNorm's attributes);
        device, dtype, requires_grad, the training flag, the small-batch policy and a
        quantization ``qconfig`` are kept. ``bn`` itself is not changed.
        """
        affine = bool(bn.affine)
        new = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            affine,
            bn.track_running_stats,
            process_group,
            bias=not affine or bn.bias is not None,
            device="meta",  # every tensor is replaced by the old layer's own below
            small_batch=getattr(bn, "small_batch", "error"),
        )
        for name in ("weight", "bias"):
            if name in new._parameters:
                setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        # the input dims of the layer it replaces (normcore.convert.norm_dims reads it back)
        norm_dims = getattr(bn, "norm_dims", None)
        if norm_dims is None and isinstance(bn, nn.BatchNorm1d | nn.BatchNorm3d):
            norm_dims = 1 if isinstance(bn, nn.BatchNorm1d) else 3
        if norm_dims is not None:
            new.norm_dims = norm_dims
        return new.train(bn.training)

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, giving normcore's SyncBatchNorm.

        Every plain batch norm of ``module`` (torch.nn's and normcore's BatchNorm1d/2d/3d and
        SyncBatchNorm, and the layers of every kind registered as syncable) becomes a
        SyncBatchNorm on ``process_group`` sharing its parameters and buffers. GhostBatchNorm2d,
        BatchRenorm2d and SplitBatchNorm2d keep their own training rule and are left alone, as
        is any batch norm subclass normcore does not know (``normcore.convert_sync_norm`` warns
        about those). Returns ``module``, or its replacement if it is a batch norm itself;
        nothing is changed if a replacement cannot be built.
        """
        return replace_modules(
            module,
            lambda m: cls.from_batchnorm(m, process_group) if is_syncable(m) else None,
        )


# The plain batch norms (batch statistics and nothing else in the forward), by exact class:
# what convert_sync_batchnorm replaces before normcore.registry is imported. The registry, whose
# table says which kinds are syncable (these are its "bn" and "sync_bn"), installs its own rule
# in is_syncable when imported; no kind of yours can exist before that.
_PLAIN_BATCH_NORMS: frozenset[type[nn.Module]] = frozenset(
    {
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.SyncBatchNorm,
        BatchNorm1d,
        BatchNorm2d,
        BatchNorm3d,
        SyncBatchNorm,
    }
)


def _is_plain_batch_norm(module: nn.Module) -> bool:
    return type(module) in _PLAIN_BATCH_NORMS


is_syncable: Callable[[nn.Module], bool] = _is_plain_batch_norm


def set_syncable_rule(rule: Callable[[nn.Module], bool]) -> None:
    """Make ``convert_sync_batchnorm`` replace the modules ``rule`` accepts (normcore.registry)."""
    global is_syncable
    is_syncable = rule
