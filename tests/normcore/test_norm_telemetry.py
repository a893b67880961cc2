"""Norm telemetry in the engine: records equal float64 recomputations from the checkpoint's
buffers, the gap probe leaves the buffers bit-identical, non-finite statistics fail the step."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normcore
from normcore.checkpoint import load_checkpoint
from normcore.engine import Callback
from normcore.engine.callbacks import NormRecord, NormStatsNonFinite
from normcore.telemetry import (
    DEAD_RELATIVE,
    FiniteCheck,
    NormTelemetry,
    collapsed_layers,
    gap_probe,
)


class _Collect(Callback):
    def __init__(self) -> None:
        self.records: list[NormRecord] = []
        self.rows: list[Any] = []
        self.warnings: list[dict[str, str]] = []

    def on_norms(self, record: NormRecord) -> None:
        self.records.append(record)

    def on_metrics(self, row: Any) -> None:
        self.rows.append(row)

    def on_warning(self, warning: dict[str, str]) -> None:
        self.warnings.append(warning)


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"mean": v.mean(), "std": v.std(), "min": v.min(), "max": v.max()}


def _spec(norm: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"arch": "convblock", "norm": norm, "num_classes": 4},
        "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64, "num_classes": 4},
        "epochs": 2,
        "seed": 0,
        **extra,
    }


def test_records_equal_float64_from_checkpoint_buffers(tmp_path: Path) -> None:
    cb = _Collect()
    result = normcore.train(_spec("bn", telemetry={"every_steps": 5}), tmp_path, callbacks=cb)
    triggers = [r.trigger for r in cb.records]
    assert triggers[0] == "start" and triggers.count("eval") == 2 and "steps" in triggers
    last = cb.records[-1]
    assert last.trigger == "eval" and last.step == result.global_step
    state = load_checkpoint(result.checkpoints[-1].path).model_state
    previous = [r for r in cb.records if r.step < last.step][-1]
    assert previous.trigger == "steps"
    prev_state = {r["layer"]: r for r in previous.layers}
    assert last.layers, "convblock with bn has norm layers"
    for row in last.layers:
        name = row["layer"]
        mean = state[f"{name}.running_mean"].double().numpy()
        var = state[f"{name}.running_var"].double().numpy()
        gamma = state[f"{name}.weight"].double().numpy()
        beta = state[f"{name}.bias"].double().numpy()
        for prefix, v in (("mean", mean), ("var", var)):
            for key, want in _summary(v).items():
                assert row[f"{prefix}_{key}"] == pytest.approx(want, rel=1e-12, abs=1e-15)
            assert row[f"{prefix}_nonfinite"] == 0
        assert row["gamma_norm"] == pytest.approx(np.linalg.norm(gamma), rel=1e-12)
        assert row["beta_norm"] == pytest.approx(np.linalg.norm(beta), rel=1e-12)
        assert row["num_batches_tracked"] == int(state[f"{name}.num_batches_tracked"])
        dead = (var < DEAD_RELATIVE * np.median(var)) | (
            np.abs(gamma) < DEAD_RELATIVE * np.median(np.abs(gamma))
        )
        assert row["dead_channels"] == int(dead.sum())
        assert row["source"] == "running" and row["channels"] == var.size
        # drift: relative L2 change since the previous record, whose summaries it matches
        assert prev_state[name]["num_batches_tracked"] < row["num_batches_tracked"]
        assert row["var_drift"] > 0
    # a gap row at each evaluation, at the eval step
    gaps = [r for r in cb.rows if r.split == "gap"]
    assert [g.step for g in gaps] == [r.step for r in cb.records if r.trigger == "eval"]
    assert set(gaps[0].values) >= {"gap_loss", "gap_accuracy", "val_loss_eval", "val_loss_batch"}


def test_drift_is_relative_l2_change() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), normcore.BatchNorm2d(4))
    tele = NormTelemetry(model)
    first = tele.record()[0]
    assert first["var_drift"] is None and first["mean_drift"] is None
    before = model[1].running_var.double().clone()
    with torch.no_grad():
        model[1].running_var.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        model[1].running_mean.add_(1.0)
    second = tele.record()[0]
    want = (model[1].running_var.double() - before).norm() / before.norm()
    assert second["var_drift"] == pytest.approx(float(want), rel=1e-12)
    assert second["mean_drift"] is None  # from a running_mean of zeros: undefined


def test_probe_stats_for_batch_independent_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), normcore.GroupNorm(2, 4))
    probe = torch.randn(6, 1, 8, 8)
    row = NormTelemetry(model, probe).record()[0]
    x = model[0](probe).detach().double().transpose(0, 1).reshape(4, -1)
    assert row["source"] == "probe"
    assert row["mean_mean"] == pytest.approx(float(x.mean(1).mean()), rel=1e-12)
    assert row["var_max"] == pytest.approx(float(x.var(1, unbiased=False).max()), rel=1e-12)
    assert row["num_batches_tracked"] is None


def test_gap_probe_leaves_buffers_bit_identical_and_matches_a_batch_stats_twin() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), normcore.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)
    )
    with torch.no_grad():  # running statistics far from the batch's
        model[1].running_var.fill_(50.0)
        model[1].running_mean.fill_(3.0)
    model.train()
    batches = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gap = gap_probe(model, batches, F.cross_entropy)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert model.training and all(m.training for m in model.modules())
    twin = copy.deepcopy(model).train()
    eval_model = copy.deepcopy(model).eval()
    with torch.no_grad():
        want_batch = np.mean([float(F.cross_entropy(twin(x), y)) for x, y in batches])
        want_eval = np.mean([float(F.cross_entropy(eval_model(x), y)) for x, y in batches])
    assert gap is not None
    assert gap["val_loss_batch"] == pytest.approx(want_batch, rel=1e-6)
    assert gap["val_loss_eval"] == pytest.approx(want_eval, rel=1e-6)
    assert gap["gap_loss"] == pytest.approx(want_eval - want_batch, rel=1e-5, abs=1e-7)
    # a model without batch statistics has no gap to measure
    assert gap_probe(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), [], F.cross_entropy) is None


def test_finite_check_names_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), normcore.BatchNorm2d(4), normcore.BatchNorm2d(4))
    check = FiniteCheck(model)
    assert bool(check.flag())
    with torch.no_grad():
        model[2].running_var[1] = float("nan")
        model[1].weight[0] = float("inf")
    assert not bool(check.flag())
    assert check.bad_layers() == {"1": ["gamma"], "2": ["running_var"]}


def test_corrupt_input_fails_at_step_one_naming_the_layer(tmp_path: Path) -> None:
    """A file with one huge (finite) pixel per image overflows the first BatchNorm's batch
    variance to inf: the run fails at that step with the layer named, before the step's loss
    row (a NaN loss would name no layer)."""
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1)).astype(np.float32)
    x[:, 0, 0, 0] = 1e30
    np.savez(tmp_path / "bad.npz", x=x, y=(np.arange(64) % 4).astype(np.int64))
    spec = _spec("bn")
    spec["data"] = {"dataset": "npz", "path": "bad.npz", "batch_size": 8, "normalize": False}
    cb = _Collect()
    with pytest.raises(NormStatsNonFinite) as info:
        normcore.train(spec, tmp_path / "run", callbacks=cb, data_root=tmp_path)
    assert info.value.step == 1
    assert "features.0.norm (running_var)" in str(info.value)
    assert not [r for r in cb.rows if r.split == "train"]  # failed before its row
    log = (tmp_path / "run" / "train.log").read_text()
    assert "non-finite norm statistics at step 1" in log


def test_collapsed_variance_is_flagged_below_eps() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), normcore.BatchNorm2d(4), normcore.BatchNorm2d(4))
    with torch.no_grad():
        model[1].running_var.fill_(0.5e-5)  # every channel under eps = 1e-5
        model[2].running_var.copy_(torch.tensor([0.5e-5, 0.5e-5, 0.5e-5, 2e-5]))  # one above
    assert collapsed_layers(NormTelemetry(model).record()) == ["1"]
