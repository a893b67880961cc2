"""``normcore train``: a local run prints checkpoints and metrics; bad specs exit 2 with field messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from normcore.checkpoint import verify_checkpoint
from normcore.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_train_example_prints_checkpoints_and_final_metrics(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    result = runner.invoke(
        app, ["train", str(REPO / "examples" / "lenet-digits.json"), "--workdir", str(workdir)]
    )
    assert result.exit_code == 0, result.output
    last = workdir / "checkpoints" / "epoch-0005"
    assert f"checkpoint {last} " in result.stdout
    verify_checkpoint(last)
    line = next(x for x in result.stdout.splitlines() if x.startswith("final metrics: "))
    metrics = json.loads(line.removeprefix("final metrics: "))
    assert metrics["val_accuracy"] > 0.9
    assert set(metrics) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert "succeeded: 5 epochs" in result.stdout
    assert "amp 'bf16' ignored on cpu" in result.stdout  # log lines are shown


def test_resume_option_continues_from_a_checkpoint(tmp_path: Path) -> None:
    spec = json.loads((REPO / "examples" / "lenet-digits.json").read_text())
    spec["epochs"] = 2
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    workdir = tmp_path / "run"
    first = runner.invoke(app, ["train", str(path), "--workdir", str(workdir)])
    assert first.exit_code == 0, first.output
    spec["epochs"] = 3
    path.write_text(json.dumps(spec))
    ckpt = workdir / "checkpoints" / "epoch-0002"
    second = runner.invoke(
        app, ["train", str(path), "--workdir", str(workdir), "--resume", str(ckpt)]
    )
    assert second.exit_code == 0, second.output
    assert f"resumed from {ckpt}" in second.stdout
    assert "succeeded: 3 epochs" in second.stdout


def test_bad_spec_exits_2_with_one_line_per_field(tmp_path: Path) -> None:
    spec = {
        "model": {"arch": "resnet21", "norm": "bn"},
        "data": {"dataset": "digits", "batch_size": 32},
        "optim": {"lr": -1},
        "epochs": 2,
        "colour": "blue",
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    result = runner.invoke(app, ["train", str(path), "--workdir", str(tmp_path / "run")])
    assert result.exit_code == 2
    err = result.stderr
    assert "Traceback" not in result.output
    lines = [x.strip() for x in err.splitlines()]
    assert any(x.startswith("model.arch: Input should be") and "resnet20" in x for x in lines)
    assert "optim.lr: Input should be greater than 0" in lines
    assert "colour: Extra inputs are not permitted" in lines
    assert not (tmp_path / "run").exists()


def test_batch_size_one_with_bn_explains_why(tmp_path: Path) -> None:
    path = tmp_path / "bs1.yaml"
    path.write_text("model: {arch: lenet, norm: bn}\ndata: {dataset: digits, batch_size: 1}\n")
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert "spec: batch_size 1 with norm 'bn'" in result.stderr


def test_resume_latest_of_a_finished_run_shows_no_epoch_past_the_end(tmp_path: Path) -> None:
    spec = {
        "name": "done",
        "model": {"arch": "lenet", "norm": "bn", "num_classes": 4},
        "data": {"dataset": "synthetic", "num_samples": 40, "image_size": 16, "batch_size": 8},
        "epochs": 2,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    workdir = tmp_path / "run"
    first = runner.invoke(app, ["train", str(path), "--workdir", str(workdir)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(
        app, ["train", str(path), "--workdir", str(workdir), "--resume", "latest"]
    )
    assert again.exit_code == 0, again.output
    assert "already complete" in again.stdout and "nothing to train" in again.stdout
    assert "epoch 3/2" not in again.output, again.output
    assert "succeeded: 2 epochs" in again.stdout


def test_bad_yaml_spec_is_one_line_error(tmp_path: Path) -> None:
    for name, text in (
        ("syntax.yaml", "model:\n  arch: lenet\n  norm: [1,2\n"),
        ("tag.yaml", "seed: !!python/object/apply:os.system ['echo pwned']\n"),
    ):
        path = tmp_path / name
        path.write_text(text)
        result = runner.invoke(app, ["train", str(path), "--workdir", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot read job spec {path}: ")
        assert "invalid YAML" in lines[0] and "Traceback" not in result.output


def test_unreadable_spec_exits_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert runner.invoke(app, ["train", str(broken)]).exit_code == 2
    missing = runner.invoke(app, ["train", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert "cannot read job spec" in missing.stderr


def test_a_spec_that_does_not_fit_the_data_exits_1_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "few-classes.json"
    path.write_text(
        json.dumps({"model": {"arch": "lenet", "num_classes": 3}, "data": {"dataset": "digits"}})
    )
    result = runner.invoke(app, ["train", str(path), "--workdir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "num_classes to at least 10" in result.stderr
    assert "Traceback" not in result.output


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"arch": "lenet"}, "data": {"dataset": "nope"}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "normcore.cli", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.dataset: Input should be" in proc.stderr
