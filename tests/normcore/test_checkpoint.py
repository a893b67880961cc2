"""Checkpoint folders: plain-torch loading, verification, pruning, atomic writes, round trips."""

from __future__ import annotations

import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import normcore
import normcore.checkpoint as ckpt_mod
from normcore.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
)
from normcore.data import build_data
from normcore.spec import JobSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


SPEC: dict[str, Any] = {
    "name": "lenet-digits",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 64},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "epochs": 3,
    "seed": 3,
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}


# tests of the `trained` run share a worker under pytest-xdist --dist loadgroup
pytestmark = pytest.mark.xdist_group("checkpoint-trained")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> normcore.TrainResult:
    return normcore.train(SPEC, tmp_path_factory.mktemp("trained"))


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 5, padding=2, bias=False),
            norm=nn.BatchNorm2d(c_out),
            act=nn.ReLU(),
        )
    )


class _FeatureBN(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n)


class ReferenceLeNet(nn.Module):
    """normcore's lenet(norm="bn", width=8) written with torch.nn layers only, same names."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv_block(in_channels, 8)
        self.conv2 = _conv_block(8, 16)
        self.fc1 = nn.Linear(16 * 25, 128, bias=False)
        self.norm1 = _FeatureBN(128)
        self.fc2 = nn.Linear(128, 64, bias=False)
        self.norm2 = _FeatureBN(64)
        self.fc3 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = F.adaptive_avg_pool2d(x, (5, 5)).flatten(1)
        x = F.relu(self.norm1.norm(self.fc1(x)))
        x = F.relu(self.norm2.norm(self.fc2(x)))
        return self.fc3(x)


def test_plain_torch_model_loads_the_checkpoint_and_reproduces_val_accuracy(
    trained: normcore.TrainResult,
) -> None:
    path = trained.checkpoints[-1].path
    state = load_file(str(path / "model.safetensors"))
    assert any(k.endswith("running_mean") for k in state)
    assert any(k.endswith("num_batches_tracked") for k in state)
    model = ReferenceLeNet()
    model.load_state_dict(state, strict=True)
    model.eval()

    meta = json.loads((path / "meta.json").read_text())
    spec = JobSpec.model_validate(meta["spec"])
    bundle = build_data(spec.data, seed=spec.seed)
    correct = 0
    with torch.no_grad():
        for x, y in bundle.val_batches(256):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct / bundle.num_val == pytest.approx(meta["metrics"]["val_accuracy"], abs=1e-12)
    assert meta["metrics"]["val_accuracy"] > 0.9


def test_load_model_rebuilds_the_network_in_eval_mode(trained: normcore.TrainResult) -> None:
    path = trained.checkpoints[-1].path
    rng_before = torch.get_rng_state()
    model = normcore.load_model(path)
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert not model.training
    reference = ReferenceLeNet()
    reference.load_state_dict(load_file(str(path / "model.safetensors")))
    reference.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_meta_json_records_spec_versions_and_every_file(trained: normcore.TrainResult) -> None:
    info = trained.checkpoints[-1]
    meta = read_meta(info.path)
    assert meta["epoch"] == 3 and meta["step"] == info.step
    assert meta["spec"] == JobSpec.model_validate(SPEC).model_dump(mode="json")
    assert meta["in_channels"] == 1 and meta["num_classes"] == 10
    assert meta["task"] == "classification"
    assert set(meta["versions"]) == {"normcore", "torch", "python"}
    listed = set(meta["files"])
    on_disk = {p.name for p in info.path.iterdir()} - {"meta.json"}
    assert listed == on_disk
    assert on_disk == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "state.json",
    }
    assert info.sha256 == meta["files"]["model.safetensors"]["sha256"]
    assert info.bytes == (info.path / "model.safetensors").stat().st_size
    assert info.files == {k: v["sha256"] for k, v in meta["files"].items()}
    assert info.to_dict()["path"] == str(info.path)


def test_keep_last_prunes_and_no_temporaries_remain(trained: normcore.TrainResult) -> None:
    root = trained.workdir / "checkpoints"
    assert [p.name for p in list_checkpoints(trained.workdir)] == ["epoch-0002", "epoch-0003"]
    assert sorted(p.name for p in root.iterdir()) == ["epoch-0002", "epoch-0003"]
    assert [c.name for c in trained.checkpoints] == ["epoch-0002", "epoch-0003"]


def _copy(path: Path, dest: Path) -> Path:
    return Path(shutil.copytree(path, dest / path.name))


def test_verify_detects_a_flipped_byte(trained: normcore.TrainResult, tmp_path: Path) -> None:
    path = _copy(trained.checkpoints[-1].path, tmp_path)
    verify_checkpoint(path)
    target = path / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors fails its sha256 check"):
        verify_checkpoint(path)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        normcore.load_model(path)


def test_verify_names_a_missing_or_truncated_file(
    trained: normcore.TrainResult, tmp_path: Path
) -> None:
    path = _copy(trained.checkpoints[-1].path, tmp_path)
    (path / "optimizer.json").unlink()
    with pytest.raises(ValueError, match=r"optimizer\.json is missing"):
        verify_checkpoint(path)
    path2 = _copy(trained.checkpoints[0].path, tmp_path)
    with open(path2 / "rng.safetensors", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"rng\.safetensors has 10 bytes"):
        verify_checkpoint(path2)
    (path2 / "meta.json").unlink()
    with pytest.raises(ValueError, match=r"meta\.json: missing"):
        verify_checkpoint(path2)


def test_latest_valid_checkpoint_skips_corrupt_ones(
    trained: normcore.TrainResult, tmp_path: Path
) -> None:
    for c in trained.checkpoints:
        _copy(c.path, tmp_path)
    (tmp_path / "epoch-0003" / "state.json").write_text("{}")
    lines: list[str] = []
    assert latest_valid_checkpoint(tmp_path, log=lines.append) == tmp_path / "epoch-0002"
    assert len(lines) == 1 and "epoch-0003" in lines[0] and "state.json" in lines[0]
    (tmp_path / "epoch-0002" / "model.safetensors").unlink()
    assert latest_valid_checkpoint(tmp_path) is None


# ------------------------------------------------------------------ save_checkpoint directly


def _tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_optimizer_and_rng_round_trip(tmp_path: Path) -> None:
    model, optimizer = _tiny()
    rng = {"torch": torch.get_rng_state()}
    info = save_checkpoint(
        tmp_path,
        epoch=1,
        step=1,
        model=model,
        optimizer=optimizer,
        rng_tensors=rng,
        state={"custom": [1, 2]},
    )
    loaded = load_checkpoint(info.path)
    assert loaded.epoch == 1 and loaded.step == 1
    assert loaded.state["custom"] == [1, 2]
    assert torch.equal(loaded.rng_tensors["torch"], rng["torch"])
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model_state[key], value)

    _, optimizer2 = _tiny()
    optimizer2.load_state_dict(loaded.optimizer_state)
    saved, restored = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"][0]["lr"] == restored["param_groups"][0]["lr"]
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    # nothing in the folder but safetensors and JSON
    assert {p.suffix for p in info.path.iterdir()} == {".safetensors", ".json"}


def test_keep_last_and_a_replaced_timeline(tmp_path: Path) -> None:
    model, _ = _tiny()
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch=epoch, step=epoch, model=model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0004", "epoch-0005"]
    # a resumed attempt writes epoch 3 again: later epochs belong to the abandoned attempt
    save_checkpoint(tmp_path, epoch=3, step=3, model=model, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0003"]
    # the one just written is never pruned, even with keep_last=1
    save_checkpoint(tmp_path, epoch=4, step=4, model=model, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0004"]


def test_rewriting_an_existing_epoch_replaces_it(tmp_path: Path) -> None:
    model, _ = _tiny()
    first = save_checkpoint(tmp_path, epoch=2, step=2, model=model)
    (first.path / "model.safetensors").write_bytes(b"garbage")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    second = save_checkpoint(tmp_path, epoch=2, step=2, model=model)
    verify_checkpoint(second.path)
    assert second.sha256 != first.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002"]


def test_a_crash_mid_write_leaves_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = _tiny()
    save_checkpoint(tmp_path, epoch=1, step=1, model=model)
    real_write = ckpt_mod._write_file

    def failing_write(path: Path, data: bytes) -> str:
        if path.name == "meta.json":
            raise OSError("disk full")
        return real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, epoch=2, step=2, model=model)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch-0001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001"]  # tmp folder removed
    save_checkpoint(tmp_path, epoch=2, step=2, model=model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001", "epoch-0002"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path: Path) -> None:
    model, _ = _tiny()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".epoch-0007.tmp-{dead_pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".epoch-0008.tmp-{os.getppid()}"
    alive.mkdir()
    save_checkpoint(tmp_path, epoch=1, step=1, model=model)
    assert not stale.exists()
    assert alive.exists()  # another live process may be writing it


def test_lone_model_file_rebuilds_from_its_header(tmp_path: Path) -> None:
    """A downloaded model.safetensors, away from meta.json, loads with load_model alone."""
    from normcore.checkpoint import read_model_header

    spec = {
        "name": "header",
        "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
        "data": {"dataset": "digits", "batch_size": 64},
        "optim": {"lr": 0.05},
        "epochs": 1,
    }
    result = normcore.train(spec, tmp_path / "run")
    folder = result.checkpoints[-1].path
    lone = tmp_path / "download.safetensors"
    shutil.copyfile(folder / "model.safetensors", lone)
    header = read_model_header(lone)
    assert header is not None and header["model"]["arch"] == "lenet"
    assert header["epoch"] == result.epochs_completed
    from_file = normcore.load_model(lone)
    from_folder = normcore.load_model(folder)
    x = torch.randn(4, 1, 8, 8)
    assert not from_file.training
    assert torch.equal(from_file(x), from_folder(x))
    for key, value in from_folder.state_dict().items():
        assert torch.equal(value, from_file.state_dict()[key]), key


def test_lone_file_without_header_is_refused(tmp_path: Path) -> None:
    """A plain safetensors file says what is missing instead of guessing a model."""
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no normcore header"):
        normcore.load_model(plain)
