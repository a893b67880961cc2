"""make_norm, the registry, validate_norm, norm_name and norm_uses_batch_stats."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import normcore
import normcore.layers as L
from normcore import factory
from normcore.factory import (
    available_norms,
    make_norm,
    norm_name,
    norm_uses_batch_stats,
    register_norm,
    validate_norm,
)

BUILTINS = [
    "bn",
    "brn",
    "evo_b0",
    "evo_s0",
    "frn",
    "frozen_bn",
    "ghost_bn",
    "gn",
    "in",
    "l2",
    "ln",
    "lrn",
    "none",
    "rms",
    "rms2d",
    "split_bn",
    "sync_bn",
]


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers names."""
    registry, lookup = dict(factory._REGISTRY), dict(factory._LOOKUP)
    yield
    factory._REGISTRY.clear()
    factory._REGISTRY.update(registry)
    factory._LOOKUP.clear()
    factory._LOOKUP.update(lookup)
    factory.registry._index_classes()  # the class -> kind index follows the table


def test_available_norms_lists_the_builtins() -> None:
    assert available_norms() == BUILTINS


@pytest.mark.parametrize(
    ("spec", "dims", "cls"),
    [
        ("bn", 1, L.BatchNorm1d),
        ("bn", 2, L.BatchNorm2d),
        ("bn", 3, L.BatchNorm3d),
        ("in", 1, L.InstanceNorm1d),
        ("in", 2, L.InstanceNorm2d),
        ("in", 3, L.InstanceNorm3d),
        ("ln", 1, L.LayerNorm),
        ("ln", 2, L.LayerNorm2d),
        ("gn:4", 2, L.GroupNorm),
        ("gn:4", 1, L.GroupNorm),
        ("frozen_bn", 2, L.FrozenBatchNorm2d),
        ("brn", 2, L.BatchRenorm2d),
        ("ghost_bn:16", 2, L.GhostBatchNorm2d),
        ("sync_bn", 2, L.SyncBatchNorm),
        ("sync_bn", 1, L.SyncBatchNorm),
        ("l2", 2, L.L2Norm),
        ("none", 2, L.Identity),
        (None, 2, L.Identity),
    ],
)
def test_each_name_builds_the_right_class(spec, dims, cls) -> None:
    layer = make_norm(spec, 8, dims=dims)
    assert type(layer) is cls
    shape = {1: (4, 8), 2: (4, 8, 3, 3), 3: (4, 8, 2, 2, 2)}[dims]
    if cls is L.InstanceNorm1d:
        shape = (4, 8, 5)
    out = layer(torch.randn(shape))
    assert out.shape == shape


def test_built_layers_have_the_channel_count_and_defaults() -> None:
    assert make_norm("bn", 12).num_features == 12
    assert make_norm("ln", 12).num_channels == 12
    assert make_norm("ln", 12, dims=1).normalized_shape == (12,)
    gn = make_norm("gn:4", 12)
    assert (gn.num_groups, gn.num_channels) == (4, 12)
    assert make_norm("ghost_bn:16", 8).virtual_batch_size == 16
    assert make_norm("ghost_bn", 8).virtual_batch_size == 32
    assert make_norm("l2:10", 8).weight[0].item() == 10.0
    assert make_norm("brn", 8).momentum == 0.01


def test_gn_without_groups_uses_32_or_the_largest_divisor_below() -> None:
    assert make_norm("gn", 64).num_groups == 32
    assert make_norm("gn", 16).num_groups == 16
    assert make_norm("gn", 48).num_groups == 24
    assert make_norm("gn", 7).num_groups == 7


@pytest.mark.parametrize("alias", ["batch", "batchnorm", "BatchNorm", "batch_norm", "BN", "b-n"])
def test_aliases_and_spelling(alias) -> None:
    assert type(make_norm(alias, 4)) is L.BatchNorm2d


@pytest.mark.parametrize(
    ("alias", "cls"),
    [
        ("group:2", L.GroupNorm),
        ("layer", L.LayerNorm2d),
        ("instance", L.InstanceNorm2d),
        ("frozen", L.FrozenBatchNorm2d),
        ("identity", L.Identity),
        ("ghost:4", L.GhostBatchNorm2d),
    ],
)
def test_other_aliases(alias, cls) -> None:
    assert type(make_norm(alias, 4)) is cls


