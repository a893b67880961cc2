"""The one table of norm kinds, the twins' torch.nn classes, all-or-nothing surgery, hostile specs.

- ``normcore.registry``: every part (factory, conversions, folding, syncing, statistics) reads it,
  and a kind added with ``register_norm`` takes part in all of them; no import cycle.
- Every twin is an instance of its torch.nn class, with torch's constructor, state dict and repr.
- convert_norm, convert_sync_norm, freeze_norm and unfreeze_norm build every replacement before
  touching the model: a failure half way leaves it exactly as it was.
- parse_norm refuses hostile strings with a ValueError (never RecursionError or MemoryError).
"""

from __future__ import annotations

import ast
import copy
import inspect
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm as TorchBatchNorm

import normcore
import normcore.layers as L
from normcore import convert, factory, registry
from normcore.convert import (
    NormConversionWarning,
    convert_norm,
    convert_sync_norm,
    freeze_norm,
    unfreeze_norm,
)
from normcore.factory import make_norm, norm_uses_batch_stats, register_norm, validate_norm
from normcore.fuse import fuse_conv_bn
from normcore.layers import syncbn
from normcore.stats import norm_stats, recalibrate_bn

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_registry():
    """Restore the table after a test that registers kinds."""
    table, lookup = dict(registry._REGISTRY), dict(registry._LOOKUP)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(table)
    registry._LOOKUP.clear()
    registry._LOOKUP.update(lookup)
    registry._index_classes()


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("kind", registry.kinds(), ids=lambda k: k.name)
def test_each_kind_builds_its_own_classes(kind: registry.NormKind) -> None:
    """What make_norm builds for a kind is one of the kind's classes, for every dims it takes,
    and the class maps back to the kind with the dims it is built for."""
    for dims in kind.dims:
        layer = make_norm(kind.name, 8, dims=dims)
        if kind.name == "none":
            assert type(layer) is L.Identity and registry.kind_of(layer) is None
            continue
        own = registry.kind_of(layer)  # "rms" builds RMSNorm2d, of kind "rms2d", for maps
        assert own is kind or (own is not None and own.family == kind.family), (kind.name, dims)
        assert type(layer) in own.classes
        assert registry.class_dims(layer) in (dims, None)


def test_flags_of_the_builtin_kinds() -> None:
    def names(flag: str) -> set[str]:
        return {k.name for k in registry.kinds() if getattr(k, flag)}

    assert names("batch_stats") == {"bn", "sync_bn", "ghost_bn", "brn", "split_bn", "evo_b0"}
    assert names("foldable") == {"bn", "sync_bn", "ghost_bn", "brn", "split_bn", "frozen_bn"}
    assert names("syncable") == {"bn", "sync_bn"}
    assert names("recalibratable") == {
        "bn",
        "sync_bn",
        "ghost_bn",
        "brn",
        "split_bn",
        "in",
        "evo_b0",
    }
    assert {k.name for k in registry.kinds() if not k.per_channel} == {"lrn", "none"}
    # torch.nn's twins are of the same kinds as normcore's
    for twin, name in [
        (nn.BatchNorm1d, "bn"),
        (nn.SyncBatchNorm, "sync_bn"),
        (nn.InstanceNorm3d, "in"),
        (nn.GroupNorm, "gn"),
        (nn.LayerNorm, "ln"),
        (nn.RMSNorm, "rms"),
        (nn.LocalResponseNorm, "lrn"),
    ]:
        assert registry.kind_of(twin).name == name
    # a subclass is of no kind by its exact class, of its base's kind by its MRO
    sub = type("MyBN", (nn.BatchNorm2d,), {})
    assert registry.kind_of(sub) is None and registry.kind_of(sub, exact=False).name == "bn"


def test_sync_batchnorm_converts_what_the_table_calls_syncable() -> None:
    """SyncBatchNorm.convert_sync_batchnorm lives in the layers, which cannot import the table:
    its built-in rule is the table's syncable classes, and the table installs its own rule."""
    table = registry.kind_classes(lambda k: k.syncable)
    assert table == syncbn._PLAIN_BATCH_NORMS
    assert syncbn.is_syncable is registry.is_syncable


