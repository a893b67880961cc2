"""Every norm on float16 and bfloat16 input, against the same layer in float64.

For each name ``make_norm`` accepts (and the classes it does not build by default), at input
scales 1e-4, 1 and 300, in train and then eval mode, in the two ways half precision reaches a
norm: a float32 layer fed half activations (autocast's conv outputs: the buffers stay float32,
as torch's BatchNorm keeps them) and a layer cast with ``.to(dtype)``. The reference is a float64
copy of the very same layer (same rounded weights) run on the same rounded input, so what is
left is the layer's own arithmetic: statistics accumulated in float32 leave only the rounding of
the output, a few units of the dtype's epsilon. Statistics taken in half precision instead fail
at 300 (300^2 overflows float16) or 1e-4 (its square underflows): zeros, inf or NaN.
"""

from __future__ import annotations

import copy
import socket
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

import normcore
import normcore.layers as L
from normcore.layers.rmsnorm import default_eps
from normcore.layers.syncbn import _SyncBatchNormFunction

C = 8
HALF = [torch.bfloat16, torch.float16]
SCALES = [1e-4, 1.0, 300.0]

# name -> (builder, input shape); every name make_norm accepts, then classes it does not build
NORMS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    name: (lambda name=name: normcore.make_norm(name, C), (8, C, 5, 5))
    for name in [
        "bn",
        "sync_bn",
        "gn:4",
        "ln",
        "in",
        "rms",
        "rms2d",
        "lrn:3",
        "frozen_bn",
        "brn",
        "ghost_bn:4",
        "split_bn:2",
        "frn",
        "evo_b0",
        "evo_s0:4",
        "l2",
        "none",
    ]
}
NORMS.update(
    {
        "BatchNorm1d": (lambda: L.BatchNorm1d(C), (16, C)),
        "BatchNorm1d-3d": (lambda: L.BatchNorm1d(C), (4, C, 6)),
        "BatchNorm3d": (lambda: L.BatchNorm3d(C), (4, C, 2, 3, 3)),
        "BatchNorm2d-momentum-None": (lambda: L.BatchNorm2d(C, momentum=None), (8, C, 5, 5)),
        "BatchRenorm2d-active": (
            lambda: L.BatchRenorm2d(C, warmup_start=0, warmup_steps=0),
            (8, C, 5, 5),
        ),
        "BatchRenorm2d-momentum-None": (
            lambda: L.BatchRenorm2d(C, momentum=None, warmup_start=0, warmup_steps=0),
            (8, C, 5, 5),
        ),
        "GhostBatchNorm2d-momentum-None": (
            lambda: L.GhostBatchNorm2d(C, 4, momentum=None),
            (8, C, 5, 5),
        ),
        "GroupNorm": (lambda: L.GroupNorm(2, C), (4, C, 3, 5)),
        "LayerNorm": (lambda: L.LayerNorm(C), (4, 5, C)),
        "LayerNorm2d": (lambda: L.LayerNorm2d(C), (4, C, 5, 5)),
        "RMSNorm": (lambda: L.RMSNorm(C), (4, 5, C)),
        "RMSNorm2d-eps-None": (lambda: L.RMSNorm2d(C, eps=None), (4, C, 5, 5)),
        "InstanceNorm1d": (lambda: L.InstanceNorm1d(C, affine=True), (4, C, 9)),
        "InstanceNorm2d-tracked": (
            lambda: L.InstanceNorm2d(C, affine=True, track_running_stats=True),
            (4, C, 5, 5),
        ),
        "InstanceNorm3d": (lambda: L.InstanceNorm3d(C, affine=True), (2, C, 2, 3, 3)),
        "LocalResponseNorm": (lambda: L.LocalResponseNorm(5), (4, C, 5, 5)),
    }
)
CHANNELS_LAST = {"ln", "rms2d", "in", "gn:4", "bn", "frn"}


