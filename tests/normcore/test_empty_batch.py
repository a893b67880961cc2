"""Every batch-statistics layer takes an empty batch (N = 0) as torch.nn.BatchNorm2d does.

torch's contract (pytorch#12013), checked here against torch.nn itself on the same input: the
output is empty with the input's shape and dtype; the input gradient is empty and the weight
and bias gradients are zeros; running_mean and running_var are untouched; in training
``num_batches_tracked`` still counts the call (so with ``momentum=None`` the next batch is
averaged in with weight 1/2, not 1). The tests run an empty batch, then a real one, in train
and in eval mode, and compare every output, gradient and buffer with torch.nn's twin after the
same sequence.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L

C = 4

# (ours, torch twin class, input shapes: an empty one, then a real one)
BN_KINDS: dict[str, tuple[Callable[..., nn.Module], type[nn.Module], tuple[int, ...]]] = {
    "BatchNorm1d-2d-input": (L.BatchNorm1d, nn.BatchNorm1d, (6, C)),
    "BatchNorm1d-3d-input": (L.BatchNorm1d, nn.BatchNorm1d, (3, C, 5)),
    "BatchNorm2d": (L.BatchNorm2d, nn.BatchNorm2d, (3, C, 3, 3)),
    "BatchNorm3d": (L.BatchNorm3d, nn.BatchNorm3d, (2, C, 2, 3, 3)),
    "SyncBatchNorm-2d": (L.SyncBatchNorm, nn.BatchNorm1d, (6, C)),
    "SyncBatchNorm-4d": (L.SyncBatchNorm, nn.BatchNorm2d, (3, C, 3, 3)),
    "SyncBatchNorm-5d": (L.SyncBatchNorm, nn.BatchNorm3d, (2, C, 2, 3, 3)),
    # BatchNorm until its warm-up starts; GhostBN with one virtual batch: both BN exactly
    "BatchRenorm2d": (L.BatchRenorm2d, nn.BatchNorm2d, (3, C, 3, 3)),
    "GhostBatchNorm2d": (
        lambda c, **kw: L.GhostBatchNorm2d(c, 4, **kw),
        nn.BatchNorm2d,
        (3, C, 3, 3),
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _empty_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """N = 0, and (for maps) a batch with samples but no positions."""
    shapes = [(0, *shape[1:])]
    if len(shape) >= 3:
        shapes.append((shape[0], shape[1], 0, *shape[3:]))
    return shapes


def _step(m: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
    """One forward and backward: (output, input gradient, parameter gradients)."""
    x = x.clone().requires_grad_()
    y = m(x)
    (y * g).sum().backward()
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def _same_state(ours: nn.Module, twin: nn.Module, where: str) -> None:
    a, b = ours.state_dict(), twin.state_dict()
    assert a.keys() == b.keys(), where
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=f"{where}: {k}")


@pytest.mark.parametrize("small_batch", ["error", "running_stats"])
@pytest.mark.parametrize("track", [True, False], ids=["tracked", "untracked"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("kind", sorted(BN_KINDS))
def test_empty_batch_as_torch_batchnorm(kind, momentum, track, small_batch) -> None:
    make, twin_cls, shape = BN_KINDS[kind]
    kw: dict[str, Any] = {"momentum": momentum, "small_batch": small_batch}
    if kind == "BatchRenorm2d":
        if not track:
            pytest.skip("BatchRenorm2d always tracks running statistics")
    else:
        kw["track_running_stats"] = track
    ours = make(C, **kw).double()
    twin = twin_cls(C, momentum=momentum, track_running_stats=track).double()
    with torch.no_grad():
        for m in (ours, twin):
            m.weight.copy_(torch.linspace(0.5, 2.0, C))
            m.bias.copy_(torch.linspace(-1.0, 1.0, C))
            if track:
                m.running_mean.copy_(torch.linspace(-0.3, 0.3, C))
                m.running_var.copy_(torch.linspace(0.5, 1.5, C))
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1
    for training in (True, False):
        ours.train(training)
        twin.train(training)
        for x in [*(torch.zeros(s, dtype=torch.float64) for s in _empty_shapes(shape)), real]:
            where = f"{kind} {'train' if training else 'eval'} input {tuple(x.shape)}"
            g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y, gx, grads = _step(ours, x, g)
                y_t, gx_t, grads_t = _step(twin, x, g)
            assert y.shape == x.shape and y.dtype == x.dtype, where
            torch.testing.assert_close(y, y_t, msg=where)
            torch.testing.assert_close(gx, gx_t, msg=where)
            for name in ("weight", "bias"):
                torch.testing.assert_close(grads[name], grads_t[name], msg=f"{where} {name}")
            if x.numel() == 0:
                assert torch.all(grads["weight"] == 0) and torch.all(grads["bias"] == 0)
            _same_state(ours, twin, where)


def test_empty_batch_leaves_stats_alone_but_counts_it() -> None:
    """The contract spelled out on torch.nn.BatchNorm2d itself, so a change in torch shows."""
    for bn in (nn.BatchNorm2d(C), L.BatchNorm2d(C), L.GhostBatchNorm2d(C, 2), L.BatchRenorm2d(C)):
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        y = bn(torch.randn(0, C, 3, 3))
        assert tuple(y.shape) == (0, C, 3, 3)
        after = bn.state_dict()
        for k in ("running_mean", "running_var"):
            assert torch.equal(after[k], before[k]), (type(bn).__name__, k)
        assert int(after["num_batches_tracked"]) == 1, type(bn).__name__


def test_ghost_batch_norm_with_virtual_batches_after_an_empty_one() -> None:
    """An empty batch changes nothing a later chunked batch computes (momentum 0.1)."""
    x = torch.randn(8, C, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fresh = L.GhostBatchNorm2d(C, 2).double()
    ours = copy.deepcopy(fresh)
    ours(torch.zeros(0, C, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(ours(x), fresh(x))
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, k), getattr(fresh, k))
    assert int(ours.num_batches_tracked) == int(fresh.num_batches_tracked) + 1


@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
def test_split_batch_norm_splits_an_empty_batch_into_empty_parts(momentum) -> None:
    """Each of SplitBatchNorm2d's BNs sees its (empty) part, as torch.nn.BatchNorm2d would."""
    ours = L.SplitBatchNorm2d(C, num_splits=3, momentum=momentum).double()
    twins = [nn.BatchNorm2d(C, momentum=momentum).double() for _ in range(3)]
    gen = torch.Generator().manual_seed(2)
    for x in (
        torch.zeros(0, C, 3, 3, dtype=torch.float64),
        torch.randn(6, C, 3, 3, generator=gen, dtype=torch.float64),
    ):
        g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        y, gx, grads = _step(ours, x, g)
        parts = [
            _step(t, p, q)
            for t, p, q in zip(twins, x.tensor_split(3), g.tensor_split(3), strict=True)
        ]
        torch.testing.assert_close(y, torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(gx, torch.cat([p[1] for p in parts]))
        torch.testing.assert_close(grads["weight"], parts[0][2]["weight"])
        for i, bn in enumerate([ours, *ours.aux_bn]):
            for k in ("running_mean", "running_var", "num_batches_tracked"):
                torch.testing.assert_close(getattr(bn, k), getattr(twins[i], k), msg=f"{i} {k}")
    ours.eval()
    assert ours(torch.zeros(0, C, 3, 3, dtype=torch.float64)).shape == (0, C, 3, 3)


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.EvoNorm2dB0(C),
        lambda: L.InstanceNorm2d(C, affine=True, track_running_stats=True),
        lambda: L.InstanceNorm1d(C, affine=True, track_running_stats=True),
    ],
    ids=["EvoNorm2dB0", "InstanceNorm2d-tracked", "InstanceNorm1d-tracked"],
)
def test_other_running_stats_survive_an_empty_batch(make) -> None:
    """Layers with batch-averaged running statistics keep them finite and unchanged, as BN
    does. (torch.nn's tracked InstanceNorm averages over zero samples and writes NaN.)"""
    layer = make().double()
    shape = (0, C, 3, 3) if not isinstance(layer, L.InstanceNorm1d) else (0, C, 5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for training in (True, False):
        layer.train(training)
        x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
        for k, v in layer.state_dict().items():
            assert torch.equal(v, before[k]), k
        for p in layer.parameters():
            assert p.grad is None or torch.all(p.grad == 0)
    # and a real batch afterwards updates them as from a fresh layer
    x = torch.randn(
        (5, *shape[1:]), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    fresh = make().double()
    layer.train()
    torch.testing.assert_close(layer(x), fresh(x))
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[k], v, msg=k)
