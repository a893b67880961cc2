"""torch's own tools on normcore models, against torch.nn's result on the same weights.

One test per tool of issue 18 item 3: ``torch.fx.symbolic_trace``,
``torch.fx.experimental.optimization.fuse``, ``torch.export.export``, ``torch.jit.script``,
``torch.optim.swa_utils.update_bn``, ``torch.func.replace_all_batch_norm_modules_`` + ``vmap``,
``nn.SyncBatchNorm.convert_sync_batchnorm`` (and normcore's own). Each runs on every model of
``normcore.models`` built with every norm the factory accepts, where the tool applies (export
and script, seconds a model, on the subsets EXPORT_CASES and SCRIPT_CASES that still cover every
model and every norm; NORMCORE_TEST_TOOLS_ALL=1 runs script on the full product). The
reference is the same model with every normcore twin swapped for its torch.nn class holding the
same parameters and buffers (``as_torch``); for a norm without a torch.nn twin it is the
untransformed normcore model.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import fx, nn
from torch.func import replace_all_batch_norm_modules_, vmap
from torch.fx.experimental.optimization import fuse as fx_fuse
from torch.optim.swa_utils import update_bn

import normcore.layers as L
from normcore._surgery import replace_modules
from normcore.models import MODEL_BUILDERS
from normcore.registry import available_norms

NORMS = available_norms()  # the built-in kinds
ARCHS = list(MODEL_BUILDERS)
SIDE = {"vgg11": 32, "resnet18": 64}  # five stride-2 stages: InstanceNorm needs > 1x1

# normcore class -> the torch.nn class holding the same state (torch.nn's twin; for
# BatchRenorm2d and GhostBatchNorm2d the BatchNorm2d they equal where a test uses them so)
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    L.BatchNorm1d: nn.BatchNorm1d,
    L.BatchNorm2d: nn.BatchNorm2d,
    L.BatchNorm3d: nn.BatchNorm3d,
    L.SyncBatchNorm: nn.SyncBatchNorm,
    L.InstanceNorm1d: nn.InstanceNorm1d,
    L.InstanceNorm2d: nn.InstanceNorm2d,
    L.InstanceNorm3d: nn.InstanceNorm3d,
    L.GroupNorm: nn.GroupNorm,
    L.LayerNorm: nn.LayerNorm,
    L.RMSNorm: nn.RMSNorm,
    L.LocalResponseNorm: nn.LocalResponseNorm,
}
AS_BN = {L.BatchRenorm2d: nn.BatchNorm2d, L.GhostBatchNorm2d: nn.BatchNorm2d}
BN_KINDS = ("bn", "sync_bn", "ghost_bn", "brn", "split_bn")  # normcore's _BatchNorm layers


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two, and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(arch: str, norm: str, seed: int = 0) -> nn.Module:
    """A small model with random affine parameters and running statistics."""
    torch.manual_seed(seed)
    kwargs: dict = {"in_channels": 3, "norm": norm, "width": 4}
    if arch == "edsr":
        kwargs.update(scale=2, depth=2)
    else:
        kwargs["num_classes"] = 3
    if arch == "convblock":
        kwargs["depth"] = 2
    model = MODEL_BUILDERS[arch](**kwargs)
    with torch.no_grad():
        for m in model.modules():
            for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
                if name in ("weight", "bias", "tau", "v") and t.dim() == 1:
                    t.uniform_(0.5, 1.5) if name in ("weight", "v") else t.uniform_(-0.5, 0.5)
                elif name == "running_mean":
                    t.uniform_(-0.5, 0.5)
                elif name == "running_var":
                    t.uniform_(0.5, 2.0)
    return model


def inputs(arch: str, n: int = 4, seed: int = 1) -> torch.Tensor:
    side = SIDE.get(arch, 16)
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def as_torch(model: nn.Module, extra: dict | None = None) -> nn.Module:
    """A deep copy of ``model`` whose normcore twins are torch.nn's classes with the same state."""
    table = {**TWINS, **(extra or {})}
    clone = copy.deepcopy(model)

    def swap(m: nn.Module) -> nn.Module | None:
        cls = table.get(type(m))
        if cls is None:
            return None
        twin = cls.__new__(cls)
        twin.__dict__ = m.__dict__  # the copy's own state, now under torch's class
        return twin

    return replace_modules(clone, swap)


