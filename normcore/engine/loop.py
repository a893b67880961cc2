"""``train``: build the data and model a JobSpec describes and train it, with exact resume.

The step is the one a reader expects (set lr, forward, loss, backward, clip, step, zero_grad);
everything else (metrics, evaluation, checkpoints, callbacks) happens around it.

Determinism: on CPU the same spec gives bit-identical metrics and weights for the same torch
thread count (``torch.get_num_threads()``); another thread count splits float reductions
differently, so results then differ in the last bits. Checkpoints record the thread count and
a resume under another one says so in the log.

Divergence: on CPU each step's loss is turned into a float right away (free there), so a NaN or
inf raises ``TrainingDiverged`` at the step it appears. On CUDA the losses of up to
``CUDA_SYNC_EVERY`` steps are kept as tensors and converted in one host sync, so the check (and
the train rows) come in batches and a divergence is reported up to that many steps late, but
always with the step it first appeared at.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normcore.checkpoint import (
    CheckpointInfo,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from normcore.data import build_data
from normcore.data.loader import to_device
from normcore.data.transforms import generator
from normcore.engine.callbacks import (
    Callback,
    CallbackList,
    MetricRow,
    TrainingDiverged,
    TrainResult,
)
from normcore.engine.normwatch import NormWatch
from normcore.engine.optim import build_optimizer
from normcore.engine.precision import Precision, determinism, resolve_device, setup_precision
from normcore.engine.rng import capture_rng, restore_rng, seed_everything
from normcore.engine.schedule import lr_at
from normcore.inference import describe_input
from normcore.models import build_model
from normcore.spec import JobSpec, load_spec
from normcore.stats import recalibrate_bn

if TYPE_CHECKING:
    from normcore.engine.distributed import DistContext

__all__ = ["CUDA_SYNC_EVERY", "train"]

CUDA_SYNC_EVERY = 50
RESUME_LATEST = "latest"


def train(
    spec: JobSpec | dict[str, Any] | str | Path,
    workdir: str | Path,
    callbacks: Iterable[Callback] | Callback = (),
    resume: str | Path | None = None,
    *,
    data_root: str | Path | None = None,
    device: str | torch.device | None = None,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train the model ``spec`` describes; checkpoints go to ``workdir/checkpoints/epoch-NNNN``.

    Args:
        spec: a JobSpec, its dict, or a path to a JSON/YAML file.
        workdir: folder for checkpoints and ``train.log`` (created if missing).
        callbacks: receive metric rows, log lines and checkpoints, and may cancel the run.
        resume: a checkpoint folder to continue from (the epoch after its own), or
            ``"latest"`` for the newest checkpoint in ``workdir`` that verifies (a fresh start
            if there is none).
        data_root: where file datasets (mnist, cifar10, imagefolder, npz) are read from.
        device: overrides ``spec.resources.device`` ("auto", "cpu", "cuda", "cuda:1").
        time_limit_s: seconds this run may train (counted from this call); default
            ``spec.max_runtime`` minutes, or no limit. At the limit the run stops after the
            current step, writes a checkpoint of that step and returns status "timed_out"
            (a data-parallel run takes its limit from ``spec.max_runtime``).

    With ``spec.resources.gpus = k > 1`` the run is data-parallel over ``k`` spawned processes
    (NCCL on ``k`` GPUs, gloo on CPU), each with ``batch_size`` samples of a global batch of
    ``k * batch_size``; the callbacks stay in this process (see ``normcore.engine.distributed``).

    Returns:
        a TrainResult with status "succeeded", "cancelled" (a callback's ``should_stop``) or
        "timed_out" (the time limit).

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        ValueError: the spec does not fit the data, or the resume checkpoint is corrupt.
    """
    started = time.perf_counter()
    spec = load_spec(spec)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cbs = CallbackList([*CallbackList.of(callbacks).callbacks, _FileLog(workdir / "train.log")])
    dev = resolve_device(
        device if device is not None else spec.resources.device, spec.resources.gpus
    )
    with determinism(dev) as deterministic:
        try:
            if spec.resources.gpus > 1:
                from normcore.engine.distributed import run_distributed

                result = run_distributed(spec, workdir, cbs, resume, data_root, dev, started)
            else:
                result = _run(
                    spec,
                    workdir,
                    cbs,
                    resume,
                    data_root,
                    dev,
                    deterministic,
                    started,
                    time_limit_s=time_limit_s,
                )
        except TrainingDiverged as exc:
            cbs.log(str(exc), logging.ERROR)
            raise
    cbs.train_end(result)
    return result


