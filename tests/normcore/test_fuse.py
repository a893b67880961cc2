"""fuse_conv_bn folds eval-mode BN into the conv/linear feeding it, and only there."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L
from normcore.fuse import fuse_conv_bn

BN_KINDS = (nn.modules.batchnorm._BatchNorm, L.FrozenBatchNorm2d, L.batchnorm._BatchNorm)


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, BN_KINDS) for m in model.modules())


@torch.no_grad()
def _randomize_stats(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters everywhere."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, BN_KINDS):
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 3 + 0.2)
            if isinstance(getattr(m, "weight", None), Tensor):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            if isinstance(getattr(m, "bias", None), Tensor):
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))


class Net(nn.Module):
    """Conv1d/2d/3d and Linear, each followed by a BN of a different flavour."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.b1 = nn.BatchNorm1d(6)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b2 = L.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.bdw = nn.BatchNorm2d(8, affine=False)
        self.g = nn.Conv2d(8, 4, 1, groups=2)  # grouped
        self.bg = L.FrozenBatchNorm2d(4)
        self.c3 = nn.Conv3d(2, 4, 3, padding=1)
        self.b3 = L.BatchNorm3d(4)
        self.fc = nn.Linear(6 * 5 + 4 * 8 * 8 + 4 * 3 * 4 * 4, 10)
        self.bfc = L.BatchNorm1d(10)
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), L.GhostBatchNorm2d(4), nn.ReLU())
        self.ln = L.LayerNorm2d(4)

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor) -> Tensor:
        a = torch.relu(self.b1(self.c1(x1))).flatten(1)
        b = self.bg(self.g(torch.relu(self.bdw(self.dw(self.b2(self.c2(x2)))))))
        b = self.ln(self.seq(b)).flatten(1)
        c = self.b3(self.c3(x3)).flatten(1)
        return self.bfc(self.fc(torch.cat([a, b, c], 1)))


def _inputs() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(4, 3, 5, generator=g),
        torch.randn(4, 3, 8, 8, generator=g),
        torch.randn(4, 2, 3, 4, 4, generator=g),
    )


def test_fused_model_matches_unfused_and_has_no_bn() -> None:
    torch.manual_seed(0)
    model = Net()
    _randomize_stats(model)
    model.eval()
    x = _inputs()
    expected = model(*x)
    fused = fuse_conv_bn(model)
    assert _count_bn(fused) == 0
    assert _count_bn(model) == 7  # not in place: the original is untouched
    torch.testing.assert_close(fused(*x), expected, atol=1e-5, rtol=1e-5)
    assert fused.c2.bias is not None  # a conv without bias gains one
    assert isinstance(fused.ln, L.LayerNorm2d)  # other norms stay


def test_inplace_and_bn_without_running_stats_is_kept() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        L.BatchNorm2d(4, track_running_stats=False),
    )
    _randomize_stats(model)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    out = fuse_conv_bn(model, inplace=True)
    assert out is model
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[3], L.BatchNorm2d)  # batch statistics cannot be folded
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


class SharedOutput(nn.Module):
    """The conv output feeds the BN and a skip connection: folding would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(nn.Module):
    """One conv called twice, followed by BN only the first time."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx fails, so only nn.Sequential pairs may be fused."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)  # registered next to conv, but fed from elsewhere

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(x)
        if h.sum() > -1e9:  # always true, but fx cannot know
            return self.bn(h) + self.conv(h)
        return h


def test_conv_output_used_twice_is_not_fused() -> None:
    model = SharedOutput()
    _randomize_stats(model)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    fused = fuse_conv_bn(model)
    assert _count_bn(fused) == 1
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_conv_called_twice_is_refused_with_its_name() -> None:
    """torch.fx's fuse folds into a shared conv and changes its other call (pytorch#104593)."""
    model = ReusedConv()
    _randomize_stats(model)
    model.eval()
    with pytest.raises(ValueError, match=r"Conv2d 'conv' runs 2 times.*pytorch#104593"):
        fuse_conv_bn(model)
    assert isinstance(model.bn, nn.BatchNorm2d)  # nothing was changed


def test_untraceable_model_fuses_only_inside_sequential() -> None:
    model = Untraceable()
    _randomize_stats(model)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    fused = fuse_conv_bn(model)
    assert isinstance(fused.block[1], nn.Identity)
    assert isinstance(
        fused.bn, nn.BatchNorm2d
    )  # conv→bn adjacency in registration is not data flow
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_mode_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_bn(model)
    model.eval()
    model[1].train()  # an eval model with one BN still in training mode
    with pytest.raises(ValueError, match=r"1"):
        fuse_conv_bn(model)


def test_float64_fold_is_exact_for_extreme_stats() -> None:
    """Tiny variances and large means: folding in float64 keeps float32 outputs close."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3, eps=1e-5)).eval()
    with torch.no_grad():
        model[1].running_var.copy_(torch.tensor([1e-3, 1.0, 50.0]))
        model[1].running_mean.copy_(torch.tensor([3.0, -2.0, 10.0]))
    x = torch.randn(2, 2, 6, 6)
    fused = fuse_conv_bn(model)
    assert _count_bn(fused) == 0
    torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-5)
