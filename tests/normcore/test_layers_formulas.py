"""The seed documents' formulas, written out in float64, and the BN variants' defining identities."""

from __future__ import annotations

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


EPS = 1e-5


def seed_batchnorm(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, ...]:
    """mu_B = 1/m sum x_i; sigma2_B = 1/m sum (x_i - mu_B)^2; x_hat; y = gamma x_hat + beta."""
    c = x.shape[1]
    values = x.transpose(0, 1).reshape(c, -1)  # (C, m): every value of each channel
    m = values.shape[1]
    mu = values.sum(1) / m
    sigma2 = ((values - mu[:, None]) ** 2).sum(1) / m
    shape = [1, c] + [1] * (x.dim() - 2)
    x_hat = (x - mu.view(shape)) / torch.sqrt(sigma2.view(shape) + eps)
    y = gamma.view(shape) * x_hat + beta.view(shape)
    return y, mu, sigma2, torch.tensor(float(m), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 5)])
def test_batchnorm_train_step_follows_seed_formulas(shape) -> None:
    torch.manual_seed(0)
    dims = len(shape)
    layer = (L.BatchNorm1d if dims == 2 else L.BatchNorm2d)(3, momentum=0.1).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
        layer.bias.copy_(torch.tensor([0.1, -0.3, 4.0]))
    running_mean = torch.zeros(3, dtype=torch.float64)
    running_var = torch.ones(3, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 3 + 2
        y_ref, mu, sigma2, m = seed_batchnorm(x, layer.weight.detach(), layer.bias.detach(), EPS)
        y = layer(x)
        torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-10)
        # running estimates: unbiased variance m/(m-1) * sigma2_B, exponential average 0.1
        running_mean = 0.9 * running_mean + 0.1 * mu
        running_var = 0.9 * running_var + 0.1 * sigma2 * m / (m - 1)
        torch.testing.assert_close(layer.running_mean, running_mean, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(layer.running_var, running_var, atol=1e-12, rtol=1e-12)
    # normalized output: per channel mean beta, std |gamma| (biased, up to eps)
    y = layer(x)
    per_channel = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), layer.bias.detach(), atol=1e-9, rtol=0)
    # eval uses the running statistics, not the batch
    layer.eval()
    x = torch.randn(shape, dtype=torch.float64)
    stat_shape = [1, 3] + [1] * (dims - 2)
    expected = (x - layer.running_mean.view(stat_shape)) / torch.sqrt(
        layer.running_var.view(stat_shape) + EPS
    ) * layer.weight.detach().view(stat_shape) + layer.bias.detach().view(stat_shape)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=1e-12)


