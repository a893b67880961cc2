"""Forward+backward time of normcore's norm layers against their torch.nn twins (CPU or CUDA).

    python benchmarks/norm_layers.py [--repeats N] [--quick] [--device cpu|cuda]
                                     [--threads N] [--clock wall|cpu] [--impls] [--only TEXT]
                                     [--min-seconds S]

Twins, measured side by side, interleaved in one run, with the median time of each and the
median of the paired ratios ours/twin (goal: <= 1.05, <= 1.0 for the channel-dim norms):
BatchNorm2d, GroupNorm, InstanceNorm2d and RMSNorm (over the channels of (N, H*W, C) tokens)
against torch.nn's; LayerNorm2d and RMSNorm2d against the permute -> F.layer_norm / F.rms_norm
-> permute-back way. Channel-dim norms are timed on NCHW and on channels_last input (``[cl]``).
BatchRenorm2d, GhostBatchNorm2d (virtual batch 16), FrozenBatchNorm2d, L2Norm, FRN+TLU,
EvoNorm-B0, EvoNorm-S0 and SplitBatchNorm2d (2 splits) are reported relative to torch's
BatchNorm2d at the same shape, StdConv2d relative to a 3x3 Conv2d. All layers train.
``min/min`` is the ratio of the fastest samples: on a loaded machine, where a sample can
stall for far longer than it runs, it is the steadier estimate of the layers' own cost.

The ``A/A`` row times the permute-way LayerNorm2d against a second copy of itself, sampled like
every other pair: its distance from 1 is what this run's noise does to a ratio of two equal
layers. LayerNorm2d on channels_last calls the same torch kernel as the permute way, so its row
can only be read against that one; a ratio over its goal by no more than the A/A distance is
marked ``~``, beyond it ``!``. On a 2-core machine pass ``--min-seconds 0.03`` or more: with
10 ms samples the 64x64x32x32 steps vary 3x with the page faults of their 16 MB tensors.

``--impls`` times instead every implementation ``normcore.layers.channelwise`` has for each
op and layout, and says which is fastest and what ``channelwise.CHOICES`` picks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import normcore.layers as L
from normcore.layers import channelwise

SHAPES: list[tuple[int, int, int, int]] = [(64, 64, 32, 32), (8, 256, 14, 14), (256, 16, 8, 8)]
GOAL = 1.05
LAYOUT_GOAL = 1.0  # channel-dim norms against the permute way
AA_NAME = "A/A permute-way LayerNorm2d"  # the reference timed against itself: the noise floor
CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


class PermuteLayerNorm2d(nn.LayerNorm):
    """The way LayerNorm2d replaces, as timm writes it: one module, F.layer_norm between two
    permutes (its per-call cost is the bar on small maps, so no wrapper module around it)."""

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


class PermuteRMSNorm2d(nn.Module):
    """The way RMSNorm2d replaces: F.rms_norm between two permutes."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = F.rms_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, 1e-6)
        return out.permute(0, 3, 1, 2)


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else c


@dataclass(frozen=True)
class Twin:
    """A layer of ours and the reference it is timed against, on inputs of one layout."""

    name: str
    ours: Callable[[int], nn.Module]
    ref: Callable[[int], nn.Module]
    layout: str = "nchw"  # "nchw", "channels_last" or "tokens" (N, H*W, C)
    goal: float = GOAL


TWINS: list[Twin] = [
    Twin("BatchNorm2d", L.BatchNorm2d, nn.BatchNorm2d),
    Twin(
        "GroupNorm(8)", lambda c: L.GroupNorm(_groups(c), c), lambda c: nn.GroupNorm(_groups(c), c)
    ),
    Twin(
        "InstanceNorm2d",
        lambda c: L.InstanceNorm2d(c, affine=True),
        lambda c: nn.InstanceNorm2d(c, affine=True),
    ),
    Twin("RMSNorm (tokens)", L.RMSNorm, nn.RMSNorm, "tokens"),
]
for _layout in ("nchw", "channels_last"):
    TWINS += [
        Twin("LayerNorm2d", L.LayerNorm2d, PermuteLayerNorm2d, _layout, LAYOUT_GOAL),
        Twin("RMSNorm2d", L.RMSNorm2d, PermuteRMSNorm2d, _layout, LAYOUT_GOAL),
    ]
