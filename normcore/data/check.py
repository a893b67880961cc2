"""What a spec's data set is, from headers and listings only, and the checks a spec must pass
against it before a job is accepted (so a mistake is a 422 at submit, not a failure later).

``describe_data`` reads no more than headers, folder listings and label files (small): an IDX
header, the sizes of CIFAR batch files, ``.npy`` headers inside an ``.npz``, the first image of
an image folder. ``check_data`` turns what it finds into ``DataCheckError``s that name the spec
field and the value it needs.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from normcore.data.loader import GENERATED, IMAGEFOLDER_CHANNELS, IMAGEFOLDER_SIZE
from normcore.data.paths import DataPathError, resolve_under
from normcore.data.readers import (
    IMAGE_SUFFIXES,
    _find,
    _idx_names,
    call_with_timeout,
    list_imagefolder,
    npz_headers,
    open_regular,
    read_idx,
    read_idx_header,
)
from normcore.data.synthetic import SHAPES

if TYPE_CHECKING:
    from normcore.spec import JobSpec

# what the generated and bundled sets default to (normcore.data.loader's values)
DEFAULT_SAMPLES = 1024
DIGITS = (1797, 1, 8, 8, 10)  # samples, channels, height, width, classes
# bytes per image in a CIFAR-10 python batch: 3072 pixels plus its label and file name in the
# pickle (the real data_batch_1 is 31,035,704 bytes for 10,000 images); sizes are approximate,
# and overcounted for pickles written by Python 3 at protocol 2 (bytes stored as latin-1 text)
CIFAR_ROW_BYTES = 3104
CIFAR_CLASSES = 10
MNIST_CLASSES = 10
# label files read to count classes: MNIST's train labels are 60 kB
MAX_LABEL_BYTES = 64 << 20


class DataCheckError(ValueError):
    """A spec that cannot train on its data; ``loc`` is the spec field, e.g. ("data", "path")."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


@dataclass
class DataInfo:
    """A data set as the engine will hold it, learned without loading it.

    ``channels`` and ``image_size`` (H, W) are those of the model's input after the spec's
    conversions; ``num_train``/``num_val`` the split sizes; ``num_classes`` None for
    super-resolution; ``raw_bytes`` what the reader holds before conversion (uint8 files) and
    ``tensor_bytes`` the float32 train and val tensors the engine keeps; ``approximate`` when
    sizes come from file sizes (CIFAR batches) rather than headers; ``notes`` the changes the
    loader makes that the spec does not spell out (each becomes a line in the job's log).
    """

    dataset: str
    num_samples: int
    num_train: int
    num_val: int
    channels: int
    image_size: tuple[int, int]
    num_classes: int | None
    raw_bytes: int
    tensor_bytes: int
    approximate: bool = False
    notes: list[str] = field(default_factory=list)
    # temporaries alive at the peak besides those two: the indexed copy of a file set's raw
    # array and its normalized float copy, the noise and clamp buffers of a generated set and
    # the allocator's slack
    extra_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        """Peak bytes while the data is built: raw arrays, float32 tensors and temporaries.

        Measured as the resident set's high-water mark over the build in a fresh process
        (tests/normcore/test_resources.py): a generated set peaks at about 4.2x its tensors
        (estimated 5x), an ``.npz`` at about 2.1x (estimated raw + 2 x tensors + one raw copy).
        """
        return self.raw_bytes + self.tensor_bytes + self.extra_bytes


def _split(n: int, val_fraction: float, has_test: int | None) -> tuple[int, int]:
    """(train, val) sizes as ``transforms.split_indices`` makes them, or the file's test split."""
    if has_test is not None:
        return n, has_test
    val = min(max(1, round(n * val_fraction)), n - 1) if n >= 2 else 0
    return n - val, val


def sniff_format(data_root: str | Path | None, relative: str) -> str | None:
    """Which reader a path looks made for ("mnist", "cifar10", "imagefolder", "npz"), or None.

    Reads a listing and at most a few header bytes.
    """
    try:
        path = resolve_under(data_root, relative)
    except DataPathError:
        return None
    if path.is_file():
        if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path):
            return "npz"
        return None
    if not path.is_dir():
        return None
    names = {p.name for p in path.iterdir()}
    if any(n.startswith("train-images") and "idx3" in n for n in names):
        return "mnist"
    if "data_batch_1" in names:
        return "cifar10"
    subdirs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for sub in subdirs[:4]:
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir()):
            return "imagefolder"
    return None


def _wrong_format(dataset: str, data_root: str | Path | None, relative: str) -> str:
    found = sniff_format(data_root, relative)
    if found is None or found == dataset:
        return ""
    return f"; '{relative}' looks like {found} data: set data.dataset to {found!r}"


