"""Implementations of the channel-dim norms, picked per device, memory layout and dtype.

LayerNorm2d and RMSNorm2d normalize over C at each position of an (N, C, H, W) map,
``instance_norm_2d`` over (H, W) of each channel, ``rms_norm`` over the trailing dims. The twins
of torch.nn (InstanceNorm1d/2d/3d, RMSNorm) do not use these routes: a twin's outputs and
gradients are bit-identical to torch.nn's, so it runs torch.nn's own computation, and the routes
below reduce in another order (equal to rounding, not to the bit). Each has a ``torch``
implementation (torch's own kernels, with permutes where the kernel wants the normalized dim
last) and faster ones written for a layout:

- ``direct``: for contiguous NCHW input, reductions over dim 1 (vectorized along H*W) and a
  hand-written backward whose channel-weighted sums are batched GEMVs; no transposing copies,
  which dominate the permute route on CPU.
- ``rows``: an (M, D) row-major view (channels_last maps, RMSNorm's trailing dims) with the
  same hand-written backward; ``torch.nn.RMSNorm``'s CPU path is a chain of autograd ops.
- ``group_norm``: instance norm as a GroupNorm with one channel per group (one fused kernel;
  the fastest for NCHW; its channels_last CPU kernel is slow when H*W is small).
- ``direct`` for instance norm: reductions over (H, W) in either layout, hand-written backward.

``CHOICES`` is the table the layers read; its CPU entries come from
``python benchmarks/norm_layers.py --impls``, which times every candidate per layout and says
where the table disagrees. The fast paths are used for float32/float64; other dtypes (bf16,
fp16 autocast) and other devices use torch's kernels, which accumulate low precision in
float32, and so does code being compiled (inductor fuses the plain ops itself) or transformed
by torch.func (vmap, grad). Every route
returns the input's layout: channels_last in, channels_last out; contiguous in, contiguous out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

from ._torch_tools import functorch_active
from .fastops import scale_shift

__all__ = [
    "CHOICES",
    "IMPLEMENTATIONS",
    "instance_norm_2d",
    "layer_norm_2d",
    "layout_of",
    "pick",
    "restore_layout",
    "rms_norm",
    "rms_norm_2d",
]

_CL = torch.channels_last
_FAST_DTYPES = (torch.float32, torch.float64)

# (op, device type, layout) -> implementation, for float32/float64 input. Measured on CPU with
# `python benchmarks/norm_layers.py --impls` (forward+backward, training mode). A missing entry
# means "torch": CUDA has none yet (no GPU was at hand to measure the other routes there).
CHOICES: dict[tuple[str, str, str], str] = {
    ("layer_norm_2d", "cpu", "nchw"): "direct",  # 1.5-2x the permute route
    ("layer_norm_2d", "cpu", "channels_last"): "torch",  # the NHWC view is the kernel's layout
    ("rms_norm_2d", "cpu", "nchw"): "direct",  # 2-4x
    ("rms_norm_2d", "cpu", "channels_last"): "rows",  # 2-3x
    ("rms_norm", "cpu", "contiguous"): "rows",
    ("instance_norm_2d", "cpu", "nchw"): "group_norm",  # 2-3x F.instance_norm
    ("instance_norm_2d", "cpu", "channels_last"): "direct",  # 2-4x (group_norm: 0.4-2.4x)
}


def layout_of(x: Tensor) -> str:
    """``"nchw"`` (contiguous), ``"channels_last"`` or ``"strided"`` for a 4-D tensor.

    A tensor that is both (C == 1, or H == W == 1) counts as ``"nchw"``.
    """
    if x.is_contiguous():
        return "nchw"
    # vmap cannot tell channels_last apart (NYI there): its maps count as strided
    if x.dim() == 4 and not functorch_active() and x.is_contiguous(memory_format=_CL):
        return "channels_last"
    return "strided"


def restore_layout(out: Tensor, layout: str) -> Tensor:
    """``out`` in the memory layout ``layout`` named (a copy only when it is not already)."""
    if layout == "nchw":
        return out if out.is_contiguous() else out.contiguous()
    if layout == "channels_last" and not out.is_contiguous(memory_format=_CL):
        return out.contiguous(memory_format=_CL)
    return out


def pick(op: str, x: Tensor, layout: str) -> str:
    """The implementation ``op`` uses for ``x`` (device, layout and dtype), from ``CHOICES``."""
    if x.dtype not in _FAST_DTYPES or torch.compiler.is_compiling() or functorch_active():
        return "torch"  # the fast paths are autograd.Functions without a vmap rule
    # is_cpu is a flag; x.device builds an object (this runs on every forward)
    return CHOICES.get((op, "cpu" if x.is_cpu else x.device.type, layout), "torch")


def _wsum(weight: Tensor, t: Tensor) -> Tensor:
    """``sum_c weight[c] * t[n, c, h, w]`` as (N, 1, H, W): one batched GEMV, no temporaries."""
    n, c, h, w = t.shape
    wv = weight.to(t.dtype).view(1, 1, c).expand(n, 1, c)
    return torch.bmm(wv, t.view(n, c, h * w)).view(n, 1, h, w)


def _vec(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).view(1, -1, 1, 1)


def _affine(xhat: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``xhat * weight + bias`` per channel; a new tensor even without either (xhat is saved
    for the backward and must not be handed out)."""
    w, b = _vec(weight, xhat.dtype), _vec(bias, xhat.dtype)
    if w is not None:
        return xhat * w if b is None else scale_shift(xhat, w, b)
    return xhat.clone() if b is None else xhat + b