# The noise floor: the permute way against a second copy of itself, sampled exactly like a twin.
# On channels_last LayerNorm2d calls the same kernel, so its row is only meaningful next to this.
TWINS.append(
    Twin(
        AA_NAME,
        PermuteLayerNorm2d,
        PermuteLayerNorm2d,
        "channels_last",
        LAYOUT_GOAL,
    )
)
TWINS += [
    Twin(
        "GroupNorm(8)",
        lambda c: L.GroupNorm(_groups(c), c),
        lambda c: nn.GroupNorm(_groups(c), c),
        "channels_last",
    ),
    Twin(
        "InstanceNorm2d",
        lambda c: L.InstanceNorm2d(c, affine=True),
        lambda c: nn.InstanceNorm2d(c, affine=True),
        "channels_last",
    ),
]

# name -> builder, timed relative to torch's BatchNorm2d ("bn") or a 3x3 Conv2d ("conv")
VARIANTS: list[tuple[str, Callable[[int], nn.Module], str]] = [
    ("BatchRenorm2d", L.BatchRenorm2d, "bn"),
    ("GhostBatchNorm2d(16)", lambda c: L.GhostBatchNorm2d(c, virtual_batch_size=16), "bn"),
    ("FrozenBatchNorm2d", L.FrozenBatchNorm2d, "bn"),
    ("L2Norm", L.L2Norm, "bn"),
    ("FilterResponseNorm2d", L.FilterResponseNorm2d, "bn"),
    ("EvoNorm2dB0", L.EvoNorm2dB0, "bn"),
    ("EvoNorm2dS0(8)", lambda c: L.EvoNorm2dS0(c, num_groups=_groups(c)), "bn"),
    ("SplitBatchNorm2d(2)", lambda c: L.SplitBatchNorm2d(c, num_splits=2), "bn"),
    ("StdConv2d 3x3", lambda c: L.StdConv2d(c, c, 3, padding=1, bias=False), "conv"),
]


