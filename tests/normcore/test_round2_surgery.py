"""Freeze modes, unfreeze to the original kind, unknown BN subclasses, safer folding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normcore.layers as L
from normcore.convert import (
    NormConversionWarning,
    convert_norm,
    convert_sync_norm,
    freeze_norm,
    unfreeze_norm,
)
from normcore.fuse import fuse_conv_bn

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.dtype == torch.long:
            t.fill_(5)
        elif name.endswith("running_var"):
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
        else:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.5)
    return model


def _net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


def _stats(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


# ------------------------------------------------------------------ freeze modes


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.BatchNorm2d(4, eps=1e-3, momentum=0.2),
        lambda: L.BatchNorm2d(4, eps=2e-4, momentum=None),
        lambda: L.GhostBatchNorm2d(4, virtual_batch_size=2, eps=1e-4, momentum=0.3),
        lambda: L.BatchRenorm2d(4, eps=1e-4, momentum=0.05, r_max=2.0),
        lambda: L.SplitBatchNorm2d(4, num_splits=2, eps=1e-4, momentum=0.2),
    ],
    ids=["torch-bn", "bn-cumulative", "ghost", "renorm", "split"],
)
def test_fine_tuning_freeze_keeps_stats_bit_identical_and_trains_gamma(make) -> None:
    model = _randomize(_net(make()).double())
    original = model[1]
    freeze_norm(model, affine=False)
    frozen = model[1]
    assert type(frozen) is L.FrozenBatchNorm2d
    assert frozen.weight is original.weight  # the same Parameter: optimizers keep working
    before = _stats(model)
    gamma = frozen.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        model.train()  # as often as a training loop likes
        x = torch.randn(4, 3, 5, 5, dtype=F64) * 2 + step
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    for key, value in _stats(model).items():
        assert torch.equal(value, before[key]), key  # bit-identical, num_batches_tracked too
    assert not torch.equal(frozen.weight.detach(), gamma)

    unfreeze_norm(model)
    back = model[1]
    assert back is original and type(back) is type(original)  # the original kind
    assert (back.eps, back.momentum) == (original.eps, original.momentum)
    assert torch.equal(back.weight.detach(), frozen.weight.detach())
    assert torch.equal(back.running_var, before["1.running_var"])
    if isinstance(back, L.GhostBatchNorm2d):
        assert back.virtual_batch_size == 2
    assert back.training


def test_default_freeze_makes_buffers_and_unfreeze_restores_settings() -> None:
    model = _randomize(_net(L.GhostBatchNorm2d(4, virtual_batch_size=3, eps=1e-4, momentum=0.3)))
    weight_before = model[1].weight.detach().clone()
    freeze_norm(model)
    assert list(model[1].parameters()) == []
    model.train()
    model(torch.randn(6, 3, 4, 4)).sum().backward()
    model = model.double()  # moved after freezing: unfreeze follows the frozen layer
    unfreeze_norm(model)
    ghost = model[1]
    assert type(ghost) is L.GhostBatchNorm2d and ghost.virtual_batch_size == 3
    assert (ghost.eps, ghost.momentum) == (1e-4, 0.3)
    assert ghost.weight.dtype == F64 and isinstance(ghost.weight, nn.Parameter)
    torch.testing.assert_close(ghost.weight.detach(), weight_before.double())
    ghost(torch.randn(6, 4, 2, 2, dtype=F64))  # trains again
    assert int(ghost.num_batches_tracked) == 6


def test_freeze_affine_only_keeps_statistics_moving() -> None:
    model = _randomize(_net(L.BatchNorm2d(4)))
    model.append(nn.Linear(4, 3))
    model.append(nn.BatchNorm1d(3))
    freeze_norm(model, stats=False, affine=True)
    assert type(model[1]) is L.BatchNorm2d and not model[1].weight.requires_grad
    assert not model[6].bias.requires_grad
    before = model[1].running_mean.clone()
    model.train()(torch.randn(4, 3, 5, 5)).sum().backward()
    assert not torch.equal(model[1].running_mean, before)
    assert model[1].weight.grad is None and model[0].weight.grad is not None
    unfreeze_norm(model)
    assert model[1].weight.requires_grad and model[6].bias.requires_grad
    with pytest.raises(ValueError, match="nothing to freeze"):
        freeze_norm(model, stats=False, affine=False)


def test_unfreeze_without_a_template_uses_saved_eps() -> None:
    frozen = L.FrozenBatchNorm2d(4, eps=1e-3)
    frozen.load_state_dict(_randomize(nn.BatchNorm2d(4)).state_dict())
    model = unfreeze_norm(nn.Sequential(frozen))
    assert type(model[0]) is L.BatchNorm2d and model[0].eps == 1e-3
    assert model[0].momentum == 0.1


# ------------------------------------------------------------------ unknown subclasses


class BNReLU(nn.BatchNorm2d):
    """A user's BN with the activation fused into its forward (as detectron2/timm do)."""

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(super().forward(input))