def has_twin(model: nn.Module) -> bool:
    return any(type(m) in TWINS for m in model.modules())


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    if a.shape != b.shape or a.dtype != b.dtype or not torch.allclose(a, b, rtol=tol, atol=tol):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)  # the report


def assert_same_state(a: nn.Module, b: nn.Module, tol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        close(sa[key].double(), sb[key].double(), tol)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__module__.startswith("normcore.layers")]


# --------------------------------------------------------------------------- torch.fx


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_symbolic_trace(arch: str, norm: str) -> None:
    """Every model with every norm traces; norms are call_module leaves as torch.nn's are; the
    traced module computes what the model does, buffer updates in training included."""
    model = build(arch, norm).eval()
    x = inputs(arch)
    gm = fx.symbolic_trace(model)
    leaves = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    norms = {
        name
        for name, m in model.named_modules()
        if m in norm_layers(model) and not isinstance(m, L.Identity | L.StdConv2d)
    }
    for name in norms:
        if not any(name.startswith(outer + ".") for outer in norms):  # not inside another
            assert name in leaves, f"{name} is not a call_module node"
    close(gm(x), model(x))
    if has_twin(model):
        close(gm(x), fx.symbolic_trace(as_torch(model))(x))
    # training mode: the call_module nodes run the layers, which update their buffers
    eager = build(arch, norm).train()
    traced = fx.symbolic_trace(build(arch, norm).train())
    close(traced(x), eager(x))
    assert_same_state(traced, eager)


def test_symbolic_trace_of_a_lone_layer() -> None:
    """A twin traced on its own is traced through torch.nn's computation (as torch.nn's layers
    are); a layer without one says to trace a model holding it."""
    x = torch.randn(2, 4, 3, 3)
    for layer in (
        L.GroupNorm(2, 4),
        L.BatchNorm2d(4).eval(),
        L.LayerNorm(3),
        L.RMSNorm(3),
        L.LocalResponseNorm(2),
        L.FrozenBatchNorm2d(4),
    ):
        close(fx.symbolic_trace(layer)(x), layer(x))
    for layer in (L.FilterResponseNorm2d(4), L.LayerNorm2d(4), L.GhostBatchNorm2d(4).eval()):
        with pytest.raises(fx.proxy.TraceError, match=r"Trace a model that holds it"):
            fx.symbolic_trace(layer)
    close(fx.symbolic_trace(nn.Sequential(L.LayerNorm2d(4)))(x), L.LayerNorm2d(4)(x))
    with pytest.raises(fx.proxy.TraceError, match=r"training mode"):
        fx.symbolic_trace(L.BatchNorm2d(4))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fx_fuse_runs_and_keeps_outputs(arch: str, norm: str) -> None:
    """torch.fx's fuse folds only torch's exact classes: it runs on normcore models and keeps
    their outputs (normcore.fuse_conv_bn is the folding path); torch.nn's twin model fused by it
    gives the same output."""
    model = build(arch, norm).eval()
    x = inputs(arch)
    with torch.no_grad():
        fused = fx_fuse(model)
        close(fused(x), model(x))
        if has_twin(model):
            close(fused(x), fx_fuse(as_torch(model))(x), 1e-4)


# --------------------------------------------------------------------------- export, script

# export takes a second or more per model: every norm on one model, every model on two norms
EXPORT_CASES = [("convblock", norm) for norm in NORMS] + [
    (arch, norm) for arch in ARCHS if arch != "convblock" for norm in ("bn", "gn")
]


