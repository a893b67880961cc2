"""The CPU-fast ops give torch's own values and gradients (float64), ties of maximum included."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from normcore.layers.fastops import maximum, scale_shift, variance

F64 = torch.float64


def _grads(fn, *inputs: Tensor, seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """Output of ``fn`` on fresh leaf copies of ``inputs`` and the gradients of a random loss."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((4, 6, 5, 5), (1, 6, 1, 1)), ((1, 6, 1, 1), (4, 6, 5, 5)), ((4, 6, 5, 5), (4, 6, 5, 5))],
)
def test_maximum_matches_torch_with_ties_and_broadcasting(a_shape, b_shape) -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(a_shape, generator=gen, dtype=F64)
    b = torch.randn(b_shape, generator=gen, dtype=F64)
    # exact ties, as after a ReLU with tau = 0: torch gives each side half the gradient
    a.view(-1)[::3] = 0.0
    b.view(-1)[::2] = 0.0
    big = torch.broadcast_tensors(a, b)
    assert bool((big[0] == big[1]).any()), "the test needs ties"
    ours, our_grads = _grads(maximum, a, b)
    ref, ref_grads = _grads(torch.maximum, a, b)
    assert torch.equal(ours, ref)
    for g, r in zip(our_grads, ref_grads, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_maximum_double_backward_matches_torch() -> None:
    """A gradient penalty differentiates the gradient again: same as torch.maximum's."""
    gen = torch.Generator().manual_seed(5)
    a0 = torch.randn(3, 4, 5, 5, generator=gen, dtype=F64)
    b0 = torch.randn(1, 4, 1, 1, generator=gen, dtype=F64)
    results = []
    for fn in (maximum, torch.maximum):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        out = fn(a * a, b)
        (ga,) = torch.autograd.grad(out.square().sum(), a, create_graph=True)
        ga.square().sum().backward()
        results.append((a.grad, b.grad))
    for ours, ref in zip(*results, strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_maximum_without_grad_is_torch_maximum() -> None:
    a, b = torch.randn(3, 4), torch.zeros(1, 4)
    with torch.no_grad():
        assert torch.equal(maximum(a.requires_grad_(), b), torch.maximum(a, b))
    assert maximum(a.detach(), b).grad_fn is None


@pytest.mark.parametrize("dims", [(2, 3), (0, 2, 3), (1,)])
@pytest.mark.parametrize("keepdim", [False, True])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_variance_matches_biased_var(dims, keepdim, layout) -> None:
    x = torch.randn(4, 6, 5, 7, dtype=F64, generator=torch.Generator().manual_seed(2)) * 3 + 5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    ours, (g_ours,) = _grads(lambda t: variance(t, dims, keepdim=keepdim), x)
    ref, (g_ref,) = _grads(lambda t: t.var(dim=dims, correction=0, keepdim=keepdim), x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("scale_shape", [(1, 6, 1, 1), (4, 6, 1, 1)])
def test_scale_shift_matches_addcmul(layout, scale_shape) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, 5, 7, dtype=F64, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    scale = torch.rand(scale_shape, dtype=F64, generator=gen) + 0.5
    shift = torch.randn(1, 6, 1, 1, dtype=F64, generator=gen)
    ours, our_grads = _grads(scale_shift, x, scale, shift)
    ref, ref_grads = _grads(lambda t, s, b: torch.addcmul(b, t, s), x, scale, shift)
    torch.testing.assert_close(ours, ref, rtol=1e-14, atol=1e-14)
    for g, r in zip(our_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
