"""``normcore.train`` at a time limit: it stops after the step, writes a checkpoint of that step
(inside an epoch) and returns "timed_out"; resuming from that checkpoint ends bit-identical to a
run that was never stopped."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import normcore
from normcore.checkpoint import load_checkpoint, read_meta
from normcore.engine import Callback, MetricRow
from normcore.spec import JobSpec

SPEC = {
    "model": {"arch": "lenet", "norm": "bn", "dropout": 0.1},
    "data": {"dataset": "synthetic", "batch_size": 16, "num_samples": 96, "augment": True},
    "epochs": 2,
    "checkpoint": {"keep_last": 5},
}


def test_time_limit_checkpoints_the_step_and_resume_is_exact(tmp_path: Path) -> None:
    stopped = normcore.train(SPEC, tmp_path / "a", time_limit_s=1e-3)
    assert stopped.status == "timed_out"
    assert stopped.global_step == 1 and stopped.epochs_completed == 0
    [ckpt] = stopped.checkpoints
    meta = read_meta(ckpt.path)
    assert (ckpt.name, meta["step"], meta["partial_epoch"]) == ("epoch-0000", 1, True)
    log = (tmp_path / "a" / "train.log").read_text()
    assert "reached at step 1 (epoch 1): writing a checkpoint of this step" in log

    resumed = normcore.train(SPEC, tmp_path / "a", resume="latest")
    whole = normcore.train(SPEC, tmp_path / "b")
    assert resumed.status == whole.status == "succeeded"
    assert resumed.global_step == whole.global_step == 8
    a = load_checkpoint(resumed.checkpoints[-1].path).model_state
    b = load_checkpoint(whole.checkpoints[-1].path).model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        "written at a time limit, 1 steps into epoch 1"
        in (tmp_path / "a" / "train.log").read_text()
    )


def test_spec_max_runtime_is_the_default_limit(tmp_path: Path) -> None:
    spec = JobSpec.model_validate({**SPEC, "max_runtime": 1e-6})
    assert normcore.train(spec, tmp_path).status == "timed_out"
    assert normcore.train({**SPEC, "epochs": 1}, tmp_path / "c").status == "succeeded"


def test_instance_norm_after_fc_layers_is_logged(tmp_path: Path) -> None:
    spec = {**SPEC, "model": {"arch": "lenet", "norm": "in"}, "epochs": 1}
    normcore.train(spec, tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "note: norm 'in' has one value per channel and sample after a fully connected" in log
    assert "norm1, norm2 are identity (no norm)" in log


class _StallAtStep(Callback):
    """Sleeps at train step ``step`` until ``until`` (a perf_counter time) has passed."""

    def __init__(self, step: int, until: float) -> None:
        self.step, self.until = step, until

    def on_metrics(self, row: MetricRow) -> None:
        if row.split == "train" and row.step == self.step:
            time.sleep(max(0.0, self.until - time.perf_counter()))


def test_time_limit_at_an_epochs_last_step_resumes_into_its_eval(tmp_path: Path) -> None:
    spec = {**SPEC, "data": {**SPEC["data"], "num_samples": 64, "augment": False}}
    limit = 12.0  # setup and two steps take a few seconds even on a loaded machine
    stall = _StallAtStep(3, time.perf_counter() + limit + 0.5)  # step 3 ends epoch 1
    stopped = normcore.train(spec, tmp_path / "a", callbacks=[stall], time_limit_s=limit)
    assert (stopped.status, stopped.global_step, stopped.epochs_completed) == ("timed_out", 3, 0)
    resumed = normcore.train(spec, tmp_path / "a", resume="latest")
    whole = normcore.train(spec, tmp_path / "b")
    assert resumed.global_step == whole.global_step == 6
    a = load_checkpoint(resumed.checkpoints[-1].path)
    b = load_checkpoint(whole.checkpoints[-1].path)
    assert all(torch.equal(a.model_state[k], b.model_state[k]) for k in a.model_state)
    assert [c.name for c in resumed.checkpoints] == ["epoch-0001", "epoch-0002"]