def _grads_of(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor | None], dy: Tensor, needs: Sequence[bool]
) -> tuple[Tensor | None, ...]:
    """Gradients of ``fn(*inputs)`` for ``dy`` through torch's plain ops, themselves
    differentiable: the hand-written backwards hand over to this under ``create_graph=True``
    (gradient penalties), where the saved input still carries its graph."""
    wanted = [i for i, t in enumerate(inputs) if needs[i] and t is not None]
    out: list[Tensor | None] = [None] * len(inputs)
    if wanted:
        grads = torch.autograd.grad(
            fn(*inputs), [inputs[i] for i in wanted], dy, create_graph=True, allow_unused=True
        )
        for i, g in zip(wanted, grads, strict=True):
            out[i] = g
    return tuple(out)


class _LayerNormNCHW(torch.autograd.Function):
    """LayerNorm over dim 1 of a contiguous NCHW map, without leaving the NCHW layout."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        mean = x.mean(1, keepdim=True)
        xc = x - mean
        rstd = xc.square().mean(1, keepdim=True).add_(eps).rsqrt_()
        xhat = xc.mul_(rstd)
        y = _affine(xhat, weight, bias)
        # xhat for the backward below; the input too, for a double backward (see _grads_of)
        ctx.save_for_backward(x, xhat, rstd, weight, bias)
        ctx.eps = eps  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, xhat, rstd, weight, bias = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: see _grads_of
            eps = ctx.eps  # type: ignore[attr-defined]
            grads = _grads_of(
                lambda x, w, b: _ln2d_torch(x, w, b, eps), (x, weight, bias), dy, needs
            )
            return (*grads, None)
        c = xhat.shape[1]
        dy = dy.contiguous()
        dbias = dy.sum((0, 2, 3)) if bias is not None and needs[2] else None
        p = dy * xhat
        dweight = p.sum((0, 2, 3)) if weight is not None and needs[1] else None
        dx = None
        if needs[0]:
            # dx = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)) with g = dy * weight
            if weight is None:
                c2, c1, t = p.mean(1, keepdim=True), dy.mean(1, keepdim=True), dy.clone()
            else:
                c2, c1 = _wsum(weight, p).div_(c), _wsum(weight, dy).div_(c)
                t = dy * weight.to(dy.dtype).view(1, -1, 1, 1)
            t.addcmul_(xhat, c2, value=-1)
            dx = torch.addcmul(c1.mul_(rstd).neg_(), t, rstd)
        return (
            dx,
            None if dweight is None else dweight.to(weight.dtype),
            dbias,  # cast by autograd's engine when bias has another dtype
            None,
        )


class _RMSNormNCHW(torch.autograd.Function):
    """RMSNorm over dim 1 of a contiguous NCHW map, without leaving the NCHW layout."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, eps: float
    ) -> Tensor:
        rstd = x.square().mean(1, keepdim=True).add_(eps).rsqrt_()
        xhat = x * rstd
        w = _vec(weight, x.dtype)
        y = xhat.clone() if w is None else xhat * w
        ctx.save_for_backward(x, xhat, rstd, weight)
        ctx.eps = eps  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, xhat, rstd, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: see _grads_of
            eps = ctx.eps  # type: ignore[attr-defined]
            return (*_grads_of(lambda x, w: _rms2d_torch(x, w, eps), (x, weight), dy, needs), None)
        c = xhat.shape[1]
        dy = dy.contiguous()
        p = dy * xhat
        dweight = p.sum((0, 2, 3)) if weight is not None and needs[1] else None
        dx = None
        if needs[0]:
            # dx = rstd * (g - xhat * mean_c(g * xhat)) with g = dy * weight
            if weight is None:
                cc, t = p.mean(1, keepdim=True), dy.clone()
            else:
                cc = _wsum(weight, p).div_(c)
                t = dy * weight.to(dy.dtype).view(1, -1, 1, 1)
            dx = t.addcmul_(xhat, cc, value=-1).mul_(rstd)
        return dx, None if dweight is None else dweight.to(weight.dtype), None


