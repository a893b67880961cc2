"""convert_norm, freeze_norm, unfreeze_norm and convert_sync_norm keep what they promise."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L
from normcore.convert import convert_norm, convert_sync_norm, freeze_norm, unfreeze_norm


@torch.no_grad()
def _randomize(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        for name in ("running_mean", "weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, Tensor) and t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g))
        rv = getattr(m, "running_var", None)
        if isinstance(rv, Tensor):
            rv.copy_(torch.rand(rv.shape, generator=g) + 0.5)
        nbt = getattr(m, "num_batches_tracked", None)
        if isinstance(nbt, Tensor):
            nbt.fill_(17)


def _torch_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8, eps=1e-3, momentum=0.2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 12),
        nn.BatchNorm1d(12),
    )


def test_torch_bn_to_group_norm_keeps_dtype_affine_and_flags() -> None:
    model = _torch_model().double()
    _randomize(model)
    model[4].eval()
    weight = model[1].weight
    out = convert_norm(model, "gn:4")
    assert out is model
    assert [type(model[i]) for i in (1, 4, 8)] == [L.GroupNorm] * 3
    assert model[1].num_groups == 4 and model[8].num_channels == 12
    assert model[1].weight is weight  # parameters are shared, so optimizers keep working
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model[1].eps == 1e-3  # eps carried over
    assert model[1].training and not model[4].training
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64)).sum().backward()
    assert model[1].weight.grad is not None


def test_bn_to_frozen_keeps_stats_and_eval_outputs() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), L.BatchNorm2d(4, eps=1e-4), nn.ReLU()).double()
    _randomize(model)
    model.eval()
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    stats = (model[1].running_mean.clone(), model[1].running_var.clone())
    convert_norm(model, "frozen_bn")
    frozen = model[1]
    assert isinstance(frozen, L.FrozenBatchNorm2d)
    assert frozen.eps == 1e-4
    torch.testing.assert_close(frozen.running_mean, stats[0])
    torch.testing.assert_close(frozen.running_var, stats[1])
    assert int(frozen.num_batches_tracked) == 17
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


def test_roundtrip_torch_bn_to_ours_and_back() -> None:
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=2e-5, momentum=0.05))
    _randomize(original)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    model = convert_norm(original, "bn")
    assert type(model[1]) is L.BatchNorm2d
    assert (model[1].eps, model[1].momentum) == (2e-5, 0.05)
    model = convert_norm(model, nn.BatchNorm2d)
    assert type(model[1]) is nn.BatchNorm2d
    assert (model[1].eps, model[1].momentum) == (2e-5, 0.05)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # a training step updates the running stats exactly as a never-converted twin does
    twin = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, eps=2e-5, momentum=0.05))
    twin.load_state_dict(state)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(model(x), twin(x))
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


def test_dims_come_from_the_old_layer_and_survive_a_detour() -> None:
    model = nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm3d(4), nn.LayerNorm(6), nn.BatchNorm2d(4))
    convert_norm(model, "in")
    assert [type(m) for m in model] == [
        L.InstanceNorm1d,
        L.InstanceNorm3d,
        L.InstanceNorm1d,
        L.InstanceNorm2d,
    ]
    assert model[0].track_running_stats is False  # a BN's tracking does not leak into IN
    convert_norm(model, "gn:2")
    convert_norm(model, "bn")  # GroupNorm remembers it replaced a 1d/3d layer
    assert [type(m) for m in model] == [L.BatchNorm1d, L.BatchNorm3d, L.BatchNorm1d, L.BatchNorm2d]
    convert_norm(model, "bn", dims=2)
    assert all(type(m) is L.BatchNorm2d for m in model)


def test_spec_keywords_win_and_momentum_stays_within_family() -> None:
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-5, momentum=0.3))
    convert_norm(model, "bn(eps=1e-3)")
    assert (model[0].eps, model[0].momentum) == (1e-3, 0.3)
    convert_norm(model, "brn")
    assert model[0].momentum == 0.01  # BatchRenorm's own default, not BN's
    assert model[0].eps == 1e-3


def test_shared_layer_is_converted_once() -> None:
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn, nn.Sequential(bn))
    convert_norm(model, "gn:3")
    assert model[1] is model[2][0]


def test_model_that_is_a_norm_and_bad_spec() -> None:
    new = convert_norm(nn.BatchNorm2d(6), "ln")
    assert isinstance(new, L.LayerNorm2d) and new.num_channels == 6
    model = _torch_model()
    with pytest.raises(ValueError, match="unknown norm"):
        convert_norm(model, "batchnrom")
    assert type(model[1]) is nn.BatchNorm2d  # untouched


def test_freeze_blocks_grads_and_stats_then_unfreeze_restores() -> None:
    model = _torch_model()
    model[4] = L.BatchNorm2d(8, momentum=None)
    model = model.double()
    _randomize(model)
    with torch.no_grad():
        model[1].bias.fill_(0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freeze_norm(model)
    assert isinstance(model[1], L.FrozenBatchNorm2d) and isinstance(model[4], L.FrozenBatchNorm2d)
    assert isinstance(model[8], nn.BatchNorm1d)  # only 2-D batch norms are frozen
    model.train()
    model(torch.randn(4, 3, 5, 5, dtype=torch.float64)).pow(2).sum().backward()
    assert all(p.grad is not None for p in model[0].parameters())
    assert not any(p.requires_grad for p in model[1].parameters())
    assert "1.weight" not in dict(model.named_parameters())
    for key in ("1.running_mean", "1.running_var", "4.running_var", "1.weight"):
        torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)

    unfreeze_norm(model)
    bn1, bn4 = model[1], model[4]
    assert type(bn1) is nn.BatchNorm2d and type(bn4) is L.BatchNorm2d  # the original kinds
    assert (bn1.eps, bn1.momentum, bn4.momentum) == (1e-3, 0.2, None)
    assert bn1.weight.requires_grad and isinstance(bn1.weight, nn.Parameter)
    for key in ("1.running_mean", "1.running_var", "1.weight", "1.bias", "4.num_batches_tracked"):
        torch.testing.assert_close(model.state_dict()[key], before[key], rtol=0, atol=0)


def test_unfreeze_of_affine_free_bn_keeps_it_affine_free() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3, affine=False))
    freeze_norm(model)
    unfreeze_norm(model)
    assert model[0].weight is None and model[0].bias is None


def test_convert_sync_norm_shares_everything() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), L.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(6), nn.BatchNorm1d(6)
    )
    model(torch.randn(2, 3, 5, 5))
    model = model.double()
    _randomize(model)
    model[1].weight.requires_grad_(False)
    model[4].eval()
    keep = {
        "w1": model[1].weight,
        "rm1": model[1].running_mean,
        "b4": model[4].bias,
        "nbt4": model[4].num_batches_tracked,
    }
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    expected = model(x)
    group = object()  # any handle: without an initialized world nothing is synchronized
    convert_sync_norm(model, process_group=group)
    assert type(model[1]) is L.SyncBatchNorm and type(model[4]) is L.SyncBatchNorm
    assert model[1].process_group is group
    assert model[1].weight is keep["w1"] and not model[1].weight.requires_grad
    assert model[1].running_mean is keep["rm1"]
    assert model[4].bias is keep["b4"] and model[4].num_batches_tracked is keep["nbt4"]
    assert model[1].training and not model[4].training
    assert model[1].weight.dtype == torch.float64
    torch.testing.assert_close(model[4](model[3](model[2](model[1](model[0](x))))), expected)
