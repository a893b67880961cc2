"""Cost of norm telemetry and the train/eval gap probe against a training epoch (issue 15).

ResNet-20 with BatchNorm on digits (batch 32, the engine's data and model). Per repeat it times,
in this order and on the same model:

- one epoch as the engine runs it, without telemetry: forward, backward and SGD step over every
  train batch, then the eval pass over the val split (``normcore.engine.loop._evaluate``);
- what ``NormWatch`` adds to that epoch: the per-step finiteness check (sum + isfinite + the
  read, once per step, as on CPU) summed over the epoch's steps, then one evaluation's worth
  (the gap probe over its fixed batches and one telemetry record).

and prints the medians and the ratio (telemetry + probe) / epoch. CPU time of this process is
reported beside wall time: on a shared machine it is the steadier measure.

    .venv/bin/python benchmarks/telemetry_cost.py [--repeats 5] [--threads 1] [--norm bn]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from normcore.data import build_data
from normcore.engine.callbacks import CallbackList
from normcore.engine.loop import _evaluate
from normcore.engine.normwatch import NormWatch
from normcore.engine.precision import resolve_device, setup_precision
from normcore.models import build_model
from normcore.spec import JobSpec


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    """Parse arguments, run the repeats, print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--norm", default="bn")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = JobSpec.model_validate(
        {
            "model": {"arch": "resnet20", "norm": args.norm, "num_classes": 10},
            "data": {"dataset": "digits", "batch_size": args.batch_size, "val_fraction": 0.2},
            "epochs": 1,
            "resources": {"device": "cpu"},
        }
    )
    bundle = build_data(spec.data, seed=0, task=spec.task, scale=spec.model.scale)
    model = build_model(spec.model, in_channels=bundle.in_channels)
    dev = resolve_device("cpu", 1)
    prec = setup_precision(spec.resources, dev, model, lambda *a, **k: None)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = bundle.steps_per_epoch(spec.data.batch_size, 1)
    watch = NormWatch(spec, bundle, model, prec, F.cross_entropy, CallbackList([]), steps)
    watch.start(0, 0)

    def epoch() -> None:
        model.train()
        for x, y in bundle.train_batches(0, spec.data.batch_size, device=dev):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _evaluate(model, bundle, spec.data.batch_size, prec, F.cross_entropy, spec.task)

    def checks() -> None:
        for step in range(1, steps + 1):
            watch.after_step(step, 1)

    def at_eval() -> None:
        watch.at_eval(steps, 1)

    rows = []
    for _ in range(args.repeats):
        rows.append((_timed(epoch), _timed(checks), _timed(at_eval)))
    med = [[statistics.median(r[i][k] for r in rows) for k in (0, 1)] for i in range(3)]
    (ew, ec), (cw, cc), (aw, ac) = med
    print(
        f"resnet20/{args.norm} digits, batch {args.batch_size}, {steps} steps/epoch, "
        f"{len(watch.gap_batches)} probe batches, {args.threads} thread(s), "
        f"{args.repeats} repeats (medians)"
    )
    print(f"  epoch            wall {ew:8.3f} s   cpu {ec:8.3f} s")
    print(
        f"  per-step checks  wall {cw:8.4f} s   cpu {cc:8.4f} s  ({cc / steps * 1e6:.0f} us cpu/step)"
    )
    print(f"  probe + record   wall {aw:8.4f} s   cpu {ac:8.4f} s")
    print(
        f"  telemetry + probe / epoch: wall {(cw + aw) / ew:.2%}   cpu {(cc + ac) / ec:.2%} "
        "(goal <= 5%)"
    )


if __name__ == "__main__":
    main()
