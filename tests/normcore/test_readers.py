"""Readers of real files, written here in their exact formats, and the data-root guard."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from normcore.data import DataNotFoundError, build_data, resolve_under
from normcore.data.readers import (
    SafeUnpickler,
    load_cifar10,
    load_imagefolder,
    load_mnist,
    load_npz,
    parse_idx,
    safe_unpickle,
)
from normcore.spec import DataSpec

RNG = np.random.default_rng(0)


def _idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}
    code = codes[array.dtype]
    header = struct.pack(">HBB", 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def _write_mnist(folder: Path, n_train: int, n_test: int, *, gz: bool) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, 6, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n_train, dtype=np.uint8),
    }
    if n_test:
        arrays["t10k-images-idx3-ubyte"] = RNG.integers(0, 256, (n_test, 6, 5), dtype=np.uint8)
        arrays["t10k-labels-idx1-ubyte"] = RNG.integers(0, 10, n_test, dtype=np.uint8)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()


# --------------------------------------------------------------------------- IDX / MNIST


def test_parse_idx_types_exactly() -> None:
    for array in (
        RNG.integers(0, 256, (3, 4, 2), dtype=np.uint8),
        RNG.integers(-(2**31), 2**31 - 1, (7,), dtype=np.int64).astype(">i4"),
        RNG.standard_normal((2, 3)).astype(">f4"),
    ):
        out = parse_idx(_idx_bytes(array), "x")
        assert out.shape == array.shape
        assert np.array_equal(out, array.astype(array.dtype.newbyteorder("=")))
        assert out.dtype.isnative


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_read_back_exactly(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path / "mnist", 30, 12, gz=gz)
    raw = load_mnist(tmp_path, "mnist")
    assert np.array_equal(raw.train.x[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(raw.train.y, arrays["train-labels-idx1-ubyte"])
    assert raw.test is not None
    assert np.array_equal(raw.test.x[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert raw.num_classes == 10
    # through build_data: the t10k split is the val split, values are exact
    spec = DataSpec(dataset="mnist", path="mnist", batch_size=8, normalize=False)
    bundle = build_data(spec, seed=0, data_root=tmp_path)
    assert bundle.train_x.shape == (30, 1, 6, 5) and bundle.in_channels == 1
    assert np.array_equal(_as_uint8(bundle.train_x)[:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(_as_uint8(bundle.val_x)[:, 0], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(bundle.val_y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    normalized = build_data(
        DataSpec(dataset="mnist", path="mnist", batch_size=8), seed=0, data_root=tmp_path
    )
    assert abs(normalized.train_x.mean().item()) < 1e-5


def test_mnist_without_test_split_is_split_by_val_fraction(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path / "m", 50, 0, gz=False)
    spec = DataSpec(dataset="mnist", path="m", batch_size=8, val_fraction=0.2, normalize=False)
    bundle = build_data(spec, seed=0, data_root=tmp_path)
    assert (bundle.num_train, bundle.num_val) == (40, 10)
    images = np.concatenate([_as_uint8(bundle.train_x), _as_uint8(bundle.val_x)])[:, 0]
    labels = np.concatenate([bundle.train_y.numpy(), bundle.val_y.numpy()])
    # the same samples, each with its own label
    original = {
        arr.tobytes(): int(lab)
        for arr, lab in zip(
            arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"], strict=True
        )
    }
    assert {arr.tobytes(): int(lab) for arr, lab in zip(images, labels, strict=True)} == original


def test_truncated_idx_gives_a_clear_error(tmp_path: Path) -> None:
    arrays = _write_mnist(tmp_path / "m", 10, 0, gz=False)
    path = tmp_path / "m" / "train-images-idx3-ubyte"
    path.write_bytes(_idx_bytes(arrays["train-images-idx3-ubyte"])[:-7])
    spec = DataSpec(dataset="mnist", path="m", batch_size=2)
    with pytest.raises(ValueError, match=r"m/train-images-idx3-ubyte: truncated") as info:
        build_data(spec, seed=0, data_root=tmp_path)
    assert str(tmp_path) not in str(info.value)
    path.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX header"):
        load_mnist(tmp_path, "m")
    path.write_bytes(b"GIF89a" + b"\x00" * 40)
    with pytest.raises(ValueError, match="bad IDX magic"):
        load_mnist(tmp_path, "m")
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(ValueError, match="corrupt gzip"):
        load_mnist(tmp_path, "m")


def test_mnist_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path, "empty")
    with pytest.raises(DataNotFoundError, match="'nowhere' not found") as info:
        build_data(DataSpec(dataset="mnist", path="nowhere"), seed=0, data_root=tmp_path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert str(tmp_path) not in str(info.value)
    with pytest.raises(ValueError, match="no data root"):
        build_data(DataSpec(dataset="mnist", path="m"), seed=0, data_root=None)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar_batch(n: int) -> dict[bytes, object]:
    return {
        b"batch_label": b"training batch",
        b"labels": [int(v) for v in RNG.integers(0, 10, n)],
        b"data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_read_back_exactly(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(6), _cifar_batch(5)]
    for i, batch in enumerate(batches, start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=protocol))
    test = _cifar_batch(4)
    (folder / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    raw = load_cifar10(tmp_path, "cifar-10-batches-py")
    data = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert np.array_equal(raw.train.x, data)
    assert raw.train.y.tolist() == batches[0][b"labels"] + batches[1][b"labels"]
    assert raw.test is not None and np.array_equal(raw.test.x, test[b"data"].reshape(-1, 3, 32, 32))
    spec = DataSpec(dataset="cifar10", path="cifar-10-batches-py", batch_size=4, normalize=False)
    bundle = build_data(spec, seed=0, data_root=tmp_path)
    assert bundle.train_x.shape == (11, 3, 32, 32) and bundle.num_classes == 10
    assert np.array_equal(_as_uint8(bundle.train_x), data)
    assert bundle.val_y.tolist() == test[b"labels"]


def test_cifar_python2_pickle_layout(tmp_path: Path) -> None:
    # the real files were written by Python 2 with numpy 1: numpy.core.multiarray, py2 strings
    batch = _cifar_batch(3)
    blob = pickle.dumps(batch, protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray"
    )
    assert b"numpy.core.multiarray\n_reconstruct" in blob
    out = safe_unpickle(blob, "data_batch_1")
    assert np.array_equal(out[b"data"], batch[b"data"]) and out[b"labels"] == batch[b"labels"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    folder.mkdir()
    evil = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [_Evil(marker)]}
    (folder / "data_batch_1").write_bytes(pickle.dumps(evil, protocol=2))
    spec = DataSpec(dataset="cifar10", path="cifar", batch_size=1)
    with pytest.raises(
        ValueError, match=r"cifar/data_batch_1: refusing to load global '(posix|os)\.system'"
    ):
        build_data(spec, seed=0, data_root=tmp_path)
    assert not marker.exists()
    for payload in (
        pickle.dumps(eval),
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"csubprocess\nPopen\n(S'true'\ntR.",
        b"c__builtin__\ngetattr\n.",
    ):
        with pytest.raises(ValueError, match="refusing"):
            safe_unpickle(payload, "x")
    with pytest.raises(pickle.UnpicklingError):
        SafeUnpickler(io.BytesIO(b"")).find_class("os", "system")
    with pytest.raises(ValueError, match="not a valid pickle"):
        safe_unpickle(pickle.dumps(_cifar_batch(2))[:50], "x")


def test_cifar_bad_layout(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(ValueError, match="3072"):
        load_cifar10(tmp_path, "c")
    (folder / "data_batch_1").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="dict"):
        load_cifar10(tmp_path, "c")


# --------------------------------------------------------------------------- image folder


def _write_folder(
    root: Path, classes: dict[str, int], size: int = 8
) -> dict[str, list[np.ndarray]]:
    written: dict[str, list[np.ndarray]] = {}
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(count):
            pixels = RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / name / f"{i:03d}.png")
            written[name].append(pixels)
    return written


def test_imagefolder_read_back_exactly(tmp_path: Path) -> None:
    written = _write_folder(tmp_path / "imgs", {"cat": 3, "dog": 4, "eel": 2})
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image")
    raw = load_imagefolder(tmp_path, "imgs", channels=3, image_size=8)
    expected = np.stack(
        [p.transpose(2, 0, 1) for name in ("cat", "dog", "eel") for p in written[name]]
    )
    assert np.array_equal(raw.train.x, expected)
    assert raw.train.y.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert raw.num_classes == 3 and raw.test is None
    grey = load_imagefolder(tmp_path, "imgs", channels=1, image_size=4)
    assert grey.train.x.shape == (9, 1, 4, 4)
    first = np.asarray(
        Image.fromarray(written["cat"][0]).convert("L").resize((4, 4), Image.BILINEAR)
    )
    assert np.array_equal(grey.train.x[0, 0], first)
    spec = DataSpec(dataset="imagefolder", path="imgs", batch_size=2, image_size=16, channels=3)
    bundle = build_data(spec, seed=0, data_root=tmp_path)
    assert bundle.train_x.shape[1:] == (3, 16, 16) and bundle.num_classes == 3
    assert bundle.num_train + bundle.num_val == 9


def test_imagefolder_corrupt_image(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    (tmp_path / "imgs" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"imgs/b/broken\.png: cannot read the image"):
        load_imagefolder(tmp_path, "imgs", channels=3, image_size=8)


# --------------------------------------------------------------------------- npz


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_npz_read_back_exactly(tmp_path: Path, layout: str) -> None:
    base = RNG.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    if layout == "NHW":
        x, expected = base[:, 0], base[:, :1]
    elif layout == "NCHW":
        x = expected = base
    else:
        x, expected = base.transpose(0, 2, 3, 1), base
    y = RNG.integers(0, 4, 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = load_npz(tmp_path, "d.npz")
    assert np.array_equal(raw.train.x, expected) and raw.train.y.tolist() == y.tolist()


def test_npz_float_and_val_split(tmp_path: Path) -> None:
    x = RNG.standard_normal((12, 2, 4, 4)).astype(np.float64)
    xv = RNG.standard_normal((3, 2, 4, 4)).astype(np.float32)
    np.savez_compressed(
        tmp_path / "f.npz", x=x, y=np.arange(12) % 3, x_val=xv, y_val=np.array([0, 1, 2])
    )
    spec = DataSpec(dataset="npz", path="f.npz", batch_size=4, normalize=False)
    bundle = build_data(spec, seed=0, data_root=tmp_path)
    assert torch.allclose(bundle.train_x, torch.from_numpy(x).float())
    assert torch.equal(bundle.val_x, torch.from_numpy(xv))
    assert bundle.num_classes == 3 and bundle.in_channels == 2


def test_npz_refuses_pickles_and_bad_arrays(tmp_path: Path) -> None:
    objects = np.empty(4, dtype=object)
    objects[:] = [1, "a", None, 2.0]
    np.savez(tmp_path / "o.npz", x=objects, y=np.arange(4))
    with pytest.raises(ValueError, match=r"o\.npz: .*allow_pickle"):
        load_npz(tmp_path, "o.npz")
    np.savez(tmp_path / "n.npz", x=np.zeros((3, 4, 4)), y=np.array([0.5, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        load_npz(tmp_path, "n.npz")
    np.savez(tmp_path / "k.npz", images=np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="needs arrays 'x' and 'y'"):
        load_npz(tmp_path, "k.npz")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match=r"bad.npz: cannot read"):
        load_npz(tmp_path, "bad.npz")


# --------------------------------------------------------------------------- the data root


def test_resolve_under_refuses_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert resolve_under(root, "sub/../sub/x.npz") == (root / "sub" / "x.npz").resolve()
    for bad in ("../outside", "sub/../../outside/x", str(outside), "/etc/passwd"):
        with pytest.raises(ValueError, match="escapes the data root"):
            resolve_under(root, bad)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"'link/x\.npz' escapes the data root"):
        resolve_under(root, "link/x.npz")
    (root / "inner").symlink_to(root / "sub", target_is_directory=True)
    assert resolve_under(root, "inner") == (root / "sub").resolve()


def test_symlinks_out_of_the_root_are_refused_by_readers(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    np.savez(outside / "secret.npz", x=np.zeros((4, 2, 2), np.uint8), y=np.arange(4))
    (root / "data.npz").symlink_to(outside / "secret.npz")
    with pytest.raises(ValueError, match="escapes the data root") as info:
        build_data(DataSpec(dataset="npz", path="data.npz", batch_size=2), seed=0, data_root=root)
    assert str(outside) not in str(info.value)
    # a file inside an image folder that links out is refused too
    _write_folder(root / "imgs", {"a": 1, "b": 1})
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "x.png")
    (root / "imgs" / "a" / "zz.png").symlink_to(outside / "x.png")
    with pytest.raises(ValueError, match=r"imgs/a/zz\.png' escapes the data root"):
        load_imagefolder(root, "imgs", channels=3, image_size=8)
    _write_mnist(outside / "m", 4, 0, gz=False)
    (root / "m").symlink_to(outside / "m", target_is_directory=True)
    with pytest.raises(ValueError, match="escapes the data root"):
        load_mnist(root, "m")
