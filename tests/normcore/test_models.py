"""The normalized CNNs: every arch x norm trains a step, structure follows the knobs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from normcore.layers.l2norm import L2Norm
from normcore.models import (
    MODEL_BUILDERS,
    build_model,
    convblock,
    edsr,
    lenet,
    resnet18,
    resnet20,
    vgg11,
)
from normcore.models.blocks import ConvNormAct
from normcore.spec import ModelSpec

NORMS = ["bn", "gn:4", "ln", "in", "none", "frozen_bn", "brn", "ghost_bn:8", "l2", "sync_bn"]
# (arch, input shape): small inputs; resnet18 at 64 so its last stage still has 2x2 maps,
# which instance norm needs (one value per channel has no variance)
INPUTS = {
    "convblock": (16, 3, 16, 16),
    "lenet": (16, 1, 8, 8),
    "vgg11": (16, 3, 32, 32),
    "resnet20": (16, 3, 16, 16),
    "resnet18": (16, 3, 64, 64),
    "edsr": (16, 3, 12, 12),
}


# the big archs run at a quarter of their width here (same structure, 16x fewer FLOPs);
# test_parameter_counts and test_small_inputs_run cover the full widths
WIDTHS = {"vgg11": 16, "resnet18": 16, "edsr": 16}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is faster and does not spin on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(arch: str, norm: str, **kwargs: object) -> nn.Module:
    channels = INPUTS[arch][1]
    width = WIDTHS.get(arch)
    if arch == "edsr":
        return edsr(in_channels=channels, scale=2, norm=norm, width=width, **kwargs)
    return MODEL_BUILDERS[arch](
        in_channels=channels, num_classes=5, norm=norm, width=width, **kwargs
    )


def _loss(arch: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if arch == "edsr":
        target = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return torch.nn.functional.l1_loss(out, target)
    return torch.nn.functional.cross_entropy(out, torch.arange(len(x)) % 5)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", list(INPUTS))
def test_every_arch_and_norm_takes_a_train_step(arch: str, norm: str) -> None:
    torch.manual_seed(0)
    model = _build(arch, norm)
    model.train()
    x = torch.randn(INPUTS[arch])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = _loss(arch, model, x)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        assert conv.weight.grad is not None
        assert torch.isfinite(conv.weight.grad).all()
    assert convs[0].weight.grad.abs().sum() > 0  # the gradient reaches the first layer
    before = convs[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, convs[0].weight)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(_loss(arch, model, x))


def test_norm_layers_come_from_the_spec() -> None:
    counts = {}
    for norm, cls_name in [("bn", "BatchNorm2d"), ("gn:4", "GroupNorm"), ("l2", "L2Norm")]:
        model = resnet20(norm=norm)
        counts[norm] = sum(type(m).__name__ == cls_name for m in model.modules())
    # stem + 9 blocks x 2 norms; option-A shortcuts have no norm
    assert counts == {"bn": 19, "gn:4": 19, "l2": 19}
    none = resnet20(norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in none.modules())


def test_lenet_feature_norms_are_1d() -> None:
    model = lenet(norm="bn")
    assert type(model.norm1.norm).__name__ == "BatchNorm1d"
    assert type(model.conv1.norm).__name__ == "BatchNorm2d"
    assert type(lenet(norm="ln").norm2.norm).__name__ == "LayerNorm"
    # 2-d-only norms see the fc features as (N, C, 1, 1) maps
    ghost = lenet(norm="ghost_bn:4")
    assert ghost.norm1.as_map
    assert type(ghost.norm1.norm).__name__ == "GhostBatchNorm2d"


@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_lenet_any_input_size(size: int, channels: int) -> None:
    model = lenet(in_channels=channels, num_classes=10)
    assert model(torch.randn(4, channels, size, size)).shape == (4, 10)


def test_small_inputs_run() -> None:
    assert resnet18(num_classes=10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert vgg11(in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert resnet20(in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts() -> None:
    assert _params(resnet20(num_classes=10)) == pytest.approx(0.27e6, rel=0.02)
    assert _params(resnet18(num_classes=1000)) == pytest.approx(11_689_512, rel=0.01)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_edsr_upscales(scale: int) -> None:
    model = edsr(in_channels=3, scale=scale, width=8, depth=2)
    out = model(torch.randn(2, 3, 6, 5))
    assert out.shape == (2, 3, 6 * scale, 5 * scale)
    assert edsr(in_channels=1, scale=scale, width=8)(torch.randn(1, 1, 4, 4)).shape[1] == 1


def test_edsr_defaults_to_no_norm_and_rejects_odd_scales() -> None:
    assert ModelSpec(arch="edsr").norm == "none"
    model = edsr()
    assert not any("Norm" in type(m).__name__ for m in model.modules())
    assert sum(type(m).__name__ == "BatchNorm2d" for m in edsr(norm="bn").modules()) == 8
    with pytest.raises(ValueError, match="scale"):
        edsr(scale=5)


def test_norm_position_after_reorders() -> None:
    before = convblock(norm="gn:4", norm_position="before")
    after = convblock(norm="gn:4", norm_position="after")
    block_b, block_a = before.features[0], after.features[0]
    assert isinstance(block_b, ConvNormAct)
    assert [n for n, _ in block_b.named_children()] == ["conv", "norm", "act"]
    assert [n for n, _ in block_a.named_children()] == ["conv", "act", "norm"]


@pytest.mark.parametrize("arch", list(INPUTS))
def test_norm_position_changes_the_function(arch: str) -> None:
    # gn keeps the conv bias in both positions, so the same seed gives the same weights
    torch.manual_seed(0)
    before = _build(arch, "gn:4", norm_position="before").eval()
    torch.manual_seed(0)
    after = _build(arch, "gn:4", norm_position="after").eval()
    for (kb, vb), (ka, va) in zip(
        before.state_dict().items(), after.state_dict().items(), strict=True
    ):
        assert kb == ka and torch.equal(vb, va)
    x = torch.randn(INPUTS[arch])
    with torch.no_grad():
        assert not torch.allclose(before(x), after(x), atol=1e-4)


@pytest.mark.parametrize("arch", list(INPUTS))
def test_dropout_only_when_asked(arch: str) -> None:
    with_dropout = _build(arch, "bn", dropout=0.3)
    without = _build(arch, "bn")
    drops = [m for m in with_dropout.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    assert not any(isinstance(m, nn.Dropout) for m in without.modules())
    # dropout is live in train mode and off in eval mode
    x = torch.randn(INPUTS[arch])
    with_dropout.eval()
    with torch.no_grad():
        assert torch.equal(with_dropout(x), with_dropout(x))


@pytest.mark.parametrize("arch", list(INPUTS))
def test_construction_is_deterministic(arch: str) -> None:
    torch.manual_seed(3)
    a = _build(arch, "bn").state_dict()
    torch.manual_seed(3)
    b = _build(arch, "bn").state_dict()
    torch.manual_seed(4)
    c = _build(arch, "bn").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_conv_bias_only_where_a_norm_does_not_absorb_it() -> None:
    bn = convblock(norm="bn")
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))
    for norm in ("none", "l2"):
        model = convblock(norm=norm)
        assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    # with the norm after the ReLU the conv bias is not absorbed
    after = convblock(norm="bn", norm_position="after")
    assert all(m.bias is not None for m in after.modules() if isinstance(m, nn.Conv2d))
    # resnet: the 1x1 projection shortcut is followed by a norm too
    r18 = resnet18(norm="bn")
    assert all(m.bias is None for m in r18.modules() if isinstance(m, nn.Conv2d))


def test_initialisation() -> None:
    model = resnet20(norm="bn")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "BatchNorm2d":
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    first = model.stem.conv.weight
    fan_out = first.shape[0] * first.shape[2] * first.shape[3]
    # Kaiming normal, fan_out: std = sqrt(2 / fan_out)
    assert first.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.25)
    l2 = [m for m in convblock(norm="l2").modules() if isinstance(m, L2Norm)]
    assert l2 and all(torch.all(m.weight == 20.0) for m in l2)
    no_affine = convblock(norm="in")
    norms = [m for m in no_affine.modules() if type(m).__name__ == "InstanceNorm2d"]
    assert norms and all(m.weight is None for m in norms)


def test_build_model_from_spec() -> None:
    model = build_model(ModelSpec(arch="resnet20", norm="gn:8", num_classes=7), in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    assert sum(type(m).__name__ == "GroupNorm" for m in model.modules()) == 19
    sr = build_model(ModelSpec(arch="edsr", scale=3, width=8, depth=1), in_channels=3)
    assert sr(torch.randn(1, 3, 4, 4)).shape == (1, 3, 12, 12)
    deep = build_model(ModelSpec(arch="convblock", depth=5, width=8), in_channels=3)
    assert sum(isinstance(m, ConvNormAct) for m in deep.modules()) == 5
    with pytest.raises(ValueError, match="depth"):
        build_model(ModelSpec(arch="resnet20", depth=5), in_channels=3)
    dict_norm = build_model(
        ModelSpec(arch="lenet", norm={"type": "bn", "momentum": 0.01}), in_channels=1
    )
    assert dict_norm.conv1.norm.momentum == 0.01


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="norm_position"):
        resnet20(norm_position="middle")
    with pytest.raises(ValueError, match="dropout"):
        vgg11(dropout=1.5)
    with pytest.raises(ValueError, match="unknown norm"):
        lenet(norm="batchy")
    with pytest.raises(ValueError, match="divisible"):
        resnet20(norm="gn:5")
    with pytest.raises(ValueError, match="width"):
        lenet(width=0)
    with pytest.raises(ValueError, match="depth"):
        edsr(depth=0)
    with pytest.raises(ValueError, match="in_channels"):
        resnet18(in_channels=0)
