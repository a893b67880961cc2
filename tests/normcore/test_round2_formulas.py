"""Round-two layers against their papers' formulas, written out here in float64.

FRN+TLU (Singh & Krishnan 2019), EvoNorm-B0/S0 (Liu et al. 2020), RMSNorm2d, weight
standardization (Qiao et al. 2019), SplitBatchNorm2d against K separate BatchNorm2d, and the
Keras conventions (bn_from_keras, momentum_convention).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normcore
import normcore.layers as L
from normcore.factory import make_norm
from normcore.layers import channelwise

F64 = torch.float64
TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rand_params(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + 1.0)


def _ch(t: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast over (N, C, H, W)."""
    return t.view(1, -1, 1, 1)


def _grads(out: Tensor, g: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
    return torch.autograd.grad((out * g).sum(), inputs)


def _compare(ours: Tensor, ref: Tensor, g: Tensor, leaves: list[Tensor]) -> None:
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)
    for a, b in zip(_grads(ours, g, *leaves), _grads(ref, g, *leaves), strict=True):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


# ------------------------------------------------------------------ FRN + TLU


def frn_formula(x: Tensor, gamma: Tensor, beta: Tensor, tau: Tensor, eps: float) -> Tensor:
    """Singh & Krishnan, Eq. 1-2: nu^2 = sum_{h,w} x^2 / (H W); y = gamma x / sqrt(nu^2+eps) +
    beta; TLU z = max(y, tau)."""
    h, w = x.shape[2:]
    nu2 = (x * x).sum(dim=(2, 3), keepdim=True) / (h * w)
    y = _ch(gamma) * (x / torch.sqrt(nu2 + eps)) + _ch(beta)
    return torch.maximum(y, _ch(tau))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_frn_tlu_formula_and_gradients(layout) -> None:
    torch.manual_seed(0)
    layer = L.FilterResponseNorm2d(5, eps=1e-4).double()
    _rand_params(layer, 1)
    with torch.no_grad():
        layer.tau.copy_(torch.linspace(-0.5, 1.5, 5))  # the threshold bites on some entries
    x = torch.randn(3, 5, 4, 6, dtype=F64) * 2 + 0.3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    g = torch.randn(3, 5, 4, 6, dtype=F64)
    out = layer(x)
    ref = frn_formula(x, layer.weight, layer.bias, layer.tau, 1e-4)
    assert (out == _ch(layer.tau).expand_as(out)).any()  # some outputs are the threshold
    _compare(out, ref, g, [x, layer.weight, layer.bias, layer.tau])
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_frn_is_batch_independent_and_has_its_parameters() -> None:
    layer = L.FilterResponseNorm2d(4).double()
    _rand_params(layer, 2)
    x = torch.randn(5, 4, 3, 3, dtype=F64)
    torch.testing.assert_close(layer(x)[2:3], layer(x[2:3]), atol=TOL, rtol=TOL)
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "tau"]
    assert list(layer.buffers()) == []
    fresh = L.FilterResponseNorm2d(4)
    assert torch.equal(fresh.weight, torch.ones(4)) and torch.equal(fresh.tau, torch.zeros(4))
    with pytest.raises(ValueError, match=r"FilterResponseNorm2d\(4\).*\(N, 4, H, W\)"):
        layer(torch.randn(2, 3, 3, 3, dtype=F64))


# ------------------------------------------------------------------ EvoNorm


def evo_b0_formula(
    x: Tensor, gamma: Tensor, beta: Tensor, v: Tensor, batch_var: Tensor, eps: float
) -> Tensor:
    """Liu et al., EvoNorm-B0: x / max(sqrt(s_b^2 + eps), v x + sqrt(s_i^2 + eps)) gamma + beta."""
    h, w = x.shape[2:]
    inst_mean = x.sum(dim=(2, 3), keepdim=True) / (h * w)
    inst_var = ((x - inst_mean) ** 2).sum(dim=(2, 3), keepdim=True) / (h * w)
    left = torch.sqrt(_ch(batch_var) + eps)
    right = _ch(v) * x + torch.sqrt(inst_var + eps)
    return x / torch.maximum(left, right) * _ch(gamma) + _ch(beta)