def _generated(spec: JobSpec) -> DataInfo:
    d = spec.data
    n = d.num_samples or DEFAULT_SAMPLES
    if d.dataset == "sr-synthetic":
        c, size = d.channels or 3, d.image_size or 32
        scale = spec.model.scale
        hr = size - size % scale
        if hr < scale:
            raise DataCheckError(
                ("data", "image_size"),
                f"data.image_size {size} is smaller than model.scale {scale}: use an "
                f"image_size of at least {scale}",
            )
        lr = hr // scale
        train, val = _split(n, d.val_fraction, None)
        hr_bytes = n * c * hr * hr * 4
        return DataInfo(
            d.dataset,
            n,
            train,
            val,
            c,
            (lr, lr),
            None,
            2 * hr_bytes,
            hr_bytes + hr_bytes // scale**2,
        )
    if d.dataset == "synthetic":
        c, size, k = d.channels or 3, d.image_size or 16, d.num_classes or 4
    else:  # brightness
        c, size, k = d.channels or 1, d.image_size or 16, 4
    train, val = _split(n, d.val_fraction, None)
    # generated as one float32 tensor (plus noise and clamp temporaries of its size), then
    # indexed into the train and val copies
    nbytes = n * c * size * size * 4
    return DataInfo(
        d.dataset, n, train, val, c, (size, size), k, nbytes, nbytes, extra_bytes=3 * nbytes
    )


def _converted(
    spec: JobSpec, n: int, c: int, h: int, w: int, itemsize: int
) -> tuple[int, tuple[int, int], int, int]:
    """Channels, size, raw and tensor bytes after the spec's channel and size conversions."""
    d = spec.data
    out_c = d.channels or c
    out_hw = (d.image_size, d.image_size) if d.image_size else (h, w)
    raw = n * c * h * w * itemsize
    return out_c, out_hw, raw, n * out_c * out_hw[0] * out_hw[1] * 4


def _labels_max(path: Path, label: str) -> int:
    head, _ = read_idx_header(path, label)
    if head.data_bytes > MAX_LABEL_BYTES:
        return -1
    y = read_idx(path, label)
    return int(y.max()) if len(y) else -1


def _mnist(spec: JobSpec, root: str | Path | None) -> DataInfo:
    folder = spec.data.path or ""
    resolve_under(root, folder)
    splits: dict[str, tuple[int, int, int]] = {}
    top = -1
    for prefix in ("train", "t10k"):
        images = _find(root, folder, _idx_names(prefix, "images", 3))
        labels = _find(root, folder, _idx_names(prefix, "labels", 1))
        if images is None and labels is None:
            continue
        if images is None or labels is None:
            missing = f"{prefix}-{'images-idx3' if images is None else 'labels-idx1'}-ubyte"
            raise DataPathError(f"data folder '{folder}' has no {missing}[.gz] for its pair")
        head, _ = read_idx_header(images[0], images[1])
        lab, _ = read_idx_header(labels[0], labels[1])
        if len(head.shape) != 3 or head.dtype != np.uint8:
            raise DataPathError(
                f"{images[1]}: expected uint8 images of rank 3, got {head.dtype} {head.shape}"
            )
        if len(lab.shape) != 1 or lab.shape[0] != head.shape[0]:
            raise DataPathError(
                f"{images[1]} has {head.shape[0]} images but {labels[1]} has {lab.shape} labels"
            )
        splits[prefix] = head.shape
        top = max(top, _labels_max(labels[0], labels[1]))
    if "train" not in splits:
        raise DataPathError(
            f"data folder '{folder}' has no train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz]"
        )
    n, h, w = splits["train"]
    test = splits.get("t10k")
    total = n + (test[0] if test else 0)
    c, hw, raw, tensors = _converted(spec, total, 1, h, w, 1)
    train, val = _split(n, spec.data.val_fraction, test[0] if test else None)
    classes = max(MNIST_CLASSES, top + 1)
    return DataInfo("mnist", total, train, val, c, hw, classes, raw, tensors)


def _cifar(spec: JobSpec, root: str | Path | None) -> DataInfo:
    folder = spec.data.path or ""
    n = 0
    for i in range(1, 6):
        rel = f"{folder}/data_batch_{i}"
        path = resolve_under(root, rel)
        if path.exists():
            with open_regular(path, rel) as f:
                size = os.fstat(f.fileno()).st_size
            if size < CIFAR_ROW_BYTES:
                raise DataPathError(
                    f"{rel}: {size} bytes cannot hold one 3072-byte image: not a CIFAR-10 batch"
                )
            n += size // CIFAR_ROW_BYTES
    if n == 0:
        raise DataPathError(f"data folder '{folder}' has no data_batch_1 .. data_batch_5")
    test_rel = f"{folder}/test_batch"
    test_path = resolve_under(root, test_rel)
    test = None
    if test_path.exists():
        with open_regular(test_path, test_rel) as f:
            test = os.fstat(f.fileno()).st_size // CIFAR_ROW_BYTES
    total = n + (test or 0)
    c, hw, raw, tensors = _converted(spec, total, 3, 32, 32, 1)
    train, val = _split(n, spec.data.val_fraction, test)
    return DataInfo("cifar10", total, train, val, c, hw, CIFAR_CLASSES, raw, tensors, True)


