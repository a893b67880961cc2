"""Normalized CNNs built from a ModelSpec, or called directly: ``resnet20(norm="gn:8")``.

Every builder takes ``in_channels``, ``num_classes`` (``scale`` for edsr), ``norm`` (any spec
``make_norm`` accepts), ``dropout``, ``norm_position`` ("before": conv → norm → ReLU, or
"after": conv → ReLU → norm) and ``width``; convblock and edsr also take ``depth``; lenet and
the resnets also take ``stem_padding`` (the first conv's padding: "zeros", "none", "reflect",
"replicate").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from normcore.models.blocks import use_conv
from normcore.models.convblock import convblock
from normcore.models.edsr import edsr
from normcore.models.lenet import lenet
from normcore.models.resnet import resnet18, resnet20
from normcore.models.vgg import vgg11

if TYPE_CHECKING:
    from normcore.spec import ModelSpec

__all__ = [
    "MODEL_BUILDERS",
    "build_model",
    "convblock",
    "edsr",
    "lenet",
    "resnet18",
    "resnet20",
    "vgg11",
]

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "convblock": convblock,
    "lenet": lenet,
    "vgg11": vgg11,
    "resnet20": resnet20,
    "resnet18": resnet18,
    "edsr": edsr,
}

_TAKES_DEPTH = ("convblock", "edsr")
# archs whose first conv honours model.stem_padding (the others refuse anything but "zeros")
TAKES_STEM_PADDING = ("lenet", "resnet20", "resnet18")


def build_model(spec: ModelSpec, *, in_channels: int) -> nn.Module:
    """Build the network ``spec`` describes for inputs with ``in_channels`` channels."""
    builder = MODEL_BUILDERS.get(spec.arch)
    if builder is None:
        raise ValueError(f"unknown arch {spec.arch!r}; valid: {', '.join(MODEL_BUILDERS)}")
    kwargs: dict[str, Any] = {
        "in_channels": in_channels,
        "norm": spec.norm,
        "dropout": spec.dropout,
        "norm_position": spec.norm_position,
        "width": spec.width,
    }
    if spec.arch == "edsr":
        kwargs["scale"] = spec.scale
    else:
        kwargs["num_classes"] = spec.num_classes
    if spec.depth is not None:
        if spec.arch not in _TAKES_DEPTH:
            raise ValueError(
                f"model.depth applies to {' and '.join(_TAKES_DEPTH)} only; "
                f"{spec.arch} has a fixed depth: remove model.depth"
            )
        kwargs["depth"] = spec.depth
    if spec.arch in TAKES_STEM_PADDING:
        kwargs["stem_padding"] = spec.stem_padding
    elif spec.stem_padding != "zeros":
        raise ValueError(
            f"model.stem_padding applies to {', '.join(TAKES_STEM_PADDING)} only; "
            f"{spec.arch} pads with zeros: remove model.stem_padding"
        )
    return use_conv(builder(**kwargs), spec.conv)
