"""Channel-dim norms keep the input layout; every implementation is right; small-batch policy."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L
from normcore.factory import make_norm
from normcore.layers import channelwise

CL = torch.channels_last
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)
    return module


LAYERS = {
    "LayerNorm2d": lambda: L.LayerNorm2d(6),
    "LayerNorm2d-noaffine": lambda: L.LayerNorm2d(6, elementwise_affine=False),
    "RMSNorm2d": lambda: L.RMSNorm2d(6),
    "GroupNorm": lambda: L.GroupNorm(3, 6),
    "InstanceNorm2d": lambda: L.InstanceNorm2d(6, affine=True),
    "InstanceNorm2d-tracked-train": lambda: L.InstanceNorm2d(
        6, affine=True, track_running_stats=True
    ),
    "InstanceNorm2d-tracked-eval": lambda: L.InstanceNorm2d(
        6, affine=True, track_running_stats=True
    ).eval(),
}


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (2, 6, 1, 9), (3, 6, 8, 8)])
@pytest.mark.parametrize("name", list(LAYERS))
def test_channels_last_in_channels_last_out_with_nchw_values(name, shape) -> None:
    """float32: the channels_last result equals the NCHW one within 1e-6 (outputs, gradients
    and running statistics), and each keeps its layout."""
    a, b = _randomize(LAYERS[name](), 1), _randomize(LAYERS[name](), 1)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(shape, generator=gen) * 2 + 0.5
    g = torch.randn(shape, generator=gen)
    x1 = base.clone().requires_grad_()
    x2 = base.contiguous(memory_format=CL).requires_grad_()
    y1, y2 = a(x1), b(x2)
    assert y1.is_contiguous()
    assert y2.is_contiguous(memory_format=CL) and not y2.is_contiguous()
    torch.testing.assert_close(y2, y1, atol=1e-6, rtol=1e-6)
    (y1 * g).sum().backward()
    (y2 * g.contiguous(memory_format=CL)).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-6, rtol=1e-6)
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, atol=1e-5, rtol=1e-6, msg=n1)
    for (n1, b1), (_, b2) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        torch.testing.assert_close(b2, b1, atol=1e-6, rtol=1e-6, msg=n1)


def ln2d_formula(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    c = x.shape[1]
    mean = x.sum(1, keepdim=True) / c
    var = ((x - mean) ** 2).sum(1, keepdim=True) / c
    y = (x - mean) / torch.sqrt(var + eps)
    if w is not None:
        y = y * w.view(1, -1, 1, 1)
    if b is not None:
        y = y + b.view(1, -1, 1, 1)
    return y


def in2d_formula(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    hw = x.shape[2] * x.shape[3]
    mean = x.sum((2, 3), keepdim=True) / hw
    var = ((x - mean) ** 2).sum((2, 3), keepdim=True) / hw
    y = (x - mean) / torch.sqrt(var + eps)
    return y * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def _check_impl(out: Tensor, ref: Tensor, leaves: list[Tensor], layout: str) -> None:
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)
    g = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad((out * g).sum(), leaves),
        torch.autograd.grad((ref * g).sum(), leaves),
        strict=True,
    ):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("affine", ["wb", "w", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", sorted(channelwise.IMPLEMENTATIONS["layer_norm_2d"]))
def test_every_layer_norm_2d_implementation(impl, layout, affine) -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 5, 4, 6, dtype=F64) * 3 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w = (torch.rand(5, dtype=F64) + 0.5).requires_grad_() if affine != "none" else None
    b = torch.randn(5, dtype=F64, requires_grad=True) if affine == "wb" else None
    out = channelwise.layer_norm_2d(x, w, b, 1e-5, impl=impl)
    leaves = [t for t in (x, w, b) if t is not None]
    _check_impl(out, ln2d_formula(x, w, b, 1e-5), leaves, layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("impl", sorted(channelwise.IMPLEMENTATIONS["instance_norm_2d"]))
def test_every_instance_norm_2d_implementation(impl, layout) -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 5, 4, 6, dtype=F64) * 3 + 2
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w = (torch.rand(5, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(5, dtype=F64, requires_grad=True)
    out = channelwise.instance_norm_2d(x, w, b, 1e-5, impl=impl)
    _check_impl(out, in2d_formula(x, w, b, 1e-5), [x, w, b], layout)


def test_implementations_are_picked_by_device_layout_and_dtype(monkeypatch) -> None:
    x = torch.randn(2, 4, 3, 3)
    cl = x.contiguous(memory_format=CL)
    for op in ("layer_norm_2d", "rms_norm_2d", "instance_norm_2d"):
        for t, layout in ((x, "nchw"), (cl, "channels_last")):
            assert channelwise.pick(op, t, layout) == channelwise.CHOICES[(op, "cpu", layout)]
            assert channelwise.pick(op, t.bfloat16(), layout) == "torch"
        assert channelwise.pick(op, x, "strided") == "torch"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert channelwise.pick("layer_norm_2d", x, "nchw") == "torch"


def test_layouts_are_recognised_and_restored() -> None:
    x = torch.randn(2, 4, 3, 3)
    cl = x.contiguous(memory_format=CL)
    assert channelwise.layout_of(x) == "nchw"
    assert channelwise.layout_of(cl) == "channels_last"
    assert channelwise.layout_of(x[:, :, :, ::2]) == "strided"
    assert channelwise.restore_layout(cl, "nchw").is_contiguous()
    assert channelwise.restore_layout(x, "channels_last").is_contiguous(memory_format=CL)
    assert channelwise.restore_layout(x, "nchw") is x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["LayerNorm2d", "RMSNorm2d", "InstanceNorm2d"])
def test_other_dtypes_keep_the_layout_too(name, dtype) -> None:
    layer = LAYERS[name]().to(dtype)
    x = torch.randn(2, 6, 3, 4, dtype=dtype)
    ref = layer(x)
    out = layer(x.contiguous(memory_format=CL))
    assert out.dtype == dtype and out.is_contiguous(memory_format=CL)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-12
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


# ------------------------------------------------------------------ small-batch policy

SMALL = [
    (lambda **kw: L.BatchNorm1d(4, **kw), (1, 4)),
    (lambda **kw: L.BatchNorm1d(4, **kw), (1, 4, 1)),
    (lambda **kw: L.BatchNorm2d(4, **kw), (1, 4, 1, 1)),
    (lambda **kw: L.BatchNorm3d(4, **kw), (1, 4, 1, 1, 1)),
    (lambda **kw: L.BatchNorm2d(4, momentum=None, **kw), (1, 4, 1, 1)),
    (lambda **kw: L.GhostBatchNorm2d(4, 2, **kw), (1, 4, 1, 1)),
    (lambda **kw: L.BatchRenorm2d(4, warmup_start=0, warmup_steps=0, **kw), (1, 4, 1, 1)),
    (lambda **kw: L.SyncBatchNorm(4, **kw), (1, 4, 1, 1)),
]
SMALL_IDS = ["bn1d-2D", "bn1d-3D", "bn2d", "bn3d", "bn2d-cumulative", "ghost", "brn", "sync"]


@pytest.mark.parametrize(("make", "shape"), SMALL, ids=SMALL_IDS)
def test_running_stats_policy_gives_eval_output_and_touches_no_buffer(make, shape) -> None:
    layer = _randomize(make(small_batch="running_stats").double(), 5)
    with torch.no_grad():
        layer.num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    out = layer.train()(x)
    expected = layer.eval()(x.detach())
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    out.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(layer.num_batches_tracked) == 7
    # a real batch still trains and counts
    layer.train()(torch.randn((3, *shape[1:]), dtype=F64))
    assert int(layer.num_batches_tracked) == 8


@pytest.mark.parametrize(("make", "shape"), SMALL[:4], ids=SMALL_IDS[:4])
def test_error_policy_is_the_default_and_names_the_remedy(make, shape) -> None:
    layer = make()
    assert layer.small_batch == "error"
    with pytest.raises(ValueError, match=r"more than 1 value per channel.*small_batch="):
        layer(torch.randn(shape))


def test_small_batch_policy_errors_and_spec() -> None:
    with pytest.raises(ValueError, match="small_batch must be 'error' or 'running_stats'"):
        L.BatchNorm2d(4, small_batch="skip")
    # without running statistics there is nothing to fall back on
    layer = L.BatchNorm2d(4, track_running_stats=False, small_batch="running_stats")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 4, 1, 1))
    bn = make_norm("bn(small_batch='running_stats')", 4)
    assert bn.small_batch == "running_stats" and "small_batch='running_stats'" in repr(bn)
    assert "small_batch" not in repr(L.BatchNorm2d(4))
    assert make_norm("ghost_bn:4(small_batch='running_stats')", 4).small_batch == "running_stats"
    # an empty batch is still torch's business (no error, no policy)
    assert L.BatchNorm2d(4, small_batch="running_stats")(torch.randn(0, 4, 2, 2)).shape[0] == 0


def test_layernorm2d_channels_last_shortcut_matches_the_table() -> None:
    """LayerNorm2d sends channels_last input straight to torch's kernel on the NHWC view; that
    is only right while the table picks "torch" for that layout on every device it lists."""
    cl_choices = {
        device: impl
        for (op, device, layout), impl in channelwise.CHOICES.items()
        if op == "layer_norm_2d" and layout == "channels_last"
    }
    assert cl_choices and set(cl_choices.values()) == {"torch"}
    layer = _randomize(L.LayerNorm2d(6), 3)
    x = torch.randn(2, 6, 4, 5).contiguous(memory_format=CL).requires_grad_()
    out = layer(x)
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    ref = channelwise.layer_norm_2d(x, layer.weight, layer.bias, layer.eps, impl="torch")
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"expected \(N, 6, H, W\)"):
        layer(torch.randn(2, 5, 4, 5).contiguous(memory_format=CL))
