"""normcore.train with resources.gpus = 2 on CPU: gloo ranks, SyncBatchNorm, relay, resume, failures.

Every run here spawns two real rank processes (a few seconds each on a small box), so the runs
are shared through module fixtures and kept tiny: ConvBlock on 8x8 synthetic images.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import normcore
from normcore.checkpoint import CheckpointInfo, load_model
from normcore.data import build_data
from normcore.engine import Callback, MetricRow, TrainingDiverged, TrainResult
from normcore.engine.distributed import (
    DistributedTrainingError,
    _error_payload,
    _rebuild_error,
    wants_sync_bn,
)
from normcore.spec import JobSpec

pytestmark = pytest.mark.xdist_group("distributed-engine")  # the module fixtures run once

B = 8  # per-rank batch; the single-process twin uses 2 * B

# SGD with momentum and weight decay, constant lr so that epoch 1 of a 2-epoch run is the
# same as a 1-epoch run; no augmentation or dropout (their RNG would differ between layouts).
DDP_SPEC: dict[str, Any] = {
    "name": "ddp-sync-bn",
    "model": {"arch": "convblock", "norm": "bn", "dropout": 0.0, "width": 8, "depth": 2},
    "data": {"dataset": "synthetic", "batch_size": B, "num_samples": 200, "image_size": 8},
    "optim": {
        "name": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "constant",
    },
    "epochs": 2,
    "seed": 11,
    "resources": {"device": "cpu", "gpus": 2, "sync_bn": True},
    "checkpoint": {"every_epochs": 1, "keep_last": 5},
}


def single_spec() -> dict[str, Any]:
    """DDP_SPEC as one process with the global batch, for one epoch."""
    spec = copy.deepcopy(DDP_SPEC)
    spec["data"]["batch_size"] = 2 * B
    spec["resources"] = {"device": "cpu", "gpus": 1}
    spec["epochs"] = 1
    return spec


class Recorder(Callback):
    """Keeps what the engine reports in this (the calling) process; may cancel or act per row."""

    def __init__(self, stop_at_poll: int | None = None, on_row: Any = None) -> None:
        self.info: dict[str, Any] | None = None
        self.rows: list[MetricRow] = []
        self.logs: list[str] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.result: TrainResult | None = None
        self.polls = 0
        self.stop_at_poll = stop_at_poll
        self.on_row = on_row
        self.pid = os.getpid()

    def on_train_start(self, info: dict[str, Any]) -> None:
        assert os.getpid() == self.pid
        self.info = info

    def on_metrics(self, row: MetricRow) -> None:
        assert os.getpid() == self.pid  # callbacks run in the caller, never in a rank
        self.rows.append(row)
        if self.on_row is not None:
            self.on_row(row)

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        self.checkpoints.append(ckpt)

    def on_log(self, message: str) -> None:
        self.logs.append(message)

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_at_poll is not None and self.polls >= self.stop_at_poll

    def on_train_end(self, result: TrainResult) -> None:
        self.result = result


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Ranks get this process's thread count divided by the world size (at least 1).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Recorder, Path]:
    """Two epochs of DDP_SPEC over two gloo ranks."""
    workdir = tmp_path_factory.mktemp("ddp")
    rec = Recorder()
    result = normcore.train(DDP_SPEC, workdir, [rec])
    return result, rec, workdir


@pytest.fixture(scope="module")
def single_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Recorder]:
    """One epoch of the same data in one process with batches of 2 * B."""
    rec = Recorder()
    return normcore.train(single_spec(), tmp_path_factory.mktemp("single"), [rec]), rec


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint folder."""
    return load_file(str(folder / "model.safetensors"))


def no_rank_left() -> bool:
    """True when this process has no live rank children."""
    return not [p for p in multiprocessing.active_children() if p.name.startswith("normcore-rank")]


