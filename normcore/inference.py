"""Inference from a checkpoint alone: the model plus the preprocessing it was trained with.

A checkpoint's ``model.safetensors`` header (see ``normcore.checkpoint``) carries an ``input``
section written by the engine (``describe_input``): the channels and (H, W) the model takes,
the per-channel ``mean`` and ``std`` the data pipeline normalized with, and whether training
resized images or converted their channels. ``load_model(path)`` returns the model in eval
mode with a ``Predictor`` as its ``predict`` attribute; ``load_predictor(path)`` returns the
Predictor itself. ``predict`` takes raw images (uint8 in [0, 255] or float in [0, 1]), applies
the same operations as ``normcore.data.build_data`` in the same float32 order, and runs the
model in batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from normcore.checkpoint import META_FILE, MODEL_FILE, read_meta, read_model_header
from normcore.checkpoint import load_model as _load_network
from normcore.data import transforms as T
from normcore.data.loader import CLASSIFICATION, GENERATED

if TYPE_CHECKING:
    from normcore.data.loader import DataBundle
    from normcore.spec import DataSpec

__all__ = [
    "InputSpec",
    "Prediction",
    "Predictor",
    "Preprocess",
    "WithPreprocess",
    "describe_input",
    "load_model",
    "load_predictor",
]

LAYOUTS = ("NCHW", "NHWC", "NHW", "CHW", "HWC", "HW")
# data sets whose reader resizes and converts every image, whatever the spec says
_ALWAYS_FITTED = ("imagefolder",)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes and how raw images became that during training.

    ``channels`` and ``image_size`` (H, W) are the model's input; ``mean`` and ``std`` (one
    float per channel, in units of the [0, 1] pixel scale) are what the train split was
    normalized with (0 and 1 when normalization was off). ``resize``: training resized images
    to ``image_size`` (bilinear, antialiased), so predict does too; otherwise images of
    another size are refused. ``convert_channels``: training converted channels (grey
    repeated, RGB to BT.601 luma), so predict does too.
    """

    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: bool = False
    convert_channels: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``value_range`` and ``layout`` document the model's raw input."""
        return {
            "channels": self.channels,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "convert_channels": self.convert_channels,
            "value_range": [0.0, 1.0],
            "uint8_scale": 255.0,
            "layout": "NCHW",
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> InputSpec:
        """Inverse of ``to_dict``; ValueError when a field is missing or inconsistent."""
        try:
            spec = cls(
                channels=int(doc["channels"]),
                image_size=(int(doc["image_size"][0]), int(doc["image_size"][1])),
                mean=tuple(float(v) for v in doc["mean"]),
                std=tuple(float(v) for v in doc["std"]),
                resize=bool(doc.get("resize", False)),
                convert_channels=bool(doc.get("convert_channels", False)),
            )
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed input description {dict(doc)!r}: {exc}") from None
        if not len(spec.mean) == len(spec.std) == spec.channels:
            raise ValueError(
                f"input description has {spec.channels} channels but {len(spec.mean)} means "
                f"and {len(spec.std)} stds"
            )
        return spec


def describe_input(data: DataSpec, bundle: DataBundle) -> InputSpec:
    """The ``InputSpec`` of a model trained on ``bundle`` built from ``data`` by build_data.

    Mirrors ``normcore.data.loader._prepare``: images read from files (and digits) are resized
    when ``data.image_size`` is set and converted when ``data.channels`` is set; image folders
    always are; generated sets are made at their size and never resized.
    """
    fitted = data.dataset in _ALWAYS_FITTED
    read = data.dataset not in GENERATED
    return InputSpec(
        channels=bundle.in_channels,
        image_size=(int(bundle.image_size[0]), int(bundle.image_size[1])),
        mean=tuple(float(v) for v in bundle.mean),
        std=tuple(float(v) for v in bundle.std),
        resize=fitted or (read and data.image_size is not None),
        convert_channels=fitted or (read and data.channels is not None),
    )


class Preprocess(nn.Module):
    """Raw images to model input: uint8 / 255, then ``(x - mean) / std`` per channel.

    Input: (N, C, H, W), uint8 in [0, 255] or float in [0, 1]. Output: float32 (N, C, H, W).
    The same float32 operations, in the same order, as ``normcore.data`` (``to_float`` then
    ``normalize_``), so the output equals the training pipeline's bit for bit; exportable to
    ONNX (Cast, Div, Sub, Div nodes in front of the model).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise ValueError(f"need one mean and one std per channel, got {mean!r}, {std!r}")
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) uint8 or float images to normalized float32."""
        scaled = x.to(torch.float32)
        if x.dtype == torch.uint8:
            scaled = scaled / 255.0
        return (scaled - self.mean) / self.std


class WithPreprocess(nn.Module):
    """``model(Preprocess(mean, std)(x))``: a model that takes raw images (for ONNX export)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.preprocess = Preprocess(mean, std)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Raw (N, C, H, W) uint8 or [0, 1] float images to the model's output."""
        return self.model(self.preprocess(x))


@dataclass
class Prediction:
    """A classifier's answer for N images (CPU tensors).

    ``logits`` and ``probabilities`` (softmax) are float32 (N, K) with K the model's outputs;
    ``labels`` int64 (N,) the argmax; ``names`` each label's class name when the checkpoint
    knows them, else None.
    """

    logits: Tensor
    probabilities: Tensor
    labels: Tensor
    names: list[str] | None = None


@dataclass
class Predictor:
    """A loaded model plus the preprocessing its training data went through.

    ``model`` is in eval mode; ``input`` is None for a checkpoint written before normcore
    recorded it (``missing`` then names what is absent, and ``preprocess`` raises until
    ``mean``/``std`` are given to ``load_predictor``).
    """

    model: nn.Module
    input: InputSpec | None
    task: str | None = CLASSIFICATION
    num_classes: int | None = None
    classes: list[str] | None = None
    data: dict[str, Any] | None = None
    missing: tuple[str, ...] = field(default_factory=tuple)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (inputs are moved there)."""
        for t in self.model.parameters():
            return t.device
        return torch.device("cpu")

    def _require_input(self) -> InputSpec:
        if self.input is None:
            raise ValueError(
                "this checkpoint does not record its input preprocessing (it predates normcore's "
                f"input header; missing: {', '.join(self.missing) or 'input'}): pass mean=, std= "
                "(per channel, [0, 1] scale) and image_size= to normcore.load_predictor, or "
                "normalize the images yourself and call .model directly"
            )
        return self.input

    def preprocess(self, images: Any, *, layout: str | None = None) -> Tensor:
        """Raw images to the model's input, exactly as training prepared its data.

        Args:
            images: a numpy array or torch tensor, uint8 in [0, 255] or float in [0, 1]; one
                image (CHW, HWC, or HW for one channel) or a batch (NCHW, NHWC, or NHW for one
                channel).
            layout: one of ``LAYOUTS`` to say which; default: inferred from the number of
                dimensions, the channel count and (without resizing) the image size,
                preferring channels-first.

        Returns:
            float32 (N, C, H, W) on the model's device, normalized with the checkpoint's
            per-channel mean and std (a single image gives N = 1).

        Raises:
            ValueError: no input description, an unsupported dtype, float values outside
                [0, 1] or not finite, or a shape that fits no layout (the message gives the
                expected (C, H, W) and the shape received).
        """
        spec = self._require_input()
        x = _as_tensor(images)
        x = _to_nchw(x, spec, layout)
        if x.dtype == torch.float32:  # to_float would keep the caller's memory: normalize a copy
            x = x.clone()
        x = T.to_float(x)
        if spec.convert_channels:
            x = T.convert_channels(x, spec.channels)
        if spec.resize:
            x = T.resize(x, spec.image_size)
        x = T.normalize_(x.contiguous(), spec.mean, spec.std)
        return x.to(self.device)

    @torch.no_grad()
    def predict(
        self, images: Any, *, layout: str | None = None, batch_size: int = 256
    ) -> Prediction | Tensor:
        """Run the model on raw images (see ``preprocess`` for what they may be).

        Classification returns a ``Prediction`` (probabilities, labels, class names); other
        tasks (super-resolution) return the model's output tensor on the CPU, e.g. the
        (N, C, sH, sW) upscaled image in [0, 1] units (unclamped). Batches of ``batch_size``
        images run in eval mode under ``torch.no_grad``.

        Raises:
            ValueError: as ``preprocess``; or ``batch_size`` < 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x = self.preprocess(images, layout=layout)
        self.model.eval()
        outputs = [self.model(part).float().cpu() for part in x.split(batch_size)]
        out = torch.cat(outputs)
        if self.task != CLASSIFICATION:
            return out
        labels = out.argmax(1)
        names = None
        if self.classes is not None:
            names = [self.classes[i] if i < len(self.classes) else str(i) for i in labels.tolist()]
        return Prediction(logits=out, probabilities=out.softmax(1), labels=labels, names=names)

    __call__ = predict

    def export_onnx(
        self, path: str | Path, example: Tensor, fold_bn: bool = True, **options: Any
    ) -> float:
        """Export the model with its preprocessing as the graph's first nodes.

        ``example`` is a raw (N, C, H, W) batch, float in [0, 1] or uint8 (the graph takes
        its dtype and shape); ``options`` go to ``normcore.export_onnx`` (``opset_version``,
        ``optimize``). Returns onnxruntime's largest absolute difference from eager
        ``model(preprocess(example))``.

        Raises:
            ValueError: no input description; or as ``normcore.export_onnx``.
        """
        from normcore.onnx_export import export_onnx

        spec = self._require_input()
        return export_onnx(
            self.model,
            example,
            path,
            fold_bn,
            include_preprocessing=True,
            mean=spec.mean,
            std=spec.std,
            **options,
        )


def _as_tensor(images: Any) -> Tensor:
    if isinstance(images, Tensor):
        x = images.detach().cpu()
    elif isinstance(images, np.ndarray):
        if images.dtype == object or not (
            images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating)
        ):
            raise ValueError(
                f"images must be uint8 in [0, 255] or float in [0, 1], got numpy {images.dtype}"
            )
        x = torch.from_numpy(np.array(images, order="C"))  # a copy: read-only arrays too
    else:
        raise ValueError(
            f"images must be a numpy array or a torch tensor, got {type(images).__name__}"
        )
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"images must be uint8 in [0, 255] or float in [0, 1], got {x.dtype}")
    if x.numel():
        if not bool(torch.isfinite(x).all()):
            raise ValueError("images hold NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{low:g}, {high:g}] (pass "
                "uint8 for 0..255 pixels, and raw pixels, not normalized ones)"
            )
    return x


