"""recalibrate_bn against a direct float64 computation; norm_stats reports and drift."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import Tensor, nn

import normcore.layers as L
from normcore.stats import (
    norm_classes,
    norm_stats,
    norm_stats_from_state_dict,
    recalibrate_bn,
    stats_drift,
)

F64 = torch.float64


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        L.BatchNorm2d(4, momentum=0.3),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5, momentum=None),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 6),
        L.SyncBatchNorm(6),  # no process group: a plain BatchNorm
    ).to(F64)


def _stats(h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel batch mean, unbiased var, and biased var of (N, C, *)."""
    dims = [0, *range(2, h.dim())]
    mean = h.mean(dims)
    n = h.numel() // h.shape[1]
    biased = ((h - mean.view(1, -1, *[1] * (h.dim() - 2))) ** 2).sum(dims) / n
    return mean, biased * n / (n - 1), biased, torch.tensor(n)


def _train_bn(h: Tensor, bn: nn.Module, mean: Tensor, biased: Tensor) -> Tensor:
    shape = (1, -1, *[1] * (h.dim() - 2))
    return (h - mean.view(shape)) / torch.sqrt(biased.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _direct(model: nn.Sequential, batches: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Precise-BN statistics of the three BNs computed by hand in float64."""
    sums = [[torch.zeros(c, dtype=F64), torch.zeros(c, dtype=F64)] for c in (4, 5, 6)]
    with torch.no_grad():
        for x in batches:
            h = x
            for i, (conv, bn) in enumerate([(0, 1), (3, 4), (7, 8)]):
                h = model[conv](h)
                mean, unbiased, biased, _ = _stats(h)
                sums[i][0] += mean
                sums[i][1] += unbiased
                h = _train_bn(h, model[bn], mean, biased)
                if i == 1:
                    h = F.relu(h).flatten(1)
                elif i == 0:
                    h = F.relu(h)
    k = len(batches)
    return [(m / k, v / k) for m, v in sums]


def test_recalibrate_matches_direct_float64_computation() -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 3, 6, 6, generator=g, dtype=F64) * 2 + 1, torch.zeros(8)) for _ in range(5)
    ]
    model.eval()
    model[4].train()  # a mixed set of flags must come back as it was
    for bn in (model[1], model[4], model[8]):
        bn.num_batches_tracked.fill_(10)
    expected = _direct(model, [x for x, _ in data[:4]])

    out = recalibrate_bn(model, data, num_batches=4)

    assert out is model
    for bn, (mean, var) in zip((model[1], model[4], model[8]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == 14  # 10 + one update per batch
    assert (model[1].momentum, model[4].momentum, model[8].momentum) == (0.3, None, 0.1)
    assert [m.training for m in model] == [False] * 4 + [True] + [False] * 4
    # equal batch sizes: the mean of batch means is the mean over all the data
    allx = torch.cat([x for x, _ in data[:4]])
    torch.testing.assert_close(model[1].running_mean, model[0](allx).mean((0, 2, 3)))


def test_recalibrate_float32_model_and_bare_tensor_batches() -> None:
    model = _model()
    batches = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    expected = _direct(model, [b.to(F64) for b in batches])
    model.float()
    recalibrate_bn(model, iter(batches))
    for bn, (mean, var) in zip((model[1], model[4], model[8]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-4, atol=1e-5)


def test_recalibrate_ghost_bn_uses_its_own_update_rule() -> None:
    bn = L.GhostBatchNorm2d(3, virtual_batch_size=4).double()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 2, 2, generator=g, dtype=F64) + i for i in range(3)]
    means, variances = [], []
    for x in batches:
        # GhostBN's documented update: mean over the batch, size-weighted chunk unbiased vars
        chunks = x.split(4)
        means.append(x.mean((0, 2, 3)))
        variances.append(sum(_stats(c)[1] for c in chunks) / len(chunks))
    recalibrate_bn(bn, batches)
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0))


def test_recalibrate_without_batches_raises_and_keeps_stats() -> None:
    model = _model()
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    with pytest.raises(ValueError, match="no batches"):
        recalibrate_bn(model, [])
    assert torch.all(model[1].running_mean == 3.0)
    assert model[1].momentum == 0.3
    with pytest.warns(UserWarning, match="asked for 5"):
        recalibrate_bn(model, [torch.randn(4, 3, 6, 6, dtype=F64)], num_batches=5)


def _report_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        L.BatchNorm2d(8),
        nn.BatchNorm2d(8),
        L.GroupNorm(2, 8),
        L.LayerNorm2d(8),
        L.FrozenBatchNorm2d(8),
        L.L2Norm(8),
        L.InstanceNorm2d(8),  # no affine, no running stats
        L.BatchNorm2d(8, track_running_stats=False),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_mean", "running_var", "weight", "bias"):
                t = getattr(m, name, None)
                if isinstance(t, Tensor) and t.dim() == 1:
                    t.copy_(torch.rand(t.shape, generator=g) + 0.1)
        model[1].num_batches_tracked.fill_(42)
    return model


def test_norm_stats_rows_match_buffers_and_are_strict_json() -> None:
    model = _report_model()
    with torch.no_grad():
        model[2].running_var[3] = math.nan  # a diverged layer must not break the JSON
    rows = norm_stats(model)
    json.dumps(rows, allow_nan=False)
    assert [r["name"] for r in rows] == [str(i) for i in range(1, 9)]
    assert [r["kind"] for r in rows][:3] == ["BatchNorm2d", "BatchNorm2d", "GroupNorm"]
    bn = rows[0]
    assert bn["num_channels"] == 8
    assert bn["running_mean"] == pytest.approx(model[1].running_mean.tolist())
    assert bn["running_var"] == pytest.approx(model[1].running_var.tolist())
    rm = model[1].running_mean
    assert bn["summary"]["running_mean"] == pytest.approx(
        {"mean": rm.mean().item(), "min": rm.min().item(), "max": rm.max().item(), "finite": True}
    )
    assert bn["summary"]["num_batches_tracked"] == 42
    w = model[1].weight
    assert bn["affine"]["weight"] == pytest.approx(
        {"mean": w.mean().item(), "std": w.std(correction=0).item()}
    )
    torch_bn = rows[1]
    assert (
        torch_bn["running_var"][3] is None and torch_bn["summary"]["running_var"]["finite"] is False
    )
    gn = rows[2]
    assert gn["running_mean"] is None and gn["summary"]["num_batches_tracked"] is None
    assert rows[5]["affine"]["bias"] is None and rows[5]["affine"]["weight"][
        "mean"
    ] == pytest.approx(model[6].weight.mean().item())
    assert rows[6]["affine"] is None and rows[6]["running_mean"] is None


def test_state_dict_rows_equal_model_rows() -> None:
    model = _report_model()
    # deeper names whose text order differs from module order ("10" < "2" as strings)
    model.add_module("10", nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    model.add_module("11", L.BatchNorm2d(8))
    flat = load(save({k: v.contiguous() for k, v in model.state_dict().items()}))
    from_sd = norm_stats_from_state_dict(flat, classes=norm_classes(model))
    # L2Norm (weight only) and a stateless InstanceNorm cannot be recognized from keys alone
    from_model = [r for r in norm_stats(model) if r["name"] not in ("6", "7")]
    names = ["1", "2", "3", "4", "5", "8", "10.1", "11"]
    assert [r["name"] for r in from_sd] == names

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "kind"} for r in rows]

    assert strip(from_sd) == strip(from_model)
    # "class" is the torch class on both paths; a state dict alone cannot know it
    assert [r["class"] for r in from_sd] == [type(model.get_submodule(n)).__name__ for n in names]
    assert {r["class"] for r in norm_stats_from_state_dict(flat)} == {None}
    assert [r["kind"] for r in from_sd] == [
        "batchnorm",
        "batchnorm",
        "affine_norm",
        "affine_norm",
        "batchnorm",
        "affine_norm",
        "batchnorm",
        "batchnorm",
    ]


def test_stats_drift_between_reports() -> None:
    model = _report_model()
    before = norm_stats(model)
    with torch.no_grad():
        model[1].running_mean += 1.0
        model[1].running_var *= 2.0
        model[1].num_batches_tracked += 5
    after = norm_stats(model)
    renamed = [{**r, "name": "renamed"} if r["name"] == "1" else r for r in after]
    drift = {r["name"]: r for r in stats_drift(before, after)}
    d1 = drift["1"]
    assert d1["status"] == "both"
    assert d1["mean"]["abs_mean"] == pytest.approx(1.0)
    assert d1["mean"]["abs_max"] == pytest.approx(1.0)
    rm0 = torch.tensor(before[0]["running_mean"], dtype=F64)
    assert d1["mean"]["rel"] == pytest.approx(math.sqrt(8) / rm0.norm().item())
    rv0 = torch.tensor(before[0]["running_var"], dtype=F64)
    assert d1["var"]["abs_mean"] == pytest.approx(rv0.mean().item())
    assert d1["var"]["rel"] == pytest.approx(1.0)
    assert d1["num_batches_tracked"] == 5
    assert drift["2"]["mean"] == {"abs_mean": 0.0, "abs_max": 0.0, "rel": 0.0}
    assert drift["3"]["mean"] is None  # GroupNorm: no running stats
    statuses = {r["name"]: r["status"] for r in stats_drift(before, renamed)}
    assert statuses["1"] == "only_a" and statuses["renamed"] == "only_b"
    json.dumps(stats_drift(before, renamed), allow_nan=False)


def test_has_recalibratable_layers_is_what_recalibrate_bn_would_touch() -> None:
    """The test the worker and the recalibrate route apply before a precise-BN build."""
    from normcore.stats import has_recalibratable_layers

    assert has_recalibratable_layers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    assert has_recalibratable_layers(nn.Sequential(nn.InstanceNorm2d(4, track_running_stats=True)))
    assert not has_recalibratable_layers(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)))
    assert not has_recalibratable_layers(
        nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False))
    )
    assert not has_recalibratable_layers(nn.Sequential(nn.InstanceNorm2d(4)))
    with torch.device("meta"):  # reads no values: validate builds its model on meta
        assert has_recalibratable_layers(nn.Sequential(nn.BatchNorm2d(4)))
