"""Precise BN across ranks and buffer checks, over 2 gloo processes on CPU.

Each rank recalibrates on its own batches (different counts and sizes) with a process group;
both must end with the buffers one process gets over the union of the batches.
check_norm_buffers must find a difference planted on one rank.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normcore
import normcore.layers as L
from normcore.stats import check_norm_buffers, recalibrate_bn

# rank -> (batch sizes) for the main run; rank 1 has nothing in the second run
BATCHES = {0: (4, 6, 5), 1: (3, 7)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        L.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.BatchNorm2d(5, momentum=0.3),
        L.GroupNorm(1, 5),  # a norm without buffers: not reported
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
        L.BatchNorm1d(3),
    ).double()


def _batches(rank: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [
        torch.randn(n, 3, 4, 4, generator=gen, dtype=torch.float64) * (rank + 1) + rank
        for n in sizes
    ]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        out: dict[str, Any] = {}
        group = dist.new_group(ranks=[0, 1])
        model = _model()
        recalibrate_bn(model, _batches(rank, BATCHES[rank]), process_group=group)
        out["union"] = _buffers(model)
        out["check_equal"] = check_norm_buffers(model, group)
        with torch.no_grad():
            if rank == 1:
                model[4].running_var[2] += 0.5
                model[9].num_batches_tracked += 3
        out["check_planted"] = check_norm_buffers(model)  # default group
        # a rank with no batches contributes nothing but still ends with everyone's result
        empty = _model()
        recalibrate_bn(empty, _batches(rank, BATCHES[0]) if rank == 0 else [], process_group=group)
        out["rank0_only"] = _buffers(empty)
        # without a process group each rank keeps its own statistics (and needs no peer)
        local = _model()
        recalibrate_bn(local, _batches(rank, BATCHES[rank]))
        out["local"] = _buffers(local)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("precise_bn")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_recalibrated_buffers_equal_on_both_ranks_and_to_the_union(gloo_results) -> None:
    r0, r1 = (r["union"] for r in gloo_results)
    assert r0.keys() == r1.keys() and r0
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key  # one all-reduce: the same bits everywhere
    reference = _model()
    union = _batches(0, BATCHES[0]) + _batches(1, BATCHES[1])
    recalibrate_bn(reference, union)
    expected = _buffers(reference)
    for key, value in expected.items():
        torch.testing.assert_close(r0[key], value, atol=1e-12, rtol=1e-12, msg=key)
    assert int(r0["1.num_batches_tracked"]) == 5
    # and not merely each rank's own result, which is what process_group=None keeps
    for rank, result in enumerate(gloo_results):
        own = _model()
        recalibrate_bn(own, _batches(rank, BATCHES[rank]))
        assert not torch.allclose(_buffers(own)["1.running_mean"], r0["1.running_mean"])
        for key, value in _buffers(own).items():
            torch.testing.assert_close(result["local"][key], value, atol=1e-12, rtol=0)


def test_rank_without_batches_ends_with_the_others_statistics(gloo_results) -> None:
    reference = _model()
    recalibrate_bn(reference, _batches(0, BATCHES[0]))
    for result in gloo_results:
        for key, value in _buffers(reference).items():
            torch.testing.assert_close(result["rank0_only"][key], value, atol=1e-12, rtol=0)


def test_check_norm_buffers_finds_a_planted_difference(gloo_results) -> None:
    for result in gloo_results:
        assert result["check_equal"] == {"1": 0.0, "4": 0.0, "9": 0.0}
        planted = result["check_planted"]
        assert planted["1"] == 0.0
        assert planted["4"] == pytest.approx(0.5)
        assert planted["9"] == 3.0  # num_batches_tracked counts too


def test_single_process_check_and_export() -> None:
    assert normcore.check_norm_buffers is check_norm_buffers
    assert check_norm_buffers(_model()) == {"1": 0.0, "4": 0.0, "9": 0.0}
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(_model(), [])