def _batch_var(x: Tensor) -> Tensor:
    """Biased variance per channel over (N, H, W)."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.sum(dim=(0, 2, 3), keepdim=True) / m
    return ((x - mean) ** 2).sum(dim=(0, 2, 3)) / m


def test_evonorm_b0_training_eval_and_running_variance() -> None:
    torch.manual_seed(0)
    eps, momentum = 1e-3, 0.2
    layer = L.EvoNorm2dB0(4, eps=eps, momentum=momentum).double()
    _rand_params(layer, 3)
    with torch.no_grad():
        layer.v.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    running = torch.ones(4, dtype=F64)
    for step in range(3):
        x = (torch.randn(3, 4, 5, 4, dtype=F64) * (step + 1) + step).requires_grad_()
        g = torch.randn_like(x)
        out = layer(x)
        bvar = _batch_var(x)
        ref = evo_b0_formula(x, layer.weight, layer.bias, layer.v, bvar, eps)
        _compare(out, ref, g, [x, layer.weight, layer.bias, layer.v])
        m = 3 * 5 * 4
        # the running variance is BN's: unbiased batch variance, torch's momentum convention
        running = (1 - momentum) * running + momentum * bvar.detach() * m / (m - 1)
        torch.testing.assert_close(layer.running_var, running, atol=TOL, rtol=TOL)
    layer.eval()
    x = torch.randn(2, 4, 3, 3, dtype=F64, requires_grad=True)
    ref = evo_b0_formula(x, layer.weight, layer.bias, layer.v, layer.running_var, eps)
    _compare(layer(x), ref, torch.randn(2, 4, 3, 3, dtype=F64), [x, layer.weight])
    before = layer.running_var.clone()
    layer(x)
    assert torch.equal(layer.running_var, before)  # eval never updates


def test_evonorm_b0_refuses_one_value_per_channel_in_training() -> None:
    layer = L.EvoNorm2dB0(3)
    with pytest.raises(ValueError, match=r"EvoNorm2dB0\(3\).*more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    assert layer.eval()(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def evo_s0_formula(
    x: Tensor, gamma: Tensor, beta: Tensor, v: Tensor, groups: int, eps: float
) -> Tensor:
    """Liu et al., EvoNorm-S0: x sigmoid(v x) / sqrt(s_g^2 + eps) gamma + beta."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups * h * w)
    mean = xg.sum(-1, keepdim=True) / xg.shape[-1]
    var = ((xg - mean) ** 2).sum(-1, keepdim=True) / xg.shape[-1]
    std = torch.sqrt(var + eps).expand_as(xg).reshape(n, c, h, w)
    sig = 1.0 / (1.0 + torch.exp(-_ch(v) * x))
    return x * sig / std * _ch(gamma) + _ch(beta)


@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_evonorm_s0_formula(groups, layout) -> None:
    torch.manual_seed(1)
    layer = L.EvoNorm2dS0(6, num_groups=groups, eps=1e-4).double()
    _rand_params(layer, 4)
    x = torch.randn(3, 6, 4, 5, dtype=F64) * 2 - 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = layer(x)
    ref = evo_s0_formula(x, layer.weight, layer.bias, layer.v, groups, 1e-4)
    _compare(out, ref, torch.randn(3, 6, 4, 5, dtype=F64), [x, layer.weight, layer.bias, layer.v])
    # per sample: the same in train and eval mode, and independent of the rest of the batch
    torch.testing.assert_close(layer.eval()(x[1:2]), out[1:2], atol=TOL, rtol=TOL)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_evonorm_from_the_factory() -> None:
    s0 = make_norm("evo_s0:8", 16)
    assert type(s0) is L.EvoNorm2dS0 and s0.num_groups == 8
    assert make_norm("evo_s0", 48).num_groups == 24  # GroupNorm's rule: largest divisor <= 32
    assert type(make_norm("evo_b0(momentum=0.05)", 8)) is L.EvoNorm2dB0
    with pytest.raises(ValueError, match="divisible by 8, got 12"):
        make_norm("evo_s0:8", 12)


# ------------------------------------------------------------------ RMSNorm2d


