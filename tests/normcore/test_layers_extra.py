"""Errors, edge cases, FrozenBatchNorm2d conversion, reprs and torch.compile of the norm layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normcore
import normcore.layers as L


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ errors a user can act on

ONE_VALUE_PER_CHANNEL = [
    (lambda: L.BatchNorm1d(16), (1, 16)),
    (lambda: L.BatchNorm1d(16), (1, 16, 1)),
    (lambda: L.BatchNorm2d(16), (1, 16, 1, 1)),
    (lambda: L.BatchNorm3d(16), (1, 16, 1, 1, 1)),
    (lambda: L.BatchRenorm2d(16), (1, 16, 1, 1)),
    (lambda: L.GhostBatchNorm2d(16, 4), (1, 16, 1, 1)),
    (lambda: L.SyncBatchNorm(16), (1, 16, 1, 1)),
]


@pytest.mark.parametrize(("make", "shape"), ONE_VALUE_PER_CHANNEL)
def test_one_value_per_channel_in_training_names_layer_and_remedies(make, shape) -> None:
    layer = make()
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}\(16\).*more than 1 value per channel") as err:
        layer(torch.randn(shape))
    message = str(err.value)
    for remedy in ("GroupNorm", "LayerNorm", "FrozenBatchNorm2d", ".eval()"):
        assert remedy in message
    # torch raises too (a ValueError), so nothing was silently accepted
    with pytest.raises(ValueError):
        nn.BatchNorm1d(16)(torch.randn(1, 16))
    # the same input is fine in eval mode, where the running statistics are used
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape


def test_one_value_per_channel_without_running_stats_fails_in_eval_too() -> None:
    layer = L.BatchNorm2d(4, track_running_stats=False).eval()
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\).*GroupNorm"):
        layer(torch.randn(1, 4, 1, 1))


@pytest.mark.parametrize(
    ("layer", "shape", "pattern"),
    [
        (L.BatchNorm2d(8), (2, 4, 3, 3), r"BatchNorm2d\(8\).*8 channels.*got 4"),
        (L.BatchNorm1d(8), (2, 6), r"BatchNorm1d\(8\).*8 channels.*got 6"),
        (L.BatchNorm2d(8, affine=False), (2, 4, 3, 3), r"BatchNorm2d\(8\).*got 4"),
        (L.GroupNorm(2, 8), (2, 4, 3, 3), r"GroupNorm\(2, 8\).*8 channels.*got 4"),
        (L.GroupNorm(4, 8, affine=False), (2, 6, 3, 3), r"GroupNorm\(4, 8\).*got 6"),
        (L.InstanceNorm2d(8, affine=True), (2, 4, 3, 3), r"InstanceNorm2d\(8\).*got 4"),
        (L.LayerNorm(8), (2, 4), r"LayerNorm\(\(8,\)\).*\(\*, 8\).*\(2, 4\)"),
        (L.LayerNorm2d(8), (2, 4, 3, 3), r"LayerNorm2d\(8\).*\(2, 4, 3, 3\)"),
        (L.FrozenBatchNorm2d(8), (2, 4, 3, 3), r"FrozenBatchNorm2d\(8\)"),
        (L.L2Norm(8), (2, 4, 3, 3), r"L2Norm\(8\)"),
        (L.BatchRenorm2d(8), (2, 4, 3, 3), r"BatchRenorm2d\(8\).*got 4"),
        (L.GhostBatchNorm2d(8, 2), (6, 4, 3, 3), r"GhostBatchNorm2d\(8\).*got 4"),
    ],
)
def test_channel_mismatch_names_layer_and_both_counts(layer, shape, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        layer(torch.randn(shape))


def test_channel_mismatch_accepted_where_torch_accepts_it() -> None:
    # no weight and no running stats: torch.nn normalizes any channel count, and so do we
    x = torch.randn(3, 5, 2, 2)
    ours = L.BatchNorm2d(3, affine=False, track_running_stats=False)(x)
    theirs = nn.BatchNorm2d(3, affine=False, track_running_stats=False)(x)
    torch.testing.assert_close(ours, theirs)
    with pytest.warns(UserWarning, match="does not match num_features"):
        L.InstanceNorm2d(3)(x)


@pytest.mark.parametrize(
    ("layer", "shape", "pattern"),
    [
        (L.BatchNorm1d(3), (2, 3, 4, 4), r"BatchNorm1d\(3\): expected 2D or 3D input \(got 4D"),
        (L.BatchNorm2d(3), (2, 3, 4), r"BatchNorm2d\(3\): expected 4D input \(got 3D"),
        (L.BatchNorm3d(3), (2, 3, 4, 4), r"BatchNorm3d\(3\): expected 5D input \(got 4D"),
        (L.InstanceNorm2d(3), (2, 3), r"InstanceNorm2d\(3\): expected 3D .* or 4D input"),
        (L.GroupNorm(1, 3), (3,), r"GroupNorm\(1, 3\): expected input of at least 2"),
    ],
)
def test_wrong_rank(layer, shape, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        layer(torch.randn(shape))


def test_instance_norm_single_position_error() -> None:
    with pytest.raises(ValueError, match=r"InstanceNorm2d\(3\).*more than 1 spatial element"):
        L.InstanceNorm2d(3)(torch.randn(2, 3, 1, 1))


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match=r"num_channels \(10\).*num_groups \(4\)"):
        L.GroupNorm(4, 10)
    with pytest.raises(ValueError, match="virtual_batch_size"):
        L.GhostBatchNorm2d(4, virtual_batch_size=1)
    with pytest.raises(ValueError, match="r_max"):
        L.BatchRenorm2d(4, r_max=0.5)


# ------------------------------------------------------------------ frozen batch norm


def test_frozen_from_batchnorm_copies_everything() -> None:
    bn = L.BatchNorm2d(3, eps=1e-3).double()
    bn(torch.randn(4, 3, 2, 2, dtype=torch.float64))
    with torch.no_grad():
        bn.weight.mul_(3)
        bn.bias.add_(1)
    frozen = L.FrozenBatchNorm2d.from_batchnorm(bn)
    assert frozen.eps == 1e-3 and frozen.running_mean.dtype == torch.float64
    assert int(frozen.num_batches_tracked) == 1
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    # the frozen copy is independent of the original
    with torch.no_grad():
        bn.running_mean.add_(10)
    assert not torch.equal(frozen.running_mean, bn.running_mean)
    # torch.nn BatchNorm converts too; one without running stats cannot
    assert isinstance(L.FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3)), L.FrozenBatchNorm2d)
    with pytest.raises(ValueError, match="no running statistics"):
        L.FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


def test_frozen_gets_no_gradients_and_never_updates() -> None:
    frozen = L.FrozenBatchNorm2d(3).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None
    assert list(frozen.parameters()) == []
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------ misc behaviour


def test_reprs_and_reset() -> None:
    bn = L.BatchNorm2d(4, momentum=None)
    assert repr(bn) == repr(nn.BatchNorm2d(4, momentum=None))
    assert repr(L.GroupNorm(2, 4)) == repr(nn.GroupNorm(2, 4))
    assert repr(L.InstanceNorm1d(4)) == repr(nn.InstanceNorm1d(4))
    assert repr(L.LayerNorm(4)) == repr(nn.LayerNorm(4))
    assert "virtual_batch_size=8" in repr(L.GhostBatchNorm2d(4, 8))
    assert "r_max=3.0" in repr(L.BatchRenorm2d(4))
    bn(torch.randn(3, 4, 2, 2) + 5)
    bn.reset_running_stats()
    assert torch.equal(bn.running_mean, torch.zeros(4))
    assert torch.equal(bn.running_var, torch.ones(4))
    assert int(bn.num_batches_tracked) == 0


def test_buffer_dtypes_and_device_arguments() -> None:
    bn = L.BatchNorm2d(4, dtype=torch.float64, device="cpu")
    assert bn.weight.dtype == torch.float64 and bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    assert L.BatchNorm2d(4, track_running_stats=False).num_batches_tracked is None
    assert L.BatchNorm2d(4, affine=False).weight is None
    assert L.BatchNorm2d(4, bias=False).bias is None


def test_identity_accepts_and_ignores_arguments() -> None:
    layer = L.Identity(16, eps=1e-3)
    x = torch.randn(2, 16, 3, 3)
    assert layer(x) is x
    assert list(layer.state_dict()) == []


def test_normcore_top_level_exports() -> None:
    for name in (
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm3d",
        "GroupNorm",
        "LayerNorm",
        "LayerNorm2d",
        "InstanceNorm1d",
        "InstanceNorm2d",
        "InstanceNorm3d",
        "FrozenBatchNorm2d",
        "BatchRenorm2d",
        "GhostBatchNorm2d",
        "SyncBatchNorm",
        "L2Norm",
        "Identity",
    ):
        assert getattr(normcore, name) is getattr(L, name)
    assert issubclass(normcore.SyncBatchNorm, L.batchnorm._BatchNorm)


def test_bfloat16_input_through_variants() -> None:
    # mixed precision: low-precision input, float32 parameters and statistics
    x = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    for layer in (L.BatchRenorm2d(4, warmup_start=0, warmup_steps=0), L.GhostBatchNorm2d(4, 4)):
        y = layer(x)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
        assert layer.running_mean.dtype == torch.float32


# ------------------------------------------------------------------ torch.compile


@pytest.mark.slow
def test_torch_compile_bn_gn_ln_model_matches_eager() -> None:
    """One small conv net with BN, GN and LN2d, compiled once (compiling is the slow part)."""

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            L.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            L.GroupNorm(2, 8),
            nn.ReLU(),
            L.LayerNorm2d(8),
        )

    eager, model = make(), make()
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 8, 8)
    for _ in range(2):
        y1, y2 = eager(x), compiled(x)
        torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
        y1.square().sum().backward()
        y2.square().sum().backward()
    for (name, p1), p2 in zip(eager.named_parameters(), model.parameters(), strict=True):
        # float32 sums reordered by the compiler: compare relative to the gradient's scale
        scale = max(1.0, p1.grad.abs().max().item())
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-4 * scale, rtol=1e-4, msg=name)
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    torch.testing.assert_close(model[1].running_var, eager[1].running_var)
    assert int(model[1].num_batches_tracked) == 2
    eager.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)