def test_no_import_cycle_through_the_norm_modules() -> None:
    """layers import nothing of normcore above them (no registry, factory or convert), so no
    import cycle runs through the norm modules (the layers' SyncBatchNorm used to import
    normcore.convert back)."""
    for path in sorted((ROOT / "normcore" / "layers").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                target = node.module
            elif isinstance(node, ast.Import):
                target = node.names[0].name
            else:
                continue
            if target.startswith("normcore"):
                assert target.startswith(("normcore.layers", "normcore._surgery")), (
                    f"{path.name} imports {target}"
                )
    surgery = ast.parse((ROOT / "normcore" / "_surgery.py").read_text())
    assert not [
        n
        for n in ast.walk(surgery)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("normcore")
    ]
    for name in ("factory", "convert", "fuse", "stats"):
        source = (ROOT / "normcore" / f"{name}.py").read_text()
        for other in ("factory", "convert", "fuse", "stats"):
            if other != name and f"from normcore.{other} import" in source:
                back = (ROOT / "normcore" / f"{other}.py").read_text()
                assert f"from normcore.{name} import" not in back, (name, other)
    registry_imports = {
        n.module
        for n in ast.walk(ast.parse((ROOT / "normcore" / "registry.py").read_text()))
        if isinstance(n, ast.ImportFrom)
    }
    assert not registry_imports & {f"normcore.{m}" for m in ("factory", "convert", "fuse", "stats")}


# --------------------------------------------------------------------------- twins

TWINS = [
    (L.BatchNorm1d, nn.BatchNorm1d, (8,)),
    (L.BatchNorm2d, nn.BatchNorm2d, (8,)),
    (L.BatchNorm3d, nn.BatchNorm3d, (8,)),
    (L.InstanceNorm1d, nn.InstanceNorm1d, (8,)),
    (L.InstanceNorm2d, nn.InstanceNorm2d, (8,)),
    (L.InstanceNorm3d, nn.InstanceNorm3d, (8,)),
    (L.GroupNorm, nn.GroupNorm, (2, 8)),
    (L.LayerNorm, nn.LayerNorm, ((4, 8),)),
    (L.RMSNorm, nn.RMSNorm, ((4, 8),)),
    (L.LocalResponseNorm, nn.LocalResponseNorm, (3,)),
    (L.SyncBatchNorm, nn.SyncBatchNorm, (8,)),
]


@pytest.mark.parametrize(
    ("ours", "theirs", "args"), TWINS, ids=lambda v: getattr(v, "__name__", "")
)
def test_twin_is_torch_class_with_its_signature_state_and_repr(ours, theirs, args) -> None:
    """Every twin is an instance of its torch.nn class (SyncBatchNorm of torch's _BatchNorm:
    DDP refuses nn.SyncBatchNorm on CPU, where normcore's syncs over gloo); the constructor takes
    torch's parameters with torch's defaults (normcore's extras are keyword-only after them);
    the state dict and repr are torch's."""
    layer = ours(*args)
    if ours is L.SyncBatchNorm:
        assert isinstance(layer, TorchBatchNorm) and not isinstance(layer, nn.SyncBatchNorm)
    else:
        assert isinstance(layer, theirs)
    mine = inspect.signature(ours.__init__).parameters
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert name in mine, f"{ours.__name__} lacks {name}"
        assert mine[name].default == p.default, (name, mine[name].default, p.default)
        assert mine[name].kind == p.kind, name
    extra = [n for n in mine if n not in inspect.signature(theirs.__init__).parameters]
    assert all(mine[n].kind is inspect.Parameter.KEYWORD_ONLY for n in extra), extra
    reference = theirs(*args)
    assert list(layer.state_dict()) == list(reference.state_dict())
    for key, value in reference.state_dict().items():
        assert layer.state_dict()[key].shape == value.shape
    layer.load_state_dict(reference.state_dict())
    reference.load_state_dict(layer.state_dict())
    if ours is not L.GroupNorm:  # ours adds bias=..., as BatchNorm's repr does
        assert repr(layer) == repr(reference)


def test_bn_derived_extras_are_batchnorm2d_and_frozen_is_not() -> None:
    for layer in (L.GhostBatchNorm2d(4), L.BatchRenorm2d(4), L.SplitBatchNorm2d(4)):
        assert isinstance(layer, nn.BatchNorm2d)
    frozen = L.FrozenBatchNorm2d(4)
    assert not isinstance(frozen, TorchBatchNorm)  # as torchvision's: torch's BN tools skip it
    assert repr(frozen) == "FrozenBatchNorm2d(4, eps=1e-05)"


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d (torchvision 0.2x), which is not installed here."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def test_frozen_batchnorm_and_torchvisions_exchange_state_and_agree() -> None:
    ours, theirs = L.FrozenBatchNorm2d(4, eps=1e-3), TorchvisionFrozenBatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        for t in theirs.buffers():
            t.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())  # num_batches_tracked filled in
    theirs.load_state_dict(ours.state_dict())  # num_batches_tracked dropped by torchvision's
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), theirs(x))
    assert repr(ours) == repr(theirs).replace("Torchvision", "")
    torch.testing.assert_close(torch.jit.script(ours)(x), theirs(x))
    for tool in (
        torch.optim.swa_utils.update_bn,
        lambda _, m: nn.SyncBatchNorm.convert_sync_batchnorm(m),
    ):
        model = nn.Sequential(copy.deepcopy(ours))
        tool([x], model)
        assert type(model[0]) is L.FrozenBatchNorm2d
        torch.testing.assert_close(model[0].running_var, ours.running_var)