class _InstanceNormSpatial(torch.autograd.Function):
    """Instance norm over (H, W) of each (sample, channel), in the input's layout.

    Reductions over dims (2, 3) run along contiguous memory in NCHW and vectorized across C in
    channels_last; the backward uses that the affine is constant over the reduced dims.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
    ) -> Tensor:
        mean = x.mean((2, 3), keepdim=True)
        xc = x - mean
        rstd = xc.square().mean((2, 3), keepdim=True).add_(eps).rsqrt_()
        xhat = xc.mul_(rstd)
        y = _affine(xhat, weight, bias)
        ctx.save_for_backward(x, xhat, rstd, weight, bias)
        ctx.eps = eps  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, xhat, rstd, weight, bias = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        if torch.is_grad_enabled():  # create_graph: see _grads_of
            eps = ctx.eps  # type: ignore[attr-defined]
            grads = _grads_of(
                lambda x, w, b: _in2d_torch(x, w, b, eps), (x, weight, bias), dy, needs
            )
            return (*grads, None)
        hw = xhat.shape[2] * xhat.shape[3]
        m1 = dy.mean((2, 3), keepdim=True)
        m2 = (dy * xhat).mean((2, 3), keepdim=True)
        dbias = m1.sum(0).flatten() * hw if bias is not None and needs[2] else None
        dweight = None
        if weight is not None and needs[1]:
            dweight = (m2.sum(0).flatten() * hw).to(weight.dtype)
        dx = None
        if needs[0]:
            # dx = rstd * weight * (dy - mean_hw(dy) - xhat * mean_hw(dy * xhat))
            scale = rstd if weight is None else rstd * _vec(weight, dy.dtype)
            dx = (dy - m1).addcmul_(xhat, m2, value=-1).mul_(scale)
        return dx, dweight, dbias, None


class _RMSNormRows(torch.autograd.Function):
    """RMSNorm over the last dim of a contiguous (M, D) matrix."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, weight: Tensor | None, eps: float
    ) -> Tensor:
        d = x.shape[1]
        ms = torch.linalg.vector_norm(x, dim=1, keepdim=True).square_().div_(d)
        rstd = ms.add_(eps).rsqrt_()
        xhat = x * rstd
        y = xhat.clone() if weight is None else xhat * weight.to(x.dtype)
        ctx.save_for_backward(x, xhat, rstd, weight)
        ctx.eps = eps  # type: ignore[attr-defined]
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, xhat, rstd, weight = ctx.saved_tensors  # type: ignore[attr-defined]
        needs = ctx.needs_input_grad  # type: ignore[attr-defined]
        d = x.shape[1]
        if torch.is_grad_enabled():  # create_graph: see _grads_of
            eps = ctx.eps  # type: ignore[attr-defined]
            grads = _grads_of(lambda x, w: torch.rms_norm(x, (d,), w, eps), (x, weight), dy, needs)
            return (*grads, None)
        dy = dy.contiguous()
        p = dy * xhat
        dweight = p.sum(0) if weight is not None and needs[1] else None
        dx = None
        if needs[0]:
            if weight is None:
                cc, t = p.mean(1, keepdim=True), dy.clone()
            else:
                w = weight.to(dy.dtype)
                cc, t = torch.mv(p, w).div_(d).unsqueeze(1), dy * w
            dx = t.addcmul_(xhat, cc, value=-1).mul_(rstd)
        return dx, None if dweight is None else dweight.to(weight.dtype), None


