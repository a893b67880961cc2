"""SyncBatchNorm over gloo on CPU equals BatchNorm over the concatenated batch."""

from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from normcore.layers.syncbn import SyncBatchNorm, _SyncBatchNormFunction

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
C = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spatial(ndim: int) -> tuple[int, ...]:
    return {2: (), 3: (5,), 4: (3, 4), 5: (2, 3, 2)}[ndim]


def _maxdiff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


# (name, per-rank batch sizes, input ndim, momentum, affine, track_running_stats, steps)
CASES: list[tuple[str, tuple[int, int], int, float | None, bool, bool, int]] = [
    ("even_4d", (4, 4), 4, 0.1, True, True, 3),
    ("uneven_4d_cumulative", (3, 5), 4, None, True, True, 3),
    ("empty_rank_3d", (0, 6), 3, 0.3, True, True, 2),
    ("uneven_2d_no_affine", (2, 5), 2, 0.1, False, True, 2),
    ("one_value_per_rank_2d", (1, 1), 2, 0.1, True, True, 2),
    ("5d_no_running_stats", (2, 1), 5, 0.1, True, False, 2),
]


def _run_case(rank: int, case: tuple[Any, ...], group: Any) -> dict[str, float]:
    """Train-mode steps of SyncBatchNorm on this rank's slice vs torch BN on the full batch."""
    name, sizes, ndim, momentum, affine, track, steps = case
    torch.manual_seed(1234)
    ref = TORCH_BN[ndim](C, momentum=momentum, affine=affine, track_running_stats=track)
    ref = ref.double()
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C) + 0.5)
            ref.bias.copy_(torch.randn(C))
    sync = SyncBatchNorm(
        C, momentum=momentum, affine=affine, track_running_stats=track, process_group=group
    ).double()
    sync.load_state_dict(ref.state_dict())
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    err: dict[str, float] = {}
    for step in range(steps):
        x = torch.randn(sum(sizes), C, *_spatial(ndim), dtype=torch.float64) * 3 + step
        g = torch.randn_like(x)
        xr = x.clone().requires_grad_()
        yr = ref(xr)
        (yr * g).sum().backward()
        xs = x[lo:hi].clone().requires_grad_()
        ys = sync(xs)
        # the per-rank loss is this rank's share of the full-batch loss
        (ys * g[lo:hi]).sum().backward()
        err[f"{name}/y{step}"] = _maxdiff(ys, yr[lo:hi])
        err[f"{name}/dx{step}"] = _maxdiff(xs.grad, xr.grad[lo:hi])
        if affine:
            gw, gb = sync.weight.grad.clone(), sync.bias.grad.clone()
            dist.all_reduce(gw)
            dist.all_reduce(gb)
            err[f"{name}/dw{step}"] = _maxdiff(gw, ref.weight.grad)
            err[f"{name}/db{step}"] = _maxdiff(gb, ref.bias.grad)
            sync.zero_grad()
            ref.zero_grad()
        err[f"{name}/running_mean{step}"] = _maxdiff(sync.running_mean, ref.running_mean)
        err[f"{name}/running_var{step}"] = _maxdiff(sync.running_var, ref.running_var)
        if track:
            err[f"{name}/nbt{step}"] = float(sync.num_batches_tracked != ref.num_batches_tracked)
    return err