# --------------------------------------------------------------------------- your own kind


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward is BatchNorm2d's (so registering it as foldable,
    syncable and recalibratable is true)."""


class ActBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass that also applies ReLU: normcore must not treat it as BN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


def net(norm: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm, nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    return model


def test_registered_kind_takes_part_everywhere(clean_registry) -> None:
    register_norm(
        "scaled_bn",
        batch_stats=True,
        foldable=True,
        syncable=True,
        recalibratable=True,
        dims=(2,),
    )(ScaledBN)
    kind = normcore.norm_kind("scaled-bn")
    assert kind.family == "batch" and registry.kind_of(ScaledBN) is kind
    # factory
    layer = make_norm("scaled_bn(momentum=0.3)", 4)
    assert type(layer) is ScaledBN and layer.momentum == 0.3
    assert norm_uses_batch_stats("scaled_bn") and norm_uses_batch_stats(ScaledBN)
    # conversions: known, so converted without a warning, momentum carried (same family)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)
        model = convert_norm(net(L.BatchNorm2d(4, momentum=0.2)), to="scaled_bn")
        assert type(model[1]) is ScaledBN and model[1].momentum == 0.2
        assert type(convert_norm(net(ScaledBN(4)), to="gn:2")[1]) is L.GroupNorm
        assert type(convert_sync_norm(net(ScaledBN(4)))[1]) is L.SyncBatchNorm
        assert type(L.SyncBatchNorm.convert_sync_batchnorm(net(ScaledBN(4)))[1]) is L.SyncBatchNorm
        assert type(freeze_norm(net(ScaledBN(4)))[1]) is L.FrozenBatchNorm2d
        # folding
        model = net(ScaledBN(4)).eval()
        x = torch.randn(2, 3, 6, 6)
        fused = fuse_conv_bn(model)
        assert isinstance(fused[1], nn.Identity)
        torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    # statistics and recalibration
    model = net(ScaledBN(4))
    assert [r["kind"] for r in norm_stats(model)] == ["ScaledBN"]
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    recalibrate_bn(model, batches)
    with torch.no_grad():
        exact = torch.stack([model[0](b).mean((0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(model[1].running_mean, exact, rtol=1e-5, atol=1e-5)


def test_registered_kind_without_flags_is_left_alone_where_they_are_needed(clean_registry) -> None:
    register_norm("act_bn", batch_stats=True, dims=(2,))(ActBN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormConversionWarning)  # known: no warning anywhere
        model = net(ActBN(4)).eval()
        assert type(convert_sync_norm(copy.deepcopy(model))[1]) is ActBN
        assert type(fuse_conv_bn(model)[1]) is ActBN  # not foldable: its ReLU would be lost
        assert type(freeze_norm(copy.deepcopy(model))[1]) is ActBN
        assert type(convert_norm(copy.deepcopy(model), to="gn:2")[1]) is L.GroupNorm
    with pytest.warns(UserWarning, match="ActBN"):
        recalibrate_bn(net(ActBN(4)), [torch.randn(4, 3, 6, 6)])


def test_unregistered_subclass_is_warned_about() -> None:
    for tool in (convert_norm, convert_sync_norm, freeze_norm):
        with pytest.warns(NormConversionWarning, match="ActBN"):
            model = tool(net(ActBN(4)))
        assert type(model[1]) is ActBN


def test_register_norm_checks_its_flags(clean_registry) -> None:
    with pytest.raises(ValueError, match=r"foldable.*classes=\(MyNorm,\)"):
        register_norm("fn_norm", foldable=True)(lambda c: nn.BatchNorm2d(c))
    with pytest.raises(ValueError, match="dims must be some of 1, 2, 3"):
        register_norm("bad_dims", dims=(4,))


# --------------------------------------------------------------------------- all or nothing


def snapshot(model: nn.Module) -> tuple:
    modules = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    params = [(name, id(p), p.requires_grad) for name, p in model.named_parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, params, state


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    modules, params, state = snapshot(model)
    assert modules == before[0]
    assert params == before[1]
    assert list(state) == list(before[2])
    for key, value in state.items():
        assert value.dtype == before[2][key].dtype and torch.equal(value, before[2][key]), key


def two_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 1),
        L.BatchNorm2d(64, eps=1e-3, momentum=0.01),
        nn.Conv2d(64, 72, 1),
        nn.BatchNorm2d(72, eps=1e-3, momentum=0.01),
        nn.Sequential(nn.Conv2d(72, 8, 1), L.BatchNorm2d(8)),
    )


def test_convert_norm_that_fails_half_way_changes_nothing() -> None:
    model = two_bn_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="gn:32 needs num_channels divisible by 32, got 72"):
        convert_norm(model, to="gn:32")  # 64 works, 72 does not
    assert_unchanged(model, before)


def test_convert_sync_norm_that_fails_half_way_changes_nothing(monkeypatch) -> None:
    model = two_bn_model()
    before = snapshot(model)
    built = []
    original = L.SyncBatchNorm.from_batchnorm.__func__

    def second_fails(cls, bn, process_group=None):
        built.append(bn)
        if len(built) == 2:
            raise RuntimeError("cannot build this one")
        return original(cls, bn, process_group)

    monkeypatch.setattr(L.SyncBatchNorm, "from_batchnorm", classmethod(second_fails))
    for tool in (convert_sync_norm, L.SyncBatchNorm.convert_sync_batchnorm):
        built.clear()
        with pytest.raises(RuntimeError, match="cannot build this one"):
            tool(model)
        assert_unchanged(model, before)


def test_freeze_norm_that_fails_half_way_changes_nothing() -> None:
    model = two_bn_model()
    model[4][1] = L.BatchNorm2d(8, track_running_stats=False)  # nothing to freeze
    before = snapshot(model)
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_norm(model)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_norm(model, stats=True, affine=False)
    assert_unchanged(model, before)


def test_unfreeze_norm_that_fails_half_way_changes_nothing(monkeypatch) -> None:
    """Two layers freeze_norm froze (their originals come back only at the commit) and one
    FrozenBatchNorm2d from a checkpoint whose BatchNorm2d cannot be built: nothing changes, and
    the originals the frozen layers hold are not moved to the model's new dtype either."""
    model = two_bn_model()
    model[4][1] = L.FrozenBatchNorm2d(8)  # as loaded from a checkpoint: no original
    model = freeze_norm(model).double()
    originals = [
        m.__dict__[convert._UNFROZEN]
        for m in model.modules()
        if isinstance(m, L.FrozenBatchNorm2d) and convert._UNFROZEN in m.__dict__
    ]
    assert len(originals) == 2
    before = snapshot(model)

    def boom(*args, **kwargs):
        raise RuntimeError("cannot build a BatchNorm2d")

    monkeypatch.setattr(convert, "BatchNorm2d", boom)
    with pytest.raises(RuntimeError, match="cannot build a BatchNorm2d"):
        unfreeze_norm(model)
    assert_unchanged(model, before)
    assert all(o.running_mean.dtype == torch.float32 for o in originals)
    monkeypatch.undo()
    model = unfreeze_norm(model)
    assert [type(m) for m in model.modules() if "BatchNorm" in type(m).__name__] == [
        L.BatchNorm2d,
        nn.BatchNorm2d,
        L.BatchNorm2d,
    ]
    assert all(o.running_mean.dtype == torch.float64 for o in originals)