# --------------------------------------------------------------------------- the ops


def _ln2d_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    out = torch.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return out.permute(0, 3, 1, 2)


def _ln2d_direct(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return _LayerNormNCHW.apply(x.contiguous(), weight, bias, eps)


def _rms2d_torch(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return torch.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, eps).permute(0, 3, 1, 2)


def _rms2d_direct(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    return _RMSNormNCHW.apply(x.contiguous(), weight, eps)


def _rms2d_rows(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view for channels_last input
    return _RMSNormRows.apply(rows, weight, eps).view(n, h, w, c).permute(0, 3, 1, 2)


def _in2d_torch(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.instance_norm(x, None, None, weight, bias, True, 0.0, eps)


def _in2d_group_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return F.group_norm(x, x.shape[1], weight, bias, eps)


def _in2d_direct(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    return _InstanceNormSpatial.apply(x, weight, bias, eps)


def _rms_torch(x: Tensor, shape: Sequence[int], weight: Tensor | None, eps: float) -> Tensor:
    return F.rms_norm(x, list(shape), weight, eps)


def _rms_rows(x: Tensor, shape: Sequence[int], weight: Tensor | None, eps: float) -> Tensor:
    d = 1
    for s in shape:
        d *= s
    w = None if weight is None else weight.reshape(d)
    return _RMSNormRows.apply(x.contiguous().view(-1, d), w, eps).view(x.shape)


IMPLEMENTATIONS: dict[str, dict[str, Callable[..., Tensor]]] = {
    "layer_norm_2d": {"torch": _ln2d_torch, "direct": _ln2d_direct},
    "rms_norm_2d": {"torch": _rms2d_torch, "direct": _rms2d_direct, "rows": _rms2d_rows},
    "instance_norm_2d": {
        "torch": _in2d_torch,
        "group_norm": _in2d_group_norm,
        "direct": _in2d_direct,
    },
    "rms_norm": {"torch": _rms_torch, "rows": _rms_rows},
}


def layer_norm_2d(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    impl: str | None = None,
) -> Tensor:
    """LayerNorm over dim 1 of an (N, C, H, W) map, returned in the input's layout.

    ``impl`` forces one of ``IMPLEMENTATIONS["layer_norm_2d"]`` (tests and benchmarks);
    by default ``pick`` chooses.
    """
    layout = layout_of(x)
    name = impl or pick("layer_norm_2d", x, layout)
    return restore_layout(IMPLEMENTATIONS["layer_norm_2d"][name](x, weight, bias, eps), layout)


def rms_norm_2d(x: Tensor, weight: Tensor | None, eps: float, impl: str | None = None) -> Tensor:
    """RMSNorm over dim 1 of an (N, C, H, W) map, returned in the input's layout."""
    layout = layout_of(x)
    name = impl or pick("rms_norm_2d", x, layout)
    return restore_layout(IMPLEMENTATIONS["rms_norm_2d"][name](x, weight, eps), layout)


def instance_norm_2d(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    impl: str | None = None,
) -> Tensor:
    """Instance norm of an (N, C, H, W) map with its own statistics, in the input's layout."""
    layout = layout_of(x)
    name = impl or pick("instance_norm_2d", x, layout)
    return restore_layout(IMPLEMENTATIONS["instance_norm_2d"][name](x, weight, bias, eps), layout)


def rms_norm(
    x: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None,
    eps: float,
    impl: str | None = None,
) -> Tensor:
    """RMSNorm over the trailing ``normalized_shape`` dims (``F.rms_norm`` semantics)."""
    if impl is None:
        impl = pick("rms_norm", x, "contiguous" if x.is_contiguous() else "strided")
    return IMPLEMENTATIONS["rms_norm"][impl](x, normalized_shape, weight, eps)