def _run(
    spec: JobSpec,
    workdir: Path,
    cbs: CallbackList,
    resume: str | Path | None,
    data_root: str | Path | None,
    dev: torch.device,
    deterministic: bool,
    started: float,
    ddp: DistContext | None = None,
    time_limit_s: float | None = None,
) -> TrainResult:
    # ddp: this process is one rank of a data-parallel run; its cbs relay to the caller (rank 0)
    # or are empty (other ranks), and only rank 0 writes checkpoints.
    rank, world = (ddp.rank, ddp.world_size) if ddp is not None else (0, 1)
    if time_limit_s is None and spec.max_runtime is not None:
        time_limit_s = spec.max_runtime * 60.0
    deadline = None if time_limit_s is None else started + time_limit_s
    seed_everything(spec.seed)
    bundle = build_data(
        spec.data, seed=spec.seed, data_root=data_root, task=spec.task, scale=spec.model.scale
    )
    in_channels = _check_fit(spec, bundle)
    model = build_model(spec.model, in_channels=in_channels).to(dev)
    if ddp is not None:
        model = ddp.sync_norm(spec, model)
    prec = setup_precision(spec.resources, dev, model, cbs.log)
    optimizer = build_optimizer(model, spec.optim)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = (
        F.cross_entropy if spec.task == "classification" else F.l1_loss
    )
    batch_size = spec.data.batch_size
    eval_batch_size = spec.data.eval_batch_size or batch_size
    steps_per_epoch = bundle.steps_per_epoch(batch_size, world)  # raises if not one batch
    total_steps = steps_per_epoch * spec.epochs

    completed, step, metrics, resumed_from = 0, 0, {}, None  # epochs and updates done
    if resume is not None:
        loaded = _resume(resume, workdir, spec, model, optimizer, prec, steps_per_epoch, cbs)
        if loaded is not None:
            resumed_from, completed, step, metrics = loaded
    # a checkpoint written at a time limit holds a step inside epoch completed + 1 (or its last
    # step, before that epoch's eval: then the epoch resumes with no steps left, evaluates and
    # checkpoints)
    start_step = (
        step - completed * steps_per_epoch
        if 0 < step - completed * steps_per_epoch <= steps_per_epoch
        else 0
    )
    # the step runs the DDP wrapper; eval, precise BN and checkpoints use the model itself
    net = ddp.wrap(model) if ddp is not None else model
    _log_setup(spec, bundle, model, prec, deterministic, steps_per_epoch, cbs, world)
    already_complete = completed >= spec.epochs
    if already_complete:
        cbs.log(
            f"the run is already complete: the checkpoint holds epoch {completed} of "
            f"{spec.epochs}, so there is nothing to train (raise epochs in the spec to train "
            "further)"
        )
    if deadline is not None:
        cbs.log(
            f"time limit {time_limit_s / 60:.2f} min: at it the run writes a checkpoint and "
            "ends as timed_out"
        )
    cbs.train_start(
        {
            "spec": spec.model_dump(mode="json"),
            "device": str(dev),
            "amp": prec.amp_name,
            "deterministic": deterministic,
            "epochs": spec.epochs,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "start_epoch": completed,
            "start_step": step,
            "already_complete": already_complete,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "num_train": bundle.num_train,
            "num_val": bundle.num_val,
            "in_channels": in_channels,
            "num_classes": bundle.num_classes,
            "task": spec.task,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "workdir": str(workdir),
            "world_size": world,
            "global_batch_size": batch_size * world,
        }
    )

    every = 1 if dev.type == "cpu" else CUDA_SYNC_EVERY
    rows = _TrainRows(cbs, batch_size * world, every, ddp)
    # norm telemetry, the train/eval gap probe and the non-finite check (one process only)
    watch = None
    if ddp is None:
        watch = NormWatch(spec, bundle, model, prec, loss_fn, cbs, steps_per_epoch, every)
        watch.start(step, completed)
    written: list[CheckpointInfo] = []
    status: Literal["succeeded", "cancelled", "timed_out"] = "succeeded"
    first_epoch = completed + 1
    for epoch in range(first_epoch, spec.epochs + 1):
        epoch_started = time.perf_counter()
        model.train()
        meter = _Meter(spec.task, dev)
        rows.restart_timer()
        for x, y in bundle.train_batches(
            epoch - 1,
            batch_size,
            rank=rank,
            world_size=world,
            device=dev,
            start_step=start_step if epoch == first_epoch else 0,
        ):
            lr = lr_at(step, spec.optim, steps_per_epoch, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with prec.autocast():
                out = net(prec.inputs(x))
                loss = loss_fn(out.float(), y)
            prec.scaler.scale(loss).backward()
            if spec.optim.grad_clip is not None:
                prec.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
            prec.scaler.step(optimizer)
            prec.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if watch is not None:
                watch.after_step(step, epoch)

            meter.add(loss, out, y)
            rows.add(step, epoch, loss, lr)
            timed_out = deadline is not None and time.perf_counter() >= deadline
            stop = cbs.should_stop() or timed_out
            if ddp is not None:  # rank 0 decides, so every rank stops after the same step
                stop = ddp.agree_stop(stop)
            if stop:
                status = "timed_out" if timed_out else "cancelled"
                break
        rows.flush()
        if status == "cancelled":
            cbs.log(f"cancelled at step {step} (epoch {epoch}); no checkpoint written for it")
            break
        if status == "timed_out":
            cbs.log(
                f"time limit of {time_limit_s / 60:.2f} min reached at step {step} (epoch "
                f"{epoch}): writing a checkpoint of this step and ending as timed_out"
            )
            if ddp is None or ddp.is_main:
                info = _save(
                    workdir,
                    spec,
                    model,
                    optimizer,
                    prec,
                    completed,
                    step,
                    metrics,
                    in_channels,
                    bundle,
                    partial_epoch=step != completed * steps_per_epoch,
                )
                written.append(info)
                cbs.checkpoint(info)
                cbs.log(f"checkpoint {info.name} saved (epoch {info.epoch}, step {info.step})")
            break

        _precise_bn(spec, bundle, model, prec, epoch, cbs, ddp)
        metrics = {
            **meter.values("train_", ddp),
            **_evaluate(model, bundle, eval_batch_size, prec, loss_fn, spec.task, ddp),
        }
        cbs.metrics(MetricRow(step, epoch, "val", metrics, time.time()))
        if watch is not None:
            watch.at_eval(step, epoch)
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        cbs.log(
            f"epoch {epoch}/{spec.epochs} step {step}: {summary} "
            f"({time.perf_counter() - epoch_started:.1f}s)"
        )
        due = epoch % spec.checkpoint.every_epochs == 0 or epoch == spec.epochs
        if due and (ddp is None or ddp.is_main):
            info = _save(
                workdir, spec, model, optimizer, prec, epoch, step, metrics, in_channels, bundle
            )
            written.append(info)
            cbs.checkpoint(info)
            cbs.log(f"checkpoint {info.name} saved (epoch {info.epoch}, step {info.step})")
        completed = epoch

    return TrainResult(
        status=status,
        epochs_completed=completed,
        global_step=step,
        metrics=metrics,
        checkpoints=[c for c in written if c.path.is_dir()],  # minus those pruned by keep_last
        workdir=workdir,
        duration_s=time.perf_counter() - started,
        resumed_from=resumed_from,
    )


# ----------------------------------------------------------------------------- setup


def _check_fit(spec: JobSpec, bundle: Any) -> int:
    """The model's input channels, after checking the spec's model fits the data."""
    in_channels = spec.model.in_channels or bundle.in_channels
    if in_channels != bundle.in_channels:
        raise ValueError(
            f"model.in_channels is {in_channels} but dataset {spec.data.dataset!r} has "
            f"{bundle.in_channels} channel(s): leave model.in_channels unset or set it to "
            f"{bundle.in_channels}"
        )
    if bundle.num_classes is not None and spec.model.num_classes < bundle.num_classes:
        raise ValueError(
            f"model.num_classes is {spec.model.num_classes} but dataset {spec.data.dataset!r} "
            f"has {bundle.num_classes} classes: set model.num_classes to at least "
            f"{bundle.num_classes}"
        )
    return in_channels


def _log_setup(
    spec: JobSpec,
    bundle: Any,
    model: nn.Module,
    prec: Precision,
    deterministic: bool,
    steps_per_epoch: int,
    cbs: CallbackList,
    world: int = 1,
) -> None:
    dev = prec.device
    if dev.type == "cuda":
        where = f"{dev} ({torch.cuda.get_device_name(dev)})"
    else:
        where = f"{dev} ({torch.get_num_threads()} threads)"
    cbs.log(
        f"device {where}, torch {torch.__version__}, amp {prec.amp_name}, "
        f"channels_last {prec.channels_last}, deterministic {deterministic}"
    )
    params = sum(p.numel() for p in model.parameters())
    cbs.log(
        f"{spec.model.arch} (norm {spec.model.norm}, {params:,} parameters) on "
        f"{spec.data.dataset}: {bundle.num_train} train / {bundle.num_val} val samples, "
        f"{steps_per_epoch} steps per epoch, {spec.epochs} epochs"
    )
    notes = [*getattr(bundle, "notes", []), *_model_notes(spec, model)]
    if bundle.num_classes is not None and spec.model.num_classes > bundle.num_classes:
        notes.append(
            f"model.num_classes is {spec.model.num_classes} but the data has "
            f"{bundle.num_classes} classes: {spec.model.num_classes - bundle.num_classes} "
            "outputs never see a label"
        )
    for note in notes:
        cbs.log(f"note: {note}")
    if world > 1:
        from normcore.engine.distributed import wants_sync_bn

        backend = "nccl" if dev.type == "cuda" else "gloo"
        cbs.log(
            f"data parallel over {world} processes ({backend}): global batch "
            f"{world} x {spec.data.batch_size} = {world * spec.data.batch_size}, "
            f"SyncBatchNorm {'on' if wants_sync_bn(spec) else 'off'}"
        )
    elif spec.resources.sync_bn:
        cbs.log("warning: resources.sync_bn has no effect with one process (resources.gpus=1)")


def _model_notes(spec: JobSpec, model: nn.Module) -> list[str]:
    """Layers the model left without the norm the spec asked for (a line each in the log)."""
    from normcore.models.blocks import FeatureNorm

    if spec.model.norm in ("none", {"type": "none"}):
        return []
    plain = [
        name
        for name, m in model.named_modules()
        if isinstance(m, FeatureNorm) and isinstance(m.norm, nn.Identity)
    ]
    if not plain:
        return []
    return [
        f"norm {spec.model.norm!r} has one value per channel and sample after a fully connected "
        f"layer, where it would output a constant: {', '.join(plain)} are identity (no norm)"
    ]


# ----------------------------------------------------------------------------- metrics


class _TrainRows:
    """Per-step train rows; losses become floats in one host sync every ``every`` steps.

    Under data parallel the losses are averaged over the ranks first (the global-batch mean)
    and ``batch_size`` is the global batch.
    """

    def __init__(
        self, cbs: CallbackList, batch_size: int, every: int, ddp: DistContext | None = None
    ) -> None:
        self.cbs, self.batch_size, self.every, self.ddp = cbs, batch_size, every, ddp
        self.pending: list[tuple[int, int, Tensor, float]] = []
        self.t0 = time.perf_counter()

    def restart_timer(self) -> None:
        self.t0 = time.perf_counter()

    def add(self, step: int, epoch: int, loss: Tensor, lr: float) -> None:
        self.pending.append((step, epoch, loss.detach(), lr))
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        stacked = torch.stack([p[2] for p in self.pending])
        if self.ddp is not None:
            stacked = self.ddp.all_reduce_mean(stacked)
        losses = stacked.tolist()
        # samples/s over the window: a per-step timer on CPU, a per-window average on CUDA.
        rate = self.batch_size * len(self.pending) / max(time.perf_counter() - self.t0, 1e-9)
        now = time.time()
        pending, self.pending = self.pending, []
        for (step, epoch, _, lr), value in zip(pending, losses, strict=True):
            if not math.isfinite(value):
                raise TrainingDiverged(step, epoch, value)
            row = MetricRow(
                step, epoch, "train", {"loss": value, "lr": lr, "samples_per_s": rate}, now
            )
            self.cbs.metrics(row)
        self.t0 = time.perf_counter()


def score_name(task: str) -> str:
    """The name of a task's score in metric rows: "psnr" (dB) for super_resolution, else
    "accuracy" (top-1)."""
    return "psnr" if task == "super_resolution" else "accuracy"


def epoch_metric_names(task: str) -> list[str]:
    """The value keys of the per-epoch "val" rows a run of ``task`` writes: loss and score over
    the val split, then over the epoch's training batches (``val_accuracy``, ``val_loss``,
    ``train_accuracy``, ``train_loss`` for classification; psnr for super-resolution)."""
    score = score_name(task)
    return [f"val_{score}", "val_loss", f"train_{score}", "train_loss"]


class _Meter:
    """Running sums over an epoch (or the val split) kept on the device: no sync per step."""

    def __init__(self, task: str, device: torch.device) -> None:
        self.sr = task == "super_resolution"
        self.score = score_name(task)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.score_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.count = 0

    def add(self, loss: Tensor, out: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        self.count += n
        self.loss_sum += loss.detach() * n
        if self.sr:
            self.score_sum += _psnr(out.detach(), y).sum()
        else:
            self.score_sum += (out.detach().argmax(1) == y).sum()

    def values(self, prefix: str, ddp: DistContext | None = None) -> dict[str, float]:
        if ddp is None:
            loss_sum, score_sum, count = self.loss_sum.item(), self.score_sum.item(), self.count
        else:  # sums over every rank's samples
            count_t = torch.tensor(
                float(self.count), dtype=torch.float64, device=self.loss_sum.device
            )
            totals = ddp.all_reduce_sum(torch.stack([self.loss_sum, self.score_sum, count_t]))
            loss_sum, score_sum, count = totals.tolist()
        n = max(count, 1)
        return {f"{prefix}loss": loss_sum / n, f"{prefix}{self.score}": score_sum / n}


def _psnr(out: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] (the output clamped to that range)."""
    mse = (out.float().clamp(0, 1) - target.float()).square().flatten(1).mean(1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


@torch.no_grad()
def _evaluate(
    model: nn.Module,
    bundle: Any,
    batch_size: int,
    prec: Precision,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    task: str,
    ddp: DistContext | None = None,
) -> dict[str, float]:
    """Loss and accuracy (or PSNR) over the val split in eval mode (running statistics).

    Under data parallel rank ``r`` evaluates every ``world``-th batch from the ``r``-th on and
    the sums are reduced, so the values cover the whole val split once.
    """
    model.eval()
    meter = _Meter(task, prec.device)
    rank, world = (ddp.rank, ddp.world_size) if ddp is not None else (0, 1)
    for i, (x, y) in enumerate(bundle.val_batches(batch_size)):
        if i % world != rank:
            continue
        x, y = to_device(x, prec.device), to_device(y, prec.device)
        with prec.autocast():
            out = model(prec.inputs(x))
            loss = loss_fn(out.float(), y)
        meter.add(loss, out, y)
    model.train()
    return meter.values("val_", ddp)


# ----------------------------------------------------------------------------- precise BN


def _has_running_stats(model: nn.Module) -> bool:
    """True when some BatchNorm-like module tracks running statistics updated in training."""
    return any(
        getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
        for m in model.modules()
    )


def _precise_bn(
    spec: JobSpec,
    bundle: Any,
    model: nn.Module,
    prec: Precision,
    epoch: int,
    cbs: CallbackList,
    ddp: DistContext | None = None,
) -> None:
    """Recalibrate BN running statistics over train batches before eval and checkpoint."""
    num_batches = spec.checkpoint.precise_bn_batches
    if num_batches <= 0 or not _has_running_stats(model):
        return
    rank, world = (ddp.rank, ddp.world_size) if ddp is not None else (0, 1)
    num_batches = min(num_batches, bundle.num_train // (spec.data.batch_size * world))
    batches = _precise_bn_batches(bundle, spec, epoch, prec, rank, world)
    recalibrate_bn(model, batches, num_batches=num_batches)
    cbs.log(f"precise BN: running statistics recalibrated over {num_batches} train batches")


def _precise_bn_batches(
    bundle: Any, spec: JobSpec, epoch: int, prec: Precision, rank: int = 0, world: int = 1
) -> Iterator[Tensor]:
    """Train batches in an order drawn from a generator of their own, seeded by (seed, epoch).

    Neither the global RNG nor the training order is touched, so resume stays exact. Under
    data parallel each global batch of ``world * batch_size`` is split as in training.
    """
    order = torch.randperm(bundle.num_train, generator=generator("precise-bn", spec.seed, epoch))
    batch_size = spec.data.batch_size
    global_batch = batch_size * world
    for start in range(0, bundle.num_train - global_batch + 1, global_batch):
        index = order[start : start + global_batch][rank * batch_size : (rank + 1) * batch_size]
        yield prec.inputs(to_device(bundle.train_x[index], prec.device))


# ----------------------------------------------------------------------------- checkpoints


def _save(
    workdir: Path,
    spec: JobSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    prec: Precision,
    epoch: int,
    step: int,
    metrics: dict[str, float],
    in_channels: int,
    bundle: Any,
    *,
    partial_epoch: bool = False,
) -> CheckpointInfo:
    # partial_epoch: written at a time limit, ``step`` lies inside epoch ``epoch + 1``
    rng_tensors, rng_states = capture_rng()
    return save_checkpoint(
        workdir / "checkpoints",
        epoch=epoch,
        step=step,
        model=model,
        optimizer=optimizer,
        spec=spec,
        metrics=metrics,
        rng_tensors=rng_tensors,
        state={"rng": rng_states, "scaler": prec.scaler.state_dict()},
        meta={
            "in_channels": in_channels,
            "num_classes": spec.model.num_classes if spec.task == "classification" else None,
            "task": spec.task,
            "torch_threads": torch.get_num_threads(),
            "partial_epoch": partial_epoch,
            "data": {
                "image_size": bundle.image_size,
                "mean": _floats(bundle.mean),
                "std": _floats(bundle.std),
            },
            # what inference needs from the data pipeline; also in model.safetensors' header
            "input": describe_input(spec.data, bundle).to_dict(),
            "classes": getattr(bundle, "class_names", None),
        },
        keep_last=spec.checkpoint.keep_last,
    )


def _floats(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        return [float(v) for v in value.flatten().tolist()]
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _resume(
    resume: str | Path,
    workdir: Path,
    spec: JobSpec,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    prec: Precision,
    steps_per_epoch: int,
    cbs: CallbackList,
) -> tuple[Path, int, int, dict[str, float]] | None:
    """Restore model, optimizer, scaler and RNG states; returns (path, epoch, step, metrics)."""
    if str(resume) == RESUME_LATEST:
        found = latest_valid_checkpoint(workdir, log=cbs.log)
        if found is None:
            cbs.log(f"no valid checkpoint in {workdir.name}: starting from scratch")
            return None
        resume = found
    ckpt = load_checkpoint(resume)
    saved_spec = ckpt.meta.get("spec") or {}
    current = spec.model_dump(mode="json")
    changed = sorted(
        k for k in set(saved_spec) | set(current) if saved_spec.get(k) != current.get(k)
    )
    if changed:
        cbs.log(
            f"warning: resuming with a spec that differs from the checkpoint's in: {', '.join(changed)}"
        )
    model.load_state_dict(ckpt.model_state)
    if ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    if prec.scaler.is_enabled() and ckpt.state.get("scaler"):
        prec.scaler.load_state_dict(ckpt.state["scaler"])
    for warning in restore_rng(ckpt.rng_tensors, ckpt.state["rng"]):
        cbs.log(f"warning: {warning}")
    threads = ckpt.meta.get("torch_threads")
    if prec.device.type == "cpu" and threads not in (None, torch.get_num_threads()):
        cbs.log(
            f"warning: checkpoint written with {threads} torch threads, resuming with "
            f"{torch.get_num_threads()}: the run stays correct but is not bit-identical to "
            "an uninterrupted one"
        )
    into = ckpt.step - ckpt.epoch * steps_per_epoch
    if ckpt.meta.get("partial_epoch") and 0 < into <= steps_per_epoch:
        cbs.log(
            f"the checkpoint was written at a time limit, {into} steps into epoch {ckpt.epoch + 1}"
        )
    elif ckpt.step != ckpt.epoch * steps_per_epoch:
        cbs.log(
            f"warning: checkpoint step {ckpt.step} is not {ckpt.epoch} epochs of "
            f"{steps_per_epoch} steps: the data or batch size changed since it was written"
        )
    cbs.log(f"resumed from {ckpt.path} (epoch {ckpt.epoch}, step {ckpt.step})")
    return ckpt.path, ckpt.epoch, ckpt.step, dict(ckpt.meta.get("metrics") or {})


class _FileLog(Callback):
    """Appends each log line, timestamped, to ``workdir/train.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")
