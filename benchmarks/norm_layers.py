"""Forward+backward time of normcore's norm layers against their torch.nn twins (CPU or CUDA).

    python benchmarks/norm_layers.py [--repeats N] [--quick] [--device cpu|cuda]
                                     [--threads N] [--clock wall|cpu]

For BatchNorm2d, GroupNorm, LayerNorm2d and InstanceNorm2d it measures ours and the torch.nn
twin side by side, interleaved in one run (LayerNorm2d's twin is permute -> nn.LayerNorm ->
permute back), and prints the median time of each and the ratio ours/twin (goal: <= 1.05).
BatchRenorm2d, GhostBatchNorm2d (virtual batch 16), FrozenBatchNorm2d and L2Norm are reported
relative to torch's BatchNorm2d at the same shape. All layers run in training mode.
``min/min`` is the ratio of the fastest samples: on a loaded machine, where a sample can
stall for far longer than it runs, it is the steadier estimate of the layers' own cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import normcore.layers as L

SHAPES: list[tuple[int, int, int, int]] = [(64, 64, 32, 32), (8, 256, 14, 14), (256, 16, 8, 8)]
GOAL = 1.05
CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


class TorchLayerNorm2d(nn.Module):
    """The twin of LayerNorm2d: channels-last nn.LayerNorm between two permutes."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(num_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else c


# name -> (ours, twin) builders taking the channel count
PAIRS: dict[str, tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]] = {
    "BatchNorm2d": (L.BatchNorm2d, nn.BatchNorm2d),
    "GroupNorm(8)": (lambda c: L.GroupNorm(_groups(c), c), lambda c: nn.GroupNorm(_groups(c), c)),
    "LayerNorm2d": (L.LayerNorm2d, TorchLayerNorm2d),
    "InstanceNorm2d": (
        lambda c: L.InstanceNorm2d(c, affine=True),
        lambda c: nn.InstanceNorm2d(c, affine=True),
    ),
}
# name -> builder, timed relative to torch's BatchNorm2d
VARIANTS: dict[str, Callable[[int], nn.Module]] = {
    "BatchRenorm2d": L.BatchRenorm2d,
    "GhostBatchNorm2d(16)": lambda c: L.GhostBatchNorm2d(c, virtual_batch_size=16),
    "FrozenBatchNorm2d": L.FrozenBatchNorm2d,
    "L2Norm": L.L2Norm,
}


@dataclass
class Case:
    """One layer at one shape, with its input and upstream gradient."""

    layer: nn.Module
    x: Tensor
    grad: Tensor
    inner: int = 1

    def step(self) -> None:
        x = self.x.detach().requires_grad_()
        self.layer(x).backward(self.grad)
        for p in self.layer.parameters():
            p.grad = None

    def sample(self, sync: Callable[[], None]) -> float:
        """Seconds per forward+backward, averaged over ``inner`` back-to-back calls."""
        sync()
        t0 = CLOCK()
        for _ in range(self.inner):
            self.step()
        sync()
        return (CLOCK() - t0) / self.inner


@dataclass
class Pair:
    """A layer ``a`` timed against a reference ``b``, sampled back to back."""

    name: str
    shape: tuple[int, int, int, int]
    a: Case
    b: Case
    ta: list[float] = field(default_factory=list)
    tb: list[float] = field(default_factory=list)

    def row(self) -> tuple[str, tuple[int, ...], float, float, float, float]:
        """(name, shape, median ms of a, median ms of b, median of the paired ratios a/b,
        ratio of the fastest samples min(a)/min(b), the least load-sensitive estimate)."""
        ratios = [x / y for x, y in zip(self.ta, self.tb, strict=True)]
        return (
            self.name,
            self.shape,
            statistics.median(self.ta) * 1e3,
            statistics.median(self.tb) * 1e3,
            statistics.median(ratios),
            min(self.ta) / min(self.tb),
        )


def _inner_for(case: Case, sync: Callable[[], None], min_seconds: float) -> int:
    """Calls per sample so that one sample of ``case`` lasts at least ``min_seconds``."""
    one = min(case.sample(sync) for _ in range(3))
    return max(1, round(min_seconds / max(one, 1e-7)))