def test_momentum_none_is_the_cumulative_average() -> None:
    torch.manual_seed(1)
    layer = L.BatchNorm2d(2, momentum=None).double()
    batches = [torch.randn(3, 2, 4, 4, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    for x in batches:
        layer(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    unbiased = torch.stack([x.var(dim=(0, 2, 3), correction=1) for x in batches])
    # cumulative moving average of the k batches (the initial 0 / 1 are weighted out)
    torch.testing.assert_close(layer.running_mean, means.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(layer.running_var, unbiased.mean(0), atol=1e-12, rtol=1e-12)
    assert int(layer.num_batches_tracked) == 4


def test_affine_false_is_pure_standardization() -> None:
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 5 + 3
    y = L.BatchNorm2d(4, affine=False).double()(x)
    ones = torch.ones(4, dtype=torch.float64)
    y_ref, *_ = seed_batchnorm(x, ones, torch.zeros(4, dtype=torch.float64), EPS)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)


def test_track_running_stats_false_uses_batch_stats_in_eval() -> None:
    layer = L.BatchNorm2d(2, track_running_stats=False).double().eval()
    assert layer.running_mean is None and layer.running_var is None
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64) + 10
    y_ref, *_ = seed_batchnorm(x, layer.weight.detach(), layer.bias.detach(), EPS)
    torch.testing.assert_close(layer(x), y_ref, atol=1e-12, rtol=1e-12)


def test_gamma_beta_restore_the_original_distribution() -> None:
    # the seed's brightness example: gamma = sigma_B, beta = mu_B undo the normalization
    x = torch.randn(64, 1, 4, 4, dtype=torch.float64) * 30 + 200
    layer = L.BatchNorm2d(1).double()
    values = x.flatten()
    with torch.no_grad():
        layer.weight.fill_((values.var(correction=0) + EPS).sqrt().item())
        layer.bias.fill_(values.mean().item())
    torch.testing.assert_close(layer(x), x, atol=1e-9, rtol=1e-9)


def test_groupnorm_layernorm_instancenorm_statistics() -> None:
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64) * 4 + 1

    def standardize(v: Tensor, dims: tuple[int, ...]) -> Tensor:
        mu = v.mean(dim=dims, keepdim=True)
        var = ((v - mu) ** 2).mean(dim=dims, keepdim=True)
        return (v - mu) / torch.sqrt(var + EPS)

    grouped = x.view(2, 3, 2, 3, 3)
    gn_ref = standardize(grouped, (2, 3, 4)).view_as(x)
    torch.testing.assert_close(L.GroupNorm(3, 6).double()(x), gn_ref)
    torch.testing.assert_close(L.LayerNorm2d(6).double()(x), standardize(x, (1,)))
    torch.testing.assert_close(L.InstanceNorm2d(6).double()(x), standardize(x, (2, 3)))
    # LayerNorm over (C, H, W): one statistic per sample
    torch.testing.assert_close(L.LayerNorm((6, 3, 3)).double()(x), standardize(x, (1, 2, 3)))


def test_l2norm_formula() -> None:
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    layer = L.L2Norm(5, scale=20.0).double()
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 6.0))
    norm = torch.sqrt((x**2).sum(dim=1, keepdim=True))
    expected = x / norm * torch.arange(1.0, 6.0, dtype=torch.float64).view(1, 5, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(L.L2Norm(5).weight, torch.full((5,), 20.0))
    # a zero vector gives zeros with finite gradients, not NaN
    z = torch.zeros(1, 5, 1, 1, requires_grad=True)
    out = L.L2Norm(5)(z)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------ ghost batch norm


def _copy_affine(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        dst.bias.copy_(src.bias)


def _train_pair(a: nn.Module, b: nn.Module, shape: tuple[int, ...], steps: int = 4) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
        a.bias.uniform_(-1, 1)
    _copy_affine(b, a)
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = a(x1), b(x2)
        g = torch.randn_like(y1)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.bias.grad, b.bias.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a.running_mean, b.running_mean, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a.running_var, b.running_var, atol=1e-9, rtol=1e-9)
    assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)
    a.eval()
    b.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(a(x), b(x), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("vbs", [8, 32])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_with_one_virtual_batch_is_batchnorm(vbs, momentum) -> None:
    ghost = L.GhostBatchNorm2d(3, virtual_batch_size=vbs, momentum=momentum).double()
    _train_pair(ghost, nn.BatchNorm2d(3, momentum=momentum).double(), (8, 3, 4, 4))


@pytest.mark.parametrize(("n", "vbs", "spatial"), [(12, 4, 2), (10, 4, 2), (9, 4, 1), (7, 3, 3)])
def test_ghost_normalizes_each_virtual_batch(n, vbs, spatial) -> None:
    torch.manual_seed(4)
    ghost = L.GhostBatchNorm2d(2, virtual_batch_size=vbs, momentum=0.5).double()
    x = torch.randn(n, 2, spatial, spatial, dtype=torch.float64) * 3 + 1
    y = ghost(x)
    sizes = [vbs] * (n // vbs) + ([n % vbs] if n % vbs else [])
    if sizes[-1] * spatial * spatial == 1:  # a lone value per channel joins the chunk before
        sizes = [*sizes[:-2], sizes[-2] + 1]
    chunks = x.split(sizes)
    expected = torch.cat(
        [seed_batchnorm(c, torch.ones(2).double(), torch.zeros(2).double(), EPS)[0] for c in chunks]
    )
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    # running stats: one update with the size-weighted mean of the chunk statistics
    weights = torch.tensor(sizes, dtype=torch.float64) / n
    means = torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks])
    unbiased = torch.stack([c.var(dim=(0, 2, 3), correction=1) for c in chunks])
    torch.testing.assert_close(ghost.running_mean, 0.5 * (weights @ means))
    torch.testing.assert_close(ghost.running_var, 0.5 + 0.5 * (weights @ unbiased))
    assert int(ghost.num_batches_tracked) == 1


def test_ghost_gradients_match_per_chunk_batchnorm() -> None:
    torch.manual_seed(5)
    ghost = L.GhostBatchNorm2d(3, virtual_batch_size=4).double()
    ref = nn.BatchNorm2d(3, track_running_stats=False).double()
    _copy_affine(ref, ghost)
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1 = ghost(x1)
    y2 = torch.cat([ref(c) for c in x2.split(4)])
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(ghost.weight.grad, ref.weight.grad)


