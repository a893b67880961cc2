"""Readers of real data files under the data root: MNIST IDX, CIFAR-10 batches, image folders, npz.

Every path goes through ``resolve_under`` so nothing outside the data root is read, and every
error names the file by its path relative to the root. CIFAR-10's batches are pickles: they
are read with ``SafeUnpickler``, which builds dicts, lists, strings, numbers and numpy arrays
and refuses everything else, never with ``pickle.load``.

Nothing is allocated from a size a file declares before the file is known to hold that much:
IDX headers are checked against the file's size, ``.npz`` member headers against the member's,
and the unpickler bounds every allocation by the pickle's own length. Only regular files are
opened (a FIFO or device in a data folder is refused before anything blocks on it), and every
read runs under a timeout (``read_timeout()``), so a stalled mount fails the job with a clear
error instead of hanging it.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np

from normcore.data.paths import DataNotFoundError, existing_under, resolve_under

# gunzip no more than this, so a small "gzip bomb" cannot fill the memory
MAX_DECOMPRESSED = 4 << 30
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")
# one image file larger than this is not an image a CNN here trains on
MAX_IMAGE_BYTES = 64 << 20
# seconds one file read may take; NORMCORE_DATA_READ_TIMEOUT overrides it (0 turns it off)
DEFAULT_READ_TIMEOUT_S = 120.0
READ_TIMEOUT_ENV = "NORMCORE_DATA_READ_TIMEOUT"
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
    # changes the reader made that the spec did not ask for in so many words (log lines)
    notes: list[str] = field(default_factory=list)
    # the name of each label 0..K-1 when the files give one (image folders: the folder names)
    class_names: list[str] | None = None


T = TypeVar("T")


class DataReadTimeout(ValueError):
    """A read of a data file took longer than the read timeout; the message names the file."""


def read_timeout() -> float | None:
    """Seconds one file read may take: ``NORMCORE_DATA_READ_TIMEOUT`` or 120; None when <= 0.

    Raises:
        ValueError: the variable is set but is not a number.
    """
    text = os.environ.get(READ_TIMEOUT_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_READ_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{READ_TIMEOUT_ENV}={text!r} is not a number of seconds") from None
    return value if value > 0 else None


def call_with_timeout(fn: Callable[[], T], label: str, timeout: float | None = None) -> T:
    """``fn()`` run in a daemon thread; DataReadTimeout if it has not returned in ``timeout`` s.

    ``timeout`` defaults to ``read_timeout()``. A read blocked in the kernel cannot be
    interrupted from Python: the thread is abandoned (it is a daemon, so it never holds up the
    interpreter's exit) and the caller gets the error at once.
    """
    limit = read_timeout() if timeout is None else timeout
    if limit is None or limit <= 0:
        return fn()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="normcore-data-read", daemon=True).start()
    if not done.wait(limit):
        raise DataReadTimeout(
            f"{label}: reading did not finish within {limit:g} s (a stalled network mount or "
            f"a file that blocks?); the read was abandoned ({READ_TIMEOUT_ENV} sets the limit)"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path, label: str) -> int:
    """The size in bytes of ``path``; ValueError naming ``label`` unless it is a regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{label}: cannot read it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{label} is {_file_kind(st.st_mode)}: only regular files are read")
    return st.st_size


def open_regular(path: Path, label: str) -> IO[bytes]:
    """Open ``path`` for binary reading, refusing anything but a regular file.

    Opened with O_NONBLOCK (opening a FIFO would otherwise block until a writer appears) and
    checked with fstat on the open descriptor, so a file swapped for a FIFO after a stat is
    still refused.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ValueError(f"{label}: cannot open it ({exc.strerror or exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{label} is {_file_kind(mode)}: only regular files are read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(stream: IO[bytes], limit: int, chunk: int = 1 << 20) -> bytes:
    """Up to ``limit + 1`` bytes of ``stream``, read in chunks.

    ``stream.read(n)`` sizes its buffer by ``n`` up front, so asking for "at most 4 GiB" in one
    call reserves 4 GiB: under an address-space limit that alone fails.
    """
    parts = bytearray()
    while len(parts) <= limit:
        block = stream.read(min(chunk, limit + 1 - len(parts)))
        if not block:
            break
        parts += block
    return bytes(parts)


def read_file(path: Path, label: str, *, max_bytes: int = MAX_DECOMPRESSED) -> bytes:
    """All bytes of a regular file of at most ``max_bytes``, read under the read timeout."""

    def work() -> bytes:
        with open_regular(path, label) as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise ValueError(
                    f"{label}: {size:,} bytes is over the {max_bytes:,}-byte limit of one file"
                )
            data = read_limited(f, max_bytes)
            if len(data) > max_bytes:
                raise ValueError(f"{label}: grew past the {max_bytes:,}-byte limit while read")
            return data

    return call_with_timeout(work, label)


# --------------------------------------------------------------------------- MNIST IDX


def read_maybe_gzip(path: Path, label: str, limit: int = MAX_DECOMPRESSED) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name).

    At most ``limit`` bytes come out of the gzip stream: a small "gzip bomb" cannot fill the
    memory.
    """
    raw = read_file(path, label)
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            data = read_limited(f, limit)  # type: ignore[arg-type]
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{label}: corrupt gzip data ({exc})") from None
    if len(data) > limit:
        raise ValueError(f"{label}: decompresses to more than {limit:,} bytes")
    return data


@dataclass(frozen=True)
class IdxHeader:
    """What an IDX header declares: element type, shape, header length and data bytes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    header_bytes: int

    @property
    def data_bytes(self) -> int:
        """Bytes of data the header promises after itself."""
        return math.prod(self.shape) * self.dtype.itemsize


def parse_idx_header(data: bytes, label: str) -> IdxHeader:
    """Decode the header at the start of ``data`` (at least its first 4 + 4 * rank bytes)."""
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
    return IdxHeader(np.dtype(_IDX_DTYPES[code]), tuple(dims), header)


def _check_idx_size(head: IdxHeader, have: int, label: str) -> None:
    if have != head.data_bytes:
        what = "truncated" if have < head.data_bytes else "has trailing bytes"
        raise ValueError(
            f"{label}: {what}: the header says shape {head.shape} ({head.data_bytes} bytes of "
            f"data), the file holds {have}"
        )


def parse_idx(data: bytes, label: str) -> np.ndarray:
    """Decode an IDX file (LeCun's MNIST format): 0x0000, type code, rank, big-endian dims."""
    head = parse_idx_header(data, label)
    _check_idx_size(head, len(data) - head.header_bytes, label)
    count = math.prod(head.shape)
    array = np.frombuffer(data, dtype=head.dtype, count=count, offset=head.header_bytes)
    # a native-order, writable copy (frombuffer views the read-only bytes)
    return array.reshape(head.shape).astype(head.dtype.newbyteorder("="))


# the most a deflate stream expands (about 1032:1); a header declaring more is lying
_GZIP_MAX_RATIO = 1100


def read_idx_header(path: Path, label: str) -> tuple[IdxHeader, int]:
    """The header of an IDX file (gzipped or not) and the file's size, reading a few bytes."""

    def work() -> tuple[IdxHeader, int]:
        with open_regular(path, label) as f:
            size = os.fstat(f.fileno()).st_size
            stream: IO[bytes] = f
            if f.read(2) == b"\x1f\x8b":
                f.seek(0)
                stream = gzip.GzipFile(fileobj=f)  # type: ignore[assignment]
            else:
                f.seek(0)
            try:
                first = stream.read(4)
                rank = first[3] if len(first) == 4 else 0
                return parse_idx_header(first + stream.read(4 * rank), label), size
            except (OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{label}: corrupt gzip data ({exc})") from None

    return call_with_timeout(work, label)


def read_idx(path: Path, label: str) -> np.ndarray:
    """An IDX file's array; the header is checked against the file size before any allocation."""
    head, size = read_idx_header(path, label)
    compressed = False
    with open_regular(path, label) as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if not compressed:
        _check_idx_size(head, size - head.header_bytes, label)
    elif head.data_bytes > MAX_DECOMPRESSED or head.data_bytes > size * _GZIP_MAX_RATIO:
        raise ValueError(
            f"{label}: the header says shape {head.shape} ({head.data_bytes:,} bytes of data), "
            f"more than a {size:,}-byte gzip file can hold"
        )
    # one byte more than the header promises, so trailing bytes are still caught
    return parse_idx(read_maybe_gzip(path, label, head.header_bytes + head.data_bytes + 1), label)


def _find(root: str | Path | None, folder: str, names: list[str]) -> tuple[Path, str] | None:
    for name in names:
        rel = f"{folder}/{name}"
        path = resolve_under(root, rel)
        if path.exists():  # read_idx refuses a FIFO or device by name, instead of "missing"
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
    x = read_idx(images[0], images[1])
    y = read_idx(labels[0], labels[1])
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


def _allowed_globals(budget: int) -> dict[tuple[str, str], Any]:
    """The whitelist, with every callable that can allocate bounded by ``budget`` bytes.

    A real pickle stores its arrays' bytes literally, so nothing it builds is larger than the
    pickle itself; ``bytes(10**9)`` or ``_reconstruct(ndarray, (100000, 3072), ...)`` in a
    121-byte file is a lie and is refused before it allocates.
    """
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    reconstruct = _numpy_attr(multiarray, "_reconstruct")
    frombuffer = _numpy_attr(numeric, "_frombuffer")

    def check(nbytes: int, what: str) -> None:
        if nbytes > budget:
            raise RefusedPickle(
                f"{what} asks for {nbytes:,} bytes, more than the whole file ({budget:,} bytes) "
                "holds: a data pickle stores its arrays' bytes literally"
            )

    def array_bytes(shape: Any, dtype: Any) -> int:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise RefusedPickle(f"array shape {shape!r} is not a tuple of sizes")
        return math.prod(dims) * np.dtype(dtype).itemsize

    class _NdarrayType:
        """Stands for numpy.ndarray: calling it directly would allocate a declared shape."""

        def __new__(cls, shape: Any, dtype: Any = float, *args: Any, **kwargs: Any) -> Any:
            check(array_bytes(shape, dtype), "an ndarray")
            return np.ndarray(shape, dtype, *args, **kwargs)

    def bounded_reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is _NdarrayType:
            subtype = np.ndarray
        if subtype is not np.ndarray:
            raise RefusedPickle(f"refusing to reconstruct {subtype!r}")
        check(array_bytes(shape, dtype), "an array")
        return reconstruct(subtype, shape, dtype)

    def bounded_bytes(*args: Any) -> bytes:
        if args and isinstance(args[0], int):
            check(args[0], f"bytes({args[0]})")
        return bytes(*args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NdarrayType,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in multiarray:
        allowed[(module, "_reconstruct")] = bounded_reconstruct
    for module in numeric:
        allowed[(module, "_frombuffer")] = frombuffer  # a view of bytes the pickle holds
    for module in ("builtins", "__builtin__"):
        for name, obj in (("dict", dict), ("list", list), ("bytes", bounded_bytes), ("str", str)):
            allowed[(module, name)] = obj
        allowed[(module, "int")] = int
    return allowed


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that resolves only a whitelist of globals: builtins' dict, list, bytes,
    str and int, and numpy's array and dtype reconstruction. Anything else (os.system,
    eval, subprocess, ...) raises ``pickle.UnpicklingError`` before it can be called, and no
    whitelisted call may allocate more than ``max_bytes`` (default: the pickle's length).
    """

    def __init__(self, file: IO[bytes], *, max_bytes: int | None = None, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        if max_bytes is None:
            try:
                max_bytes = os.fstat(file.fileno()).st_size
            except (AttributeError, OSError, io.UnsupportedOperation):
                buffer = getattr(file, "getbuffer", None)
                max_bytes = len(buffer()) if buffer is not None else MAX_DECOMPRESSED
        self._allowed = _allowed_globals(max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        """Return the whitelisted object for ``module.name`` or refuse."""
        obj = self._allowed.get((module, name))
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
    """Unpickle ``data`` with ``SafeUnpickler`` (py2 strings as bytes); ValueError on refusal.

    No object it builds may take more bytes than ``data`` has.
    """
    try:
        return SafeUnpickler(io.BytesIO(data), max_bytes=len(data), encoding="bytes").load()
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
    raw = read_file(path, label)
    batch = safe_unpickle(raw, label)
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
    if data.nbytes > len(raw):
        raise ValueError(f"{label}: 'data' holds more bytes than the file ({len(raw):,} bytes)")
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
        if path.exists():
            parts.append(_cifar_batch(path, rel))
    if not parts:
        raise DataNotFoundError(f"data folder '{folder}' has no data_batch_1 .. data_batch_5")
    train = RawSplit(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    test_rel = f"{folder}/test_batch"
    test_path = resolve_under(root, test_rel)
    test = _cifar_batch(test_path, test_rel) if test_path.exists() else None
    return RawData(train, test, _num_classes(train, test, at_least=10))


# --------------------------------------------------------------------------- image folder


def list_imagefolder(
    root: str | Path | None, folder: str, *, check_files: bool = True
) -> list[tuple[str, list[str]]]:
    """The class folders of an image folder and each one's image files, sorted; no image read.

    ``check_files`` stats every image name (one call each) to refuse non-regular files before
    any is opened; a listing for counting only can skip it.

    Raises:
        ValueError: fewer than two class folders, a class folder without images, or an image
            name that is not a regular file (a FIFO or device would block or never end);
            messages name the path relative to the data root.
    """
    base = existing_under(root, folder, kind="folder")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"data folder '{folder}' needs a subfolder per class, found {classes}")
    listing: list[tuple[str, list[str]]] = []
    for name in classes:
        class_dir = resolve_under(root, f"{folder}/{name}")
        files = sorted(
            f.name
            for f in class_dir.iterdir()
            if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")
        )
        if not files:
            raise ValueError(f"class folder '{folder}/{name}' holds no images ({IMAGE_SUFFIXES})")
        for file in files if check_files else ():  # up front: nothing read if one would block
            rel = f"{folder}/{name}/{file}"
            check_regular(resolve_under(root, rel), rel)
        listing.append((name, files))
    return listing


def load_imagefolder(
    root: str | Path | None,
    folder: str,
    *,
    channels: int,
    image_size: int,
    defaults: tuple[str, ...] = (),
) -> RawData:
    """One subfolder per class (sorted names give labels 0..K-1), images read with Pillow.

    Images are converted to grey ("L", ``channels`` 1) or RGB (3) and resized to
    ``image_size`` square with bilinear filtering. Each file is read whole (at most
    ``MAX_IMAGE_BYTES``) under the read timeout before Pillow decodes it. ``defaults`` names
    the spec fields ("channels", "image_size") the caller filled in with defaults: the notes
    of the result then say which images were changed to fit them.
    """
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(
            "imagefolder reads images with pillow: pip install 'normcore[data]'"
        ) from exc

    if channels not in (1, 3):
        raise ValueError(f"imagefolder reads grey (channels 1) or RGB (channels 3), got {channels}")
    mode = "L" if channels == 1 else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    sizes: dict[tuple[int, int], int] = {}
    modes: dict[str, int] = {}
    listing = list_imagefolder(root, folder)
    num_classes = len(listing)
    for index, (name, files) in enumerate(listing):
        for file in files:
            rel = f"{folder}/{name}/{file}"
            data = read_file(resolve_under(root, rel), rel, max_bytes=MAX_IMAGE_BYTES)
            try:
                with Image.open(io.BytesIO(data)) as img:
                    sizes[img.size] = sizes.get(img.size, 0) + 1
                    modes[img.mode] = modes.get(img.mode, 0) + 1
                    img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"{rel}: cannot read the image ({exc})") from None
            images.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
            labels.append(index)
    train = RawSplit(np.stack(images), np.asarray(labels, dtype=np.int64))
    notes = []
    resized = {k: v for k, v in sizes.items() if k != (image_size, image_size)}
    if resized:
        found = ", ".join(f"{n} of {w}x{h}" for (w, h), n in sorted(resized.items()))
        why = " (data.image_size unset: its default)" if "image_size" in defaults else ""
        notes.append(f"{folder}: images resized to {image_size}x{image_size}{why}: {found}")
    converted = {k: v for k, v in modes.items() if k != mode}
    if converted:
        found = ", ".join(f"{n} {m}" for m, n in sorted(converted.items()))
        why = " (data.channels unset: its default)" if "channels" in defaults else ""
        notes.append(f"{folder}: images converted to {mode} ({channels} channels){why}: {found}")
    return RawData(train, None, num_classes, notes, class_names=[name for name, _ in listing])


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


@dataclass(frozen=True)
class NpyHeader:
    """What one ``.npz`` member's header declares."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the array the header declares."""
        return math.prod(self.shape) * self.dtype.itemsize


def npz_headers(archive: zipfile.ZipFile, label: str) -> dict[str, NpyHeader]:
    """Shape and dtype of every ``.npy`` member, read from the headers only.

    Each declared size is checked against the member's size in the zip directory (which caps
    what zipfile will ever inflate) and against ``MAX_DECOMPRESSED``, so a small archive that
    declares a huge array fails here instead of allocating.
    """
    headers: dict[str, NpyHeader] = {}
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        key = info.filename[: -len(".npy")]
        try:
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                header_len = f.tell()
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise ValueError(f"{label}: member {key!r} has no valid .npy header ({exc})") from None
        head = NpyHeader(tuple(int(d) for d in shape), np.dtype(dtype))
        if head.dtype.hasobject:
            raise ValueError(
                f"{label}: member {key!r} is an object array: pickles are refused (read with allow_pickle=False)"
            )
        if head.nbytes > MAX_DECOMPRESSED:
            raise ValueError(
                f"{label}: member {key!r} declares {head.nbytes:,} bytes {head.shape}, over the "
                f"{MAX_DECOMPRESSED >> 30} GiB limit of one array"
            )
        if info.file_size - header_len < head.nbytes:
            raise ValueError(
                f"{label}: member {key!r} is truncated: its header says shape {head.shape} "
                f"({head.nbytes:,} bytes), the member holds {info.file_size - header_len:,}"
            )
        headers[key] = head
    return headers


def load_npz(root: str | Path | None, relative: str) -> RawData:
    """An ``.npz`` with ``x`` (images) and ``y`` (int labels), optionally ``x_val``/``y_val``.

    Read with ``allow_pickle=False``: an object array in the file is refused. Member headers
    are checked (``npz_headers``) before any array is read.
    """
    path = existing_under(root, relative)
    return call_with_timeout(lambda: _read_npz(path, relative), relative)


def _read_npz(path: Path, relative: str) -> RawData:
    with open_regular(path, relative) as f:
        if f.read(6) == b"\x93NUMPY":
            raise ValueError(f"{relative}: not an .npz archive (a single .npy array?)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                npz_headers(archive, relative)
            f.seek(0)
            arrays = np.load(f, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            if str(exc).startswith(relative):
                raise
            raise ValueError(f"{relative}: cannot read the .npz ({exc})") from None
        return _npz_arrays(arrays, relative)


def _npz_arrays(arrays: Any, relative: str) -> RawData:
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
