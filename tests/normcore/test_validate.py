"""normcore.validate: the half-life against torch's own BatchNorm update, the effective batch of
each norm kind, and the warnings' triggers (each with a spec that must not trigger it)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from normcore.checkpoint_diff import ArchitectureMismatch, diff_state_dicts
from normcore.validate import half_life, validate_spec


def _spec(norm: Any = "bn", batch: int = 32, epochs: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"arch": "lenet", "norm": norm},
        "data": {"dataset": "digits", "batch_size": batch},
        "epochs": epochs,
        **extra,
    }


def _codes(spec: dict[str, Any]) -> set[str]:
    return {w.code for w in validate_spec(spec).warnings}


def test_half_life_of_momentum_0_1_is_6_58_steps_as_torch_updates() -> None:
    h = half_life(0.1)
    assert h is not None and round(h, 2) == 6.58
    # torch.nn.BatchNorm1d in float64: running_mean = (1 - m) running + m batch, from 0 toward
    # batches of mean 1, reaches 1 - 0.9^n after n steps: it crosses 0.5 between 6 and 7 steps
    bn = torch.nn.BatchNorm1d(1, momentum=0.1, dtype=torch.float64)
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    trail = []
    for _ in range(7):
        bn(x)
        trail.append(bn.running_mean.item())
    assert trail[5] < 0.5 < trail[6]
    assert 1 - 0.9**h == pytest.approx(0.5, abs=1e-12)
    assert half_life(None) is None and half_life(0.0) is None and half_life(1.0) == 0.0
    assert half_life(0.01) == pytest.approx(math.log(0.5) / math.log(0.99))


def test_effective_batch_per_kind() -> None:
    plain = validate_spec(_spec(batch=16))
    assert {r.norm_batch for r in plain.layers} == {16} and plain.global_batch == 16
    ghost = validate_spec(_spec("ghost_bn:4", batch=16))
    assert {r.norm_batch for r in ghost.layers} == {4}
    split = validate_spec(_spec("split_bn:2", batch=16))
    assert {r.norm_batch for r in split.layers} == {8}
    assert {r.kind for r in split.layers} == {"split_bn"}
    sync = validate_spec(_spec(batch=16, resources={"device": "cpu", "gpus": 2, "sync_bn": True}))
    assert {r.norm_batch for r in sync.layers} == {32} and sync.global_batch == 32
    gn = validate_spec(_spec("gn:4"))
    assert all(r.norm_batch is None and not r.batch_stats for r in gn.layers)
    # lenet: conv1 (8 ch) on 8x8 maps of the 8x8 digits: 4 groups of 2 channels x 64 pixels
    first = gn.layers[0]
    assert first.map_size == [8, 8] and first.channels_per_group == 2
    assert first.values_per_stat == 2 * 64


def test_warnings_fire_on_their_cases_only() -> None:
    assert "bn_small_batch" in _codes(_spec(batch=4))
    assert "bn_small_batch" not in _codes(_spec(batch=8))
    assert "bn_small_batch" in _codes(_spec("ghost_bn:4"))
    # momentum=None: 1 epoch is fine, 5 epochs leave the last one a fifth of the average
    assert "momentum_none_long_run" not in _codes(_spec({"type": "bn", "momentum": None}))
    long = validate_spec(_spec({"type": "bn", "momentum": None}, epochs=5))
    warning = next(w for w in long.warnings if w.code == "momentum_none_long_run")
    assert "20%" in warning.message
    assert long.running_stats["cumulative"] and long.running_stats["half_life_steps"] is None
    # 44 steps of momentum 0.001 leave 0.999^44 = 96% of the initial statistics
    assert "running_stats_stale" in _codes(_spec("bn(momentum=0.001)"))
    assert "running_stats_stale" not in _codes(_spec("bn(momentum=0.1)", epochs=2))
    # the default momentum on a 22-step run: 0.9^22 = 9.8% left, said as a note, not a warning
    short = validate_spec(_spec(batch=64))
    assert short.total_steps == 22 and short.warnings == []
    assert any("9.8% of the initial running statistics" in n for n in short.notes)
    assert "gn_one_channel_per_group" in _codes(_spec("gn:8"))
    assert "gn_one_channel_per_group" not in _codes(_spec("gn:4"))


def test_diff_matches_float64_and_names_a_mismatch() -> None:
    torch.manual_seed(0)
    a = {
        "bn.weight": torch.rand(5),
        "bn.running_var": torch.rand(5) + 0.5,
        "bn.num_batches_tracked": torch.tensor(10),
    }
    b = {
        k: (v + 0.01 * torch.randn(v.shape) if v.is_floating_point() else v + 3)
        for k, v in a.items()
    }
    # the change of b relative to the reference a
    out = diff_state_dicts(b, a)["bn"]
    d = b["bn.weight"].double() - a["bn.weight"].double()
    assert out["weight"]["rel_l2"] == pytest.approx(
        (d.norm() / a["bn.weight"].double().norm()).item(), rel=1e-12
    )
    assert out["weight"]["max_abs"] == pytest.approx(d.abs().max().item(), rel=1e-12)
    assert out["weight"]["norm_a"] == pytest.approx(b["bn.weight"].double().norm().item())
    assert out["num_batches_tracked"] == {"a": 13, "b": 10, "change": 3}
    with pytest.raises(ArchitectureMismatch, match=r"1 tensor\(s\) only in old: bn\.running_var"):
        diff_state_dicts(
            {k: v for k, v in b.items() if k != "bn.running_var"}, a, names=("new", "old")
        )
    with pytest.raises(ArchitectureMismatch, match=r"new vs old\): bn.weight: \[6\] vs \[5\]"):
        diff_state_dicts({**b, "bn.weight": torch.rand(6)}, a, names=("new", "old"))
