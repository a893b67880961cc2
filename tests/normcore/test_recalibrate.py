"""recalibrate_bn (precise BN) recomputes every layer its docstring names, by float64 formulas.

The formula (Ioffe & Szegedy 2015, Algorithm 2; fvcore's precise BN): over the K batches that
reach a layer, ``running_mean = mean_k(mu_k)`` and ``running_var = mean_k(s2_k)``, with ``mu_k``
and ``s2_k`` the layer's batch mean and unbiased batch variance. Layers here sit directly on
the model input, so each expected value is computed from the batches alone.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L
from normcore.stats import recalibrate_bn

F64 = torch.float64
C = 3


def _batches(sizes: list[int], shape: tuple[int, ...] = (5, 5), seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(n, C, *shape, generator=g, dtype=F64) * (2 + i) + i for i, n in enumerate(sizes)
    ]


def _bn_stats(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Precise-BN statistics of a BatchNorm on these batches: mean of batch means and of
    unbiased batch variances over (N, *spatial)."""
    dims = lambda b: [0, *range(2, b.dim())]  # noqa: E731
    mean = torch.stack([b.mean(dims(b)) for b in batches]).mean(0)
    var = torch.stack([b.var(dims(b), correction=1) for b in batches]).mean(0)
    return mean, var


def _in_stats(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Precise statistics of a tracked InstanceNorm: per batch, the batch average of the
    per-instance means and unbiased variances over the spatial dims; then their mean."""
    sp = lambda b: list(range(2, b.dim()))  # noqa: E731
    mean = torch.stack([b.mean(sp(b)).mean(0) for b in batches]).mean(0)
    var = torch.stack([b.var(sp(b), correction=1).mean(0) for b in batches]).mean(0)
    return mean, var


class _Parallel(nn.Module):
    """Every layer on the model input (their outputs summed), so each sees the raw batches."""

    def __init__(self, **layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleDict(layers)

    def forward(self, x: Tensor) -> Tensor:
        return sum(m(x) for m in self.layers.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda: L.InstanceNorm2d(C, affine=True, track_running_stats=True),
        lambda: L.InstanceNorm2d(C, momentum=None, track_running_stats=True),
        lambda: nn.InstanceNorm2d(C, track_running_stats=True),
    ],
    ids=["normcore", "normcore-momentum-None", "torch.nn"],
)
def test_tracked_instance_norm_is_recomputed(make) -> None:
    inorm = make().double()
    bn = L.BatchNorm2d(C, momentum=0.3).double()
    model = _Parallel(inorm=inorm, bn=bn)
    batches = _batches([4, 2, 6])
    momentum = inorm.momentum
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a covered layer is no reason to warn
        recalibrate_bn(model, batches)
    mean, var = _in_stats(batches)
    torch.testing.assert_close(inorm.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inorm.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(inorm.num_batches_tracked) == 0  # training InstanceNorm never counts batches
    assert inorm.momentum == momentum and bn.momentum == 0.3
    mean, var = _bn_stats(batches)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_instance_norm_1d_and_3d_are_recomputed() -> None:
    in1 = L.InstanceNorm1d(C, track_running_stats=True).double()
    in3 = L.InstanceNorm3d(C, track_running_stats=True).double()
    b1 = _batches([3, 5], shape=(7,), seed=1)
    b3 = _batches([2, 3], shape=(2, 3, 3), seed=2)
    recalibrate_bn(in1, b1)
    recalibrate_bn(in3, b3)
    for layer, batches in ((in1, b1), (in3, b3)):
        mean, var = _in_stats(batches)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12)


def test_evonorm_b0_running_var_is_recomputed() -> None:
    evo = L.EvoNorm2dB0(C, momentum=0.05).double()
    batches = _batches([4, 3, 5], seed=3)
    recalibrate_bn(evo, batches)
    torch.testing.assert_close(evo.running_var, _bn_stats(batches)[1], rtol=1e-12, atol=1e-12)
    assert evo.momentum == 0.05


def test_batch_norm_kinds_are_recomputed() -> None:
    layers = {
        "bn": L.BatchNorm2d(C, momentum=None),
        "torch_bn": nn.BatchNorm2d(C),
        "sync": L.SyncBatchNorm(C),
        "brn": L.BatchRenorm2d(C),
    }
    model = _Parallel(**layers).double()
    batches = _batches([4, 6, 2], seed=4)
    recalibrate_bn(model, batches)
    mean, var = _bn_stats(batches)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-12, atol=1e-12, msg=name)
        assert int(layer.num_batches_tracked) == 3, name
    assert layers["bn"].momentum is None and layers["torch_bn"].momentum == 0.1


def test_split_batch_norm_main_and_auxiliary_bns() -> None:
    split = L.SplitBatchNorm2d(C, num_splits=2).double()
    batches = _batches([4, 6, 8], seed=5)
    recalibrate_bn(split, batches)
    for bn, part in ((split, 0), (split.aux_bn[0], 1)):
        mean, var = _bn_stats([b.tensor_split(2)[part] for b in batches])
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 3


class _OwnNorm(nn.Module):
    """A norm with running statistics recalibrate_bn knows nothing about."""

    def __init__(self) -> None:
        super().__init__()
        self.momentum = 0.1
        self.register_buffer("running_mean", torch.zeros(C))
        self.register_buffer("running_var", torch.ones(C))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean((0, 2, 3)).to(self.running_mean), self.momentum)
        return x - self.running_mean.view(1, -1, 1, 1)


def test_an_uncovered_layer_is_named_in_a_warning_and_left_alone() -> None:
    own = _OwnNorm().double()
    frozen = L.FrozenBatchNorm2d(C).double()
    bn = L.BatchNorm2d(C).double()
    with torch.no_grad():
        own.running_mean.fill_(7.0)
        frozen.running_mean.fill_(5.0)
    model = _Parallel(own=own, frozen=frozen, bn=bn)
    batches = _batches([4, 4], seed=6)
    with pytest.warns(UserWarning, match=r"layers\.own \(_OwnNorm\)") as record:
        recalibrate_bn(model, batches)
    text = " ".join(str(w.message) for w in record)
    assert "frozen" not in text  # FrozenBatchNorm2d is frozen on purpose: no warning
    assert torch.all(own.running_mean == 7.0) and torch.all(own.running_var == 1.0)
    assert torch.all(frozen.running_mean == 5.0) and int(frozen.num_batches_tracked) == 0
    torch.testing.assert_close(bn.running_mean, _bn_stats(batches)[0])


def test_empty_and_fallen_back_batches_add_nothing() -> None:
    """An empty batch (torch's BN counts it but has no statistics) and a batch the layer
    normalized with its running statistics (small_batch="running_stats") are not averaged in."""
    bn = L.BatchNorm1d(C, small_batch="running_stats").double()
    inorm = L.InstanceNorm1d(C, track_running_stats=True).double()
    model = _Parallel(bn=bn)
    g = torch.Generator().manual_seed(7)
    real = [torch.randn(n, C, generator=g, dtype=F64) + i for i, n in enumerate([5, 3, 4])]
    noise = [torch.zeros(0, C, dtype=F64), torch.randn(1, C, generator=g, dtype=F64)]
    bn.num_batches_tracked.fill_(10)
    recalibrate_bn(model, [real[0], noise[0], real[1], noise[1], real[2]])
    mean, var = _bn_stats(real)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
    assert int(bn.num_batches_tracked) == 13  # 10 + the three real batches
    maps = [torch.randn(n, C, 6, generator=g, dtype=F64) for n in (3, 0, 2)]
    recalibrate_bn(inorm, maps)
    mean, var = _in_stats([maps[0], maps[2]])
    torch.testing.assert_close(inorm.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inorm.running_var, var, rtol=1e-12, atol=1e-12)


class _Branchy(nn.Module):
    """``wide`` runs only on batches of more than 4 samples."""

    def __init__(self) -> None:
        super().__init__()
        self.always = L.BatchNorm2d(C)
        self.wide = L.InstanceNorm2d(C, track_running_stats=True)
        self.never = L.BatchNorm2d(C)

    def forward(self, x: Tensor) -> Tensor:
        y = self.always(x)
        return y + self.wide(x) if x.shape[0] > 4 else y


def test_a_layer_averages_only_the_batches_that_reach_it() -> None:
    model = _Branchy().double()
    with torch.no_grad():
        model.never.running_mean.fill_(2.0)
        model.wide.running_mean.fill_(3.0)
    batches = _batches([6, 2, 8, 3], seed=8)
    recalibrate_bn(model, batches)
    torch.testing.assert_close(model.always.running_mean, _bn_stats(batches)[0])
    mean, var = _in_stats([b for b in batches if b.shape[0] > 4])
    torch.testing.assert_close(model.wide.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.wide.running_var, var, rtol=1e-12, atol=1e-12)
    assert torch.all(model.never.running_mean == 2.0)  # reached by no batch: kept
    assert int(model.never.num_batches_tracked) == 0


def test_float32_layers_sum_in_float64() -> None:
    """Two hundred float32 batches far from zero: the average is the float64 one, rounded."""
    bn = L.BatchNorm2d(C).float()
    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(4, C, 2, 2, generator=g) * 0.01 + 1000.0 for _ in range(200)]
    recalibrate_bn(bn, batches)
    mean, var = _bn_stats([b.double() for b in batches])
    torch.testing.assert_close(bn.running_mean, mean.float(), rtol=2e-7, atol=0)
    torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-3, atol=0)


def test_failure_keeps_every_buffer() -> None:
    """A batch that raises half way leaves every statistic, count and momentum as it was."""
    model = _Parallel(
        bn=L.BatchNorm2d(C, momentum=0.2), inorm=L.InstanceNorm2d(C, track_running_stats=True)
    ).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = torch.randn(2, C + 1, 5, 5, dtype=F64)  # wrong channel count
    with pytest.raises(ValueError):
        recalibrate_bn(model, [*_batches([4]), bad])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.layers["bn"].momentum == 0.2 and model.layers["inorm"].momentum == 0.1
    # and no hook is left behind
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
