"""Throughput of ``normcore.train`` against a plain hand-written PyTorch loop doing the same work.

Both sides build the same data bundle and model (same seed), iterate the same train batches,
use SGD with momentum and the same weight-decay groups, a per-step cosine lr, ``zero_grad(set_to_none=True)``,
cross-entropy, and run the same eval pass over the val split after every epoch. The engine
additionally does what it exists for: per-step metric rows and callbacks, the cancel poll,
epoch meters, log lines and one checkpoint at the end (``every_epochs`` is set past the last
epoch, so only the final one is written). Runs are interleaved (the order alternates) and
medians are reported, so drift in machine load hits both sides alike. Rates are given per
wall-clock second and per CPU second of this process: on a shared machine the second is the
steadier measure of the work each side does (use --threads 1 there).

    .venv/bin/python benchmarks/engine_overhead.py [--repeats 5] [--epochs 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

import normcore
from normcore.data import build_data
from normcore.engine.optim import param_groups
from normcore.engine.rng import seed_everything
from normcore.models import build_model
from normcore.spec import JobSpec


def make_spec(epochs: int, batch_size: int, arch: str, train_samples: int) -> JobSpec:
    """ResNet-20-style net on 16x16 synthetic images: compute dominates the step, as in real jobs."""
    return JobSpec.model_validate(
        {
            "name": "bench",
            "model": {"arch": arch, "norm": "bn", "num_classes": 10},
            "data": {
                "dataset": "synthetic",
                "num_samples": train_samples + train_samples // 10,
                "val_fraction": (train_samples // 10) / (train_samples + train_samples // 10),
                "image_size": 16,
                "channels": 3,
                "num_classes": 10,
                "batch_size": batch_size,
            },
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "epochs": epochs,
            "seed": 0,
            "resources": {"device": "cpu"},
            "checkpoint": {"every_epochs": 10_000, "keep_last": 1},
        }
    )


def run_engine(spec: JobSpec) -> tuple[float, float, int]:
    """Wall and CPU seconds of ``normcore.train`` and the samples it trained on."""
    with tempfile.TemporaryDirectory() as workdir:
        start, cpu = time.perf_counter(), time.process_time()
        result = normcore.train(spec, workdir)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, result.global_step * spec.data.batch_size


def run_plain(spec: JobSpec) -> tuple[float, float, int]:
    """The same job as a plain loop: wall and CPU seconds and samples trained on."""
    start, cpu = time.perf_counter(), time.process_time()
    seed_everything(spec.seed)
    bundle = build_data(spec.data, seed=spec.seed, task=spec.task)
    model = build_model(spec.model, in_channels=bundle.in_channels)
    opt = spec.optim
    # the engine's two groups (no decay on norm parameters and biases): the same update work
    groups = param_groups(model, opt.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum)
    bs = spec.data.batch_size
    steps_per_epoch = bundle.steps_per_epoch(bs)
    total = steps_per_epoch * spec.epochs
    step = 0
    for epoch in range(spec.epochs):
        model.train()
        for x, y in bundle.train_batches(epoch, bs):
            lr = opt.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        model.eval()
        val_loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in bundle.val_batches(bs):
                out = model(x)
                val_loss += F.cross_entropy(out, y, reduction="sum").item()
                correct += int((out.argmax(1) == y).sum())
    return time.perf_counter() - start, time.process_time() - cpu, step * bs


def main() -> None:
    """Run the comparison and print samples/s of both and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--train-samples", type=int, default=640)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = make_spec(args.epochs, args.batch_size, args.arch, args.train_samples)
    print(
        f"{args.arch}, batch {args.batch_size}, {args.epochs} epochs of {args.train_samples} "
        "16x16x3 synthetic images, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"
    )
    run_engine(spec)  # warm-up: imports, allocator, first-call costs
    run_plain(spec)

    wall: dict[str, list[float]] = {"engine": [], "plain": []}
    cpu: dict[str, list[float]] = {"engine": [], "plain": []}
    runners: dict[str, Any] = {"engine": run_engine, "plain": run_plain}
    for repeat in range(args.repeats):
        order = ("engine", "plain") if repeat % 2 == 0 else ("plain", "engine")
        for name in order:
            wall_s, cpu_s, samples = runners[name](spec)
            wall[name].append(samples / wall_s)
            cpu[name].append(samples / cpu_s)
        print(
            f"repeat {repeat + 1}: engine {wall['engine'][-1]:7.1f} samples/s "
            f"({cpu['engine'][-1]:7.1f} per CPU-s), plain {wall['plain'][-1]:7.1f} samples/s "
            f"({cpu['plain'][-1]:7.1f} per CPU-s)"
        )
    for label, rates in (("wall clock", wall), ("CPU time", cpu)):
        engine, plain = statistics.median(rates["engine"]), statistics.median(rates["plain"])
        paired = statistics.median(
            e / p for e, p in zip(rates["engine"], rates["plain"], strict=True)
        )
        print(
            f"{label}: median engine {engine:.1f} samples/s, plain {plain:.1f} samples/s, "
            f"ratio of medians {engine / plain:.3f}, median paired ratio {paired:.3f} (goal >= 0.97)"
        )


if __name__ == "__main__":
    main()
