"""model.stem_padding: the first conv's padding in lenet and the resnets (docs/experiments.md §3).

The default ("zeros") must build the network of before the field existed: same state-dict keys,
same outputs. "none" is a valid conv (the map shrinks by kernel_size - 1), "reflect" and
"replicate" are nn.Conv2d padding modes; other archs refuse anything but "zeros" at submit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from normcore.models import build_model, lenet, resnet18, resnet20
from normcore.spec import JobSpec, ModelSpec
from tests.harness import Stack

# (builder, input channels, input side, path of the stem conv, kernel size, stride)
STEMS: dict[str, tuple[Any, int, int, str, int, int]] = {
    "lenet": (lenet, 1, 16, "conv1.conv", 5, 1),
    "resnet20": (resnet20, 3, 16, "stem.conv", 3, 1),
    "resnet18": (resnet18, 3, 32, "stem.0.conv", 7, 2),
}


def _stem(model: nn.Module, path: str) -> nn.Conv2d:
    conv = model.get_submodule(path)
    assert isinstance(conv, nn.Conv2d)
    return conv


def _build(arch: str, **kwargs: Any) -> nn.Module:
    builder, channels, _, _, _, _ = STEMS[arch]
    torch.manual_seed(0)
    return builder(in_channels=channels, num_classes=4, width=8, **kwargs).double().eval()


@pytest.mark.parametrize("arch", sorted(STEMS))
def test_default_is_todays_network(arch: str) -> None:
    """stem_padding="zeros" (given or not) keeps the keys, the padding and the outputs."""
    _, channels, side, path, kernel, _ = STEMS[arch]
    before, zeros = _build(arch), _build(arch, stem_padding="zeros")
    assert list(before.state_dict()) == list(zeros.state_dict())
    conv = _stem(zeros, path)
    assert conv.padding == (kernel // 2, kernel // 2) and conv.padding_mode == "zeros"
    x = torch.randn(3, channels, side, side, dtype=torch.float64)
    assert torch.equal(before(x), zeros(x))


@pytest.mark.parametrize("arch", sorted(STEMS))
@pytest.mark.parametrize("mode", ["none", "reflect", "replicate"])
def test_stem_conv_pads_as_asked(arch: str, mode: str) -> None:
    """The stem conv's attributes and output size, its output against F.conv2d on a padded
    input (float64), and the same state-dict keys as the default (checkpoints stay loadable)."""
    _, channels, side, path, kernel, stride = STEMS[arch]
    model = _build(arch, stem_padding=mode)
    assert list(model.state_dict()) == list(_build(arch).state_dict())
    conv = _stem(model, path)
    pad = 0 if mode == "none" else kernel // 2
    assert conv.padding == (pad, pad)
    assert conv.padding_mode == ("zeros" if mode == "none" else mode)
    x = torch.randn(2, channels, side, side, dtype=torch.float64)
    out = conv(x)
    expected_side = (side + 2 * pad - kernel) // stride + 1
    assert out.shape == (2, 8, expected_side, expected_side)
    padded = x if mode == "none" else F.pad(x, (pad,) * 4, mode=mode)
    torch.testing.assert_close(out, F.conv2d(padded, conv.weight, conv.bias, stride=stride))
    assert model(x).shape == (2, 4)  # the later layers adapt to the smaller map


def test_lenet_valid_stem_sizes() -> None:
    """LeNet with a valid first conv: 16x16 -> 12x12 conv1 maps; an 8x8 digit still fits."""
    model = _build("lenet", stem_padding="none")
    seen: list[tuple[int, ...]] = []
    model.conv1.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape)))
    model(torch.zeros(1, 1, 16, 16, dtype=torch.float64))
    model(torch.zeros(1, 1, 8, 8, dtype=torch.float64))
    assert seen == [(1, 8, 12, 12), (1, 8, 4, 4)]


def test_build_model_passes_the_spec_field() -> None:
    """build_model hands model.stem_padding to the arch; the spec's default is "zeros"."""
    assert ModelSpec(arch="lenet").stem_padding == "zeros"
    model = build_model(ModelSpec(arch="resnet20", stem_padding="replicate"), in_channels=3)
    assert _stem(model, "stem.conv").padding_mode == "replicate"


@pytest.mark.parametrize("arch", ["convblock", "vgg11", "edsr"])
def test_other_archs_refuse_it(arch: str) -> None:
    """Archs that cannot honour the field refuse it in the spec, naming the field."""
    with pytest.raises(ValidationError, match=r"model\.stem_padding"):
        ModelSpec(arch=arch, stem_padding="none")
    ModelSpec(arch=arch, stem_padding="zeros")  # the default is always fine
    with pytest.raises(ValidationError):
        ModelSpec(arch="lenet", stem_padding="circular")


def test_submit_answers_422_naming_the_field(sqlite_stack: Stack) -> None:
    """POST /jobs with stem_padding on vgg11 is a 422 that names model.stem_padding; lenet's
    passes POST /jobs/validate (the same checks as a submit, without training a job)."""
    spec: dict[str, Any] = {
        "model": {"arch": "vgg11", "num_classes": 4, "stem_padding": "none"},
        "data": {"dataset": "brightness", "num_samples": 64},
        "epochs": 1,
    }
    with sqlite_stack.client() as client:
        refused = client.post("/jobs", json=spec)
        assert refused.status_code == 422, refused.text
        assert "model.stem_padding" in refused.text
        spec["model"]["arch"] = "lenet"
        JobSpec.model_validate(spec)
        accepted = client.post("/jobs/validate", json=spec)
        assert accepted.status_code == 200, accepted.text
