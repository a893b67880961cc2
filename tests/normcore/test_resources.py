"""``estimate_memory`` against what a real run holds: the data tensors the loader builds, the
parameter, gradient and optimizer-state tensors after a real step, and the tensors autograd
saves in a real forward."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from normcore.data import build_data
from normcore.engine.optim import build_optimizer
from normcore.models import build_model
from normcore.resources import (
    MB,
    _model_shape_counts,
    estimate_memory,
    optimizer_slots,
    over_budget_message,
)
from normcore.spec import JobSpec


def _spec(arch: str = "lenet", norm: str = "bn", **data: object) -> JobSpec:
    dataset = "sr-synthetic" if arch == "edsr" else "synthetic"
    return JobSpec.model_validate(
        {
            "model": {"arch": arch, "norm": norm},
            "data": {"dataset": dataset, "batch_size": 8, "num_samples": 64, **data},
        }
    )


def test_data_part_is_the_loaders_tensors() -> None:
    spec = _spec(num_samples=200, channels=4, image_size=20)
    estimate = estimate_memory(spec)
    bundle = build_data(spec.data, seed=0)
    tensors = sum(t.nbytes for t in (bundle.train_x, bundle.val_x))
    # generated once as a whole (with noise and clamp temporaries), then indexed into copies
    assert estimate.data_bytes == 5 * tensors


def _peak_rss_of_build(spec_json: str, data_root: str | None) -> tuple[int, int]:
    """(peak RSS growth while building the data, bytes of its tensors), in a fresh process.

    A tiny build of the same kind runs first (imports, first-use allocations), then the
    high-water mark is reset (Linux's clear_refs "5"), so the peak is the build's own.
    """
    from normcore.data import build_data

    def status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    spec = JobSpec.model_validate_json(spec_json)
    if spec.data.dataset == "npz":
        tiny = spec.data.model_copy(update={"path": "tiny.npz"})
    else:
        tiny = spec.data.model_copy(update={"num_samples": 200})
    build_data(tiny, seed=0, data_root=data_root)
    Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    bundle = build_data(spec.data, seed=0, data_root=data_root)
    return status("VmHWM") - base, bundle.train_x.nbytes + bundle.val_x.nbytes


def test_data_part_covers_the_measured_peak(tmp_path: Path) -> None:
    import multiprocessing

    import numpy as np

    x = np.random.default_rng(0).integers(0, 255, (20_000, 3, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(20_000) % 10)
    np.savez(tmp_path / "tiny.npz", x=x[:200], y=np.arange(200) % 10)
    specs = [
        _spec(num_samples=8_000, channels=4, image_size=32),
        JobSpec.model_validate(
            {"model": {"arch": "lenet"}, "data": {"dataset": "npz", "path": "d.npz"}}
        ),
    ]
    ctx = multiprocessing.get_context("spawn")
    for spec in specs:
        with ctx.Pool(1) as pool:
            peak, tensors = pool.apply(_peak_rss_of_build, (spec.model_dump_json(), str(tmp_path)))
        estimate = estimate_memory(spec, tmp_path).data_bytes
        assert tensors < peak <= estimate <= 1.5 * peak, (spec.data.dataset, peak, estimate)


@pytest.mark.parametrize(
    "optim", [{"name": "sgd", "momentum": 0.9}, {"name": "sgd", "momentum": 0.0}, {"name": "adamw"}]
)
def test_model_part_is_params_grads_and_optimizer_state(optim: dict) -> None:
    spec = _spec("resnet20", "gn:8").model_copy(
        update={"optim": JobSpec.model_validate({**_spec().model_dump(), "optim": optim}).optim}
    )
    model = build_model(spec.model, in_channels=3)
    optimizer = build_optimizer(model, spec.optim)
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    optimizer.step()
    held = sum(p.nbytes + p.grad.nbytes for p in model.parameters())
    for state in optimizer.state.values():
        held += sum(v.nbytes for v in state.values() if isinstance(v, torch.Tensor) and v.dim())
    estimate = estimate_memory(spec)
    assert estimate.model_bytes == held
    assert optimizer_slots(spec) == {"adamw": 2}.get(
        optim["name"], int(optim.get("momentum", 0) > 0)
    )


@pytest.mark.parametrize(
    ("arch", "norm"),
    [("lenet", "bn"), ("resnet20", "gn:8"), ("vgg11", "bn"), ("convblock", "ln"), ("edsr", "none")],
)
def test_activation_part_covers_what_autograd_saves(arch: str, norm: str) -> None:
    spec = _spec(arch, norm, image_size=16)
    estimate = estimate_memory(spec)
    model = build_model(spec.model, in_channels=3)
    size = 8 if arch == "edsr" else 16  # edsr's input is the low-resolution image
    x = torch.randn(spec.data.batch_size, 3, size, size)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    ratio = estimate.activation_bytes / sum(saved.values())
    # an upper-side estimate: every leaf's output counts, some of which autograd frees
    assert 0.9 <= ratio <= 2.5, ratio


def test_a_huge_job_is_estimated_without_allocating_it() -> None:
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "resnet18", "norm": "bn"},
            "data": {"dataset": "synthetic", "batch_size": 512, "image_size": 224},
            "optim": {"name": "adamw"},
        }
    )
    estimate_memory(spec)  # warm the imports
    _model_shape_counts.cache_clear()  # measure a real build and forward, not the cache
    tracemalloc.start()
    started = time.perf_counter()
    estimate = estimate_memory(spec)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert estimate.total_bytes > 10 * 2**30
    assert peak < 50 * MB and seconds < 5, (peak, seconds)
    assert estimate.parameters == 11_181_642  # torchvision's resnet18 with 10 classes


def test_processes_multiply_and_message_has_every_part() -> None:
    spec = JobSpec.model_validate(
        {**_spec().model_dump(), "resources": {"device": "cpu", "gpus": 2}}
    )
    estimate = estimate_memory(spec)
    assert estimate.processes == 2
    assert estimate.total_bytes == 2 * estimate.per_process_bytes
    mb = estimate.as_mb()
    text = over_budget_message(estimate, 64 * MB)
    for key in ("data_mb", "model_mb", "activations_mb", "total_mb"):
        assert f"{mb[key]:.1f} MB" in text
    assert "budget per job is 64.0 MB" in text and "x 2 processes" in text


def test_split_bn_counts_its_own_parameters_and_a_bns_activations() -> None:
    """A split BN is estimated through a BN stand-in for shapes, but with its own parameters."""
    base = {"data": {"dataset": "synthetic", "batch_size": 8}, "epochs": 1}
    model = {"arch": "resnet20", "num_classes": 10}
    split = estimate_memory({**base, "model": {**model, "norm": "split_bn:4"}})
    plain = estimate_memory({**base, "model": {**model, "norm": "bn"}})
    built = build_model(
        JobSpec.model_validate({**base, "model": {**model, "norm": "split_bn:4"}}).model,
        in_channels=3,
    )
    assert split.parameters == sum(p.numel() for p in built.parameters())
    assert split.parameters > plain.parameters
    assert split.activation_bytes == plain.activation_bytes
