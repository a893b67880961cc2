"""ONNX export: every model and every norm make_norm accepts run in onnxruntime like eager.

Each case goes through ``normcore.export_onnx`` (torch's dynamo exporter, conv-BN folded) into a
real file that a real onnxruntime session runs; the number it returns is checked against an
independent onnxruntime run here. Norm affine parameters and running statistics are made
non-trivial first, so folding has something to get wrong.
"""

from __future__ import annotations

import functools
import importlib
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import normcore
from normcore.models import MODEL_BUILDERS, lenet
from normcore.onnx_export import export_onnx, onnx_max_abs_diff

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# every name make_norm accepts, with the argument the name needs
NORM_SPECS = {
    "bn": "bn",
    "sync_bn": "sync_bn",
    "gn": "gn:4",
    "ln": "ln",
    "in": "in",
    "rms": "rms",
    "rms2d": "rms2d",
    "lrn": "lrn:3",
    "frozen_bn": "frozen_bn",
    "brn": "brn",
    "ghost_bn": "ghost_bn:2",
    "split_bn": "split_bn:2",
    "frn": "frn",
    "evo_b0": "evo_b0",
    "evo_s0": "evo_s0:4",
    "l2": "l2",
    "none": "none",
}
# (input shape, builder kwargs): the smallest sizes each arch takes. vgg11 pools 5 times; resnet18's
# imagenet stem and stages leave 2x2 maps at 64x64 (instance statistics need more than one value)
ARCHS: dict[str, tuple[tuple[int, ...], dict[str, int]]] = {
    "convblock": ((2, 3, 8, 8), {"width": 8, "depth": 2}),
    "lenet": ((2, 1, 8, 8), {"width": 8}),
    "vgg11": ((2, 3, 32, 32), {"width": 8}),
    "resnet20": ((2, 3, 8, 8), {"width": 8}),
    "resnet18": ((2, 3, 64, 64), {"width": 8}),
    "edsr": ((2, 3, 8, 8), {"width": 8, "depth": 2}),
}
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _fast_exporter() -> Iterator[None]:
    """One intra-op thread, and torchlib's op table built once instead of once per export.

    torch's exporter asks onnxscript for its ATen->ONNX function table on every call, and
    onnxscript re-parses the source of ~500 functions each time (about a second). The table
    is the same every time, so it is cached for this module; the exported graphs do not change.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:  # a private module: if onnxscript moves it, the tests only run slower
        apis = importlib.import_module("onnxscript._framework_apis.torch_2_5")
    except ImportError:
        apis = None
    original = getattr(apis, "get_torchlib_ops", None)
    if original is not None:
        apis.get_torchlib_ops = functools.cache(original)
    yield
    if original is not None:
        apis.get_torchlib_ops = original
    torch.set_num_threads(before)


def _build(arch: str, norm: str) -> tuple[nn.Module, torch.Tensor]:
    """A model with trained-looking norms (running stats from 3 batches, affine != 1, 0)."""
    shape, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    if arch == "edsr":
        model = MODEL_BUILDERS[arch](in_channels=shape[1], scale=2, norm=norm, **kwargs)
    else:
        model = MODEL_BUILDERS[arch](in_channels=shape[1], num_classes=5, norm=norm, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__module__.startswith("normcore.layers"):
                for name in ("weight", "bias"):
                    p = getattr(m, name, None)
                    if isinstance(p, torch.Tensor) and p.is_floating_point():
                        center = 1.0 if name == "weight" else 0.0
                        p.copy_(center + 0.5 * (torch.rand_like(p) - 0.5))
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape[1:]) * 2 + 0.5)
    return model.eval(), torch.randn(shape)


def test_norm_list_is_every_name_make_norm_accepts() -> None:
    """A norm added to the factory must be added here (and to the README's ONNX column).

    Asked in a fresh interpreter: other test modules register norms of their own in this one.
    """
    code = "import normcore; print(' '.join(normcore.available_norms()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    builtin = set(out.stdout.split())
    assert builtin == set(NORM_SPECS), (
        f"ONNX tests differ from make_norm: {builtin ^ set(NORM_SPECS)}"
    )


# norms that export_onnx folds into the conv before them
FOLDED = {"bn", "sync_bn", "frozen_bn", "brn", "ghost_bn", "split_bn"}


def _cases() -> list[tuple[str, str]]:
    """(arch, norm) pairs: every norm in lenet and in one of the other five models.

    lenet holds a norm at conv sites and at fully connected ones (BatchNorm1d, LayerNorm);
    the other models take the norms in turn, the folded ones first, so each model meets 3-4
    norms, at least one of them folded into its convs (residual blocks with pad or projection
    shortcuts, pixel shuffle, 2x2 maps). torch's exporter costs about 2.5 s of CPU a model here,
    so the full 6 x 17 product runs only with NORMCORE_TEST_ONNX_ALL=1 (it passes: all 102
    within 1e-4).
    """
    norms = sorted(NORM_SPECS)
    if os.environ.get("NORMCORE_TEST_ONNX_ALL"):
        return [(arch, norm) for arch in sorted(ARCHS) for norm in norms]
    others = [arch for arch in sorted(ARCHS) if arch != "lenet"]
    turns = [n for n in norms if n in FOLDED] + [n for n in norms if n not in FOLDED]
    return [("lenet", norm) for norm in norms] + [
        (others[i % len(others)], norm) for i, norm in enumerate(turns)
    ]


def test_cases_cover_every_model_and_norm() -> None:
    cases = _cases()
    assert {arch for arch, _ in cases} == set(ARCHS)
    for norm in NORM_SPECS:
        assert len({arch for arch, n in cases if n == norm}) >= 2
    for arch in ARCHS:
        assert {n for a, n in cases if a == arch} & FOLDED, f"{arch} folds no norm"
        assert {n for a, n in cases if a == arch} - FOLDED, f"{arch} has only folded norms"


@pytest.mark.parametrize(("arch", "norm"), _cases())
def test_every_model_and_norm_matches_eager(arch: str, norm: str, tmp_path: Path) -> None:
    model, x = _build(arch, NORM_SPECS[norm])
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # onnxscript's own
        diff = export_onnx(model, x, path, optimize=False)
    assert diff < TOL, f"{arch} x {norm}: onnxruntime is {diff:.2e} from eager"
    # the number is onnxruntime's distance from eager, measured here on fresh inputs too
    with torch.no_grad():
        fresh = torch.randn_like(x)
        again = onnx_max_abs_diff(path, fresh, model(fresh))
    assert max(again) < TOL
    assert diff == diff  # not NaN


def test_fold_bn_removes_batch_norm_and_keeps_outputs(tmp_path: Path) -> None:
    """fold_bn=True: no BatchNormalization node left; the model itself is not changed.

    Both files are written with the exporter's optimizer off (it folds BN into Conv by itself);
    the default options (optimizer on) are checked on the same model for the number only.
    """
    import onnx

    model, x = _build("lenet", "bn")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = export_onnx(model, x, tmp_path / "folded.onnx", optimize=False)
    plain = export_onnx(model, x, tmp_path / "plain.onnx", fold_bn=False, optimize=False)
    default = export_onnx(model, x, tmp_path / "default.onnx")
    assert folded < TOL and plain < TOL and default < TOL

    def ops(name: str) -> list[str]:
        return [node.op_type for node in onnx.load(str(tmp_path / name)).graph.node]

    assert "BatchNormalization" not in ops("folded.onnx")
    assert ops("plain.onnx").count("BatchNormalization") == 4  # two conv, two linear norms
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, normcore.BatchNorm2d) for m in model.modules()) == 2


def test_public_name_and_several_outputs(tmp_path: Path) -> None:
    """normcore.export_onnx is the same function; tuple outputs are compared element-wise."""
    assert normcore.export_onnx is export_onnx

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.norm = normcore.make_norm("bn", 4)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.norm(self.conv(x))
            return y, y.mean((2, 3)) * 1000.0

    model = TwoHeads().eval()
    with torch.no_grad():
        model.norm.running_var.fill_(4.0)
    diff = normcore.export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "two.onnx")
    assert 0.0 <= diff < 1e-3


def test_training_mode_and_bad_examples_are_refused(tmp_path: Path) -> None:
    model = lenet(norm="bn")
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "m.onnx")
    model.eval()
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(model, torch.randn(2, 1, 8, 8, dtype=torch.bfloat16), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match="Tensor"):
        export_onnx(model, [[1.0]], tmp_path / "m.onnx")  # type: ignore[arg-type]
    assert not (tmp_path / "m.onnx").exists()


def test_exporter_failure_names_the_norm_layers(tmp_path: Path) -> None:
    """A layer torch cannot export: the error says which normcore norms the model holds."""

    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = normcore.make_norm("gn:2", 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(x)
            return y * 2 if y.sum() > 0 else y - 1  # Python control flow on a value

    with pytest.raises(RuntimeError, match="GroupNorm"):
        export_onnx(Untraceable().eval(), torch.randn(2, 4, 3, 3), tmp_path / "u.onnx")


def test_half_example_runs_and_float64_says_onnxruntime_cannot(tmp_path: Path) -> None:
    """float16 checks in onnxruntime (to half's precision); float64 has no onnxruntime Conv."""
    model, x = _build("lenet", "bn")
    half = export_onnx(model.half(), x.half(), tmp_path / "half.onnx", optimize=False)
    assert half < 1e-2
    with pytest.raises(RuntimeError, match="onnxruntime cannot run it"):
        export_onnx(model.double(), x.double(), tmp_path / "double.onnx", optimize=False)
    assert (tmp_path / "double.onnx").stat().st_size > 0
