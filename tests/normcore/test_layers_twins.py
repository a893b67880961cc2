"""Each normcore layer with a torch.nn twin matches it: outputs, gradients, buffers, state dicts."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import normcore.layers as L


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STEPS = 5
TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def _layout(x: Tensor, layout: str) -> Tensor:
    """``x`` in the requested memory layout; 'channels_last' means non-default strides."""
    if layout == "contiguous":
        return x.contiguous()
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    # 2D/3D have no channels_last format: use a transposed (non-contiguous) view instead
    return x.transpose(0, -1).contiguous().transpose(0, -1)


def _randomize(module: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen, dtype=b.dtype))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen, dtype=b.dtype) + 0.5)


def _close(a: Tensor | None, b: Tensor | None, tol: float | None, what: str) -> None:
    """``a`` and ``b`` agree within ``tol``; bit for bit (``torch.equal``) when ``tol`` is None."""
    assert (a is None) == (b is None), what
    if a is not None and b is not None:
        assert a.shape == b.shape and a.dtype == b.dtype, what
        if tol is None:
            diff = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
            assert torch.equal(a, b), f"{what}: not bit-identical, max |diff| = {diff:.3g}"
        else:
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def check_twin(
    ours: nn.Module,
    theirs: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    layout: str,
    steps: int = STEPS,
    transform: Callable[[Tensor], Tensor] | None = None,
    exact: bool = True,
) -> None:
    """Train both modules ``steps`` times on the same data, then eval; compare everything.

    Outputs, input and parameter gradients and buffers must be bit-identical (``torch.equal``):
    a twin runs torch.nn's computation. ``exact=False`` compares within ``TOL`` instead, for a
    layer checked against a torch.nn layer that computes the same thing another way.
    ``transform`` maps our input to theirs and their output back (e.g. a permutation).
    """
    gen = torch.Generator().manual_seed(0)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    _randomize(theirs, gen)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tol = None if exact else TOL[dtype]
    t = transform or (lambda v: v)
    for mode in ["train"] * steps + ["eval"]:
        ours.train(mode == "train")
        theirs.train(mode == "train")
        ours.zero_grad()
        theirs.zero_grad()
        base = torch.randn(shape, generator=gen, dtype=dtype) * 2.0 + 0.7
        x1 = _layout(base, layout).requires_grad_()
        x2 = _layout(base, layout).requires_grad_()
        y1 = ours(x1)
        y2 = t(theirs(t(x2)))
        g = torch.randn(y1.shape, generator=gen, dtype=dtype)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        _close(y1, y2, tol, f"{mode} output")
        _close(x1.grad, x2.grad, tol, f"{mode} input grad")
        for (n1, p1), (n2, p2) in zip(
            ours.named_parameters(), theirs.named_parameters(), strict=True
        ):
            assert n1 == n2
            _close(p1.grad, p2.grad, tol, f"{mode} grad of {n1}")
    for (n1, b1), (n2, b2) in zip(ours.named_buffers(), theirs.named_buffers(), strict=True):
        assert n1 == n2
        if b1.dtype == torch.long:
            assert torch.equal(b1, b2), n1
        else:
            _close(b1, b2, tol, f"buffer {n1}")


DTYPES = [torch.float64, torch.float32]
LAYOUTS = ["contiguous", "channels_last"]
MOMENTA = [0.1, 0.01, None]

BN_CASES = [
    (L.BatchNorm1d, nn.BatchNorm1d, (6, 3)),
    (L.BatchNorm1d, nn.BatchNorm1d, (4, 3, 5)),
    (L.BatchNorm2d, nn.BatchNorm2d, (4, 3, 5, 4)),
    (L.BatchNorm3d, nn.BatchNorm3d, (3, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", MOMENTA, ids=["m0.1", "m0.01", "mNone"])
@pytest.mark.parametrize(
    ("ours", "theirs", "shape"), BN_CASES, ids=["bn1d-2D", "bn1d-3D", "bn2d", "bn3d"]
)
def test_batchnorm_twin(ours, theirs, shape, momentum, affine, track, layout, dtype) -> None:
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    check_twin(ours(3, **kw), theirs(3, **kw), shape, dtype, layout)


def test_batchnorm_bias_false_twin() -> None:
    check_twin(
        L.BatchNorm2d(3, bias=False),
        nn.BatchNorm2d(3, bias=False),
        (4, 3, 3, 3),
        torch.float64,
        "contiguous",
    )


SYNC_SHAPES = [(5, 3), (4, 3, 5), (4, 3, 5, 4), (3, 3, 2, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["m0.1", "mNone"])
@pytest.mark.parametrize("shape", SYNC_SHAPES, ids=["2D", "3D", "4D", "5D"])
def test_syncbatchnorm_single_process_twin(shape, momentum, track, layout, dtype) -> None:
    """Without a process group, SyncBatchNorm is torch.nn.SyncBatchNorm bit for bit."""
    kw = {"momentum": momentum, "track_running_stats": track}
    check_twin(L.SyncBatchNorm(3, **kw), nn.SyncBatchNorm(3, **kw), shape, dtype, layout)


HALF = [torch.float16, torch.bfloat16]
# (ours, theirs, input shape): the twins torch.nn runs in float16/bfloat16 on CPU
HALF_CASES = [
    (lambda: L.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
    (lambda: L.BatchNorm1d(3, momentum=None), lambda: nn.BatchNorm1d(3, momentum=None), (5, 3)),
    (
        lambda: L.InstanceNorm2d(3, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (2, 3, 4, 5),
    ),
    (lambda: L.InstanceNorm2d(3), lambda: nn.InstanceNorm2d(3), (2, 3, 4, 5)),
    (
        lambda: L.InstanceNorm1d(3, affine=True),
        lambda: nn.InstanceNorm1d(3, affine=True),
        (2, 3, 6),
    ),
    (lambda: L.RMSNorm(6), lambda: nn.RMSNorm(6), (4, 6)),
    (lambda: L.RMSNorm((2, 3), eps=1e-3), lambda: nn.RMSNorm((2, 3), eps=1e-3), (4, 2, 3)),
    (lambda: L.GroupNorm(3, 6), lambda: nn.GroupNorm(3, 6), (2, 6, 3, 3)),
    (lambda: L.LayerNorm(6), lambda: nn.LayerNorm(6), (3, 6)),
]
HALF_IDS = ["bn2d", "bn1d-mNone", "in2d-track", "in2d", "in1d", "rms", "rms-2dims", "gn", "ln"]


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
@pytest.mark.parametrize("dtype", HALF, ids=["f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("ours", "theirs", "shape"), HALF_CASES, ids=HALF_IDS)
def test_half_precision_twin(ours, theirs, shape, layout, dtype) -> None:
    """Where torch.nn runs a norm in float16/bfloat16 on CPU, the twin is bit-identical too.

    (LocalResponseNorm is not here on purpose: normcore's computes half input in float32,
    where torch's overflows to zeros, and runs 4-D/5-D half input torch's CPU pooling refuses.)
    """
    check_twin(ours(), theirs(), shape, dtype, layout, steps=2)


IN_CASES = [
    (L.InstanceNorm1d, nn.InstanceNorm1d, (4, 3, 6)),
    (L.InstanceNorm2d, nn.InstanceNorm2d, (3, 3, 4, 5)),
    (L.InstanceNorm3d, nn.InstanceNorm3d, (2, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("momentum", MOMENTA, ids=["m0.1", "m0.01", "mNone"])
@pytest.mark.parametrize(("ours", "theirs", "shape"), IN_CASES, ids=["in1d", "in2d", "in3d"])
def test_instancenorm_twin(ours, theirs, shape, momentum, affine, track, layout, dtype) -> None:
    kw = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    check_twin(ours(3, **kw), theirs(3, **kw), shape, dtype, layout)


@pytest.mark.parametrize("track", [True, False], ids=["track", "notrack"])
@pytest.mark.parametrize(
    ("ours", "theirs", "shape"),
    [
        (L.InstanceNorm1d, nn.InstanceNorm1d, (3, 6)),
        (L.InstanceNorm2d, nn.InstanceNorm2d, (3, 4, 5)),
        (L.InstanceNorm3d, nn.InstanceNorm3d, (3, 2, 3, 4)),
    ],
    ids=["in1d", "in2d", "in3d"],
)
def test_instancenorm_unbatched_twin(ours, theirs, shape, track) -> None:
    kw = {"affine": True, "track_running_stats": track}
    check_twin(ours(3, **kw), theirs(3, **kw), shape, torch.float64, "contiguous")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(
    ("groups", "shape"), [(1, (3, 6, 4, 4)), (3, (3, 6, 4, 4)), (6, (3, 6, 5)), (2, (4, 6))]
)
def test_groupnorm_twin(groups, shape, affine, layout, dtype) -> None:
    check_twin(
        L.GroupNorm(groups, 6, affine=affine),
        nn.GroupNorm(groups, 6, affine=affine),
        shape,
        dtype,
        layout,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize(
    ("normalized", "shape"),
    [(5, (4, 5)), (5, (2, 3, 5)), ((4, 5), (3, 2, 4, 5)), (5, (5,)), ((3, 4), (3, 4))],
    ids=["2D", "3D", "4D-two-dims", "unbatched", "exact"],
)
def test_layernorm_twin(normalized, shape, affine, bias, layout, dtype) -> None:
    kw = {"elementwise_affine": affine, "bias": bias}
    check_twin(L.LayerNorm(normalized, **kw), nn.LayerNorm(normalized, **kw), shape, dtype, layout)


def _to_nhwc(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1) if t.shape[1] == 5 else t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
def test_layernorm2d_matches_layernorm_on_permuted_input(affine, layout, dtype) -> None:
    # shape (N=2, C=5, H=3, W=4): permuted to (2, 3, 4, 5) for torch's LayerNorm(5), and back
    check_twin(
        L.LayerNorm2d(5, elementwise_affine=affine),
        nn.LayerNorm(5, elementwise_affine=affine),
        (2, 5, 3, 4),
        dtype,
        layout,
        transform=_to_nhwc,
        exact=False,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layernorm2d_keeps_layout(layout) -> None:
    x = _layout(torch.randn(2, 5, 3, 4), layout)
    y = L.LayerNorm2d(5)(x)
    assert y.shape == x.shape
    fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_matches_eval_batchnorm(layout, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    bn = nn.BatchNorm2d(4).to(dtype)
    _randomize(bn, gen)
    bn.eval()
    frozen = L.FrozenBatchNorm2d(4).to(dtype)
    frozen.load_state_dict(bn.state_dict())
    frozen.train()  # frozen in train mode still uses the stored statistics
    base = torch.randn(3, 4, 5, 5, generator=gen, dtype=dtype)
    x1 = _layout(base, layout).requires_grad_()
    x2 = _layout(base, layout).requires_grad_()
    y1, y2 = frozen(x1), bn(x2)
    _close(y1, y2, None, "output")
    g = torch.randn(y1.shape, generator=gen, dtype=dtype)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    _close(x1.grad, x2.grad, None, "input grad")
    assert list(frozen.parameters()) == []
    assert all(not b.requires_grad for b in frozen.buffers())
    # the statistics did not move
    assert torch.equal(frozen.running_mean, bn.running_mean)


# ------------------------------------------------------------------ state dicts


STATE_CASES = [
    (lambda: L.BatchNorm1d(4), lambda: nn.BatchNorm1d(4)),
    (lambda: L.BatchNorm2d(4, affine=False), lambda: nn.BatchNorm2d(4, affine=False)),
    (lambda: L.BatchNorm2d(4, bias=False), lambda: nn.BatchNorm2d(4, bias=False)),
    (
        lambda: L.BatchNorm2d(4, track_running_stats=False),
        lambda: nn.BatchNorm2d(4, track_running_stats=False),
    ),
    (lambda: L.BatchNorm3d(4), lambda: nn.BatchNorm3d(4)),
    (lambda: L.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4)),
    (lambda: L.LayerNorm((4, 3)), lambda: nn.LayerNorm((4, 3))),
    (lambda: L.LayerNorm2d(4), lambda: nn.LayerNorm(4)),
    (lambda: L.InstanceNorm2d(4), lambda: nn.InstanceNorm2d(4)),
    (
        lambda: L.InstanceNorm2d(4, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    ),
    (lambda: L.FrozenBatchNorm2d(4), lambda: nn.BatchNorm2d(4)),
    (lambda: L.BatchRenorm2d(4), lambda: nn.BatchNorm2d(4)),
    (lambda: L.GhostBatchNorm2d(4, 2), lambda: nn.BatchNorm2d(4)),
    (lambda: L.SyncBatchNorm(4), lambda: nn.BatchNorm2d(4)),
]


@pytest.mark.parametrize(("make_ours", "make_theirs"), STATE_CASES)
def test_state_dict_round_trip(make_ours, make_theirs) -> None:
    gen = torch.Generator().manual_seed(2)
    ours, theirs = make_ours(), make_theirs()
    _randomize(theirs, gen)
    for b in theirs.buffers():
        if b.dtype == torch.long:
            b.fill_(7)
    sd = theirs.state_dict()
    ours.load_state_dict(sd, strict=True)
    mine = ours.state_dict()
    assert list(mine) == list(sd)
    for key, value in sd.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key

    _randomize(ours, gen)
    fresh = make_theirs()
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_old_state_dict_without_num_batches_tracked_loads() -> None:
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1  # as saved by torch < 0.4.1
    for layer in (L.BatchNorm2d(3), L.FrozenBatchNorm2d(3)):
        layer.load_state_dict(sd, strict=True)
        assert int(layer.num_batches_tracked) == 0


def test_frozen_loads_affine_false_batchnorm() -> None:
    bn = nn.BatchNorm2d(3, affine=False)
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
    frozen = L.FrozenBatchNorm2d(3)
    frozen.load_state_dict(bn.state_dict(), strict=True)
    assert torch.equal(frozen.weight, torch.ones(3))
    assert torch.equal(frozen.running_mean, torch.full((3,), 2.0))
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(frozen(x), bn.eval()(x))


# ------------------------------------------------------------------ empty batches


@pytest.mark.parametrize(
    ("ours", "theirs", "shape"),
    [
        (lambda: L.BatchNorm1d(3), lambda: nn.BatchNorm1d(3), (0, 3)),
        (lambda: L.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (0, 3, 4, 4)),
        (lambda: L.BatchNorm3d(3), lambda: nn.BatchNorm3d(3), (0, 3, 2, 2, 2)),
        (lambda: L.GroupNorm(1, 3), lambda: nn.GroupNorm(1, 3), (0, 3, 2, 2)),
        (lambda: L.LayerNorm(3), lambda: nn.LayerNorm(3), (0, 3)),
        (lambda: L.InstanceNorm2d(3), lambda: nn.InstanceNorm2d(3), (0, 3, 2, 2)),
        (lambda: L.LayerNorm2d(3), None, (0, 3, 2, 2)),
        (lambda: L.FrozenBatchNorm2d(3), lambda: nn.BatchNorm2d(3).eval(), (0, 3, 2, 2)),
        (lambda: L.BatchRenorm2d(3), lambda: nn.BatchNorm2d(3), (0, 3, 2, 2)),
        (lambda: L.GhostBatchNorm2d(3, 2), lambda: nn.BatchNorm2d(3), (0, 3, 2, 2)),
        (lambda: L.L2Norm(3), None, (0, 3, 2, 2)),
    ],
)
def test_empty_batch(ours, theirs, shape) -> None:
    mine = ours()
    x = torch.randn(shape, requires_grad=True)
    y = mine(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    if theirs is not None:
        other = theirs()
        other(torch.randn(shape))
        buffers = dict(other.named_buffers())
        for name, b1 in mine.named_buffers():
            if name in buffers:
                assert torch.equal(b1, buffers[name]), name
