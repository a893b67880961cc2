"""A spec checked against its data set before training, and readers that neither block nor
allocate what a file only claims to hold. Real files, FIFOs and pickles, written here."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from normcore.data import build_data
from normcore.data.check import DataCheckError, check_data, describe_data, sniff_format
from normcore.data.loader import DataMemoryError
from normcore.data.readers import DataReadTimeout, call_with_timeout, load_cifar10
from normcore.spec import DataSpec, JobSpec
from tests.normcore.test_readers import _cifar_batch, _write_folder, _write_mnist

RNG = np.random.default_rng(1)


def _spec(data: dict, model: dict | None = None, **top: object) -> JobSpec:
    return JobSpec.model_validate(
        {"model": {"arch": "lenet", **(model or {})}, "data": data, **top}
    )


# --------------------------------------------------------------------------- blocking reads


def test_fifo_in_an_image_folder_is_refused_by_name_without_blocking(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    os.mkfifo(tmp_path / "imgs" / "b" / "zz.png")  # nobody ever writes to it
    spec = DataSpec(dataset="imagefolder", path="imgs", batch_size=2)
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^imgs/b/zz\.png is a FIFO \(named pipe\)"):
        build_data(spec, seed=0, data_root=tmp_path)
    # at submit the folder is only listed (no stat per image): it must not block either
    info = check_data(_spec({"dataset": "imagefolder", "path": "imgs", "batch_size": 2}), tmp_path)
    assert info.num_samples == 5
    assert time.monotonic() - started < 5
    with pytest.raises(ValueError) as error:
        build_data(spec, seed=0, data_root=tmp_path)
    assert str(tmp_path) not in str(error.value)


def test_fifo_named_like_a_data_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    os.mkfifo(tmp_path / "m" / "train-images-idx3-ubyte")
    os.mkfifo(tmp_path / "m" / "train-labels-idx1-ubyte")
    os.mkfifo(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"m/train-images-idx3-ubyte is a FIFO"):
        build_data(DataSpec(dataset="mnist", path="m"), seed=0, data_root=tmp_path)
    with pytest.raises(ValueError, match=r"'d\.npz' is not a regular file"):
        build_data(DataSpec(dataset="npz", path="d.npz"), seed=0, data_root=tmp_path)


def test_a_read_that_blocks_ends_within_the_timeout(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    holder = os.open(fifo, os.O_RDWR)  # a writer that never writes: reads block
    reader = os.open(fifo, os.O_RDONLY)
    try:
        started = time.monotonic()
        with pytest.raises(DataReadTimeout, match=r"^data/pipe: reading did not finish within"):
            call_with_timeout(lambda: os.read(reader, 10), "data/pipe", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        os.write(holder, b"x")  # let the abandoned thread finish
        os.close(holder)
    time.sleep(0.05)
    os.close(reader)
    assert call_with_timeout(lambda: 42, "x", timeout=1) == 42
    with pytest.raises(ZeroDivisionError):
        call_with_timeout(lambda: 1 // 0, "x", timeout=1)


def test_read_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from normcore.data.readers import read_timeout

    monkeypatch.setenv("NORMCORE_DATA_READ_TIMEOUT", "2.5")
    assert read_timeout() == 2.5
    monkeypatch.setenv("NORMCORE_DATA_READ_TIMEOUT", "0")
    assert read_timeout() is None
    monkeypatch.setenv("NORMCORE_DATA_READ_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="NORMCORE_DATA_READ_TIMEOUT"):
        read_timeout()


# --------------------------------------------------------------------------- lying sizes


def _peak_bytes(fn) -> tuple[BaseException | None, int, float]:
    tracemalloc.start()
    started = time.perf_counter()
    error = None
    try:
        fn()
    except BaseException as exc:
        error = exc
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return error, peak, time.perf_counter() - started


def test_tiny_cifar_batch_declaring_100k_images_fails_fast_without_allocating(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    rows = 100_000 * 3072
    # bytes(N) allocates N zero bytes; _reconstruct(ndarray, shape, ...) allocates the shape
    zeros = b"\x80\x02cbuiltins\nbytes\nJ" + struct.pack("<i", rows) + b"\x85R."
    shaped = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        b"J\xa0\x86\x01\x00M\x00\x0c\x86U\x01B\x87R."
    )
    assert len(zeros) < 121 and len(shaped) < 121
    for blob in (zeros, shaped):
        (folder / "data_batch_1").write_bytes(blob)
        error, peak, seconds = _peak_bytes(lambda: load_cifar10(tmp_path, "c"))
        assert isinstance(error, ValueError), error
        assert str(error).startswith("c/data_batch_1: ")
        assert "more than the whole file" in str(error)
        assert peak < 20 * 2**20 and seconds < 2, (peak, seconds)
    # a real batch still loads
    (folder / "data_batch_1").write_bytes(pickle.dumps(_cifar_batch(3), protocol=2))
    assert load_cifar10(tmp_path, "c").train.x.shape == (3, 3, 32, 32)


def test_idx_header_declaring_more_than_the_file_fails_before_reading(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 100_000, 28, 28)
    (folder / "train-images-idx3-ubyte").write_bytes(header + b"\0" * 10)
    labels = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 100_000)
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)
    spec = DataSpec(dataset="mnist", path="m")
    error, peak, _ = _peak_bytes(lambda: build_data(spec, seed=0, data_root=tmp_path))
    assert isinstance(error, ValueError)
    assert "m/train-images-idx3-ubyte: truncated: the header says shape (100000, 28, 28)" in str(
        error
    )
    assert peak < 20 * 2**20
    # gzipped: 78 MB cannot come out of a 40-byte gzip stream
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\0" * 10))
    error, peak, _ = _peak_bytes(lambda: build_data(spec, seed=0, data_root=tmp_path))
    assert "more than a" in str(error) and "gzip file can hold" in str(error), error
    assert peak < 20 * 2**20


def _npy_member(shape: tuple[int, ...], data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": shape}
    )
    return buf.getvalue() + data


def test_npz_member_declaring_a_huge_array_fails_before_reading(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as z:
        z.writestr("x.npy", _npy_member((100_000, 3, 32, 32), b"\0" * 64))
        z.writestr("y.npy", _npy_member((100_000,), b"\0" * 64))
    spec = DataSpec(dataset="npz", path="lie.npz")
    error, peak, _ = _peak_bytes(lambda: build_data(spec, seed=0, data_root=tmp_path))
    assert isinstance(error, ValueError)
    assert str(error).startswith("lie.npz: member 'x' is truncated: its header says shape")
    assert peak < 20 * 2**20


def test_data_loading_oom_names_the_data_not_the_batch_size() -> None:
    import resource

    spec = DataSpec(dataset="synthetic", num_samples=60_000, channels=4, image_size=32)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # run in a thread-free child so the limit cannot hurt this test process
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        message = pool.apply(_build_under_limit, (spec.model_dump(), 1200 * 2**20))
    assert resource.getrlimit(resource.RLIMIT_AS) == (soft, hard)
    assert message.startswith("DataMemoryError: out of memory while loading data set 'synthetic'")
    assert "data.num_samples" in message and "data.batch_size does not help" in message


def _build_under_limit(data: dict, limit: int) -> str:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        build_data(DataSpec.model_validate(data), seed=0)
    except DataMemoryError as exc:
        return f"DataMemoryError: {exc}"
    except BaseException as exc:  # pragma: no cover - reported by the assertion
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


# --------------------------------------------------------------------------- check_data


def test_describe_matches_what_the_loader_builds(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "m", 30, 12, gz=True)
    _write_folder(tmp_path / "imgs", {"a": 3, "b": 4}, size=8)
    folder = tmp_path / "c"
    folder.mkdir()
    for i, n in ((1, 6), (2, 5)):
        # protocol 4 stores bytes as they are, like the real (Python 2) files; a Python 3
        # protocol-2 pickle stores them as latin-1 text, up to 2x larger, and is overcounted
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(n), protocol=4))
    np.savez(
        tmp_path / "d.npz",
        x=RNG.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
        y=np.arange(20) % 5,
    )
    cases = [
        {"dataset": "synthetic", "num_samples": 64, "num_classes": 6, "batch_size": 4},
        {"dataset": "brightness", "num_samples": 40, "batch_size": 4},
        {"dataset": "digits", "image_size": 12, "channels": 3, "batch_size": 4},
        {"dataset": "mnist", "path": "m", "batch_size": 4},
        {"dataset": "cifar10", "path": "c", "batch_size": 4, "val_fraction": 0.25},
        {"dataset": "imagefolder", "path": "imgs", "batch_size": 2, "image_size": 8},
        {"dataset": "npz", "path": "d.npz", "batch_size": 2},
    ]
    for data in cases:
        spec = DataSpec.model_validate(data)
        info = describe_data(_spec(data, {"num_classes": 10}), tmp_path)
        bundle = build_data(spec, seed=0, data_root=tmp_path)
        got = (info.num_train, info.num_val, info.channels, info.image_size, info.num_classes)
        want = (
            bundle.num_train,
            bundle.num_val,
            bundle.in_channels,
            bundle.image_size,
            bundle.num_classes,
        )
        if info.approximate:  # CIFAR: counted from file sizes
            assert got[2:] == want[2:], data
            assert abs(info.num_train - bundle.num_train) <= 1, (got, want)
            continue
        assert got == want, data
        tensors = bundle.train_x.nbytes + bundle.val_x.nbytes
        assert info.tensor_bytes == tensors, data


@pytest.mark.parametrize(
    ("data", "model", "loc", "needle"),
    [
        (
            {"dataset": "digits", "batch_size": 2000},
            {},
            ("data", "batch_size"),
            "train split of 'digits' has 1438 samples: use a batch_size of at most 1438",
        ),
        (
            {"dataset": "digits"},
            {"num_classes": 5},
            ("model", "num_classes"),
            "set model.num_classes to 10",
        ),
        (
            {"dataset": "synthetic", "num_classes": 6},
            {"num_classes": 4},
            ("model", "num_classes"),
            "has 6 classes: set model.num_classes to 6",
        ),
        (
            {"dataset": "synthetic", "num_classes": 12},
            {"num_classes": 12},
            ("data", "num_classes"),
            "use a num_classes from 2 to 10",
        ),
        (
            {"dataset": "digits"},
            {"in_channels": 3},
            ("model", "in_channels"),
            "set it to 1",
        ),
        (
            {"dataset": "digits", "num_samples": 10},
            {},
            ("data", "num_samples"),
            "remove it",
        ),
    ],
)
def test_newcomer_mistakes_name_the_field_and_the_value(
    data: dict, model: dict, loc: tuple[str, ...], needle: str
) -> None:
    with pytest.raises(DataCheckError) as info:
        check_data(_spec(data, model))
    assert info.value.loc == loc
    assert needle in str(info.value)


def test_a_reader_pointed_at_another_format_says_which(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "m", 10, 0, gz=False)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps(_cifar_batch(3), protocol=2))
    _write_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    assert sniff_format(tmp_path, "m") == "mnist"
    assert sniff_format(tmp_path, "c") == "cifar10"
    assert sniff_format(tmp_path, "imgs") == "imagefolder"
    for dataset, path, found in (
        ("cifar10", "m", "mnist"),
        ("mnist", "c", "cifar10"),
        ("mnist", "imgs", "imagefolder"),
        ("imagefolder", "c", "cifar10"),
    ):
        with pytest.raises(DataCheckError) as info:
            check_data(_spec({"dataset": dataset, "path": path, "batch_size": 2}), tmp_path)
        assert info.value.loc == ("data", "path")
        assert f"looks like {found} data: set data.dataset to '{found}'" in str(info.value)


def test_imagefolder_defaults_are_said_not_silent(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "g" / name).mkdir(parents=True)
        for i in range(3):
            pixels = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(tmp_path / "g" / name / f"{i}.png")
    info = check_data(_spec({"dataset": "imagefolder", "path": "g", "batch_size": 2}), tmp_path)
    assert info.channels == 3 and info.image_size == (32, 32)
    assert any("8x8 are resized to 32x32 (data.image_size unset" in n for n in info.notes)
    assert any("converted to 3 channel(s) (data.channels unset" in n for n in info.notes)
    bundle = build_data(
        DataSpec(dataset="imagefolder", path="g", batch_size=2), seed=0, data_root=tmp_path
    )
    assert any("resized to 32x32 (data.image_size unset" in n for n in bundle.notes)
    assert any("converted to RGB (3 channels) (data.channels unset" in n for n in bundle.notes)
    own = DataSpec(dataset="imagefolder", path="g", batch_size=2, channels=1, image_size=8)
    assert build_data(own, seed=0, data_root=tmp_path).notes == []


def test_describe_reads_headers_only(tmp_path: Path) -> None:
    # a large, valid IDX set: describing it must not read the images
    folder = tmp_path / "big"
    folder.mkdir()
    n = 20_000
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", n, 28, 28)
    with open(folder / "train-images-idx3-ubyte", "wb") as f:
        f.write(header)
        f.truncate(len(header) + n * 28 * 28)
    labels = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", n) + bytes(n)
    (folder / "train-labels-idx1-ubyte").write_bytes(labels)
    error, peak, seconds = _peak_bytes(
        lambda: check_data(_spec({"dataset": "mnist", "path": "big"}), tmp_path)
    )
    assert error is None, error
    assert peak < 2 * 2**20 and seconds < 2, (peak, seconds)


def test_reads_do_not_leave_threads_running(tmp_path: Path) -> None:
    _write_mnist(tmp_path / "m", 10, 0, gz=False)
    before = threading.active_count()
    build_data(DataSpec(dataset="mnist", path="m", batch_size=2), seed=0, data_root=tmp_path)
    time.sleep(0.05)
    assert threading.active_count() == before


def test_more_outputs_than_classes_is_a_note() -> None:
    info = check_data(_spec({"dataset": "brightness"}, {"num_classes": 10}))
    assert any("6 outputs never see a label (set model.num_classes to 4)" in n for n in info.notes)