def _eval_case(rank: int) -> dict[str, float]:
    """Eval mode normalizes with running statistics and never communicates."""
    calls = {"n": 0}
    real_all_gather, real_all_reduce = dist.all_gather, dist.all_reduce

    def counting(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    torch.manual_seed(7)
    sync = SyncBatchNorm(C).double()
    with torch.no_grad():
        sync.running_mean.copy_(torch.randn(C))
        sync.running_var.copy_(torch.rand(C) + 0.5)
        sync.weight.copy_(torch.randn(C))
    ref = nn.BatchNorm2d(C).double()
    ref.load_state_dict(sync.state_dict())
    sync.eval()
    ref.eval()
    # ranks run different numbers of eval steps: any collective would deadlock or mismatch
    x = torch.randn(2 + rank, C, 3, 3, dtype=torch.float64, requires_grad=True)
    dist.all_gather, dist.all_reduce = counting(real_all_gather), counting(real_all_reduce)
    try:
        for _ in range(rank + 1):
            y = sync(x)
            y.sum().backward()
    finally:
        dist.all_gather, dist.all_reduce = real_all_gather, real_all_reduce
    return {"eval/y": _maxdiff(y, ref(x)), "eval/collectives": float(calls["n"])}


def _degenerate_case(rank: int) -> dict[str, float]:
    """One value per channel over the whole group (ranks 1 + 0): no variance, buffers kept."""
    sync = SyncBatchNorm(C).double()
    x = torch.randn(1 - rank, C, dtype=torch.float64, requires_grad=True)
    y = sync(x)
    y.sum().backward()
    return {
        "degenerate/finite": float(not torch.isfinite(y).all()),
        "degenerate/running_mean": _maxdiff(sync.running_mean, torch.zeros(C, dtype=torch.float64)),
        "degenerate/running_var": _maxdiff(sync.running_var, torch.ones(C, dtype=torch.float64)),
        "degenerate/nbt": float(int(sync.num_batches_tracked) != 1),
    }


def _ddp_case(rank: int) -> dict[str, float]:
    """Under DDP (gradient averaging) the parameter gradients are the full-batch ones / world."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(99)
    ref = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), nn.BatchNorm2d(C)).double()
    model = nn.Sequential(nn.Conv2d(2, C, 3, padding=1), SyncBatchNorm(C)).double()
    model.load_state_dict(ref.state_dict())
    ddp = DDP(model)
    sizes = (3, 5)
    x = torch.randn(sum(sizes), 2, 4, 4, dtype=torch.float64)
    g = torch.randn(sum(sizes), C, 4, 4, dtype=torch.float64)
    (ref(x) * g).sum().backward()
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    (ddp(x[lo:hi]) * g[lo:hi]).sum().backward()
    world = dist.get_world_size()
    err = {}
    for (name, p), pr in zip(model.named_parameters(), ref.parameters(), strict=True):
        err[f"ddp/{name}"] = _maxdiff(p.grad * world, pr.grad)
    err["ddp/running_var"] = _maxdiff(model[1].running_var, ref[1].running_var)
    return err


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        torch.set_num_threads(1)
        err: dict[str, float] = {}
        subgroup = dist.new_group(ranks=[0, 1])
        for i, case in enumerate(CASES):
            # alternate between the default group and an explicit process group
            err.update(_run_case(rank, case, subgroup if i % 2 else None))
        err.update(_eval_case(rank))
        err.update(_degenerate_case(rank))
        err.update(_ddp_case(rank))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(err))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    out = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_match_full_batch_bn(gloo_results: list[dict[str, float]], case: str) -> None:
    for rank, err in enumerate(gloo_results):
        rows = {k: v for k, v in err.items() if k.startswith(case + "/")}
        assert rows, f"no results for {case}"
        bad = {k: v for k, v in rows.items() if not v < 1e-10}
        assert not bad, f"rank {rank}: {bad}"


def test_eval_uses_running_stats_without_communication(
    gloo_results: list[dict[str, float]],
) -> None:
    for err in gloo_results:
        assert err["eval/y"] < 1e-12
        assert err["eval/collectives"] == 0


def test_group_with_one_value_keeps_running_stats(gloo_results: list[dict[str, float]]) -> None:
    for err in gloo_results:
        rows = {k: v for k, v in err.items() if k.startswith("degenerate/")}
        assert len(rows) == 4 and all(v == 0 for v in rows.values()), rows


def test_ddp_averaged_grads_are_full_batch_grads_over_world(
    gloo_results: list[dict[str, float]],
) -> None:
    for err in gloo_results:
        rows = {k: v for k, v in err.items() if k.startswith("ddp/")}
        assert len(rows) == 5  # conv weight/bias, bn weight/bias, running_var
        assert all(v < 1e-10 for v in rows.values()), rows


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_is_batchnorm(ndim: int, momentum: float | None) -> None:
    torch.manual_seed(0)
    ref = TORCH_BN[ndim](C, momentum=momentum).double()
    sync = SyncBatchNorm(C, momentum=momentum).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    sync.load_state_dict(ref.state_dict())
    for _ in range(2):
        x = torch.randn(4, C, *_spatial(ndim), dtype=torch.float64)
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ys = ref(xr), sync(xs)
        torch.testing.assert_close(ys, yr)
        g = torch.randn_like(yr)
        (yr * g).sum().backward()
        (ys * g).sum().backward()
        torch.testing.assert_close(xs.grad, xr.grad)
        torch.testing.assert_close(sync.weight.grad, ref.weight.grad)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(sync.state_dict()[key], value)
    ref.eval()
    sync.eval()
    x = torch.randn(4, C, *_spatial(ndim), dtype=torch.float64)
    torch.testing.assert_close(sync(x), ref(x))


def test_state_dict_and_signature_match_torch() -> None:
    ours = SyncBatchNorm(5, eps=1e-3, momentum=None, affine=True, track_running_stats=True)
    theirs = nn.SyncBatchNorm(5, eps=1e-3, momentum=None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        theirs.running_mean.normal_()
        theirs.weight.normal_()
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert ours.eps == 1e-3 and ours.momentum is None
    with pytest.raises(ValueError):
        SyncBatchNorm(5)(torch.randn(4))  # 1D input is rejected
    converted = SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm3d(5)))
    assert type(converted[0]) is SyncBatchNorm


def test_single_rank_group_function_gradcheck() -> None:
    """With a one-rank gloo group the autograd function itself passes gradcheck."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        group = dist.group.WORLD
        torch.manual_seed(3)
        x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(2, dtype=torch.float64, requires_grad=True)
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)

        def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return _SyncBatchNormFunction.apply(x, w, b, None, None, 1e-5, 0.1, group, 1)

        assert torch.autograd.gradcheck(fn, (x, w, b))
        # a world of one rank falls back to plain BatchNorm in the module
        sync = SyncBatchNorm(2).double()
        ref = nn.BatchNorm1d(2).double()
        torch.testing.assert_close(sync(x), ref(x))
        torch.testing.assert_close(sync.running_var, ref.running_var)
    finally:
        dist.destroy_process_group()