def _imagefolder(spec: JobSpec, root: str | Path | None) -> DataInfo:
    from PIL import Image

    folder = spec.data.path or ""
    listing = list_imagefolder(root, folder, check_files=False)  # the loader stats them all
    n = sum(len(files) for _, files in listing)
    first_rel = f"{folder}/{listing[0][0]}/{listing[0][1][0]}"

    def header() -> tuple[tuple[int, int], str]:
        with open_regular(resolve_under(root, first_rel), first_rel) as f:
            try:
                with Image.open(f) as img:  # reads the header only
                    return img.size, img.mode
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise DataPathError(f"{first_rel}: cannot read the image ({exc})") from None

    (w, h), mode = call_with_timeout(header, first_rel)
    d = spec.data
    c = d.channels or IMAGEFOLDER_CHANNELS
    if c not in (1, 3):
        raise DataCheckError(
            ("data", "channels"),
            f"imagefolder reads grey (data.channels 1) or RGB (data.channels 3), got {c}",
        )
    size = d.image_size or IMAGEFOLDER_SIZE
    notes = []
    if (w, h) != (size, size):
        why = "" if d.image_size else f" (data.image_size unset: default {IMAGEFOLDER_SIZE})"
        notes.append(f"{folder}: images of {w}x{h} are resized to {size}x{size}{why}")
    own = 1 if mode in ("L", "1", "I", "F", "I;16") else 3
    if own != c:
        why = "" if d.channels else f" (data.channels unset: default {IMAGEFOLDER_CHANNELS})"
        notes.append(f"{folder}: {mode} images are converted to {c} channel(s){why}")
    train, val = _split(n, d.val_fraction, None)
    raw = n * c * size * size
    return DataInfo(
        "imagefolder", n, train, val, c, (size, size), len(listing), raw, raw * 4, notes=notes
    )