def test_conversions_still_share_aliased_layers() -> None:
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), shared, nn.Sequential(shared))
    converted = convert_norm(model, to="gn:2")
    assert converted[1] is converted[2][0] and type(converted[1]) is L.GroupNorm


# --------------------------------------------------------------------------- hostile specs


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("bn(momentum=" + "-" * 5000 + "1)", r"5014 characters long; at most 256"),
        ("1+" * 100000, r"200000 characters long; at most 256"),
        ("bn(momentum=" + "-" * 40 + "1)", r"nests 40 unary operators in a row; at most 8"),
        ("bn(eps=" + "(" * 30 + "1" + ")" * 30 + ")", r"nests 30 brackets; at most 8"),
        ("bn(eps=[" + "1," * 110 + "1])", r"syntax nodes in its arguments; at most 100"),
        ("gn:" + "(" * 200, r"characters long|nests"),
    ],
)
def test_hostile_specs_are_value_errors(spec: str, pattern: str) -> None:
    for call in (factory.parse_norm, validate_norm, lambda s: make_norm(s, 8)):
        with pytest.raises(ValueError, match=pattern):
            call(spec)
    with pytest.raises(ValueError, match=pattern):
        validate_norm({"type": spec})


def test_hostile_spec_in_a_job_spec_is_a_validation_error() -> None:
    from pydantic import ValidationError

    from normcore.spec import JobSpec

    base = {"model": {"arch": "lenet", "norm": "bn"}, "data": {"dataset": "digits"}, "epochs": 1}
    JobSpec.model_validate(base)
    for spec in ("bn(momentum=" + "-" * 5000 + "1)", "1+" * 100000):
        with pytest.raises(ValidationError, match="characters long"):
            JobSpec.model_validate({**base, "model": {"arch": "lenet", "norm": spec}})


def test_ordinary_specs_still_parse() -> None:
    assert make_norm("bn(momentum=0.01, eps=1e-3)", 4).eps == 1e-3
    assert make_norm("l2(scale=-1.5)", 4).scale == -1.5
    assert make_norm("gn:2(eps=1e-6)", 4).num_groups == 2
    assert make_norm("bn(momentum=None)", 4).momentum is None
    spec = "bn(momentum=0.01, eps=1e-3, affine=True, track_running_stats=True, bias=True)"
    assert make_norm(spec, 4).momentum == 0.01


class MatrixScaleNorm(nn.Module):
    """A registered norm whose learnable scale is 2-d (out of the optimizer's ndim rule)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(num_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


def test_registered_kind_gets_no_weight_decay(clean_registry) -> None:
    from normcore.engine.optim import param_groups

    register_norm("matrix_scale", batch_stats=False)(MatrixScaleNorm)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MatrixScaleNorm(4))
    decay, no_decay = param_groups(model, 5e-4)
    assert any(p is model[1].scale for p in no_decay["params"])
    assert [p for p in decay["params"]] == [model[0].weight]