def _input(shape: tuple[int, ...], layout: str, device: str) -> Tensor:
    n, c, h, w = shape
    if layout == "tokens":
        return torch.randn(n, h * w, c, device=device)
    x = torch.randn(shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


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
        """Seconds per forward+backward, averaged over ``inner`` back-to-back calls.

        One untimed call goes first: the case before this one leaves the allocator holding
        other block sizes, and at 16 MB tensors the page faults of the first call after a
        switch cost up to half a call, landing on whichever side of a pair runs first.
        """
        self.step()
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
    goal: float = GOAL
    ta: list[float] = field(default_factory=list)
    tb: list[float] = field(default_factory=list)

    def row(self) -> tuple[str, tuple[int, ...], float, float, float, float, float]:
        """(name, shape, median ms of a, median ms of b, median of the paired ratios a/b,
        ratio of the fastest samples min(a)/min(b), the least load-sensitive estimate, goal)."""
        ratios = [x / y for x, y in zip(self.ta, self.tb, strict=True)]
        return (
            self.name,
            self.shape,
            statistics.median(self.ta) * 1e3,
            statistics.median(self.tb) * 1e3,
            statistics.median(ratios),
            min(self.ta) / min(self.tb),
            self.goal,
        )


def _calibrate(case: Case, sync: Callable[[], None], min_seconds: float) -> None:
    """Warm up, then pick ``inner`` so one sample lasts at least ``min_seconds``."""
    for _ in range(3):
        case.step()
    one = min(case.sample(sync) for _ in range(3))
    case.inner = max(1, round(min_seconds / max(one, 1e-7)))


def _measure(pairs: list[Pair], repeats: int, sync: Callable[[], None], min_seconds: float) -> None:
    """Each repeat samples every pair once, its two sides back to back, so both see the same
    machine load; the ratio is the median of paired ratios. The order of the pairs and which
    side of a pair goes first are shuffled every repeat (seeded): with a fixed order, the case
    run before a pair biased its first side by up to 20% at 16 MB tensors (allocator state)."""
    order = random.Random(0)
    for pair in pairs:
        for case in (pair.a, pair.b):
            case.layer.train()
            _calibrate(case, sync, min_seconds)
    for _ in range(repeats):
        for pair in order.sample(pairs, len(pairs)):
            if order.random() < 0.5:
                pair.ta.append(pair.a.sample(sync))
                pair.tb.append(pair.b.sample(sync))
            else:
                pair.tb.append(pair.b.sample(sync))
                pair.ta.append(pair.a.sample(sync))


def run(
    repeats: int, device: str, min_seconds: float, only: str | None = None
) -> tuple[list[tuple], list[tuple]]:
    """Time every twin and variant; returns rows for the twin table and the variant table."""
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    twins: list[Pair] = []
    variants: list[Pair] = []
    for shape in SHAPES:
        c = shape[1]
        inputs = {
            layout: (_input(shape, layout, device), _input(shape, layout, device))
            for layout in ("nchw", "channels_last", "tokens")
        }
        for spec in TWINS:
            label = spec.name + (" [cl]" if spec.layout == "channels_last" else "")
            if only and only.lower() not in label.lower():
                continue
            x, g = inputs[spec.layout]
            ours, ref = spec.ours(c).to(device), spec.ref(c).to(device)
            twins.append(Pair(label, shape, Case(ours, x, g), Case(ref, x, g), spec.goal))
        x, g = inputs["nchw"]
        refs = {
            "bn": Case(nn.BatchNorm2d(c).to(device), x, g),
            "conv": Case(nn.Conv2d(c, c, 3, padding=1, bias=False).to(device), x, g),
        }
        for name, build, ref in VARIANTS:
            if only and only.lower() not in name.lower():
                continue
            label = f"{name} / Conv2d" if ref == "conv" else name
            variants.append(Pair(label, shape, Case(build(c).to(device), x, g), refs[ref]))
    _measure(twins + variants, repeats, sync, min_seconds)
    return [p.row() for p in twins], [p.row() for p in variants]


# ----------------------------------------------------------------------------- --impls


class _Impl(nn.Module):
    """One implementation of a channelwise op as a module (weight, and bias where it has one)."""

    def __init__(self, op: str, impl: str, c: int) -> None:
        super().__init__()
        self.op, self.impl = op, impl
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = (
            nn.Parameter(torch.randn(c)) if op in ("layer_norm_2d", "instance_norm_2d") else None
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.op == "rms_norm_2d":
            return channelwise.rms_norm_2d(x, self.weight, 1e-6, impl=self.impl)
        if self.op == "rms_norm":
            return channelwise.rms_norm(x, (x.shape[-1],), self.weight, 1e-6, impl=self.impl)
        fn = (
            channelwise.layer_norm_2d
            if self.op == "layer_norm_2d"
            else channelwise.instance_norm_2d
        )
        return fn(x, self.weight, self.bias, 1e-5, impl=self.impl)


def run_impls(repeats: int, device: str, min_seconds: float) -> None:
    """Time each implementation of each op per layout (relative to its ``torch`` one)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    plans = [
        ("layer_norm_2d", "nchw"),
        ("layer_norm_2d", "channels_last"),
        ("rms_norm_2d", "nchw"),
        ("rms_norm_2d", "channels_last"),
        ("instance_norm_2d", "nchw"),
        ("instance_norm_2d", "channels_last"),
        ("rms_norm", "tokens"),
    ]
    groups: list[tuple[str, str, tuple[int, ...], list[Pair]]] = []
    for op, layout in plans:
        for shape in SHAPES:
            x, g = _input(shape, layout, device), _input(shape, layout, device)
            c = x.shape[-1] if layout == "tokens" else shape[1]
            base = Case(_Impl(op, "torch", c).to(device), x, g)
            pairs = [
                Pair(impl, shape, Case(_Impl(op, impl, c).to(device), x, g), base)
                for impl in channelwise.IMPLEMENTATIONS[op]
            ]
            groups.append((op, layout, shape, pairs))
    _measure([p for *_, pairs in groups for p in pairs], repeats, sync, min_seconds)
    print(f"{'op':18} {'layout':14} {'N x C x H x W':16} implementations: median ms (x torch)")
    for op, layout, shape, pairs in groups:
        rows = [p.row() for p in pairs]
        best = min(rows, key=lambda r: r[4])[0]  # by the paired ratio to torch: steadier
        key = "contiguous" if layout == "tokens" else layout
        chosen = channelwise.CHOICES.get((op, device, key), "torch")
        cells = "  ".join(f"{n} {a:.3f} ({r:.2f})" for n, _, a, _, r, _, _ in rows)
        flag = "" if best == chosen else f"   <- table picks {chosen}"
        print(f"{op:18} {layout:14} {_fmt_shape(shape):16} {cells}   fastest {best}{flag}")


# ----------------------------------------------------------------------------- report


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def report(twin_rows: list[tuple], var_rows: list[tuple], header: str) -> None:
    """Print both tables with rich when it is installed, else as plain text.

    A ratio above its goal is marked ``!``, or ``~`` when it is within the A/A row's distance
    from 1 at that shape (two identical layers differ that much in this run: noise)."""
    noise = {
        s: max(abs(r - 1), abs(q - 1)) for n, s, _, _, r, q, _ in twin_rows if n.startswith(AA_NAME)
    }

    def mark(value: float, goal: float, shape: tuple[int, ...]) -> str:
        if value <= goal:
            return ""
        return " ~" if value <= goal + noise.get(shape, 0.0) else " !"

    twin_cols = ["layer", "N x C x H x W", "ours ms", "ref ms", "ours/ref", "min/min", "goal"]
    var_cols = ["layer", "N x C x H x W", "ms", "ref ms", "x ref", "min/min"]
    twin_data = [
        [n, _fmt_shape(s), f"{a:.3f}", f"{b:.3f}", f"{r:.3f}", f"{q:.3f}", "noise"]
        if n.startswith(AA_NAME)
        else [
            n,
            _fmt_shape(s),
            f"{a:.3f}",
            f"{b:.3f}",
            f"{r:.3f}" + mark(r, goal, s),
            f"{q:.3f}" + mark(q, goal, s),
            f"{goal:.2f}",
        ]
        for n, s, a, b, r, q, goal in twin_rows
    ]
    var_data = [
        [n, _fmt_shape(s), f"{a:.3f}", f"{b:.3f}", f"{r:.2f}", f"{q:.2f}"]
        for n, s, a, b, r, q, _ in var_rows
    ]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        print(header)
        for cols, data in ((twin_cols, twin_data), (var_cols, var_data)):
            widths = [max(len(str(v)) for v in col) for col in zip(cols, *data, strict=False)]
            for row in (cols, *data):
                print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
            print()
    else:
        console = Console(width=max(110, Console().width))
        console.print(header)
        for title, cols, data in (
            (
                "ours vs torch.nn twin or the permute way (forward+backward, median)",
                twin_cols,
                twin_data,
            ),
            ("variants relative to torch BatchNorm2d (StdConv2d: to Conv2d)", var_cols, var_data),
        ):
            table = Table(title=title)
            for col in cols:
                table.add_column(col, justify="left" if col == "layer" else "right")
            for row in data:
                table.add_row(*map(escape, row))  # "[cl]" is not markup
            console.print(table)
    judged = [row for row in twin_rows if not row[0].startswith(AA_NAME)]
    slow = [
        f"{n} at {_fmt_shape(s)} ({r:.3f}, min/min {q:.3f})"
        for n, s, _, _, r, q, g in judged
        if mark(r, g, s) == " !"
    ]
    near = [
        f"{n} at {_fmt_shape(s)} ({r:.3f}, A/A {noise[s]:.3f})"
        for n, s, _, _, r, _, g in judged
        if mark(r, g, s) == " ~"
    ]
    print("median ratio above its goal beyond the A/A noise: " + (", ".join(slow) or "none"))
    print("... above it by no more than the A/A noise: " + (", ".join(near) or "none"))


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
    parser.add_argument(
        "--impls", action="store_true", help="time channelwise implementations instead"
    )
    parser.add_argument("--only", default=None, help="only rows whose name contains this text")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=None,
        help="shortest sample (default 0.01, 0.002 with --quick); longer samples average out "
        "the page faults of 16 MB tensors, which make single steps vary 3x on a small machine",
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
    min_seconds = args.min_seconds or (0.002 if args.quick else 0.01)
    t0 = time.perf_counter()
    header = (
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock, {repeats} repeats of >= {min_seconds * 1e3:g} ms, medians "
        "(ratio: median of paired ratios)"
    )
    if args.impls:
        print(header)
        run_impls(repeats, args.device, min_seconds)
        print(f"took {time.perf_counter() - t0:.0f} s")
        return
    twin_rows, var_rows = run(repeats, args.device, min_seconds, args.only)
    report(twin_rows, var_rows, header + f"; took {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