def run(repeats: int, device: str, min_seconds: float) -> tuple[list[tuple], list[tuple]]:
    """Time every pair; returns rows for the twin table and the variant table.

    Each repeat samples every pair once, its two sides back to back (alternating which goes
    first), so both see the same machine load; the ratio is the median of paired ratios.
    """
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    twins: list[Pair] = []
    variants: list[Pair] = []
    for shape in SHAPES:
        c = shape[1]
        x = torch.randn(*shape, device=device)
        g = torch.randn(*shape, device=device)
        torch_bn = None
        for name, (ours, twin) in PAIRS.items():
            pair = Pair(name, shape, Case(ours(c).to(device), x, g), Case(twin(c).to(device), x, g))
            twins.append(pair)
            if name == "BatchNorm2d":
                torch_bn = pair.b
        assert torch_bn is not None
        for name, build in VARIANTS.items():
            variants.append(Pair(name, shape, Case(build(c).to(device), x, g), torch_bn))
    pairs = twins + variants
    for pair in pairs:
        for case in (pair.a, pair.b):
            case.layer.train()
            for _ in range(3):  # warm up
                case.step()
    # one calls-per-sample count per shape, set by torch's BatchNorm2d: a side timed over
    # more back-to-back calls would run on warmer caches than its partner
    for pair in twins:
        if pair.name == "BatchNorm2d":
            inner = _inner_for(pair.b, sync, min_seconds)
            for other in pairs:
                if other.shape == pair.shape:
                    other.a.inner = other.b.inner = inner
    for r in range(repeats):
        for pair in pairs if r % 2 == 0 else reversed(pairs):
            if r % 2 == 0:
                pair.ta.append(pair.a.sample(sync))
                pair.tb.append(pair.b.sample(sync))
            else:
                pair.tb.append(pair.b.sample(sync))
                pair.ta.append(pair.a.sample(sync))
    return [p.row() for p in twins], [p.row() for p in variants]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def report(twin_rows: list[tuple], var_rows: list[tuple], header: str) -> None:
    """Print both tables with rich when it is installed, else as plain text."""
    twin_cols = ["layer", "N x C x H x W", "ours ms", "torch ms", "ours/torch", "min/min"]
    var_cols = ["layer", "N x C x H x W", "ms", "BN2d ms", "x BN2d", "min/min"]
    twin_data = [
        [
            n,
            _fmt_shape(s),
            f"{a:.3f}",
            f"{b:.3f}",
            f"{r:.3f}" + (" !" if r > GOAL else ""),
            f"{q:.3f}" + (" !" if q > GOAL else ""),
        ]
        for n, s, a, b, r, q in twin_rows
    ]
    var_data = [
        [n, _fmt_shape(s), f"{a:.3f}", f"{b:.3f}", f"{r:.2f}", f"{q:.2f}"]
        for n, s, a, b, r, q in var_rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for cols, data in ((twin_cols, twin_data), (var_cols, var_data)):
            widths = [max(len(str(v)) for v in col) for col in zip(cols, *data, strict=False)]
            for row in (cols, *data):
                print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
            print()
    else:
        console = Console(width=max(100, Console().width))
        console.print(header)
        for title, cols, data in (
            ("ours vs torch.nn twin (forward+backward, median)", twin_cols, twin_data),
            ("variants relative to torch BatchNorm2d", var_cols, var_data),
        ):
            table = Table(title=title)
            for col in cols:
                table.add_column(col, justify="left" if col == "layer" else "right")
            for row in data:
                table.add_row(*row)
            console.print(table)
    slow = [f"{n} at {_fmt_shape(s)} ({r:.2f})" for n, s, _, _, r, _ in twin_rows if r > GOAL]
    both = [
        f"{n} at {_fmt_shape(s)} ({r:.2f}, min {q:.2f})"
        for n, s, _, _, r, q in twin_rows
        if r > GOAL and q > GOAL
    ]
    print(f"median ratio above {GOAL}: " + (", ".join(slow) if slow else "none"))
    print(f"... and min/min above {GOAL} too: " + (", ".join(both) if both else "none"))


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="samples per case (median)")
    parser.add_argument("--quick", action="store_true", help="few repeats, short samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, which ignores time spent descheduled on a busy machine "
        "(most meaningful with --threads 1; CPU only)",
    )
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu needs --device cpu")
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (5 if args.quick else 25)
    min_seconds = 0.002 if args.quick else 0.01
    t0 = time.perf_counter()
    twin_rows, var_rows = run(repeats, args.device, min_seconds)
    header = (
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, "
        f"{repeats} repeats, medians (ratio: median of paired ratios); took {time.perf_counter() - t0:.0f} s"
    )
    report(twin_rows, var_rows, header)


if __name__ == "__main__":
    main()