def _candidates(ndim: int) -> tuple[str, ...]:
    return {2: ("HW",), 3: ("CHW", "HWC", "NHW"), 4: ("NCHW", "NHWC")}.get(ndim, ())


def _channels_of(shape: tuple[int, ...], layout: str) -> int:
    return shape[layout.index("C")] if "C" in layout else 1


def _size_of(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    return shape[layout.index("H")], shape[layout.index("W")]


def _to_nchw(x: Tensor, spec: InputSpec, layout: str | None) -> Tensor:
    """``x`` as (N, C, H, W), checking its channels and (without resizing) its size."""
    shape = tuple(x.shape)
    expected = f"(C, H, W) = ({spec.channels}, {spec.image_size[0]}, {spec.image_size[1]})"
    if layout is not None:
        layout = layout.upper()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if len(layout) != x.ndim:
            raise ValueError(f"layout {layout} needs {len(layout)} dimensions, got shape {shape}")
        layouts: tuple[str, ...] = (layout,)
    else:
        layouts = _candidates(x.ndim)
        if not layouts:
            raise ValueError(
                f"images must be one image (CHW, HWC, HW) or a batch (NCHW, NHWC, NHW) of "
                f"{expected}, got shape {shape}"
            )

    def fits(candidate: str) -> bool:
        channels = _channels_of(shape, candidate)
        if channels != spec.channels and not (spec.convert_channels and channels in (1, 3, 4)):
            return False
        if spec.resize:
            return True
        return _size_of(shape, candidate) == spec.image_size

    chosen = next((c for c in layouts if fits(c)), None)
    if chosen is None or ("N" in chosen and shape[0] == 0):
        tried = "/".join(layouts)
        size = "any size (resized)" if spec.resize else "that size"
        raise ValueError(
            f"images must be {expected} ({size}) per image, got shape {shape} as {tried}"
            + (" with no images" if chosen is not None else "")
        )
    batched = chosen if "N" in chosen else "N" + chosen
    x = x.unsqueeze(0) if "N" not in chosen else x
    if "C" not in batched:
        batched = batched[:1] + "C" + batched[1:]
        x = x.unsqueeze(1)
    return x.permute(*(batched.index(d) for d in "NCHW"))


def _read_header_and_meta(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(model.safetensors header or {}, meta.json or None) of a checkpoint file or folder."""
    if path.is_file() and not (path.parent / META_FILE).is_file():
        return read_model_header(path) or {}, None
    folder = path.parent if path.is_file() else path
    return read_model_header(folder / MODEL_FILE) or {}, read_meta(folder)


def load_predictor(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> Predictor:
    """A ``Predictor`` for a checkpoint folder or a lone downloaded ``model.safetensors``.

    The preprocessing comes from the file's header; a folder's meta.json fills in for
    checkpoints written before the header carried it. ``mean``, ``std`` (per channel, on the
    [0, 1] scale) and ``image_size`` override or supply it for old checkpoints that have
    neither; a warning names what is missing when nothing supplies it.

    Raises:
        ValueError: the file is not a normcore checkpoint, fails its checks, or an override
            does not match the model's channels.
    """
    path = Path(path)
    model = _load_network(path, device=device)
    header, meta = _read_header_and_meta(path)
    source = {**(meta or {}), **header}
    input_doc = header.get("input")
    missing: list[str] = []
    if input_doc is None:
        # older checkpoints: meta.json's data section has the mean, std and image size
        data = (meta or {}).get("data") or {}
        input_doc = {
            "channels": source.get("in_channels"),
            "image_size": data.get("image_size"),
            "mean": data.get("mean"),
            "std": data.get("std"),
        }
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        input_doc = {**input_doc, "image_size": list(size)}
    if mean is not None:
        input_doc = {**input_doc, "mean": list(mean)}
    if std is not None:
        input_doc = {**input_doc, "std": list(std)}
    missing = [k for k in ("channels", "image_size", "mean", "std") if input_doc.get(k) is None]
    spec = None if missing else InputSpec.from_dict(input_doc)
    if missing:
        warnings.warn(
            f"{path}: the checkpoint does not record its input {', '.join(missing)} (written "
            "before normcore's input header): predict needs mean=, std=, image_size= given to "
            "load_predictor",
            stacklevel=2,
        )
    elif spec is not None and spec.channels != int(source.get("in_channels", spec.channels)):
        raise ValueError(
            f"{path}: the model takes {source['in_channels']} channels, the input description "
            f"says {spec.channels}"
        )
    spec_doc = (meta or {}).get("spec") or {}
    return Predictor(
        model=model,
        input=spec,
        task=source.get("task") or spec_doc.get("task") or CLASSIFICATION,
        num_classes=source.get("num_classes"),
        classes=source.get("classes"),
        data=header.get("data") or spec_doc.get("data"),
        missing=tuple(missing),
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """The model a checkpoint was trained as, in eval mode, with ``model.predict`` attached.

    ``model(x)`` takes normalized (N, C, H, W) float32 input as before; ``model.predict`` is
    the checkpoint's ``Predictor`` (``model.predict(images)`` on raw images,
    ``model.predict.preprocess``, ``model.predict.classes``). ``overrides`` go to
    ``load_predictor`` (``mean``, ``std``, ``image_size`` for old checkpoints).

    Raises:
        ValueError: as ``load_predictor``.
    """
    predictor = load_predictor(path, device, **overrides)
    model = predictor.model
    # a plain attribute, not a submodule: state_dict and parameters stay the network's
    object.__setattr__(model, "predict", predictor)
    return model