def rms2d_formula(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """y = x / sqrt(mean_c x^2 + eps) * weight at each position."""
    c = x.shape[1]
    ms = (x * x).sum(dim=1, keepdim=True) / c
    y = x / torch.sqrt(ms + eps)
    return y if weight is None else y * _ch(weight)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("impl", sorted(channelwise.IMPLEMENTATIONS["rms_norm_2d"]))
def test_rmsnorm2d_formula_every_implementation(impl, layout, affine) -> None:
    torch.manual_seed(2)
    w = (torch.rand(5, dtype=F64) + 0.5).requires_grad_() if affine else None
    x = torch.randn(3, 5, 4, 6, dtype=F64) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    out = channelwise.rms_norm_2d(x, w, 1e-5, impl=impl)
    ref = rms2d_formula(x, w, 1e-5)
    _compare(out, ref, torch.randn(3, 5, 4, 6, dtype=F64), [x] + ([w] if affine else []))


def test_rmsnorm2d_layer_equals_rmsnorm_on_nhwc() -> None:
    layer = L.RMSNorm2d(5, eps=1e-5).double()
    _rand_params(layer, 5)
    ref = nn.RMSNorm(5, eps=1e-5).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 3, 4, dtype=F64)
    torch.testing.assert_close(
        layer(x), ref(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=TOL, rtol=TOL
    )
    with pytest.raises(ValueError, match=r"RMSNorm2d\(5\)"):
        layer(torch.randn(2, 4, 3, 3, dtype=F64))


# ------------------------------------------------------------------ weight standardization


def ws_formula(weight: Tensor, eps: float) -> Tensor:
    """Qiao et al., Eq. 5-6: W_hat = (W - mu) / sqrt(sigma^2 + eps), per output channel over its
    fan-in (biased variance)."""
    out = weight.shape[0]
    flat = weight.reshape(out, -1)
    mu = flat.sum(1, keepdim=True) / flat.shape[1]
    var = ((flat - mu) ** 2).sum(1, keepdim=True) / flat.shape[1]
    return ((flat - mu) / torch.sqrt(var + eps)).reshape_as(weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": 3, "stride": 2, "groups": 2, "bias": False},
        {"kernel_size": (3, 1), "padding": 1, "padding_mode": "reflect", "dilation": 1},
    ],
    ids=["plain", "grouped-strided-nobias", "reflect"],
)
def test_stdconv_formula(kwargs) -> None:
    torch.manual_seed(3)
    conv = L.StdConv2d(4, 6, eps=1e-5, **kwargs).double()
    with torch.no_grad():
        conv.weight.mul_(7).add_(0.3)  # far from standardized, so the test can tell
    x = torch.randn(2, 4, 7, 6, dtype=F64, requires_grad=True)
    out = conv(x)
    plain = nn.Conv2d(4, 6, **kwargs).double()
    plain.load_state_dict(conv.state_dict())
    what = ws_formula(conv.weight, 1e-5)
    if plain.padding_mode != "zeros":
        ref = plain._conv_forward(x, what, conv.bias)
    else:
        ref = F.conv2d(
            x, what, conv.bias, plain.stride, plain.padding, plain.dilation, plain.groups
        )
    leaves = [x, conv.weight] + ([conv.bias] if conv.bias is not None else [])
    _compare(out, ref, torch.randn_like(out), leaves)
    assert list(conv.state_dict()) == list(plain.state_dict())


def test_stdconv_from_conv_shares_parameters() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    std = L.StdConv2d.from_conv(conv)
    assert std.weight is conv.weight and std.bias is conv.bias
    assert std.padding == conv.padding and std.weight.device.type == "cpu"
    w = std.standardized_weight().detach().reshape(4, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(4), atol=1e-6, rtol=0)
    # var / (var + eps) with the small init variance of a conv kernel
    torch.testing.assert_close(w.var(1, correction=0), torch.ones(4), atol=1e-3, rtol=0)