def test_rank_shards_concatenate_to_the_single_process_batches() -> None:
    data = JobSpec.model_validate(DDP_SPEC).data
    bundle = build_data(data, seed=DDP_SPEC["seed"])
    single = list(bundle.train_batches(0, 2 * B))
    ranks = [list(bundle.train_batches(0, B, rank=r, world_size=2)) for r in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == bundle.steps_per_epoch(B, 2)
    for (x, y), (x0, y0), (x1, y1) in zip(single, *ranks, strict=True):
        assert torch.equal(x, torch.cat([x0, x1]))
        assert torch.equal(y, torch.cat([y0, y1]))


def test_two_gloo_ranks_with_sync_bn_match_one_process_with_the_double_batch(
    ddp_run: tuple[TrainResult, Recorder, Path], single_run: tuple[TrainResult, Recorder]
) -> None:
    ddp_result, ddp_rec, workdir = ddp_run
    one_result, one_rec = single_run
    assert ddp_result.status == one_result.status == "succeeded"
    assert ddp_rec.info["world_size"] == 2  # type: ignore[index]
    assert ddp_rec.info["global_batch_size"] == 2 * B  # type: ignore[index]
    assert ddp_rec.info["steps_per_epoch"] == one_rec.info["steps_per_epoch"]  # type: ignore[index]

    ddp_w = weights(workdir / "checkpoints" / "epoch-0001")
    one_w = weights(one_result.checkpoints[-1].path)
    assert ddp_w.keys() == one_w.keys()
    assert not any(k.startswith("module.") for k in ddp_w)
    stats = [k for k in ddp_w if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4  # two BatchNorms, both synchronized
    for key in ddp_w:
        diff = (ddp_w[key].double() - one_w[key].double()).abs().max().item()
        tol = 1e-6 if key in stats else 0.0 if key.endswith("num_batches_tracked") else 1e-5
        assert diff <= tol, f"{key}: {diff}"

    # Metrics are the global batch's: the rank-averaged loss equals the 2B-batch loss.
    steps = one_rec.info["steps_per_epoch"]  # type: ignore[index]
    ddp_train = [r for r in ddp_rec.rows if r.split == "train" and r.epoch == 1]
    one_train = [r for r in one_rec.rows if r.split == "train"]
    assert [r.step for r in ddp_train] == [r.step for r in one_train] == list(range(1, steps + 1))
    for a, b in zip(ddp_train, one_train, strict=True):
        assert a.values["loss"] == pytest.approx(b.values["loss"], abs=1e-5)
    ddp_val = next(r for r in ddp_rec.rows if r.split == "val" and r.epoch == 1)
    one_val = next(r for r in one_rec.rows if r.split == "val")
    assert ddp_val.values == pytest.approx(one_val.values, abs=1e-5)


def test_precise_bn_over_ranks_matches_one_process(tmp_path: Path) -> None:
    # Precise BN splits each global batch across the ranks as training does, and SyncBatchNorm
    # merges the halves, so the recalibrated statistics are the single process's.
    ddp_spec = copy.deepcopy(DDP_SPEC)
    ddp_spec["epochs"] = 1
    ddp_spec["checkpoint"]["precise_bn_batches"] = 3
    one_spec = single_spec()
    one_spec["checkpoint"] = dict(ddp_spec["checkpoint"])
    rec = Recorder()
    ddp = normcore.train(ddp_spec, tmp_path / "ddp", [rec])
    one = normcore.train(one_spec, tmp_path / "one", [])
    assert any("recalibrated over 3 train batches" in line for line in rec.logs)
    ddp_w, one_w = weights(ddp.checkpoints[-1].path), weights(one.checkpoints[-1].path)
    for key in (k for k in one_w if k.endswith(("running_mean", "running_var"))):
        diff = (ddp_w[key].double() - one_w[key].double()).abs().max().item()
        assert diff <= 1e-6, f"{key}: {diff}"
    assert ddp.metrics == pytest.approx(one.metrics, abs=1e-5)


def test_distributed_checkpoint_loads_into_the_plain_model(
    ddp_run: tuple[TrainResult, Recorder, Path],
) -> None:
    result, rec, workdir = ddp_run
    assert [c.name for c in result.checkpoints] == ["epoch-0001", "epoch-0002"]
    assert rec.checkpoints == result.checkpoints  # relayed to the caller's callbacks
    model = load_model(result.checkpoints[-1].path)
    norms = [m for m in model.modules() if isinstance(m, normcore.BatchNorm2d)]
    assert len(norms) == 2
    assert not any(isinstance(m, normcore.SyncBatchNorm) for m in model.modules())
    assert model(torch.randn(3, 3, 8, 8)).shape == (3, 10)
    # the caller's log: relayed lines, and the train.log that only the caller writes
    assert any("data parallel over 2 processes (gloo)" in line for line in rec.logs)
    assert "SyncBatchNorm on" in (workdir / "train.log").read_text()
    assert no_rank_left()


def test_resume_of_a_distributed_run_is_exact(
    ddp_run: tuple[TrainResult, Recorder, Path], tmp_path: Path
) -> None:
    result, rec, workdir = ddp_run
    shutil.copytree(workdir / "checkpoints" / "epoch-0001", tmp_path / "checkpoints" / "epoch-0001")
    again = Recorder()
    resumed = normcore.train(DDP_SPEC, tmp_path, [again], resume="latest")
    assert resumed.resumed_from == tmp_path / "checkpoints" / "epoch-0001"
    steps = rec.info["steps_per_epoch"]  # type: ignore[index]
    assert again.info["start_step"] == steps  # type: ignore[index]
    assert next(r.step for r in again.rows if r.split == "train") == steps + 1
    got, want = weights(resumed.checkpoints[-1].path), weights(result.checkpoints[-1].path)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert resumed.metrics == result.metrics


def test_cancel_stops_every_rank_after_the_same_step(tmp_path: Path) -> None:
    rec = Recorder(stop_at_poll=2)
    result = normcore.train(DDP_SPEC, tmp_path, [rec])
    assert result.status == "cancelled"
    assert rec.result is result
    steps = rec.info["steps_per_epoch"]  # type: ignore[index]
    # rank 0 reads the caller's decision after a step or two and broadcasts it
    assert 2 <= result.global_step < steps
    assert [r.step for r in rec.rows if r.split == "train"][-1] == result.global_step
    assert result.checkpoints == [] and not (tmp_path / "checkpoints" / "epoch-0001").exists()
    assert any(f"cancelled at step {result.global_step}" in line for line in rec.logs)
    assert no_rank_left()


def test_a_killed_rank_fails_the_run_and_stops_the_others(tmp_path: Path) -> None:
    def kill_rank1(row: MetricRow) -> None:
        for proc in multiprocessing.active_children():
            if proc.name == "normcore-rank1" and proc.pid is not None:
                os.kill(proc.pid, signal.SIGKILL)

    with pytest.raises(DistributedTrainingError, match="rank 1 was killed by SIGKILL"):
        normcore.train(DDP_SPEC, tmp_path, [Recorder(on_row=kill_rank1)])
    assert no_rank_left()


def test_an_error_in_the_ranks_keeps_its_type_and_message(tmp_path: Path) -> None:
    spec = copy.deepcopy(DDP_SPEC)
    spec["data"]["num_samples"] = 20  # 16 train samples, fewer than one global batch of 2 x 9
    spec["data"]["batch_size"] = 9
    with pytest.raises(ValueError, match=r"one batch of 18 \(9 x 2 processes\)") as info:
        normcore.train(spec, tmp_path, [])
    assert "rank" in str(info.value.__cause__) and "Traceback" in str(info.value.__cause__)
    assert no_rank_left()


def test_rank_errors_are_rebuilt_as_their_own_type() -> None:
    diverged = _rebuild_error(_error_payload(TrainingDiverged(7, 1, float("nan")), rank=1))
    assert isinstance(diverged, TrainingDiverged)
    assert (diverged.step, diverged.epoch) == (7, 1) and diverged.value != diverged.value
    missing = _rebuild_error(_error_payload(FileNotFoundError(2, "No such file", "/d/x"), 0))
    assert isinstance(missing, FileNotFoundError) and missing.filename == "/d/x"

    class Custom(Exception):
        pass

    other = _rebuild_error(_error_payload(Custom("boom"), rank=1))
    assert isinstance(other, DistributedTrainingError)
    assert str(other) == "rank 1: Custom: boom"
    peer = _error_payload(torch.distributed.DistBackendError("Connection closed by peer"), 0)
    assert peer["secondary"] is True
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    assert _error_payload(gloo, 0)["secondary"] is True
    assert _error_payload(RuntimeError("shape mismatch"), 0)["secondary"] is False


def test_sync_bn_is_wanted_by_norm_name_or_resources() -> None:
    def spec(norm: Any, sync: bool) -> JobSpec:
        doc = copy.deepcopy(DDP_SPEC)
        doc["model"]["norm"] = norm
        doc["resources"]["sync_bn"] = sync
        return JobSpec.model_validate(doc)

    assert wants_sync_bn(spec("sync_bn", False))
    assert wants_sync_bn(spec({"type": "sync_bn", "momentum": 0.01}, False))
    assert wants_sync_bn(spec("bn", True))
    assert not wants_sync_bn(spec("bn", False))
    assert not wants_sync_bn(spec("gn:4", False))
