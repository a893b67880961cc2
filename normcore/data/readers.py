"""Readers of real data files under the data root: MNIST IDX, CIFAR-10 batches, image folders, npz.

Every path goes through ``resolve_under`` so nothing outside the data root is read, and every
error names the file by its path relative to the root. CIFAR-10's batches are pickles: they
are read with ``SafeUnpickler``, which builds dicts, lists, strings, numbers and numpy arrays
and refuses everything else, never with ``pickle.load``.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normcore.data.paths import DataNotFoundError, existing_under, resolve_under

# gunzip no more than this, so a small "gzip bomb" cannot fill the memory
MAX_DECOMPRESSED = 4 << 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class RawSplit:
    """Images (N, C, H, W), uint8 in [0, 255] or float, and int64 labels (N,)."""

    x: np.ndarray
    y: np.ndarray


@dataclass
class RawData:
    """What a reader found: the train split and, when the files have one, a test split."""

    train: RawSplit
    test: RawSplit | None
    num_classes: int


# --------------------------------------------------------------------------- MNIST IDX


def read_maybe_gzip(path: Path, label: str) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = f.read(MAX_DECOMPRESSED + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{label}: corrupt gzip data ({exc})") from None
    if len(data) > MAX_DECOMPRESSED:
        raise ValueError(f"{label}: decompresses to more than {MAX_DECOMPRESSED >> 30} GiB")
    return data


def parse_idx(data: bytes, label: str) -> np.ndarray:
    """Decode an IDX file (LeCun's MNIST format): 0x0000, type code, rank, big-endian dims."""
    if len(data) < 4:
        raise ValueError(f"{label}: {len(data)} bytes is too short for an IDX header (truncated?)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{label}: bad IDX magic 0x{data[:4].hex()} (expected 0x0000 then a type code "
            "0x08-0x0E and a rank); not an IDX file"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{label}: truncated IDX header ({len(data)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    have = len(data) - header
    if have != expected:
        what = "truncated" if have < expected else "has trailing bytes"
        raise ValueError(
            f"{label}: {what}: the header says shape {dims} ({expected} bytes of data), "
            f"the file holds {have}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    # a native-order, writable copy (frombuffer views the read-only bytes)
    return array.astype(dtype.newbyteorder("="))


def _find(root: str | Path | None, folder: str, names: list[str]) -> tuple[Path, str] | None:
    for name in names:
        rel = f"{folder}/{name}"
        path = resolve_under(root, rel)
        if path.is_file():
            return path, rel
    return None


def _idx_names(prefix: str, kind: str, rank: int) -> list[str]:
    stems = [f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"]
    return [s + ext for s in stems for ext in ("", ".gz")]


def _mnist_split(root: str | Path | None, folder: str, prefix: str) -> RawSplit | None:
    image_names = _idx_names(prefix, "images", 3)
    label_names = _idx_names(prefix, "labels", 1)
    images = _find(root, folder, image_names)
    labels = _find(root, folder, label_names)
    if images is None and labels is None:
        return None
    if images is None or labels is None:
        expected = image_names[0] if images is None else label_names[0]
        raise DataNotFoundError(f"data folder '{folder}' has no {expected}[.gz] for its pair")
    x = parse_idx(read_maybe_gzip(images[0], images[1]), images[1])
    y = parse_idx(read_maybe_gzip(labels[0], labels[1]), labels[1])
    if x.ndim != 3 or x.dtype != np.uint8:
        raise ValueError(f"{images[1]}: expected uint8 images of rank 3, got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise ValueError(f"{labels[1]}: expected uint8 labels of rank 1, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{images[1]} has {len(x)} images but {labels[1]} has {len(y)} labels")
    return RawSplit(x[:, None], y.astype(np.int64))


def load_mnist(root: str | Path | None, folder: str) -> RawData:
    """MNIST-format IDX files in ``folder``: train-{images,labels} and optionally t10k-*.

    Also reads Fashion-MNIST and any set in this layout; ``.gz`` or not.
    """
    existing_under(root, folder, kind="folder")
    train = _mnist_split(root, folder, "train")
    if train is None:
        raise DataNotFoundError(
            f"data folder '{folder}' has no train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz]"
        )
    test = _mnist_split(root, folder, "t10k")
    return RawData(train, test, _num_classes(train, test, at_least=10))


def _num_classes(train: RawSplit, test: RawSplit | None, at_least: int = 2) -> int:
    top = int(train.y.max())
    if test is not None and len(test.y):
        top = max(top, int(test.y.max()))
    return max(at_least, top + 1)


# --------------------------------------------------------------------------- CIFAR-10


class RefusedPickle(pickle.UnpicklingError):
    """A pickle asked for something outside SafeUnpickler's whitelist."""


def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    import importlib

    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1")
    if encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    reconstruct = _numpy_attr(multiarray, "_reconstruct")
    frombuffer = _numpy_attr(numeric, "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
    for module in ("numpy._core.numeric", "numpy.core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    for module in ("builtins", "__builtin__"):
        for name, obj in (("dict", dict), ("list", list), ("bytes", bytes), ("str", str)):
            allowed[(module, name)] = obj
        allowed[(module, "int")] = int
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only a whitelist of globals: builtins' dict, list, bytes,
    str and int, and numpy's array and dtype reconstruction. Anything else (os.system,
    eval, subprocess, ...) raises ``pickle.UnpicklingError`` before it can be called.
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        """Return the whitelisted object for ``module.name`` or refuse."""
        if SafeUnpickler._allowed is None:
            SafeUnpickler._allowed = _allowed_globals()
        obj = SafeUnpickler._allowed.get((module, name))
        if obj is None:
            raise RefusedPickle(
                f"refusing to load global '{module}.{name}': only plain containers and numpy "
                "arrays are allowed in a data file"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids: a data file has no business referring outside itself."""
        raise RefusedPickle("refusing a persistent id in a data file")


def safe_unpickle(data: bytes, label: str) -> Any:
    """Unpickle ``data`` with ``SafeUnpickler`` (py2 strings as bytes); ValueError on refusal."""
    try:
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except RefusedPickle as exc:
        raise ValueError(f"{label}: {exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
    ) as exc:
        raise ValueError(f"{label}: not a valid pickle ({type(exc).__name__}: {exc})") from None


def _get(batch: dict[Any, Any], key: str) -> Any:
    if key.encode() in batch:
        return batch[key.encode()]
    return batch.get(key)


def _cifar_batch(path: Path, label: str) -> RawSplit:
    batch = safe_unpickle(path.read_bytes(), label)
    if not isinstance(batch, dict):
        raise ValueError(f"{label}: expected a dict batch, got {type(batch).__name__}")
    data = _get(batch, "data")
    labels = _get(batch, "labels")
    if labels is None:
        labels = _get(batch, "fine_labels")  # CIFAR-100 keeps its labels here
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{label}: 'data' must be a uint8 array (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{label}: 'data' rows have {data.shape[1]} values, expected 3072")
    if not isinstance(labels, list | np.ndarray) or len(labels) != len(data):
        raise ValueError(f"{label}: 'labels' must be a list of {len(data)} ints")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"{label}: 'labels' must be a list of ints") from None
    if y.ndim != 1 or (len(y) and y.min() < 0):
        raise ValueError(f"{label}: labels must be non-negative ints")
    return RawSplit(data.reshape(-1, 3, 32, 32), y)


def load_cifar10(root: str | Path | None, folder: str) -> RawData:
    """The ``cifar-10-batches-py`` folder: data_batch_1..5 (train) and test_batch (test)."""
    existing_under(root, folder, kind="folder")
    parts = []
    for i in range(1, 6):
        rel = f"{folder}/data_batch_{i}"
        path = resolve_under(root, rel)
        if path.is_file():
            parts.append(_cifar_batch(path, rel))
    if not parts:
        raise DataNotFoundError(f"data folder '{folder}' has no data_batch_1 .. data_batch_5")
    train = RawSplit(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    test_rel = f"{folder}/test_batch"
    test_path = resolve_under(root, test_rel)
    test = _cifar_batch(test_path, test_rel) if test_path.is_file() else None
    return RawData(train, test, _num_classes(train, test, at_least=10))


# --------------------------------------------------------------------------- image folder


def load_imagefolder(
    root: str | Path | None, folder: str, *, channels: int, image_size: int
) -> RawData:
    """One subfolder per class (sorted names give labels 0..K-1), images read with Pillow.

    Images are converted to grey ("L", ``channels`` 1) or RGB (3) and resized to
    ``image_size`` square with bilinear filtering.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"imagefolder reads grey (channels 1) or RGB (channels 3), got {channels}")
    base = existing_under(root, folder, kind="folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"data folder '{folder}' needs a subfolder per class, found {classes}")
    mode = "L" if channels == 1 else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        class_dir = resolve_under(root, f"{folder}/{name}")
        files = sorted(
            f.name
            for f in class_dir.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            raise ValueError(f"class folder '{folder}/{name}' holds no images ({IMAGE_SUFFIXES})")
        for file in files:
            rel = f"{folder}/{name}/{file}"
            path = resolve_under(root, rel)
            try:
                with Image.open(path) as img:
                    img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"{rel}: cannot read the image ({exc})") from None
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(index)
    train = RawSplit(np.stack(images), np.asarray(labels, dtype=np.int64))
    return RawData(train, None, len(classes))


# --------------------------------------------------------------------------- npz


def _channels_first(x: np.ndarray, label: str) -> np.ndarray:
    """(N,H,W) -> (N,1,H,W); 4-d arrays are channels-last when the last axis is the smaller.

    (N,32,32,3) and (N,8,8,1) are channels-last, (N,3,32,32) and (N,2,4,4) channels-first.
    """
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise ValueError(f"{label} must be (N,H,W), (N,C,H,W) or (N,H,W,C), got {x.shape}")
    if x.shape[-1] < x.shape[1] and x.shape[-1] <= 16:
        return x.transpose(0, 3, 1, 2)
    if x.shape[1] <= 16:
        return x
    raise ValueError(f"{label}: cannot tell the channel axis of shape {x.shape} (at most 16)")


def _npz_split(arrays: Any, xkey: str, ykey: str, label: str) -> RawSplit:
    x, y = arrays[xkey], arrays[ykey]
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise ValueError(f"{label}: {xkey} must be uint8 or float, got {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise ValueError(f"{label}: {xkey} has NaN or infinite values")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise ValueError(f"{label}: {ykey} must be a 1-d integer array, got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise ValueError(f"{label}: {xkey} has {len(x)} samples but {ykey} has {len(y)}")
    if len(y) and y.min() < 0:
        raise ValueError(f"{label}: {ykey} has negative labels")
    x = _channels_first(x, f"{label}: {xkey}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return RawSplit(x, y.astype(np.int64))


def load_npz(root: str | Path | None, relative: str) -> RawData:
    """An ``.npz`` with ``x`` (images) and ``y`` (int labels), optionally ``x_val``/``y_val``.

    Read with ``allow_pickle=False``: an object array in the file is refused.
    """
    path = existing_under(root, relative)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"{relative}: cannot read the .npz ({exc})") from None
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"{relative}: not an .npz archive (a single .npy array?)")
    with arrays:
        keys = set(arrays.files)
        if not {"x", "y"} <= keys:
            raise ValueError(f"{relative}: needs arrays 'x' and 'y', has {sorted(keys)}")
        try:
            train = _npz_split(arrays, "x", "y", relative)
            has_val = {"x_val", "y_val"} <= keys
            test = _npz_split(arrays, "x_val", "y_val", relative) if has_val else None
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ValueError(f"{relative}: corrupt .npz member ({exc})") from None
        except ValueError as exc:  # e.g. an object array, refused by allow_pickle=False
            if str(exc).startswith(relative):
                raise
            raise ValueError(f"{relative}: {exc}") from None
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise ValueError(
            f"{relative}: x_val images {test.x.shape[1:]} differ from x {train.x.shape[1:]}"
        )
    return RawData(train, test, _num_classes(train, test))


READERS: dict[str, Callable[..., RawData]] = {
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
    "npz": load_npz,
}
