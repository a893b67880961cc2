"""``normcore train SPEC``: train a job spec locally with a live progress bar.

``app`` is a Typer app with the ``train`` command; ``service.cli`` mounts it into the single
``normcore`` console script. ``python -m normcore.cli train SPEC`` works without the service.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from normcore.checkpoint import CheckpointInfo
from normcore.engine import Callback, MetricRow, TrainingDiverged
from normcore.spec import JobSpec, load_spec
from normcore.specfile import SpecFileError

__all__ = ["app", "format_validation_error", "main", "train_command"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train normalized CNNs.")


@app.callback()
def _group() -> None:
    """normcore: normalization layers, normalized CNNs and their training engine."""


def format_validation_error(error: ValidationError) -> list[str]:
    """One line per problem, ``field.path: message``, for people rather than tracebacks."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return lines


class _ProgressCallback(Callback):
    """Drives a rich progress bar from metric rows and prints log lines above it."""

    def __init__(self, progress: Progress, console: Console) -> None:
        self.progress, self.console = progress, console
        self.task: Any = None
        self.epochs = 0
        self.train: dict[str, float] = {}
        self.val: dict[str, float] = {}

    def on_train_start(self, info: dict[str, Any]) -> None:
        self.epochs = info["epochs"]
        if info["start_epoch"] >= self.epochs:  # resumed from the last epoch: no bar (the
            return  # engine's log says the run is already complete), never "epoch 6/5"
        self.task = self.progress.add_task(
            f"epoch {info['start_epoch'] + 1}/{self.epochs}",
            total=info["total_steps"],
            completed=info["start_step"],
            stats="",
        )

    def on_metrics(self, row: MetricRow) -> None:
        if self.task is None:
            return
        if row.split == "val":
            self.val = row.values
        elif row.split == "train":  # not the telemetry's "gap" rows (no loss in them)
            self.train = row.values
        stats = []
        if self.train:
            stats.append(f"loss {self.train['loss']:.4f}")
        if "val_accuracy" in self.val:
            stats.append(f"val_acc {self.val['val_accuracy']:.4f}")
        elif "val_psnr" in self.val:
            stats.append(f"val_psnr {self.val['val_psnr']:.2f}")
        if self.train:
            stats.append(f"{self.train['samples_per_s']:.0f} samples/s")
        self.progress.update(
            self.task,
            completed=row.step,
            description=f"epoch {row.epoch}/{self.epochs}",
            stats="  ".join(stats),
        )

    def on_log(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)


def _default_workdir(spec: JobSpec) -> Path:
    return Path("runs") / (re.sub(r"[^A-Za-z0-9._+-]+", "_", spec.name) or "job")


@app.command("train")
def train_command(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Job spec, .json or .yaml.")],
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", help="Checkpoints and train.log; default runs/<spec name>."),
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Folder file datasets are read from.")
    ] = None,
    resume: Annotated[
        str | None,
        typer.Option("--resume", help="Checkpoint folder to continue from, or 'latest'."),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Override resources.device: auto, cpu, cuda.")
    ] = None,
) -> None:
    """Train SPEC locally; print the checkpoints and final metrics."""
    from normcore.engine import train

    err = Console(stderr=True, soft_wrap=True)
    try:
        spec = load_spec(spec_path)
    except SpecFileError as exc:
        err.print(f"error: cannot read job spec {spec_path}: {exc}", markup=False)
        raise typer.Exit(2) from None
    except ValidationError as exc:
        err.print(f"invalid job spec {spec_path}:", markup=False)
        for line in format_validation_error(exc):
            err.print(f"  {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    except (OSError, ValueError, yaml.YAMLError) as exc:  # unreadable, bad JSON/YAML
        err.print(f"cannot read job spec {spec_path}: {exc}", markup=False)
        raise typer.Exit(2) from None

    console = Console(soft_wrap=True)
    workdir = workdir or _default_workdir(spec)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            result = train(
                spec,
                workdir,
                [_ProgressCallback(progress, console)],
                resume=resume,
                data_root=data_root,
                device=device,
            )
    except TrainingDiverged as exc:
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    except ValueError as exc:  # the spec does not fit the data, a corrupt checkpoint, ...
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    except ImportError as exc:  # a dataset whose package is in an extra (digits: normcore[data])
        if "normcore[" not in str(exc):
            raise
        err.print(f"error: {exc}", markup=False)
        raise typer.Exit(2) from None

    console.print(
        f"{result.status}: {result.epochs_completed} epochs, {result.global_step} steps "
        f"in {result.duration_s:.1f}s, workdir {result.workdir}",
        markup=False,
    )
    for ckpt in result.checkpoints:
        console.print(_checkpoint_line(ckpt), markup=False, highlight=False)
    console.print("final metrics: " + json.dumps(result.metrics, sort_keys=True), markup=False)


def _checkpoint_line(ckpt: CheckpointInfo) -> str:
    return (
        f"checkpoint {ckpt.path} (epoch {ckpt.epoch}, step {ckpt.step}, sha256 {ckpt.sha256[:12]})"
    )


def main() -> None:
    """Entry point: run the Typer app."""
    app()


if __name__ == "__main__":
    main()