# ------------------------------------------------------------------ SplitBatchNorm2d


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_split_bn_is_k_batchnorms_in_training_and_the_main_one_in_eval(k, momentum) -> None:
    torch.manual_seed(4)
    split = L.SplitBatchNorm2d(3, num_splits=k, momentum=momentum).double()
    refs = [nn.BatchNorm2d(3, momentum=momentum).double() for _ in range(k)]
    for i, ref in enumerate(refs):
        _rand_params(ref, 10 + i)
    split.load_state_dict(refs[0].state_dict(), strict=False)
    for bn, ref in zip(split.aux_bn, refs[1:], strict=True):
        bn.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = (torch.randn(2 * k, 3, 4, 4, dtype=F64) * 2 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        g = torch.randn_like(x)
        out = split(x)
        parts = x_ref.split(2)
        ref = torch.cat([bn(p) for bn, p in zip(refs, parts, strict=True)])
        torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
        (out * g).sum().backward()
        (ref * g).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, atol=TOL, rtol=TOL)
    mains = [split, *split.aux_bn]
    for mine, ref in zip(mains, refs, strict=True):
        torch.testing.assert_close(mine.running_mean, ref.running_mean, atol=TOL, rtol=TOL)
        torch.testing.assert_close(mine.running_var, ref.running_var, atol=TOL, rtol=TOL)
        torch.testing.assert_close(mine.weight.grad, ref.weight.grad, atol=TOL, rtol=TOL)
        assert int(mine.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    split.eval()
    refs[0].eval()
    x = torch.randn(5, 3, 4, 4, dtype=F64)  # any batch size in eval
    torch.testing.assert_close(split(x), refs[0](x), atol=TOL, rtol=TOL)


def test_split_bn_state_dict_errors_and_factory() -> None:
    split = make_norm("split_bn:3", 4)
    assert type(split) is L.SplitBatchNorm2d and split.num_splits == 3
    keys = list(split.state_dict())
    assert keys[:5] == list(nn.BatchNorm2d(4).state_dict())
    assert "aux_bn.1.running_var" in keys
    with pytest.raises(ValueError, match=r"N divisible by 3"):
        split(torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="num_splits must be an int >= 2"):
        L.SplitBatchNorm2d(4, num_splits=1)


# ------------------------------------------------------------------ Keras conventions


def keras_inference(x: Tensor, gamma, beta, mean, var, epsilon: float) -> Tensor:
    """Keras BatchNormalization at inference: gamma (x - mean) / sqrt(var + epsilon) + beta."""
    return _ch(gamma) * (x - _ch(mean)) / torch.sqrt(_ch(var) + epsilon) + _ch(beta)


def test_bn_from_keras_eval_equals_keras_inference() -> None:
    gen = torch.Generator().manual_seed(5)
    c = 6
    gamma = torch.randn(c, generator=gen, dtype=F64).numpy()
    beta = torch.randn(c, generator=gen, dtype=F64).numpy()
    mean = torch.randn(c, generator=gen, dtype=F64).numpy()
    var = (torch.rand(c, generator=gen, dtype=F64) + 0.1).numpy()
    bn = normcore.bn_from_keras(
        gamma=gamma, beta=beta, moving_mean=mean, moving_variance=var, epsilon=1e-3, momentum=0.99
    )
    assert isinstance(bn, L.BatchNorm2d) and not bn.training
    assert bn.eps == 1e-3 and bn.momentum == pytest.approx(0.01)
    assert bn.weight.dtype == F64
    x = torch.randn(2, c, 3, 3, dtype=F64, generator=gen)
    ref = keras_inference(x, *(torch.as_tensor(a) for a in (gamma, beta, mean, var)), epsilon=1e-3)
    torch.testing.assert_close(bn(x), ref, atol=TOL, rtol=TOL)
    # center=False / scale=False layers have no beta / gamma
    no_beta = normcore.bn_from_keras(gamma=gamma, moving_mean=mean, moving_variance=var)
    ref0 = keras_inference(
        x,
        torch.as_tensor(gamma),
        0 * torch.as_tensor(beta),
        torch.as_tensor(mean),
        torch.as_tensor(var),
        epsilon=1e-3,
    )
    torch.testing.assert_close(no_beta(x), ref0, atol=TOL, rtol=TOL)
    plain = normcore.bn_from_keras(moving_mean=[0.5] * 3, moving_variance=[2.0] * 3, dims=1)
    assert isinstance(plain, L.BatchNorm1d) and plain.weight is None
    assert plain.running_mean.dtype == torch.float32
    torch.testing.assert_close(
        plain(torch.ones(4, 3)), torch.full((4, 3), 0.5 / math.sqrt(2.0 + 1e-3))
    )
    with pytest.raises(ValueError, match="moving_variance has 2 channels"):
        normcore.bn_from_keras(moving_mean=[0.0] * 3, moving_variance=[1.0] * 2)


def test_keras_momentum_convention() -> None:
    """Keras' 0.99 keeps 99% of the old average: torch's momentum 0.01 does the same."""
    bn = make_norm("bn", 3, momentum=0.99, momentum_convention="keras").double()
    assert bn.momentum == 0.01
    assert make_norm("bn(momentum=0.9, momentum_convention='keras')", 3).momentum == 0.1
    spec = {"type": "bn", "momentum": 0.99, "momentum_convention": "keras"}
    assert make_norm(spec, 3).momentum == 0.01
    assert make_norm("bn", 3, momentum=0.2, momentum_convention="torch").momentum == 0.2
    x = torch.randn(8, 3, 2, 2, dtype=F64)
    bn(x)
    batch_mean = x.mean(dim=(0, 2, 3))
    keras_moving = 0.99 * torch.zeros(3, dtype=F64) + (1 - 0.99) * batch_mean
    torch.testing.assert_close(bn.running_mean, keras_moving, atol=TOL, rtol=TOL)
    with pytest.raises(ValueError, match="momentum_convention must be 'torch' or 'keras'"):
        make_norm("bn", 3, momentum_convention="tf")
    with pytest.raises(ValueError, match=r"Keras momentum must be a number in \[0, 1\]"):
        make_norm("bn(momentum=None)", 3, momentum_convention="keras")