def _npz_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(N, C, H, W) of an ``x`` array as ``readers._channels_first`` reads it."""
    if len(shape) == 3:
        return shape[0], 1, shape[1], shape[2]
    if len(shape) != 4:
        raise ValueError(f"x must be (N,H,W), (N,C,H,W) or (N,H,W,C), got {shape}")
    n, a, b, last = shape
    if last < a and last <= 16:
        return n, last, a, b
    if a <= 16:
        return n, a, b, last
    raise ValueError(f"cannot tell the channel axis of shape {shape} (at most 16)")


def _npz(spec: JobSpec, root: str | Path | None) -> DataInfo:
    rel = spec.data.path or ""
    path = resolve_under(root, rel)

    def work() -> DataInfo:
        with open_regular(path, rel) as f:
            try:
                with zipfile.ZipFile(f) as archive:
                    heads = npz_headers(archive, rel)
                    if not {"x", "y"} <= set(heads):
                        raise DataPathError(f"{rel}: needs arrays 'x' and 'y', has {sorted(heads)}")
                    try:
                        n, c, h, w = _npz_shape(heads["x"].shape)
                    except ValueError as exc:
                        raise DataPathError(f"{rel}: {exc}") from None
                    has_val = {"x_val", "y_val"} <= set(heads)
                    n_val = heads["x_val"].shape[0] if has_val else None
                    top = -1
                    for key in ("y", "y_val") if has_val else ("y",):
                        if heads[key].nbytes <= MAX_LABEL_BYTES and heads[key].shape[0]:
                            f.seek(0)
                            with np.load(f, allow_pickle=False) as arrays:
                                top = max(top, int(np.max(arrays[key])))
            except (OSError, zipfile.BadZipFile, EOFError) as exc:
                raise DataPathError(f"{rel}: cannot read the .npz ({exc})") from None
        itemsize = heads["x"].dtype.itemsize
        total = n + (n_val or 0)
        out_c, hw, raw, tensors = _converted(spec, total, c, h, w, itemsize)
        train, val = _split(n, spec.data.val_fraction, n_val)
        return DataInfo("npz", total, train, val, out_c, hw, max(2, top + 1), raw, tensors)

    return call_with_timeout(work, rel)


def describe_data(spec: JobSpec, data_root: str | Path | None = None) -> DataInfo:
    """What the engine will hold for ``spec.data``, read from headers and listings only.

    Raises:
        DataCheckError: a field that does not fit the data set (``loc`` names it); reader
            errors (a missing, unreadable or lying file) come with ``loc`` ("data", "path")
            and name the file relative to the data root.
    """
    d = spec.data
    if d.num_samples is not None and d.dataset not in GENERATED:
        raise DataCheckError(
            ("data", "num_samples"),
            f"data.num_samples applies to generated sets {GENERATED}, not {d.dataset!r}: remove it",
        )
    if d.num_classes is not None and d.dataset != "synthetic":
        raise DataCheckError(
            ("data", "num_classes"),
            f"data.num_classes applies to the synthetic set, not {d.dataset!r}: remove it",
        )
    if d.dataset == "synthetic" and d.num_classes is not None and d.num_classes > len(SHAPES):
        raise DataCheckError(
            ("data", "num_classes"),
            f"data.num_classes is {d.num_classes} but the synthetic set has {len(SHAPES)} "
            f"shapes: use a num_classes from 2 to {len(SHAPES)}",
        )
    if d.dataset in GENERATED:
        return _generated(spec)
    if d.dataset == "digits":
        n, c, h, w, k = DIGITS
        out_c, hw, raw, tensors = _converted(spec, n, c, h, w, 4)
        train, val = _split(n, d.val_fraction, None)
        return DataInfo("digits", n, train, val, out_c, hw, k, raw, tensors)
    readers = {"mnist": _mnist, "cifar10": _cifar, "imagefolder": _imagefolder, "npz": _npz}
    try:
        info = readers[d.dataset](spec, data_root)
        # the split indexes a copy of the raw array; normalizing makes a float copy of the tensors
        info.extra_bytes = info.raw_bytes + info.tensor_bytes
        return info
    except DataCheckError:
        raise
    except ValueError as exc:  # DataPathError and the readers' own errors
        raise DataCheckError(
            ("data", "path"), f"{exc}{_wrong_format(d.dataset, data_root, d.path or '')}"
        ) from None
    except OSError as exc:  # a listing or header read the OS refused (permissions, I/O error)
        reason = exc.strerror or type(exc).__name__
        raise DataCheckError(("data", "path"), f"{d.path}: cannot be read ({reason})") from None


def _extra_classes_note(outputs: int, classes: int, dataset: str) -> str:
    return (
        f"model.num_classes is {outputs} but dataset {dataset!r} has {classes} classes: "
        f"{outputs - classes} outputs never see a label (set model.num_classes to {classes})"
    )


def check_data(spec: JobSpec, data_root: str | Path | None = None) -> DataInfo:
    """``describe_data`` plus the checks a spec must pass against its data set.

    Refused: a batch larger than the train split (per process under data parallel), a
    ``model.num_classes`` smaller than the data set's classes (labels past the last output),
    ``model.in_channels`` different from the data's channels. More outputs than classes train
    (the extra logits are pushed down) and become a note in ``notes`` and the job's log.

    Raises:
        DataCheckError: the first check that fails, naming the field and the value it needs.
    """
    info = describe_data(spec, data_root)
    d, m = spec.data, spec.model
    world = spec.resources.gpus if spec.resources.gpus > 1 else 1
    global_batch = d.batch_size * world
    if info.num_train < global_batch:
        what = f"{d.batch_size} x {world} processes" if world > 1 else f"{d.batch_size}"
        most = max(1, info.num_train // world)
        raise DataCheckError(
            ("data", "batch_size"),
            f"data.batch_size is {what} but the train split of {d.dataset!r} has "
            f"{info.num_train} samples{' (about)' if info.approximate else ''}: use a "
            f"batch_size of at most {most}, or lower data.val_fraction",
        )
    classes = info.num_classes if spec.task == "classification" else None
    if classes is not None and m.num_classes < classes:
        raise DataCheckError(
            ("model", "num_classes"),
            f"model.num_classes is {m.num_classes} but dataset {d.dataset!r} has "
            f"{classes} classes: set model.num_classes to {classes}",
        )
    if (
        spec.task == "classification"
        and info.num_classes is not None
        and m.num_classes > info.num_classes
    ):
        info.notes.append(_extra_classes_note(m.num_classes, info.num_classes, d.dataset))
    if m.in_channels is not None and m.in_channels != info.channels:
        raise DataCheckError(
            ("model", "in_channels"),
            f"model.in_channels is {m.in_channels} but dataset {d.dataset!r} gives "
            f"{info.channels} channel(s): leave model.in_channels unset or set it to "
            f"{info.channels}",
        )
    if math.prod(info.image_size) <= 0:
        raise DataCheckError(("data", "image_size"), f"images of {info.image_size} are empty")
    return info