def test_string_arguments() -> None:
    bn = make_norm("bn(momentum=0.01, eps=1e-3)", 4)
    assert (bn.momentum, bn.eps) == (0.01, 1e-3)
    assert make_norm("bn(momentum=None)", 4).momentum is None
    bn = make_norm(" bn ( affine = False , track_running_stats=False ) ", 4)
    assert bn.weight is None and bn.running_mean is None
    gn = make_norm("gn:2(eps=1e-6)", 4)
    assert (gn.num_groups, gn.eps) == (2, 1e-6)
    assert make_norm("gn(num_groups=2)", 4).num_groups == 2
    assert make_norm("gn(2)", 4).num_groups == 2
    brn = make_norm("brn(r_max=2, d_max=1, warmup_steps=0)", 4)
    assert (brn.r_max, brn.d_max, brn.warmup_steps) == (2.0, 1.0, 0)


def test_dict_spec_and_overrides() -> None:
    bn = make_norm({"type": "batch", "momentum": 0.01}, 4)
    assert type(bn) is L.BatchNorm2d and bn.momentum == 0.01
    gn = make_norm({"name": "gn:2", "eps": 1e-4}, 4)
    assert (gn.num_groups, gn.eps) == (2, 1e-4)
    # keyword overrides replace what the spec says
    assert make_norm("bn(momentum=0.5)", 4, momentum=0.2).momentum == 0.2
    assert make_norm("bn", 4, dtype=torch.float64).weight.dtype == torch.float64


