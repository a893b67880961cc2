"""``build_data``: a DataSpec to a ``DataBundle`` of in-memory tensors with seeded batching.

Batching is a pure function of (seed, epoch, step): the shuffle of epoch ``e`` comes from a
``torch.Generator`` seeded with (seed, e), the augmentation of step ``s`` from (seed, e, s),
so a run resumed at epoch ``e`` sees exactly the batches it would have seen, and no global RNG
is consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from normcore.data import transforms as T
from normcore.data.digits import load_digits
from normcore.data.readers import READERS, RawData
from normcore.data.synthetic import downsample, make_brightness, make_shapes, make_sr_images

if TYPE_CHECKING:
    from normcore.spec import DataSpec

CLASSIFICATION = "classification"
SUPER_RESOLUTION = "super_resolution"
TASKS = (CLASSIFICATION, SUPER_RESOLUTION)
GENERATED = ("synthetic", "brightness", "sr-synthetic")
SR_DATASETS = ("sr-synthetic",)
IMAGEFOLDER_CHANNELS = 3
IMAGEFOLDER_SIZE = 32


class DataMemoryError(MemoryError):
    """Loading or preparing the data set ran out of memory (not the model or its batches)."""


def _is_alloc_failure(exc: BaseException) -> bool:
    # torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate
    # memory"), numpy a MemoryError (numpy._core._exceptions._ArrayMemoryError)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


def to_device(t: Tensor, device: Any) -> Tensor:
    """``t`` on ``device``; a CUDA copy is staged in pinned memory so it runs asynchronously."""
    if device is None:
        return t
    if torch.device(device).type == "cuda" and not t.is_pinned():
        # torch's caching host allocator keeps the staging buffer alive until the copy is done
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass
class DataBundle:
    """A train and a val split in memory, ready to batch.

    Classification: ``x`` float32 (N, C, H, W), normalized per channel with the train split's
    ``mean``/``std`` (identity values when normalization is off), ``y`` int64 labels.
    Super-resolution: ``x`` the low-resolution and ``y`` the high-resolution image, both
    float32 in [0, 1] and never normalized, so PSNR is computed on [0, 1] images.
    ``image_size`` is the (H, W) of ``x``, the model's input.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    in_channels: int
    num_classes: int | None
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str = CLASSIFICATION
    augment: bool = False
    seed: int = 0
    notes: list[str] = field(default_factory=list)  # changes to the data the log should show
    class_names: list[str] | None = None  # label i's name, when the data has names

    @property
    def num_train(self) -> int:
        """Samples in the train split."""
        return len(self.train_x)

    @property
    def num_val(self) -> int:
        """Samples in the val split."""
        return len(self.val_x)

    @property
    def crop_padding(self) -> int:
        """Padding of the random crop: 4 for 32x32 images (size // 8), at least 1."""
        return max(1, min(self.image_size) // 8)

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        """Full global batches of ``batch_size * world_size`` per epoch (the remainder is dropped)."""
        if batch_size < 1 or world_size < 1:
            raise ValueError(
                f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}"
            )
        global_batch = batch_size * world_size
        if global_batch > self.num_train:
            raise ValueError(
                f"the train split has {self.num_train} samples, fewer than one batch of "
                f"{global_batch} ({batch_size} x {world_size} processes): lower the batch "
                "size or val_fraction, or use more data"
            )
        return self.num_train // global_batch

    def epoch_order(self, epoch: int) -> Tensor:
        """The train-set permutation of ``epoch``; depends only on (seed, epoch)."""
        return torch.randperm(self.num_train, generator=T.generator("order", self.seed, epoch))

    def train_batches(
        self,
        epoch: int,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: Any = None,
        start_step: int = 0,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled (x, y) train batches of exactly ``batch_size`` samples (drop_last).

        Dropping the last partial batch keeps every step's batch statistics over the same
        number of samples, and never leaves a BatchNorm a batch of one. With ``world_size``
        processes all share one permutation: step ``s`` covers the global batch
        ``order[s*B*W:(s+1)*B*W]`` and rank ``r`` takes its ``r``-th slice of ``B``, so the
        ranks together see what one process would see with a batch of ``B*W``. Augmentation
        (random crop and flip, classification only) is drawn for the whole global batch, so it
        is the same split or not. ``start_step`` skips the first steps, to resume mid-epoch.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        steps = self.steps_per_epoch(batch_size, world_size)
        order = self.epoch_order(epoch)
        global_batch = batch_size * world_size
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        augment = self.augment and self.task == CLASSIFICATION
        for step in range(start_step, steps):
            idx = order[step * global_batch : (step + 1) * global_batch][mine]
            x = to_device(self.train_x[idx], device)
            y = to_device(self.train_y[idx], device)
            if augment:
                gen = T.generator("augment", self.seed, epoch, step)
                pad = self.crop_padding
                dy, dx, flip = T.crop_flip_params(global_batch, pad, gen)
                x = T.crop_flip(x, dy[mine], dx[mine], flip[mine], pad)
            yield x, y

    def val_batches(self, batch_size: int, device: Any = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) val batches in order; the last one may be smaller."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.num_val, batch_size):
            end = start + batch_size
            yield to_device(self.val_x[start:end], device), to_device(self.val_y[start:end], device)


def build_data(
    spec: DataSpec,
    *,
    seed: int,
    data_root: str | Path | None = None,
    task: str | None = None,
    scale: int = 2,
) -> DataBundle:
    """Load or generate ``spec``'s data set, split it and normalize it; see ``DataBundle``.

    ``task`` defaults to the data set's own ("super_resolution" for sr-synthetic, else
    "classification"); ``scale`` is the SR downscaling factor; ``data_root`` is the folder
    that ``spec.path`` is relative to (file data sets only).

    Raises:
        ValueError: the spec does not fit the data, or a file is missing, unreadable or lies
            about its size (the message names the file relative to ``data_root``).
        DataMemoryError: the data set does not fit in memory.
    """
    try:
        return _build_data(spec, seed, data_root, task, scale)
    except DataMemoryError:
        raise
    except (MemoryError, RuntimeError) as exc:
        if not _is_alloc_failure(exc):
            raise
        raise DataMemoryError(
            f"out of memory while loading data set {spec.dataset!r}"
            f"{f' from {spec.path!r}' if spec.path else ''} into memory: lower "
            "data.num_samples or data.image_size, or use a smaller data set (this is the "
            "data, not the model: data.batch_size does not help here)"
        ) from None


def _build_data(
    spec: DataSpec, seed: int, data_root: str | Path | None, task: str | None, scale: int
) -> DataBundle:
    own = SUPER_RESOLUTION if spec.dataset in SR_DATASETS else CLASSIFICATION
    task = own if task is None else task
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task != own:
        raise ValueError(f"dataset {spec.dataset!r} is a {own} data set, not {task}")
    if spec.num_samples is not None and spec.dataset not in GENERATED:
        raise ValueError(
            f"data.num_samples applies to generated sets {GENERATED}, not {spec.dataset!r}"
        )
    if spec.num_classes is not None and spec.dataset != "synthetic":
        raise ValueError(f"data.num_classes applies to the synthetic set, not {spec.dataset!r}")
    if task == SUPER_RESOLUTION:
        bundle = _build_sr(spec, seed, scale)
    else:
        bundle = _build_classification(spec, seed, data_root)
    if bundle.num_train < spec.batch_size:
        raise ValueError(
            f"the train split has {bundle.num_train} samples, fewer than one batch of "
            f"{spec.batch_size}: lower data.batch_size or data.val_fraction, or use more data"
        )
    return bundle


def _generate(spec: DataSpec, seed: int) -> tuple[Tensor, Tensor, int]:
    n = spec.num_samples or 1024
    data_seed = T.derive_seed(spec.dataset, seed)
    if spec.dataset == "synthetic":
        k = spec.num_classes or 4
        x, y = make_shapes(n, spec.image_size or 16, spec.channels or 3, k, data_seed)
        return x, y, k
    x, y = make_brightness(n, spec.image_size or 16, spec.channels or 1, data_seed)
    return x, y, 4


def _read(spec: DataSpec, data_root: str | Path | None) -> RawData:
    if spec.path is None:
        raise ValueError(f"dataset {spec.dataset!r} reads files: give data.path")
    if spec.dataset == "imagefolder":
        defaults = tuple(name for name in ("channels", "image_size") if getattr(spec, name) is None)
        return READERS["imagefolder"](
            data_root,
            spec.path,
            channels=spec.channels or IMAGEFOLDER_CHANNELS,
            image_size=spec.image_size or IMAGEFOLDER_SIZE,
            defaults=defaults,
        )
    return READERS[spec.dataset](data_root, spec.path)


def _prepare(x: np.ndarray | Tensor, spec: DataSpec) -> Tensor:
    """Float32 images with the channels and size the spec asks for."""
    out = T.to_float(x)
    if spec.channels is not None:
        out = T.convert_channels(out, spec.channels)
    if spec.image_size is not None:
        out = T.resize(out, spec.image_size)
    return out


def _build_classification(spec: DataSpec, seed: int, data_root: str | Path | None) -> DataBundle:
    split_gen = T.generator("split", seed)
    notes: list[str] = []
    class_names: list[str] | None = None
    if spec.dataset in ("synthetic", "brightness"):
        x, y, num_classes = _generate(spec, seed)
        train_idx, val_idx = T.split_indices(len(y), spec.val_fraction, split_gen, y)
        train_x, train_y, val_x, val_y = x[train_idx], y[train_idx], x[val_idx], y[val_idx]
    elif spec.dataset == "digits":
        x, y = load_digits()
        num_classes = 10
        train_idx, val_idx = T.split_indices(len(y), spec.val_fraction, split_gen, y)
        train_x = _prepare(x[train_idx], spec)
        val_x = _prepare(x[val_idx], spec)
        train_y, val_y = y[train_idx], y[val_idx]
    else:
        raw = _read(spec, data_root)
        num_classes = raw.num_classes
        notes += raw.notes
        class_names = raw.class_names
        if raw.test is not None:
            # the files' own test split is the val split; val_fraction is not used
            train_x, train_y = _prepare(raw.train.x, spec), torch.from_numpy(raw.train.y)
            val_x, val_y = _prepare(raw.test.x, spec), torch.from_numpy(raw.test.y)
        else:
            y = torch.from_numpy(raw.train.y)
            train_idx, val_idx = T.split_indices(len(y), spec.val_fraction, split_gen, y)
            train_x = _prepare(raw.train.x[train_idx.numpy()], spec)
            val_x = _prepare(raw.train.x[val_idx.numpy()], spec)
            train_y, val_y = y[train_idx], y[val_idx]
    channels = train_x.shape[1]
    mean, std = (0.0,) * channels, (1.0,) * channels
    if spec.normalize:
        mean, std = T.channel_stats(train_x)
        T.normalize_(train_x, mean, std)
        T.normalize_(val_x, mean, std)
    return DataBundle(
        train_x=train_x.contiguous(),
        train_y=train_y.to(torch.int64),
        val_x=val_x.contiguous(),
        val_y=val_y.to(torch.int64),
        in_channels=channels,
        num_classes=num_classes,
        image_size=(train_x.shape[2], train_x.shape[3]),
        mean=mean,
        std=std,
        task=CLASSIFICATION,
        augment=spec.augment,
        seed=seed,
        notes=notes,
        class_names=class_names,
    )


def _build_sr(spec: DataSpec, seed: int, scale: int) -> DataBundle:
    """sr-synthetic: HR side is image_size (default 32) rounded down to a multiple of ``scale``."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    size = spec.image_size or 32
    hr_size = size - size % scale
    if hr_size < scale:
        raise ValueError(f"image_size {size} is smaller than the scale {scale}")
    channels = spec.channels or 3
    hr = make_sr_images(spec.num_samples or 1024, hr_size, channels, T.derive_seed("sr", seed))
    lr = downsample(hr, scale)
    train_idx, val_idx = T.split_indices(len(hr), spec.val_fraction, T.generator("split", seed))
    return DataBundle(
        train_x=lr[train_idx],
        train_y=hr[train_idx],
        val_x=lr[val_idx],
        val_y=hr[val_idx],
        in_channels=channels,
        num_classes=None,
        image_size=(lr.shape[2], lr.shape[3]),
        mean=(0.0,) * channels,
        std=(1.0,) * channels,
        task=SUPER_RESOLUTION,
        augment=spec.augment,
        seed=seed,
    )