# ------------------------------------------------------------------ batch renorm


@pytest.mark.parametrize("momentum", [0.01, 0.1, None])
def test_batch_renorm_with_unit_limits_is_batchnorm(momentum) -> None:
    brn = L.BatchRenorm2d(3, momentum=momentum, r_max=1.0, d_max=0.0, warmup_start=0)
    _train_pair(brn.double(), nn.BatchNorm2d(3, momentum=momentum).double(), (6, 3, 4, 4))


def test_batch_renorm_clips_r_and_d() -> None:
    torch.manual_seed(6)
    r_max, d_max = 1.5, 0.5
    brn = L.BatchRenorm2d(
        2, momentum=0.0, r_max=r_max, d_max=d_max, warmup_steps=0, warmup_start=0
    ).double()
    brn.train()
    # running stats mean 0 / var 1; the batch has std ~10 and mean ~5: r and d both clip
    x = torch.randn(16, 2, 4, 4, dtype=torch.float64) * 10 + 5
    y = brn(x)
    ones = torch.ones(2, dtype=torch.float64)
    x_hat, mu, sigma2, _ = seed_batchnorm(x, ones, torch.zeros(2, dtype=torch.float64), EPS)
    sigma_b = torch.sqrt(sigma2 + EPS)
    sigma = torch.sqrt(torch.ones(2, dtype=torch.float64) + EPS)
    r_raw, d_raw = sigma_b / sigma, mu / sigma
    assert (r_raw > r_max).all() and (d_raw > d_max).all()
    expected = x_hat * r_max + d_max
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    # unclipped values would give a different output
    assert not torch.allclose(y, x_hat * r_raw.view(1, 2, 1, 1) + d_raw.view(1, 2, 1, 1))


def test_batch_renorm_r_and_d_inside_limits_undo_the_batch_statistics() -> None:
    # with wide limits, r and d are not clipped: x_hat = (x - mu) / sigma with running stats
    torch.manual_seed(7)
    brn = L.BatchRenorm2d(2, momentum=0.0, r_max=100, d_max=100, warmup_steps=0, warmup_start=0)
    brn = brn.double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, -2.0]))
        brn.running_var.copy_(torch.tensor([4.0, 0.25]))
    x = torch.randn(8, 2, 3, 3, dtype=torch.float64) * 3
    y = brn(x)
    expected = (x - brn.running_mean.view(1, 2, 1, 1)) / torch.sqrt(
        brn.running_var.view(1, 2, 1, 1) + EPS
    )
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)


def test_batch_renorm_r_d_carry_no_gradient() -> None:
    # the gradient through BRN equals BN's gradient scaled by r (d and r are constants)
    torch.manual_seed(8)
    brn = L.BatchRenorm2d(2, momentum=0.0, r_max=1.5, d_max=0.5, warmup_steps=0, warmup_start=0)
    brn = brn.double()
    x = (torch.randn(8, 2, 3, 3, dtype=torch.float64) * 10 + 5).requires_grad_()
    g = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    (brn(x) * g).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    bn = nn.BatchNorm2d(2, track_running_stats=False).double()
    (bn(x2) * g * 1.5).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_batch_renorm_warmup_schedule() -> None:
    brn = L.BatchRenorm2d(2, r_max=3.0, d_max=5.0, warmup_start=10, warmup_steps=20)
    seen = {}
    for t in (0, 10, 20, 30, 100):
        brn.num_batches_tracked.fill_(t)
        r_max, d_max = brn.limits()
        seen[t] = (float(r_max), float(d_max))
    assert seen == {0: (1.0, 0.0), 10: (1.0, 0.0), 20: (2.0, 2.5), 30: (3.0, 5.0), 100: (3.0, 5.0)}
    # during warm-up (t < warmup_start) it trains exactly like BatchNorm
    brn = L.BatchRenorm2d(2, momentum=0.1, warmup_start=10).double()
    _train_pair(brn, nn.BatchNorm2d(2).double(), (4, 2, 3, 3))


def test_batch_renorm_eval_uses_running_stats() -> None:
    brn = L.BatchRenorm2d(2).double()
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([1.0, 2.0]))
        brn.running_var.copy_(torch.tensor([4.0, 9.0]))
    brn.eval()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    expected = (x - brn.running_mean.view(1, 2, 1, 1)) / torch.sqrt(
        brn.running_var.view(1, 2, 1, 1) + EPS
    )
    torch.testing.assert_close(brn(x), expected)
    assert int(brn.num_batches_tracked) == 0