def test_class_and_callable_specs() -> None:
    assert type(make_norm(nn.BatchNorm2d, 4)) is nn.BatchNorm2d
    assert make_norm(nn.BatchNorm2d, 4, momentum=0.3).momentum == 0.3
    layer = make_norm(functools.partial(nn.GroupNorm, 2), 4)
    assert isinstance(layer, nn.GroupNorm) and layer.num_groups == 2
    assert type(make_norm(lambda c: nn.LayerNorm(c), 4)) is nn.LayerNorm
    with pytest.raises(ValueError, match=r"unknown keyword 'momentun'.*momentum"):
        make_norm(nn.BatchNorm2d, 4, momentun=0.1)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"unknown norm 'bnn'; valid: bn, brn, evo_b0, .*did you mean 'bn'"
    ):
        make_norm("bnn", 8)
    with pytest.raises(
        ValueError, match=r"unknown norm 'whatever'; valid: bn, brn, evo_b0, evo_s0, frn, frozen_bn"
    ):
        validate_norm("whatever")


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("gn:8", r"gn:8 needs num_channels divisible by 8, got 20"),
        ("bn(momentun=0.1)", r"unknown keyword 'momentun'; accepted: affine, bias, .*momentum"),
        ("bn:3", r"'bn' takes no positional argument"),
        ("bn(momentum=2)", r"momentum must be a number in \[0, 1\] or None, got 2"),
        ("bn(eps=-1)", r"eps must be a positive number"),
        ("bn(affine='yes')", r"affine must be true or false"),
        ("bn(eps=__import__('os'))", r"not a literal"),
        ("bn(momentum=0.1", r"cannot parse"),
        ("gn:0", r"num_groups must be an integer >= 1"),
        ("gn:2.5", r"num_groups must be an integer"),
        ("ghost_bn:1", r"virtual_batch_size must be an integer >= 2"),
        ("brn(r_max=0.5)", r"r_max must be a number >= 1"),
        ("ln(momentum=0.1)", r"unknown keyword 'momentum'; accepted: bias, .*eps"),
        ({"momentum": 0.1}, r"needs exactly one of 'type' or 'name'"),
        ({"type": "bn", "name": "bn"}, r"needs exactly one of 'type' or 'name'"),
        (42, r"must be a name, a dict, a class or a callable"),
    ],
)
def test_bad_arguments(spec, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        make_norm(spec, 20)


def test_dims_errors() -> None:
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        make_norm("bn", 8, dims=4)
    with pytest.raises(ValueError, match=r"'frozen_bn' supports dims 2, got dims=1"):
        make_norm("frozen_bn", 8, dims=1)
    with pytest.raises(ValueError, match=r"'ln' supports dims 1, 2"):
        make_norm("ln", 8, dims=3)
    with pytest.raises(ValueError, match="num_channels must be a positive int"):
        make_norm("bn", 0)


def test_validate_norm_checks_without_building(monkeypatch) -> None:
    for spec in ["bn", "gn:8", "bn(momentum=0.01)", {"type": "batch"}, "sync_bn", "none"]:
        assert validate_norm(spec) is None
    # nothing is built: make the builder explode and validate still passes
    entry = factory._REGISTRY["bn"]

    def boom(*args, **kwargs):
        raise AssertionError("built")

    monkeypatch.setitem(
        factory._REGISTRY, "bn", factory.NormEntry(**{**vars(entry), "builder": boom})
    )
    validate_norm("bn(eps=1e-3)")
    for bad in ["bnn", "bn(momentun=1)", "gn:x(", "gn:0"]:
        with pytest.raises(ValueError):
            validate_norm(bad)
    # divisibility needs the channel count, which validate_norm takes optionally
    validate_norm("gn:8")
    with pytest.raises(ValueError, match="divisible by 8, got 20"):
        validate_norm("gn:8", num_channels=20)


def test_norm_uses_batch_stats_and_norm_name() -> None:
    for spec in ["bn", "batch", "bn(track_running_stats=False)", "brn", "ghost_bn:8", "sync_bn"]:
        assert norm_uses_batch_stats(spec), spec
    for spec in ["gn:8", "ln", "in", "frozen_bn", "l2", "none", None]:
        assert not norm_uses_batch_stats(spec), spec
    assert norm_uses_batch_stats(nn.BatchNorm2d)
    assert norm_uses_batch_stats(L.GhostBatchNorm2d)
    assert not norm_uses_batch_stats(L.FrozenBatchNorm2d)
    assert not norm_uses_batch_stats(nn.GroupNorm)
    assert norm_name("group_norm:8") == "gn"
    assert norm_name({"type": "Batch", "momentum": 0.1}) == "bn"
    assert norm_name(None) == "none"
    assert norm_name(nn.GroupNorm) == "GroupNorm"


def test_register_norm_class(clean_registry) -> None:
    @register_norm("scaled", aliases=("scale_norm",), arg="factor")
    class Scaled(nn.Module):
        """Multiplies by a constant."""

        def __init__(self, num_channels: int, factor: float = 2.0) -> None:
            super().__init__()
            self.num_channels, self.factor = num_channels, factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    assert "scaled" in available_norms()
    layer = make_norm("scale_norm:3", 4)
    assert isinstance(layer, Scaled) and layer.factor == 3
    assert make_norm({"type": "scaled", "factor": 5}, 4).factor == 5
    assert make_norm(Scaled, 4).factor == 2.0
    assert norm_name(Scaled) == "scaled"
    assert not norm_uses_batch_stats("scaled")
    validate_norm("scaled(factor=1.5)")
    with pytest.raises(ValueError, match=r"unknown keyword 'eps'; accepted: factor"):
        make_norm("scaled(eps=1)", 4)
    # names are unique
    with pytest.raises(ValueError, match="already names"):
        register_norm("scale-norm")(Scaled)
    # it works through the top-level package as well
    assert normcore.make_norm("scaled", 4).factor == 2.0


def test_register_norm_function_with_dims(clean_registry) -> None:
    @register_norm("my_bn", batch_stats=True)
    def my_bn(num_channels: int, dims: int = 2, momentum: float = 0.1) -> nn.Module:
        return [nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d][dims - 1](
            num_channels, momentum=momentum
        )

    assert type(make_norm("my_bn", 4, dims=3)) is nn.BatchNorm3d
    assert make_norm("my_bn(momentum=0.3)", 4).momentum == 0.3
    assert norm_uses_batch_stats("MyBN")
    with pytest.raises(ValueError, match="takes no positional argument"):
        make_norm("my_bn:2", 4)


def test_register_norm_rejects_bad_names() -> None:
    with pytest.raises(ValueError, match="norm name"):
        register_norm("bad name!")
    with pytest.raises(ValueError, match="already names 'bn'"):
        register_norm("batch")(nn.BatchNorm2d)
