"""Inference from a checkpoint alone: header, Predictor preprocessing, old files, ONNX front.

One lenet/bn digits run (1 epoch, ~4 s) is shared by the module. Preprocessing is checked
against ``build_data``'s own normalized tensors (bit for bit, and against the formula in
float64), on every input layout and dtype.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import normcore
from normcore.checkpoint import HEADER_KEY, read_model_header
from normcore.data import build_data
from normcore.data.loader import DataBundle
from normcore.inference import (
    Prediction,
    Predictor,
    describe_input,
    load_predictor,
)
from normcore.spec import DataSpec, JobSpec

LENET_DIGITS: dict[str, Any] = {
    "name": "inference",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
    "optim": {"lr": 0.05},
    "epochs": 1,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> normcore.TrainResult:
    result = normcore.train(LENET_DIGITS, tmp_path_factory.mktemp("inference") / "run")
    assert result.status == "succeeded"
    return result


@pytest.fixture(scope="module")
def lone(run: normcore.TrainResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint's model.safetensors alone, as the service serves it."""
    path = tmp_path_factory.mktemp("download") / "model.safetensors"
    shutil.copyfile(run.checkpoints[-1].path / "model.safetensors", path)
    return path


def _bundles(data: DataSpec | dict[str, Any], seed: int = 0) -> tuple[DataBundle, DataBundle]:
    """(raw, normalized) bundles of the same split: raw is what the reader gives."""
    spec = DataSpec.model_validate(data) if isinstance(data, dict) else data
    raw = build_data(spec.model_copy(update={"normalize": False}), seed=seed)
    return raw, build_data(spec, seed=seed)


@pytest.fixture(scope="module")
def digits() -> tuple[DataBundle, DataBundle]:
    return _bundles(JobSpec.model_validate(LENET_DIGITS).data)


def test_header_carries_what_inference_needs(
    run: normcore.TrainResult, lone: Path, digits: tuple[DataBundle, DataBundle]
) -> None:
    _, normalized = digits
    header = read_model_header(lone)
    assert header is not None
    assert header["input"]["channels"] == 1 and header["input"]["image_size"] == [8, 8]
    assert tuple(header["input"]["mean"]) == normalized.mean  # exact: JSON keeps float64
    assert tuple(header["input"]["std"]) == normalized.std
    assert header["input"]["mean"][0] == pytest.approx(0.3047, abs=1e-4)
    assert header["input"]["std"][0] == pytest.approx(0.3755, abs=1e-4)
    assert header["input"]["resize"] is False and header["input"]["convert_channels"] is False
    assert header["task"] == "classification" and header["num_classes"] == 10
    assert header["data"] == JobSpec.model_validate(LENET_DIGITS).data.model_dump(mode="json")
    assert "classes" not in header  # digits has no names beyond its labels
    meta = json.loads((run.checkpoints[-1].path / "meta.json").read_text())
    assert meta["input"] == header["input"]


def test_predict_from_the_lone_file_reproduces_val_accuracy(
    run: normcore.TrainResult, lone: Path, digits: tuple[DataBundle, DataBundle]
) -> None:
    raw, _ = digits
    model = normcore.load_model(lone)
    assert isinstance(model, nn.Module) and not model.training
    assert set(model.state_dict()) == set(
        normcore.load_model(run.checkpoints[-1].path).state_dict()
    )
    prediction = model.predict(raw.val_x)
    assert isinstance(prediction, Prediction)
    correct = int((prediction.labels == raw.val_y).sum())
    reported = run.checkpoints[-1].metrics["val_accuracy"]
    assert correct == round(reported * raw.num_val)
    assert correct / raw.num_val == reported
    assert prediction.probabilities.shape == (raw.num_val, 10)
    torch.testing.assert_close(prediction.probabilities.sum(1), torch.ones(raw.num_val))
    # batch size does not change the answer
    again = model.predict(raw.val_x, batch_size=7)
    assert torch.equal(again.labels, prediction.labels)


def _layouts(x: torch.Tensor) -> list[tuple[str, Any, slice]]:
    """(name, raw input in that layout, which val images it holds) for (N, 1, H, W) ``x``."""
    nchw = x[:5]
    return [
        ("NCHW tensor", nchw, slice(0, 5)),
        ("NCHW float64 numpy", nchw.double().numpy(), slice(0, 5)),
        ("NHWC numpy", nchw.permute(0, 2, 3, 1).numpy(), slice(0, 5)),
        ("NHW tensor", nchw[:, 0], slice(0, 5)),
        ("CHW tensor", x[3], slice(3, 4)),
        ("HWC numpy float16", x[3].permute(1, 2, 0).half().numpy(), slice(3, 4)),
        ("HW tensor", x[3, 0], slice(3, 4)),
        (
            "NCHW non-contiguous",
            x.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)[:5],
            slice(0, 5),
        ),
    ]