def _build(name: str, mode: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """(layer, float64 reference): parameters moved off their init, then the layer cast for
    ``mode``; the reference is a float64 copy of the cast layer (same rounded weights)."""
    torch.manual_seed(0)
    layer = NORMS[name][0]()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.rand(p.shape) * 0.2 - 0.1)
    if mode == "module":
        layer = layer.to(dtype)
    ref = copy.deepcopy(layer).double()
    for m in ref.modules():
        if isinstance(m, L.RMSNorm | L.RMSNorm2d) and m.eps is None:
            # torch.nn.RMSNorm's eps=None depends on the input dtype: give float64 the half one
            m.eps = default_eps(dtype)
    return layer, ref


def _input(name: str, scale: float, dtype: torch.dtype, channels_last: bool) -> Tensor:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(NORMS[name][1], generator=g) + 0.5) * scale
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.to(dtype)


def _assert_near(got: Tensor, want: Tensor, dtype: torch.dtype, what: str, ulps: float) -> None:
    """``got`` (half) within ``ulps`` units of the dtype's epsilon of the float64 ``want``:
    relative to each element, plus the same relative to the largest element (an element that
    is a difference of larger terms carries their rounding)."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values where float64 is finite"
    eps = torch.finfo(dtype).eps
    scale = want.abs().max().item()
    # float16 subnormals are spaced 6e-8 apart: a value near them keeps fewer digits
    tiny = torch.finfo(dtype).smallest_normal * eps if dtype == torch.float16 else 0.0
    err = (got.double() - want).abs()
    bound = ulps * eps * (want.abs() + scale) + 2 * tiny
    worst = (err - bound).max().item()
    assert worst <= 0, (
        f"{what}: max |half - float64| = {err.max().item():.3g} exceeds {ulps} eps "
        f"(eps={eps:.3g}, max |float64| = {scale:.3g})"
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cases() -> list[tuple[str, bool]]:
    return [(name, False) for name in NORMS] + [(name, True) for name in sorted(CHANNELS_LAST)]


@pytest.mark.parametrize("mode", ["mixed", "module"], ids=["fp32-layer", "half-layer"])
@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    ("name", "channels_last"),
    _cases(),
    ids=[n + ("-cl" if cl else "") for n, cl in _cases()],
)
def test_half_input_matches_float64(name, channels_last, dtype, mode) -> None:
    layer, ref = _build(name, mode, dtype)
    bufs_dtype = {k: v.dtype for k, v in layer.state_dict().items() if "running" in k}
    for scale in SCALES:
        x = _input(name, scale, dtype, channels_last).requires_grad_()
        xr = x.detach().double().requires_grad_()
        where = f"{name} {dtype} {mode} scale={scale}"
        for training in (True, False):
            layer.train(training)
            ref.train(training)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # LRN and friends on tiny maps
                y = layer(x)
                yr = ref(xr)
            phase = f"{where} {'train' if training else 'eval'}"
            assert y.dtype == dtype, f"{phase}: returned {y.dtype} for {dtype} input"
            _assert_near(y.detach(), yr.detach(), dtype, phase, ulps=2)
            if not training:
                continue
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
            gx, gr = torch.autograd.grad(y, x, g.to(dtype), allow_unused=True)[0], None
            if gx is not None:
                gr = torch.autograd.grad(yr, xr, g.double())[0]
                # a gradient float16 cannot hold (1e4 / 1e-4 for L2Norm) is not the layer's fault
                if gr.abs().max().item() < torch.finfo(dtype).max / 8:
                    _assert_near(gx, gr, dtype, f"{phase} input grad", ulps=8)
        # running buffers: float32 for a float32 layer (as torch's BN under autocast), the
        # layer's dtype for a cast one; close to float64's updates either way
        state, state_ref = layer.state_dict(), ref.state_dict()
        for key, want_dtype in bufs_dtype.items():
            assert state[key].dtype == want_dtype, f"{where}: {key} became {state[key].dtype}"
            if want_dtype == torch.float32:
                torch.testing.assert_close(
                    state[key].double(), state_ref[key], rtol=1e-5, atol=1e-12, msg=where + key
                )
            else:
                _assert_near(state[key], state_ref[key], dtype, f"{where} {key}", ulps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF])
@pytest.mark.parametrize("scale", [1e-4, 0.05, 3.0])
def test_rmsnorm_eps_none_is_torchs_op_math_eps(dtype, scale) -> None:
    """RMSNorm(eps=None) is torch.nn.RMSNorm(eps=None) (pytorch#155527): eps is finfo of the
    op-math dtype, float32 for half input, which the float64 formula pins down."""
    x = (torch.randn(6, 16, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    ours = L.RMSNorm(16).to(dtype)(x)
    twin = nn.RMSNorm(16).to(dtype)(x)
    torch.testing.assert_close(ours, twin, rtol=0, atol=0 if dtype in HALF else 1e-6)
    xd = x.double()
    opmath = torch.float64 if dtype == torch.float64 else torch.float32
    formula = xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + torch.finfo(opmath).eps)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours.double(), formula, rtol=2 * eps, atol=2 * eps)
    # finfo(bfloat16).eps = 7.8e-3 would swamp mean(x^2) = 1e-8 here: the old, wrong default
    if scale == 1e-4 and dtype in HALF:
        wrong = xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + eps)
        assert (ours.double() - wrong).abs().max() > 0.5


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_rmsnorm2d_eps_none_matches_torch_rmsnorm_over_channels(dtype) -> None:
    x = (torch.randn(2, C, 3, 4, generator=torch.Generator().manual_seed(1)) * 1e-4).to(dtype)
    ours = L.RMSNorm2d(C, eps=None).to(dtype)(x)
    twin = nn.RMSNorm(C).to(dtype)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(ours, twin, rtol=2 * eps, atol=2 * eps)


def test_blend_rounds_into_a_float16_buffer_once() -> None:
    """A float16 running_var takes 0.9 * 1 + 0.1 * 9e4 (fits), never 9e4 itself (inf)."""
    bn = L.GhostBatchNorm2d(C, virtual_batch_size=4).half()
    x = (torch.randn(8, C, 5, 5, generator=torch.Generator().manual_seed(0)) * 300).half()
    bn(x)
    assert torch.isfinite(bn.running_var).all()
    expected = 0.9 + 0.1 * x.double().var((0, 2, 3))
    torch.testing.assert_close(bn.running_var.double(), expected, rtol=0.05, atol=0)


def test_multi_rank_sync_batch_norm_in_half_precision() -> None:
    """SyncBatchNorm's own collective path (here a one-rank gloo group) on float16 input of
    scale 300: statistics in float32, the float16 buffers blended before rounding."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        x = (torch.randn(8, C, 5, 5, generator=torch.Generator().manual_seed(0)) * 300).half()
        xd = x.double()
        mean, var = xd.mean((0, 2, 3)), xd.var((0, 2, 3), correction=0)
        want = (xd - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
        for buffers in (torch.float32, torch.float16):
            rm = torch.zeros(C, dtype=buffers)
            rv = torch.ones(C, dtype=buffers)
            y = _SyncBatchNormFunction.apply(x, None, None, rm, rv, 1e-5, 0.1, dist.group.WORLD, 1)
            assert y.dtype == torch.float16
            _assert_near(y, want, torch.float16, f"SyncBN output, {buffers} buffers", ulps=2)
            unbiased = xd.var((0, 2, 3), correction=1)
            assert torch.isfinite(rv).all()
            rtol = 1e-6 if buffers == torch.float32 else 1e-3
            torch.testing.assert_close(rv.double(), 0.9 + 0.1 * unbiased, rtol=rtol, atol=0)
            torch.testing.assert_close(rm.double(), 0.1 * mean, rtol=rtol, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
