"""normcore.train: accuracy, determinism, exact resume, divergence, cancel, every model x norm."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import normcore
from normcore.checkpoint import CheckpointInfo, list_checkpoints, read_meta, verify_checkpoint
from normcore.engine import Callback, MetricRow, TrainingDiverged, TrainResult, epoch_metric_names
from normcore.engine.optim import param_groups
from normcore.engine.schedule import lr_at
from normcore.spec import OptimSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Small models gain nothing from more threads, and on a shared 2-core box extra threads
    # spin against other processes; bit-exactness does not depend on the thread count.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Recorder(Callback):
    """Keeps everything the engine reports; ``stop_at_poll`` cancels at that poll."""

    def __init__(self, stop_at_poll: int | None = None) -> None:
        self.info: dict[str, Any] | None = None
        self.rows: list[MetricRow] = []
        self.logs: list[str] = []
        self.checkpoints: list[CheckpointInfo] = []
        self.result: TrainResult | None = None
        self.polls = 0
        self.stop_at_poll = stop_at_poll

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.info = info

    def on_metrics(self, row: MetricRow) -> None:
        self.rows.append(row)

    def on_checkpoint(self, ckpt: CheckpointInfo) -> None:
        self.checkpoints.append(ckpt)

    def on_log(self, message: str) -> None:
        self.logs.append(message)

    def should_stop(self) -> bool:
        self.polls += 1
        return self.stop_at_poll is not None and self.polls >= self.stop_at_poll

    def on_train_end(self, result: TrainResult) -> None:
        self.result = result


def comparable(rows: list[MetricRow]) -> list[tuple[int, int, str, dict[str, float]]]:
    """Rows without what depends on the clock (time, samples_per_s)."""
    return [
        (r.step, r.epoch, r.split, {k: v for k, v in r.values.items() if k != "samples_per_s"})
        for r in rows
    ]


def final_weights(result: TrainResult) -> dict[str, torch.Tensor]:
    return load_file(str(result.checkpoints[-1].path / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# BN + dropout + augmentation + precise BN: every RNG and every piece of state matters.
RESUME_SPEC: dict[str, Any] = {
    "name": "resume",
    "model": {"arch": "lenet", "norm": "bn", "dropout": 0.3},
    "data": {"dataset": "digits", "batch_size": 64, "augment": True},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"},
    "epochs": 3,
    "seed": 7,
    "checkpoint": {"every_epochs": 1, "keep_last": 3, "precise_bn_batches": 3},
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Recorder]:
    """The uninterrupted 3-epoch run of RESUME_SPEC."""
    rec = Recorder()
    result = normcore.train(RESUME_SPEC, tmp_path_factory.mktemp("reference"), [rec])
    return result, rec


def test_lenet_bn_reaches_95_percent_on_digits(tmp_path: Path) -> None:
    spec = {
        "name": "lenet-digits",
        "model": {"arch": "lenet", "norm": "bn"},
        "data": {"dataset": "digits", "batch_size": 32},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"},
        "epochs": 5,
        "seed": 0,
        "checkpoint": {"every_epochs": 2},
    }
    rec = Recorder()
    result = normcore.train(spec, tmp_path, [rec])
    assert result.status == "succeeded"
    assert result.epochs_completed == 5
    assert result.metrics["val_accuracy"] >= 0.95, result.metrics
    assert result.duration_s < 60
    # rows: one train row per step (1-based, consecutive) and one val row per epoch
    steps_per_epoch = rec.info["steps_per_epoch"]  # type: ignore[index]
    train_rows = [r for r in rec.rows if r.split == "train"]
    val_rows = [r for r in rec.rows if r.split == "val"]
    assert [r.step for r in train_rows] == list(range(1, 5 * steps_per_epoch + 1))
    assert [(r.epoch, r.step) for r in val_rows] == [(e, e * steps_per_epoch) for e in range(1, 6)]
    assert set(train_rows[0].values) == {"loss", "lr", "samples_per_s"}
    assert set(val_rows[0].values) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert val_rows[-1].values == result.metrics
    assert result.global_step == 5 * steps_per_epoch
    # every 2 epochs, and the last
    assert [c.epoch for c in rec.checkpoints] == [2, 4, 5]
    assert any("epoch 5/5" in line for line in rec.logs)
    assert (tmp_path / "train.log").read_text().count("epoch ") >= 5
    assert rec.result is result


@pytest.mark.xdist_group("engine-reference")  # one reference run per worker
def test_same_spec_twice_is_bit_identical(
    reference: tuple[TrainResult, Recorder], tmp_path: Path
) -> None:
    ref_result, ref_rec = reference
    rec = Recorder()
    result = normcore.train(RESUME_SPEC, tmp_path, [rec])
    assert comparable(rec.rows) == comparable(ref_rec.rows)
    assert_same_weights(final_weights(result), final_weights(ref_result))
    assert [c.sha256 for c in rec.checkpoints] == [c.sha256 for c in ref_rec.checkpoints]


@pytest.mark.xdist_group("engine-reference")  # one reference run per worker
def test_cancel_then_resume_is_bit_identical(
    reference: tuple[TrainResult, Recorder], tmp_path: Path
) -> None:
    ref_result, ref_rec = reference
    steps_per_epoch = ref_rec.info["steps_per_epoch"]  # type: ignore[index]
    stop = 2 * steps_per_epoch + 1  # the first step of epoch 3: checkpoint epoch-0002 exists

    first = Recorder(stop_at_poll=stop)
    cancelled = normcore.train(RESUME_SPEC, tmp_path, [first])
    assert cancelled.status == "cancelled"
    assert cancelled.global_step == stop
    assert cancelled.epochs_completed == 2
    assert [r.step for r in first.rows if r.split == "train"][-1] == stop
    assert [c.name for c in cancelled.checkpoints] == ["epoch-0001", "epoch-0002"]

    second = Recorder()
    resumed = normcore.train(
        RESUME_SPEC, tmp_path, [second], resume=tmp_path / "checkpoints" / "epoch-0002"
    )
    assert resumed.status == "succeeded"
    assert resumed.resumed_from == tmp_path / "checkpoints" / "epoch-0002"
    assert second.info["start_step"] == 2 * steps_per_epoch  # type: ignore[index]
    assert min(r.step for r in second.rows) == 2 * steps_per_epoch + 1
    after = [r for r in ref_rec.rows if r.step > 2 * steps_per_epoch]
    assert comparable(second.rows) == comparable(after)
    assert_same_weights(final_weights(resumed), final_weights(ref_result))
    assert any("resumed from" in line for line in second.logs)


@pytest.mark.xdist_group("engine-reference")  # one reference run per worker
def test_resume_latest_falls_back_past_a_corrupt_checkpoint(
    reference: tuple[TrainResult, Recorder], tmp_path: Path
) -> None:
    ref_result, ref_rec = reference
    steps_per_epoch = ref_rec.info["steps_per_epoch"]  # type: ignore[index]
    normcore.train(RESUME_SPEC, tmp_path, [Recorder(stop_at_poll=2 * steps_per_epoch + 1)])
    corrupt = tmp_path / "checkpoints" / "epoch-0002" / "model.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))

    rec = Recorder()
    resumed = normcore.train(RESUME_SPEC, tmp_path, [rec], resume="latest")
    assert resumed.resumed_from == tmp_path / "checkpoints" / "epoch-0001"
    assert any("skipping corrupt checkpoint epoch-0002" in line for line in rec.logs)
    after = [r for r in ref_rec.rows if r.step > steps_per_epoch]
    assert comparable(rec.rows) == comparable(after)
    assert_same_weights(final_weights(resumed), final_weights(ref_result))
    verify_checkpoint(tmp_path / "checkpoints" / "epoch-0002")  # rewritten by the resumed run


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path: Path) -> None:
    spec = copy.deepcopy(SMALL_SPEC)
    rec = Recorder()
    result = normcore.train(spec, tmp_path, [rec], resume="latest")
    assert result.status == "succeeded"
    assert result.resumed_from is None
    assert any("starting from scratch" in line for line in rec.logs)


def test_resume_of_a_finished_run_trains_nothing_and_says_so(tmp_path: Path) -> None:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["epochs"] = 2
    first = normcore.train(spec, tmp_path, [Recorder()])
    assert first.epochs_completed == 2
    rec = Recorder()
    again = normcore.train(spec, tmp_path, [rec], resume="latest")
    assert again.status == "succeeded"
    assert (again.epochs_completed, again.global_step) == (2, first.global_step)
    assert again.checkpoints == [] and rec.rows == []  # no step, no eval, no new checkpoint
    assert again.metrics == first.metrics
    assert rec.info is not None and rec.info["already_complete"] is True
    assert rec.info["start_epoch"] == rec.info["epochs"] == 2
    assert any(
        "already complete" in line and "epoch 2 of 2" in line and "nothing to train" in line
        for line in rec.logs
    ), rec.logs
    # a run resumed before its end is not "complete"
    spec["epochs"] = 3
    more = Recorder()
    normcore.train(spec, tmp_path, [more], resume="latest")
    assert more.info is not None and more.info["already_complete"] is False
    assert {r.epoch for r in more.rows} == {3}


def test_resume_under_another_thread_count_says_it_is_not_bit_identical(tmp_path: Path) -> None:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["epochs"] = 2
    normcore.train(spec, tmp_path, [Recorder(stop_at_poll=4)])  # 3 steps per epoch
    assert read_meta(tmp_path / "checkpoints" / "epoch-0001")["torch_threads"] == 1
    rec = Recorder()
    torch.set_num_threads(2)
    try:
        normcore.train(spec, tmp_path, [rec], resume=tmp_path / "checkpoints" / "epoch-0001")
    finally:
        torch.set_num_threads(1)
    assert any("written with 1 torch threads, resuming with 2" in line for line in rec.logs)


def test_divergence_raises_naming_step_and_value(tmp_path: Path) -> None:
    # No normalization and lr 10: the seeds' point about BN allowing large rates, reversed.
    spec = {
        "name": "diverge",
        "model": {"arch": "resnet20", "norm": "none", "num_classes": 4, "width": 4},
        "data": {
            "dataset": "synthetic",
            "num_samples": 64,
            "image_size": 8,
            "channels": 1,
            "num_classes": 4,
            "batch_size": 16,
        },
        "optim": {"name": "sgd", "lr": 10.0, "momentum": 0.9},
        "epochs": 3,
    }
    rec = Recorder()
    with pytest.raises(TrainingDiverged) as info:
        normcore.train(spec, tmp_path, [rec])
    err = info.value
    assert isinstance(err, ValueError)
    assert f"at step {err.step} (epoch {err.epoch})" in str(err)
    assert str(err.value) in str(err)
    assert not torch.isfinite(torch.tensor(err.value))
    assert "lr" in str(err) and "grad_clip" in str(err)
    # rows up to the step before the divergence were reported, finite
    train_steps = [r.step for r in rec.rows if r.split == "train"]
    assert train_steps == list(range(1, err.step))
    assert any("diverged" in line for line in rec.logs)


def test_cancel_keeps_earlier_checkpoints_intact(tmp_path: Path) -> None:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["epochs"] = 3
    rec = Recorder(stop_at_poll=5)  # mid-epoch 2 (3 steps per epoch)
    result = normcore.train(spec, tmp_path, [rec])
    assert result.status == "cancelled"
    assert result.global_step == 5
    assert result.epochs_completed == 1
    assert rec.result is result
    assert [c.name for c in rec.checkpoints] == ["epoch-0001"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001"]
    verify_checkpoint(tmp_path / "checkpoints" / "epoch-0001")
    assert max(r.step for r in rec.rows) == 5
    assert any("cancelled at step 5" in line for line in rec.logs)


def test_model_num_classes_smaller_than_the_data_is_refused(tmp_path: Path) -> None:
    spec = {"model": {"arch": "lenet", "num_classes": 5}, "data": {"dataset": "digits"}}
    with pytest.raises(ValueError, match="num_classes to at least 10"):
        normcore.train(spec, tmp_path)


def test_logs_reach_python_logging(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="normcore.train"):
        normcore.train(SMALL_SPEC, tmp_path)
    messages = [r.getMessage() for r in caplog.records if r.name == "normcore.train"]
    assert any(m.startswith("device cpu") for m in messages)
    assert any(m.startswith("epoch 1/1") for m in messages)


def test_amp_is_ignored_on_cpu_with_a_log_line(tmp_path: Path) -> None:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["resources"] = {"device": "cpu", "amp": "fp16"}
    rec = Recorder()
    normcore.train(spec, tmp_path, [rec])
    assert any("amp 'fp16' ignored on cpu" in line for line in rec.logs)


# ------------------------------------------------------------------------ every model x norm

SMALL_SPEC: dict[str, Any] = {
    "name": "small",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 4},
    "data": {
        "dataset": "synthetic",
        "num_samples": 40,
        "image_size": 16,
        "channels": 3,
        "num_classes": 4,
        "batch_size": 8,
        "val_fraction": 0.25,
    },
    "optim": {"name": "sgd", "lr": 0.01},
    "epochs": 1,
}

NORMS = ["bn", "gn:4", "ln", "in", "none", "frozen_bn", "brn", "ghost_bn:4"]
ARCHS = ["convblock", "lenet", "vgg11", "resnet20", "resnet18", "edsr"]


def _matrix_spec(arch: str, norm: str) -> dict[str, Any]:
    spec = copy.deepcopy(SMALL_SPEC)
    spec["model"] = {"arch": arch, "norm": norm, "num_classes": 4, "width": 8}
    if arch == "edsr":
        spec["model"] = {"arch": "edsr", "norm": norm, "scale": 2, "width": 8, "depth": 2}
        spec["data"] = {
            "dataset": "sr-synthetic",
            "num_samples": 20,
            "image_size": 16,
            "channels": 3,
            "batch_size": 8,
            "val_fraction": 0.2,
        }
    elif arch in ("vgg11", "resnet18"):
        # instance norm needs more than one position per channel at the deepest stage:
        # vgg11 downsamples by 16 before its last convs, resnet18 by 32
        spec["data"]["image_size"] = 32 if arch == "vgg11" else 64
    return spec


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_model_and_norm_trains_a_step(arch: str, norm: str, tmp_path: Path) -> None:
    rec = Recorder()
    result = normcore.train(_matrix_spec(arch, norm), tmp_path, [rec])
    assert result.status == "succeeded"
    assert result.global_step >= 1
    val = [r for r in rec.rows if r.split == "val"]
    assert len(val) == 1
    assert all(torch.isfinite(torch.tensor(v)) for v in val[0].values.values())
    score = "val_psnr" if arch == "edsr" else "val_accuracy"
    assert score in val[0].values
    # what a sweep's metric may name (service.sweeps.grid.recorded_metrics)
    task = "super_resolution" if arch == "edsr" else "classification"
    assert set(epoch_metric_names(task)) <= set(val[0].values), val[0].values
    verify_checkpoint(result.checkpoints[-1].path)


def test_ghost_bn_with_the_briefs_virtual_batch_of_8(tmp_path: Path) -> None:
    spec = _matrix_spec("resnet20", "ghost_bn:8")
    spec["data"]["batch_size"] = 16
    spec["data"]["num_samples"] = 64
    assert normcore.train(spec, tmp_path).global_step >= 1


# ------------------------------------------------------------------------ optimizer, schedule


def test_weight_decay_skips_norm_parameters_and_biases() -> None:
    from normcore.models import lenet

    model = lenet(norm="bn")
    groups = param_groups(model, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 5e-4 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        is_norm_or_bias = name.endswith("bias") or ".norm" in name or p.ndim == 1
        assert (id(p) not in decayed) == is_norm_or_bias, name
    everything = param_groups(model, 5e-4, decay_norm_and_bias=True)
    assert len(everything) == 1
    assert len(everything[0]["params"]) == len(list(model.parameters()))


def test_adamw_and_nesterov_specs_train(tmp_path: Path) -> None:
    for optim in (
        {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        {"name": "sgd", "lr": 0.01, "nesterov": True, "grad_clip": 1.0},
    ):
        spec = copy.deepcopy(SMALL_SPEC)
        spec["optim"] = {**optim, "schedule": "step", "step_epochs": 1, "warmup_epochs": 0.5}
        result = normcore.train(spec, tmp_path / optim["name"])
        assert result.status == "succeeded"


def test_schedules_are_pure_functions_of_the_step() -> None:
    spe, total = 10, 105
    warm = OptimSpec(lr=1.0, warmup_epochs=0.5, schedule="cosine")
    assert [lr_at(s, warm, spe, total) for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_at(5, warm, spe, total) == 1.0  # cosine starts at the peak after warm-up
    assert lr_at(55, warm, spe, total) == pytest.approx(0.5)  # halfway through the decay
    assert 0 < lr_at(104, warm, spe, total) < 0.001  # the last update still moves a little
    step = OptimSpec(lr=1.0, schedule="step", step_epochs=3, step_gamma=0.1)
    assert lr_at(29, step, spe, total) == 1.0
    assert lr_at(30, step, spe, total) == pytest.approx(0.1)
    assert lr_at(60, step, spe, total) == pytest.approx(0.01)
    const = OptimSpec(lr=0.3, schedule="constant")
    assert {lr_at(s, const, spe, total) for s in range(total)} == {0.3}


def test_auto_device_needs_a_cuda_device_per_process(monkeypatch) -> None:
    """``auto`` picks CUDA only when there is one device for each data-parallel process; else
    the ranks run on CPU (gloo) instead of failing on a missing cuda:1."""
    from normcore.engine.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("auto", processes=2).type == "cuda"
    assert resolve_device("auto", processes=4).type == "cpu"
    assert resolve_device("cpu", processes=4).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no usable CUDA device"):
        resolve_device("cuda")