@pytest.mark.parametrize("index", range(8))
def test_every_layout_gives_the_training_tensors(
    lone: Path, digits: tuple[DataBundle, DataBundle], index: int
) -> None:
    raw, normalized = digits
    predictor = load_predictor(lone)
    name, images, which = _layouts(raw.val_x)[index]
    before = torch.as_tensor(images).clone()
    got = predictor.preprocess(images)
    want = normalized.val_x[which]
    assert got.dtype == torch.float32 and got.shape == want.shape, name
    assert torch.equal(got, want), name  # the same float32 operations as build_data
    mean, std = torch.tensor(normalized.mean).double(), torch.tensor(normalized.std).double()
    formula = (raw.val_x[which].double() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    torch.testing.assert_close(got.double(), formula, rtol=0, atol=1e-6)
    assert torch.equal(torch.as_tensor(images), before), f"{name}: the caller's images changed"


def _write_imagefolder(root: Path) -> np.ndarray:
    """Two classes of 8x8 grey PNGs (uint8); returns every image in file order."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for label, name in enumerate(("cat", "dog")):
        folder = root / "pets" / name
        folder.mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8) // (2 - label)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}.png")
            images.append(pixels)
    return np.stack(images)


def test_uint8_images_and_class_names(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "data")
    spec = {
        "name": "pets",
        "model": {"arch": "lenet", "norm": "bn", "num_classes": 2},
        "data": {
            "dataset": "imagefolder",
            "path": "pets",
            "channels": 1,
            "image_size": 8,
            "batch_size": 16,
        },
        "optim": {"lr": 0.05},
        "epochs": 1,
    }
    result = normcore.train(spec, tmp_path / "run", data_root=tmp_path / "data")
    predictor = load_predictor(result.checkpoints[-1].path / "model.safetensors")
    assert predictor.classes == ["cat", "dog"]
    assert predictor.input is not None and predictor.input.resize  # image folders always are
    data = DataSpec.model_validate(spec["data"])
    raw_spec = data.model_copy(update={"normalize": False})
    raw = build_data(raw_spec, seed=0, data_root=tmp_path / "data")
    normalized = build_data(data, seed=0, data_root=tmp_path / "data")
    uint8 = (raw.val_x * 255).round().to(torch.uint8)  # the files' own bytes
    assert torch.equal(uint8.float() / 255, raw.val_x)
    for images in (uint8, uint8.numpy().transpose(0, 2, 3, 1), uint8[:, 0].numpy()):
        assert torch.equal(predictor.preprocess(images), normalized.val_x)
    prediction = predictor.predict(uint8)
    assert prediction.names == [predictor.classes[i] for i in prediction.labels.tolist()]
    correct = int((prediction.labels == raw.val_y).sum())
    assert correct / raw.num_val == result.checkpoints[-1].metrics["val_accuracy"]


def test_resizing_and_channel_conversion_follow_training() -> None:
    """digits at image_size 12 with 3 channels: predict resizes and converts as build_data."""
    data = DataSpec.model_validate(
        {"dataset": "digits", "batch_size": 64, "image_size": 12, "channels": 3}
    )
    raw_native, _ = _bundles({"dataset": "digits", "batch_size": 64})
    _, normalized = _bundles(data)
    spec = describe_input(data, normalized)
    assert spec.resize and spec.convert_channels and spec.image_size == (12, 12)
    predictor = Predictor(model=nn.Identity(), input=spec)
    got = predictor.preprocess(raw_native.val_x)  # 8x8 grey in, 12x12 RGB out
    assert torch.equal(got, normalized.val_x)
    # a generated set is made at its size: another size is refused, not resized
    synthetic = DataSpec.model_validate({"dataset": "synthetic", "image_size": 8})
    _, bundle = _bundles(synthetic)
    fixed = Predictor(model=nn.Identity(), input=describe_input(synthetic, bundle))
    with pytest.raises(ValueError, match=r"\(C, H, W\) = \(3, 8, 8\).*got shape \(2, 3, 12, 12\)"):
        fixed.preprocess(torch.rand(2, 3, 12, 12))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(2, 3, 8, 8), r"\(C, H, W\) = \(1, 8, 8\).*got shape \(2, 3, 8, 8\)"),
        (torch.rand(2, 1, 9, 9), r"\(C, H, W\) = \(1, 8, 8\).*got shape \(2, 1, 9, 9\)"),
        (torch.rand(1, 1, 1, 8, 8), r"got shape \(1, 1, 1, 8, 8\)"),
        (torch.rand(0, 1, 8, 8), r"with no images"),
        (torch.randint(0, 255, (2, 1, 8, 8)), r"uint8 in \[0, 255\] or float in \[0, 1\].*int64"),
        (np.zeros((2, 1, 8, 8), dtype=np.int32), r"got numpy int32"),
        (torch.full((2, 1, 8, 8), 255.0), r"float images must lie in \[0, 1\].*255"),
        (torch.full((1, 8, 8), float("nan")), r"NaN"),
        ([[0.0] * 8] * 8, r"numpy array or a torch tensor, got list"),
    ],
)
def test_wrong_inputs_are_refused_with_what_was_expected(
    lone: Path, images: Any, message: str
) -> None:
    predictor = load_predictor(lone)
    with pytest.raises(ValueError, match=message):
        predictor.predict(images)


def test_explicit_layout(lone: Path, digits: tuple[DataBundle, DataBundle]) -> None:
    raw, normalized = digits
    predictor = load_predictor(lone)
    hwc = raw.val_x[0].permute(1, 2, 0)
    assert torch.equal(predictor.preprocess(hwc, layout="hwc"), normalized.val_x[:1])
    with pytest.raises(ValueError, match="layout must be one of"):
        predictor.preprocess(hwc, layout="WHC")
    with pytest.raises(ValueError, match="layout NCHW needs 4 dimensions"):
        predictor.preprocess(hwc, layout="NCHW")


def _strip_input(src: Path, dest: Path) -> None:
    """Rewrite ``src`` as an older normcore wrote it: no input, classes or data in the header."""
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    for key in ("input", "classes", "data"):
        header.pop(key, None)
    save_file(tensors, str(dest), metadata={HEADER_KEY: json.dumps(header)})


def test_old_lone_file_says_what_is_missing(
    lone: Path, tmp_path: Path, digits: tuple[DataBundle, DataBundle]
) -> None:
    raw, normalized = digits
    old = tmp_path / "old.safetensors"
    _strip_input(lone, old)
    with pytest.warns(UserWarning, match="does not record its input image_size, mean, std"):
        model = normcore.load_model(old)
    torch.testing.assert_close(
        model(normalized.val_x[:4]), load_predictor(lone).model(normalized.val_x[:4])
    )
    with pytest.raises(ValueError, match=r"predates normcore's input header.*mean=, std="):
        model.predict(raw.val_x)
    supplied = load_predictor(old, mean=normalized.mean, std=normalized.std, image_size=8)
    assert torch.equal(supplied.preprocess(raw.val_x), normalized.val_x)


def test_old_folder_falls_back_on_meta_json(
    run: normcore.TrainResult, tmp_path: Path, digits: tuple[DataBundle, DataBundle]
) -> None:
    import hashlib

    raw, normalized = digits
    folder = Path(shutil.copytree(run.checkpoints[-1].path, tmp_path / "epoch-0001"))
    _strip_input(run.checkpoints[-1].path / "model.safetensors", folder / "model.safetensors")
    meta = json.loads((folder / "meta.json").read_text())
    data = (folder / "model.safetensors").read_bytes()
    meta["files"]["model.safetensors"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    meta.pop("input")
    (folder / "meta.json").write_text(json.dumps(meta))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # meta.json's data section is enough: no warning
        predictor = load_predictor(folder)
    assert torch.equal(predictor.preprocess(raw.val_x), normalized.val_x)


def test_super_resolution_returns_the_output_tensor(tmp_path: Path) -> None:
    spec = {
        "name": "sr",
        "model": {"arch": "edsr", "width": 4, "depth": 1, "scale": 2},
        "data": {"dataset": "sr-synthetic", "batch_size": 16, "num_samples": 64, "image_size": 8},
        "optim": {"lr": 0.01},
        "epochs": 1,
    }
    result = normcore.train(spec, tmp_path / "run")
    predictor = load_predictor(result.checkpoints[-1].path / "model.safetensors")
    assert predictor.task == "super_resolution"
    raw = build_data(DataSpec.model_validate(spec["data"]), seed=0, task="super_resolution")
    out = predictor.predict(raw.val_x)
    assert isinstance(out, torch.Tensor) and out.shape == raw.val_y.shape
    with torch.no_grad():
        assert torch.equal(out, predictor.model(raw.val_x))  # mean 0, std 1: no change


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_onnx_with_preprocessing_matches_predict(
    lone: Path, tmp_path: Path, digits: tuple[DataBundle, DataBundle], dtype: torch.dtype
) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx
    import onnxruntime as ort

    raw, _ = digits
    predictor = load_predictor(lone)
    images = raw.val_x[:16] if dtype == torch.float32 else (raw.val_x[:16] * 255).to(torch.uint8)
    path = tmp_path / "model.onnx"
    diff = predictor.export_onnx(path, images, fold_bn=True)
    assert diff < 1e-4
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    front = ["Sub", "Div"] if dtype == torch.float32 else ["Cast", "Div", "Sub", "Div"]
    assert ops[: len(front)] == front
    assert "BatchNormalization" not in ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    expected = predictor.predict(images)
    np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=0, atol=1e-4)
    assert np.array_equal(logits.argmax(1), expected.labels.numpy())
    with pytest.raises(ValueError, match="needs the per-channel mean and std"):
        normcore.export_onnx(predictor.model, images, path, include_preprocessing=True)
