"""The GroupNorm the small-batch advice suggests fits the model: a group count that divides
every norm layer's channels with more than one channel per group (not a fixed "gn:8", which on
LeNet's 8-channel first conv is InstanceNorm), in validate's warnings and telemetry's gap
warning alike; and split BN's batch check of ``normcore.validate``."""

from __future__ import annotations

import pytest
import torch

from normcore.data.check import DataCheckError
from normcore.models import build_model
from normcore.spec import JobSpec, ModelSpec
from normcore.telemetry import gap_warning, gn_advice, gn_groups_for, norm_layers
from normcore.validate import check_norm_batch, validate_spec

LARGE_GAP = {
    "val_loss_eval": 2.0,
    "val_loss_batch": 0.5,
    "gap_loss": 1.5,
    "val_accuracy_eval": 0.4,
    "val_accuracy_batch": 0.9,
    "gap_accuracy": 0.5,
}


def _channels(arch: str) -> list[int]:
    with torch.device("meta"):
        model = build_model(ModelSpec(arch=arch, norm="bn"), in_channels=1)
    return [int(m.num_features) for _, m in norm_layers(model)]


def test_group_count_for_lenet_and_resnet20() -> None:
    assert sorted(set(_channels("lenet"))) == [8, 16, 64, 128]
    assert gn_groups_for(_channels("lenet")) == 4  # 8 channels: gn:8 would be one per group
    assert sorted(set(_channels("resnet20"))) == [16, 32, 64]
    assert gn_groups_for(_channels("resnet20")) == 8  # gn:16 would be one per group at 16
    assert gn_groups_for([64, 128]) == 32
    assert gn_groups_for([6, 12]) == 2
    assert gn_groups_for([3, 64]) is None  # nothing divides 3 with two channels per group
    assert gn_groups_for([0]) is None and gn_groups_for([]) is None
    assert gn_advice([8, 16]) == "gn:4" and gn_advice([2]) is None


@pytest.mark.parametrize(("arch", "groups"), [("lenet", 4), ("resnet20", 8)])
def test_validate_advice_fits_and_the_advised_norm_does_not_warn(arch: str, groups: int) -> None:
    spec = {"model": {"arch": arch, "norm": "bn"}, "data": {"dataset": "digits", "batch_size": 4}}
    report = validate_spec(spec)
    small = next(w for w in report.warnings if w.code == "bn_small_batch")
    assert f'"gn:{groups}", "ln"' in small.message
    spec["model"]["norm"] = f"gn:{groups}"
    advised = validate_spec(spec)
    assert "gn_one_channel_per_group" not in {w.code for w in advised.warnings}
    assert min(r.channels_per_group or 0 for r in advised.layers) >= 2


def test_in_small_map_advice_fits_resnet20() -> None:
    spec = {"model": {"arch": "resnet20", "norm": "in"}, "data": {"dataset": "digits"}}
    tiny = next(w for w in validate_spec(spec).warnings if w.code == "in_small_map")
    assert '"gn:8"/"ln"' in tiny.message


def test_gap_warning_suggests_the_group_count_of_the_records() -> None:
    lenet = [
        {"layer": f"n{i}", "source": "running", "channels": c, "var_drift": 0.1}
        for i, c in enumerate(_channels("lenet"))
    ]
    warning = gap_warning(LARGE_GAP, 4, lenet)
    assert warning is not None
    assert 'GroupNorm (model.norm "gn:4")' in warning["message"]
    assert "gn:8" not in warning["message"]
    odd = [{"layer": "n", "source": "running", "channels": 3}]
    warning = gap_warning(LARGE_GAP, 4, odd)
    assert warning is not None and 'LayerNorm (model.norm "ln")' in warning["message"]


def test_check_norm_batch() -> None:
    def spec(norm: str, batch: int) -> JobSpec:
        return JobSpec.model_validate(
            {
                "model": {"arch": "lenet", "norm": norm},
                "data": {"dataset": "digits", "batch_size": batch},
            }
        )

    with pytest.raises(DataCheckError) as err:
        check_norm_batch(spec("split_bn:3", 32))
    assert err.value.loc == ("data", "batch_size")
    assert "30 or 33" in str(err.value)
    check_norm_batch(spec("split_bn:4", 32))
    check_norm_batch(spec("ghost_bn:12", 32))  # no constraint: a last virtual batch of 8
    check_norm_batch(spec("bn", 31))