@pytest.mark.parametrize(("arch", "norm"), EXPORT_CASES)
def test_torch_export(arch: str, norm: str) -> None:
    """torch.export.export traces the model (dynamo: the eager forward on fake tensors) and the
    exported program computes the model's output, as torch.nn's twin model's does."""
    model = build(arch, norm).eval()
    x = inputs(arch, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, (x,))
    out = ep.module()(x)
    close(out, model(x))
    if has_twin(model):
        close(out, as_torch(model)(x))


SCRIPTED = ("bn", "sync_bn", "gn", "in", "ln", "rms", "rms2d", "lrn", "frozen_bn", "none")
# scripting takes seconds a model (resnet18 the most): every scripted norm on two models (plain
# conv blocks; residual blocks with shortcuts), every model on two norms; the full product runs
# with NORMCORE_TEST_TOOLS_ALL=1
SCRIPT_CASES = (
    [(arch, norm) for arch in ARCHS for norm in SCRIPTED]
    if os.environ.get("NORMCORE_TEST_TOOLS_ALL")
    else [(arch, norm) for arch in ("convblock", "resnet20") for norm in SCRIPTED]
    + [
        (arch, norm)
        for arch in ARCHS
        if arch not in ("convblock", "resnet20")
        for norm in ("bn", "gn")
    ]
)


def test_script_cases_cover_every_model_and_scripted_norm() -> None:
    assert {arch for arch, _ in SCRIPT_CASES} == set(ARCHS)
    assert {norm for _, norm in SCRIPT_CASES} == set(SCRIPTED)


