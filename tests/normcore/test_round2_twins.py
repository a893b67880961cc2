"""RMSNorm and LocalResponseNorm are twins of torch.nn's: outputs, gradients, state dicts, edges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normcore
import normcore.layers as L
from normcore.layers import channelwise
from tests.normcore.test_layers_twins import DTYPES, LAYOUTS, TOL, _layout, check_twin


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ RMSNorm

RMS_CASES = [
    (5, (4, 5)),
    (5, (2, 3, 5)),
    ((3, 4), (2, 5, 3, 4)),
    (4, (2, 3, 5, 4)),
    (5, (5,)),
    ((3, 4), (3, 4)),
]
RMS_IDS = ["2D", "3D", "4D-two-dims", "4D-last-dim", "unbatched", "exact"]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["eps-default", "eps1e-3"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(("normalized", "shape"), RMS_CASES, ids=RMS_IDS)
def test_rmsnorm_twin(normalized, shape, affine, eps, layout, dtype) -> None:
    kw = {"eps": eps, "elementwise_affine": affine}
    check_twin(L.RMSNorm(normalized, **kw), nn.RMSNorm(normalized, **kw), shape, dtype, layout)


@pytest.mark.parametrize("impl", sorted(channelwise.IMPLEMENTATIONS["rms_norm"]))
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_every_rms_norm_implementation_matches_torch(impl, dtype) -> None:
    """Each route the layer can pick gives torch's values and gradients."""
    gen = torch.Generator().manual_seed(3)
    x1 = (torch.randn(6, 3, 8, generator=gen, dtype=dtype) * 3 + 1).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w1 = (torch.rand(8, generator=gen, dtype=dtype) + 0.5).requires_grad_()
    w2 = w1.detach().clone().requires_grad_()
    g = torch.randn(6, 3, 8, generator=gen, dtype=dtype)
    y1 = channelwise.rms_norm(x1, (8,), w1, 1e-5, impl=impl)
    y2 = torch.nn.functional.rms_norm(x2, (8,), w2, 1e-5)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    tol = TOL[dtype]
    torch.testing.assert_close(y1, y2, atol=tol, rtol=tol)
    torch.testing.assert_close(x1.grad, x2.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w1.grad, w2.grad, atol=tol, rtol=tol)


def test_rmsnorm_fast_path_is_the_picked_one_on_cpu() -> None:
    x = torch.randn(4, 8)
    assert channelwise.pick("rms_norm", x, "contiguous") == "rows"
    assert channelwise.pick("rms_norm", x.bfloat16(), "contiguous") == "torch"


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_rmsnorm_bfloat16_matches_torch() -> None:
    x = torch.randn(4, 3, 16).bfloat16()
    ours, theirs = L.RMSNorm(16), nn.RMSNorm(16)
    torch.testing.assert_close(ours(x), theirs(x))
    assert ours(x).dtype == torch.bfloat16


def test_rmsnorm_edges_and_errors() -> None:
    layer = L.RMSNorm(5)
    x = torch.randn(0, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 5)
    # a zero vector gives 0 (eps keeps the denominator away from 0), as in torch
    z = torch.zeros(2, 5)
    torch.testing.assert_close(layer(z), nn.RMSNorm(5)(z))
    with pytest.raises(
        ValueError, match=r"RMSNorm\(\(5,\)\).*\(\*, 5\).*got input of size \(3, 4\)"
    ):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"RMSNorm2d"):
        L.RMSNorm((3, 4))(torch.randn(4))
    assert repr(L.RMSNorm(4)) == repr(nn.RMSNorm(4))
    assert repr(L.RMSNorm((2, 3), eps=1e-3, elementwise_affine=False)) == repr(
        nn.RMSNorm((2, 3), eps=1e-3, elementwise_affine=False)
    )


# ------------------------------------------------------------------ LocalResponseNorm

LRN_SHAPES = [(3, 6, 5), (2, 6, 4, 4), (2, 6, 2, 3, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kwargs",
    [{"size": 1}, {"size": 2}, {"size": 5, "alpha": 1e-2, "beta": 0.5, "k": 2.0}, {"size": 9}],
    ids=["size1", "size2", "size5-alexnet-ish", "size-gt-C"],
)
@pytest.mark.parametrize("shape", LRN_SHAPES, ids=["3D", "4D", "5D"])
def test_lrn_twin(shape, kwargs, layout, dtype) -> None:
    check_twin(L.LocalResponseNorm(**kwargs), nn.LocalResponseNorm(**kwargs), shape, dtype, layout)


def test_lrn_edges_and_errors() -> None:
    layer = L.LocalResponseNorm(3)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None
    with pytest.raises(ValueError, match=r"LocalResponseNorm\(3\).*at least 3.*2D input"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="size must be a positive int"):
        L.LocalResponseNorm(0)
    assert repr(L.LocalResponseNorm(3, 1e-3, 0.5, 2.0)) == repr(
        nn.LocalResponseNorm(3, 1e-3, 0.5, 2.0)
    )
    # no parameters, no buffers: its state dict is empty on both sides
    assert layer.state_dict() == {} and nn.LocalResponseNorm(3).state_dict() == {}


# ------------------------------------------------------------------ state dicts


@pytest.mark.parametrize(
    ("make_ours", "make_theirs"),
    [
        (lambda: L.RMSNorm(4), lambda: nn.RMSNorm(4)),
        (lambda: L.RMSNorm((2, 3), eps=1e-4), lambda: nn.RMSNorm((2, 3), eps=1e-4)),
        (
            lambda: L.RMSNorm(4, elementwise_affine=False),
            lambda: nn.RMSNorm(4, elementwise_affine=False),
        ),
        (lambda: L.RMSNorm2d(4), lambda: nn.RMSNorm(4)),
        (lambda: L.LocalResponseNorm(3), lambda: nn.LocalResponseNorm(3)),
    ],
    ids=["rms", "rms-2dims", "rms-noaffine", "rms2d-from-rms", "lrn"],
)
def test_state_dict_round_trip_both_ways(make_ours, make_theirs) -> None:
    gen = torch.Generator().manual_seed(4)
    ours, theirs = make_ours(), make_theirs()
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    with torch.no_grad():
        for p in ours.parameters():
            p.mul_(2)
    fresh = make_theirs()
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_top_level_exports() -> None:
    for name in (
        "RMSNorm",
        "LocalResponseNorm",
        "RMSNorm2d",
        "FilterResponseNorm2d",
        "EvoNorm2dB0",
        "EvoNorm2dS0",
        "SplitBatchNorm2d",
        "StdConv2d",
    ):
        assert getattr(normcore, name) is getattr(L, name)
    from normcore.keras import bn_from_keras

    assert normcore.bn_from_keras is bn_from_keras


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rmsnorm_keeps_strided_input_values(layout) -> None:
    """A non-contiguous input takes torch's route and still gives torch's values."""
    x = _layout(torch.randn(3, 4, 6, 5, dtype=torch.float64), layout)
    torch.testing.assert_close(L.RMSNorm(5)(x), nn.RMSNorm(5).double()(x))