class OurBNReLU(L.BatchNorm2d):
    def forward(self, input: Tensor) -> Tensor:
        return F.relu(super().forward(input))


def _subclass_net(cls: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), cls(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    )
    return _randomize(model).eval()


CONVERSIONS = {
    "convert_norm": lambda m, **kw: convert_norm(m, "gn:2", **kw),
    "convert_sync_norm": lambda m, **kw: convert_sync_norm(m, **kw),
    "freeze_norm": lambda m, **kw: freeze_norm(m, **kw),
    "freeze_norm_affine_false": lambda m, **kw: freeze_norm(m, affine=False, **kw),
    "fuse_conv_bn": lambda m, **kw: fuse_conv_bn(m, inplace=True, **kw),
}


@pytest.mark.parametrize("cls", [BNReLU, OurBNReLU])
@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_bn_subclass_with_activation_survives_or_is_reported(name, cls) -> None:
    model = _subclass_net(cls)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    custom = model[1]
    with pytest.warns(NormConversionWarning, match=rf"'1' \(.*{cls.__name__}\)"):
        out = CONVERSIONS[name](model)
    assert out[1] is custom  # left in place, activation and all
    assert type(out[3]) is not nn.BatchNorm2d  # the plain BN next to it was converted
    if name in ("freeze_norm", "freeze_norm_affine_false", "fuse_conv_bn"):
        with torch.no_grad():
            torch.testing.assert_close(out(x), expected, atol=1e-5, rtol=1e-5)

    strict_model = _subclass_net(cls)
    with pytest.raises(ValueError, match=cls.__name__):
        CONVERSIONS[name](strict_model, strict=True)
    assert type(strict_model[1]) is cls and type(strict_model[3]) is nn.BatchNorm2d  # untouched


def test_known_kinds_convert_without_warnings() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        L.BatchNorm2d(4),
        L.GhostBatchNorm2d(4, 2),
        L.SplitBatchNorm2d(4),
        nn.BatchNorm2d(4),
    ).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        fuse_conv_bn(model)
        convert_sync_norm(model)
        freeze_norm(model)
        unfreeze_norm(model)
        convert_norm(model, "gn:2")
    assert all(type(m) is L.GroupNorm for m in list(model)[1:])


def test_convert_sync_norm_leaves_split_bn_whole() -> None:
    model = nn.Sequential(L.SplitBatchNorm2d(4, num_splits=3))
    convert_sync_norm(model)
    assert type(model[0]) is L.SplitBatchNorm2d and len(model[0].aux_bn) == 2


# ------------------------------------------------------------------ folding


@pytest.mark.parametrize(
    ("conv", "bn", "shape"),
    [
        (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d, (2, 3, 5, 5)),
        (
            lambda: nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2, bias=False),
            L.BatchNorm2d,
            (2, 4, 3, 3),
        ),
        (
            lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1, dilation=1),
            L.BatchNorm2d,
            (2, 3, 4, 4),
        ),
        (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), nn.BatchNorm1d, (2, 3, 7)),
        (lambda: nn.ConvTranspose3d(2, 4, 2, groups=2), nn.BatchNorm3d, (2, 2, 3, 3, 3)),
        (lambda: nn.Linear(5, 4), nn.BatchNorm1d, (6, 5)),
        (lambda: nn.Linear(5, 4, bias=False), L.BatchNorm1d, (6, 5)),
    ],
    ids=[
        "convT2d",
        "convT2d-grouped-nobias",
        "convT2d-outpad",
        "convT1d",
        "convT3d-grouped",
        "linear-bn1d",
        "linear-nobias-ours",
    ],
)
def test_transposed_conv_and_linear_fold_into_one_layer(conv, bn, shape) -> None:
    layer = conv()
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    model = _randomize(nn.Sequential(layer, bn(channels), nn.ReLU()), seed=3).eval()
    x = torch.randn(shape)
    fused = fuse_conv_bn(model)
    assert isinstance(fused[1], nn.Identity) and type(fused[0]) is type(layer)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


class LinearTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.fc(x)) + self.fc(x * 2)


def test_linear_run_twice_is_refused() -> None:
    model = _randomize(LinearTwice()).eval()
    with pytest.raises(ValueError, match=r"Linear 'fc' runs 2 times in one forward"):
        fuse_conv_bn(model)


def test_stdconv_is_never_folded() -> None:
    """Folding into a weight-standardized conv would be undone by its standardization."""
    model = _randomize(nn.Sequential(L.StdConv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    fused = fuse_conv_bn(model)
    assert type(fused[1]) is nn.BatchNorm2d
