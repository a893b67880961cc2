"""Gradient penalties (WGAN-GP, R1) differentiate a gradient again: every channel-dim norm gives
the second-order gradients of torch's own ops, in both layouts and through every implementation."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L
from normcore.layers import channelwise

F64 = torch.float64
CL = torch.channels_last


def _penalty_grads(layer: nn.Module, fn: Callable[[Tensor], Tensor], x0: Tensor) -> list[Tensor]:
    """d/d(x, params) of |d sum(fn(x)^2) / dx|^2, the shape of a gradient penalty."""
    x = x0.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x).square().sum(), x, create_graph=True)
    params = list(layer.parameters())
    return list(torch.autograd.grad(gx.square().sum(), [x, *params]))


def _randomized(layer: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
    return layer.double()


# name -> (layer, the same computation with torch's plain ops, input dims)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module, Tensor], Tensor]]] = {
    "LayerNorm2d": (
        lambda: L.LayerNorm2d(6),
        lambda m, x: channelwise._ln2d_torch(x, m.weight, m.bias, m.eps),
    ),
    "RMSNorm2d": (
        lambda: L.RMSNorm2d(6),
        lambda m, x: channelwise._rms2d_torch(x, m.weight, m.eps),
    ),
    "InstanceNorm2d": (
        lambda: L.InstanceNorm2d(6, affine=True),
        lambda m, x: nn.functional.instance_norm(x, weight=m.weight, bias=m.bias, eps=m.eps),
    ),
    "GroupNorm": (
        lambda: L.GroupNorm(3, 6),
        lambda m, x: nn.functional.group_norm(x, 3, m.weight, m.bias, m.eps),
    ),
}


OPS = {
    "LayerNorm2d": "layer_norm_2d",
    "RMSNorm2d": "rms_norm_2d",
    "InstanceNorm2d": "instance_norm_2d",
}
# the module's own choice (None) and, for the channelwise ops, each implementation forced
IMPLS = [(name, None) for name in CASES] + [
    (name, impl) for name, op in OPS.items() for impl in channelwise.IMPLEMENTATIONS[op]
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(("name", "impl"), IMPLS)
def test_second_order_gradients_match_torch(name: str, layout: str, impl: str | None) -> None:
    build, reference = CASES[name]
    op = OPS.get(name, "")
    layer = _randomized(build())
    x0 = torch.randn(3, 6, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(1)) * 2 + 1
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=CL)

    def ours(x: Tensor) -> Tensor:
        if impl is None:
            return layer(x)
        fn = getattr(channelwise, op)
        if op == "rms_norm_2d":
            return fn(x, layer.weight, layer.eps, impl=impl)
        return fn(x, layer.weight, layer.bias, layer.eps, impl=impl)

    got = _penalty_grads(layer, ours, x0)
    want = _penalty_grads(layer, lambda x: reference(layer, x), x0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_rmsnorm_second_order_gradients_match_torch_nn() -> None:
    ours, ref = _randomized(L.RMSNorm(5)), _randomized(nn.RMSNorm(5))
    x0 = torch.randn(4, 7, 5, dtype=F64, generator=torch.Generator().manual_seed(2))
    for g, w in zip(_penalty_grads(ours, ours, x0), _penalty_grads(ref, ref, x0), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


def test_first_order_gradients_are_unchanged_by_the_second_order_path() -> None:
    """Without create_graph the hand-written backward runs; it agrees with the plain ops."""
    layer = _randomized(L.LayerNorm2d(6))
    x = torch.randn(3, 6, 4, 5, dtype=F64, requires_grad=True)
    y = channelwise.layer_norm_2d(x, layer.weight, layer.bias, layer.eps, impl="direct")
    assert y.grad_fn is not None and "LayerNormNCHW" in type(y.grad_fn).__name__
    (ours,) = torch.autograd.grad(y.square().sum(), x)
    ref_y = channelwise._ln2d_torch(x, layer.weight, layer.bias, layer.eps)
    (ref,) = torch.autograd.grad(ref_y.square().sum(), x)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
