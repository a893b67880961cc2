"""Round-two norms in the models and job specs: the conv knob, and training through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import normcore
import normcore.layers as L
from normcore.checkpoint import load_model
from normcore.models import build_model, convblock, resnet20
from normcore.models.blocks import use_conv
from normcore.spec import JobSpec, ModelSpec

NEW_NORMS = {
    "rms": L.RMSNorm2d,
    "rms2d": L.RMSNorm2d,
    "lrn": L.LocalResponseNorm,
    "frn": L.FilterResponseNorm2d,
    "evo_b0": L.EvoNorm2dB0,
    "evo_s0:4": L.EvoNorm2dS0,
    "split_bn:2": L.SplitBatchNorm2d,
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster and does not spin on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("norm", list(NEW_NORMS))
def test_each_new_norm_trains_a_step_in_a_model(norm: str) -> None:
    torch.manual_seed(0)
    model = convblock(in_channels=3, num_classes=4, norm=norm, width=8, depth=2)
    assert any(type(m) is NEW_NORMS[norm] for m in model.modules())
    x = torch.randn(8, 3, 8, 8)
    loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 4)
    loss.backward()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert torch.isfinite(loss) and first.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_conv_std_knob_standardizes_every_conv() -> None:
    spec = ModelSpec(arch="resnet20", norm="gn:8", conv="std")
    model = build_model(spec, in_channels=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is L.StdConv2d for m in convs)
    plain = build_model(ModelSpec(arch="resnet20", norm="gn:8"), in_channels=3)
    assert all(type(m) is nn.Conv2d for m in plain.modules() if isinstance(m, nn.Conv2d))
    # same keys: a standard checkpoint loads into the std model and vice versa
    assert list(model.state_dict()) == list(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    # same weights, standardized kernels: a different function
    assert not torch.allclose(model(x), plain(x))
    with pytest.raises(ValueError, match="conv"):
        ModelSpec(arch="resnet20", conv="weird")
    with pytest.raises(ValueError, match="conv must be one of standard, std"):
        use_conv(resnet20(), "weird")


def test_use_conv_shares_parameters() -> None:
    model = resnet20(norm="gn:8")
    first = model.stem.conv
    weight = first.weight
    use_conv(model, "std")
    assert type(model.stem.conv) is L.StdConv2d and model.stem.conv.weight is weight
    assert use_conv(model, "standard") is model


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["frn", "evo_s0:8"])
def test_job_spec_trains_resnet20_on_digits(norm: str, tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "name": f"resnet20-{norm}-digits",
            "model": {"arch": "resnet20", "norm": norm, "num_classes": 10},
            "data": {"dataset": "digits", "batch_size": 32},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": "cosine"},
            "epochs": 1,
            "seed": 0,
        }
    )
    result = normcore.train(spec, tmp_path)
    assert result.status == "succeeded" and result.epochs_completed == 1
    # one epoch already learns (0.84 with frn, 0.94 with evo_s0:8 here); chance is 0.1
    assert result.metrics["val_accuracy"] > 0.6, result.metrics
    kind = L.FilterResponseNorm2d if norm == "frn" else L.EvoNorm2dS0
    model = load_model(result.checkpoints[-1].path)
    norms = [m for m in model.modules() if type(m) is kind]
    assert len(norms) == 19  # stem + 2 per block x 9 blocks
    if norm == "evo_s0:8":
        assert all(m.num_groups == 8 for m in norms)