@pytest.mark.parametrize(("arch", "norm"), SCRIPT_CASES)
def test_jit_script_wherever_torch_nn_scripts(arch: str, norm: str) -> None:
    """A model with normcore's twins scripts wherever the same model with torch.nn's does, and
    gives the eager output (LayerNorm2d, RMSNorm2d and FrozenBatchNorm2d script too)."""
    model = build(arch, norm).eval()
    x = inputs(arch, n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            reference = torch.jit.script(as_torch(model))
        except Exception:
            reference = None  # the model itself does not script (LeNet), whatever its norm
        if reference is None and arch == "lenet":
            pytest.skip("LeNet does not script with torch.nn's layers either")
        scripted = torch.jit.script(model)
    close(scripted(x), model(x))
    if reference is not None:
        close(scripted(x), reference(x))
    # the model itself keeps its normcore layers (scripting does not swap them)
    assert all(type(m).__module__.startswith("normcore") for m in norm_layers(model))


def test_scripted_sync_batchnorm_is_eval_batch_norm() -> None:
    """torch.nn's SyncBatchNorm does not script; normcore's does, as an eval-mode BatchNorm (no
    process groups in TorchScript), and refuses training mode instead of skipping the sync."""
    layer = L.SyncBatchNorm(4)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(Exception, match=r"eval mode only"):
        scripted(x)
    scripted.eval()
    close(
        scripted(x),
        nn.functional.batch_norm(
            x,
            layer.running_mean,
            layer.running_var,
            layer.weight,
            layer.bias,
            False,
            0.0,
            layer.eps,
        ),
    )


# --------------------------------------------------------------------------- BN utilities


def loader(arch: str) -> list[torch.Tensor]:
    return [inputs(arch, n=4, seed=10 + i) * 2 + 1 for i in range(3)]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_swa_update_bn(arch: str, norm: str) -> None:
    """torch.optim.swa_utils.update_bn recomputes every normcore batch norm as torch.nn's: the
    running statistics equal those of torch.nn's model on the same weights (BatchRenorm2d and
    GhostBatchNorm2d with one virtual batch update them as BatchNorm2d); it leaves the other
    norms alone, as it leaves their torch.nn twins."""
    if norm == "split_bn":
        pytest.skip("SplitBatchNorm2d: test_swa_update_bn_split checks its per-split formula")
    model = build(arch, norm)
    reference = as_torch(model, AS_BN)
    before = copy.deepcopy(model.state_dict())
    update_bn(loader(arch), model)
    update_bn(loader(arch), reference)
    assert_same_state(model, reference)
    if norm in BN_KINDS:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert any(k.endswith("running_mean") for k in changed)


def test_swa_update_bn_split() -> None:
    """SplitBatchNorm2d under update_bn: each BN (main and auxiliary) ends with the average of
    the batch means (and unbiased variances) of its own split over the loader."""
    model = build("convblock", "split_bn")
    seen: dict[nn.Module, list[torch.Tensor]] = {}
    splits = [m for m in model.modules() if isinstance(m, L.BatchNorm2d)]
    hooks = [
        m.register_forward_pre_hook(lambda m, args: seen.setdefault(m, []).append(args[0]))
        for m in splits
    ]
    update_bn(loader("convblock"), model)
    for h in hooks:
        h.remove()
    for m in splits:
        # SplitBatchNorm2d's own forward calls BatchNorm2d.forward on split 0 without a hook
        xs = (
            seen[m]
            if not isinstance(m, L.SplitBatchNorm2d)
            else [x[: len(x) // 2] for x in seen[m]]
        )
        mean = torch.stack([x.mean((0, 2, 3)) for x in xs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in xs]).mean(0)
        close(m.running_mean, mean)
        close(m.running_var, var)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_replace_all_batch_norm_modules_then_vmap(arch: str, norm: str) -> None:
    """functorch's recipe for vmap over training-mode BN works on normcore's batch norms: they
    lose their running statistics and vmap over groups of four samples gives what calling the
    model on each group gives, and what torch.nn's model gives."""
    if norm == "evo_b0":
        pytest.skip("EvoNorm2dB0 is no _BatchNorm: it keeps running_var, which vmap cannot update")
    model = replace_all_batch_norm_modules_(build(arch, norm).train())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.running_mean is None and not m.track_running_stats
    side = SIDE.get(arch, 16)
    x = torch.randn(2, 4, 3, side, side, generator=torch.Generator().manual_seed(3))
    out = vmap(model, randomness="same")(x)
    close(out, torch.stack([model(g) for g in x]))
    if has_twin(model):
        close(out, vmap(as_torch(model, AS_BN), randomness="same")(x))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_convert_sync_batchnorm(arch: str, norm: str) -> None:
    """torch's nn.SyncBatchNorm.convert_sync_batchnorm turns every normcore batch norm (a
    _BatchNorm) into torch's SyncBatchNorm with the same parameters and buffers, as it does for
    torch.nn's model, and leaves the other norms; eval outputs are kept."""
    model = build(arch, norm).eval()
    x = inputs(arch)
    expected = model(x)
    params = {id(p) for p in model.parameters()}
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in converted.modules():
        assert not isinstance(m, L.batchnorm._BatchNorm)  # all became torch's
    assert {id(p) for p in converted.parameters()} == params
    close(converted(x), expected)
    if has_twin(build(arch, norm)):
        reference = nn.SyncBatchNorm.convert_sync_batchnorm(as_torch(build(arch, norm).eval()))
        close(converted(x), reference(x))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", ARCHS)
def test_normcore_convert_sync_batchnorm(arch: str, norm: str) -> None:
    """normcore's SyncBatchNorm.convert_sync_batchnorm gives normcore's SyncBatchNorm for the
    plain batch norms (torch.nn's too), sharing their tensors, and leaves GhostBN, BatchRenorm
    and SplitBN their own training rule."""
    model = build(arch, norm).eval()
    reference = as_torch(model)
    x = inputs(arch)
    expected = model(x)
    before = {name: type(m) for name, m in model.named_modules()}
    params = {id(p) for p in model.parameters()}
    converted = L.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in converted.named_modules():
        if before.get(name) in (L.BatchNorm2d, L.BatchNorm1d, L.SyncBatchNorm):
            assert type(m) is L.SyncBatchNorm, name
        elif name in before and norm in ("ghost_bn", "brn", "split_bn"):
            assert type(m) is before[name]
    assert {id(p) for p in converted.parameters()} == params
    close(converted(x), expected)
    torch_converted = L.SyncBatchNorm.convert_sync_batchnorm(reference)  # from torch.nn's
    assert not any(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) for m in torch_converted.modules())
    close(torch_converted(x), expected)
