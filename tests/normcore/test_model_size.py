"""normcore.models.size.count_parameters equals the built model's count, without building it."""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normcore.models import build_model
from normcore.models.size import count_parameters
from normcore.spec import ARCHS, ModelSpec

NORMS = [
    "bn",
    "sync_bn",
    "gn:4",
    "gn",
    "ln",
    "in",
    "in(affine=True)",
    "frozen_bn",
    "brn",
    "ghost_bn:4",
    "split_bn:3",
    "l2",
    "rms",
    "rms2d",
    "rms(elementwise_affine=False)",
    "lrn:5",
    "frn",
    "evo_b0",
    "evo_s0:4",
    "none",
    "bn(affine=False)",
    "ln(bias=False)",
]


def _built(spec: ModelSpec, in_channels: int) -> int:
    with torch.device("meta"):
        model = build_model(spec, in_channels=in_channels)
    return sum(p.numel() for p in model.parameters())


def _both(spec: ModelSpec, in_channels: int) -> tuple[Any, Any]:
    """(counted, built), each the count or the ValueError's type when it refuses the spec."""
    out: list[Any] = []
    for fn in (count_parameters, None):
        try:
            out.append(fn(spec, in_channels=in_channels) if fn else _built(spec, in_channels))
        except ValueError:
            out.append(ValueError)
    return out[0], out[1]


def _spec(arch: str, norm: Any, **kw: Any) -> ModelSpec:
    return ModelSpec(arch=arch, norm=norm, **kw)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_and_norm_at_the_defaults(arch: str, norm: str) -> None:
    """Each arch at its default width with each norm; edsr at its own small width to stay quick."""
    kw = {"width": 8, "depth": 2} if arch == "edsr" else {}
    if arch == "resnet18":
        kw = {"width": 8}
    counted, built = _both(_spec(arch, norm, **kw), 3)
    assert counted == built
    assert counted is not ValueError


def test_resnet_counts_match_the_papers() -> None:
    """ResNet-20: 0.27M (He et al., 2016: 269,722 with BN); ResNet-18, 1000 classes: torchvision's."""
    assert count_parameters(_spec("resnet20", "bn"), in_channels=3) == 269_722
    assert count_parameters(_spec("resnet18", "bn", num_classes=1000), in_channels=3) == 11_689_512


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    arch=st.sampled_from(ARCHS),
    norm=st.sampled_from(NORMS),
    position=st.sampled_from(["before", "after"]),
    conv=st.sampled_from(["standard", "std"]),
    width=st.one_of(st.none(), st.integers(1, 24)),
    depth=st.one_of(st.none(), st.integers(1, 4)),
    in_channels=st.integers(1, 5),
    num_classes=st.integers(1, 20),
    scale=st.sampled_from([1, 2, 3, 4, 6, 8]),
)
def test_counts_equal_the_built_model(
    arch: str,
    norm: str,
    position: str,
    conv: str,
    width: int | None,
    depth: int | None,
    in_channels: int,
    num_classes: int,
    scale: int,
) -> None:
    """Random arch x norm x position x conv x width x depth: the count equals the built model's,
    and a spec the builder refuses (gn:4 on 3 channels, a depth on resnet20) is refused too."""
    if width is None and arch in ("vgg11", "resnet18", "edsr"):
        width = 16  # their defaults are large: keep the meta build quick
    spec = ModelSpec(
        arch=arch,
        norm=norm,
        norm_position=position,
        conv=conv,
        width=width,
        depth=depth,
        num_classes=num_classes,
        scale=scale,
    )
    counted, built = _both(spec, in_channels)
    assert counted == built


def test_largest_specs_are_counted_fast_and_in_no_memory() -> None:
    """At the spec's limits (width 1024, depth 64, split_bn:16) counting takes milliseconds
    and allocates nothing that grows with the model (building it on meta takes seconds)."""
    specs = [
        _spec("convblock", "split_bn:16", width=1024, depth=64),
        _spec("edsr", "split_bn:16", width=1024, depth=64, scale=8),
        _spec("resnet18", "split_bn:16", width=1024, num_classes=100_000),
        _spec("vgg11", "gn:32", width=1024),
    ]
    for spec in specs:
        count_parameters(spec, in_channels=16)  # warm the imports
        tracemalloc.start()
        start = time.perf_counter()
        params = count_parameters(spec, in_channels=16)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert params > 50_000_000
        assert elapsed < 1.0, (spec.arch, elapsed)  # loose: ~10 ms measured on 2 cores
        assert peak < 20_000_000, (spec.arch, peak)


def test_refuses_what_build_model_refuses() -> None:
    with pytest.raises(ValueError, match="depth"):
        count_parameters(_spec("resnet20", "bn", depth=3), in_channels=3)
    with pytest.raises(ValueError, match="divisible"):
        count_parameters(_spec("convblock", "gn:8", width=12), in_channels=3)
    with pytest.raises(ValueError, match="in_channels"):
        count_parameters(_spec("lenet", "bn"), in_channels=0)
