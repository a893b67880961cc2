"""VGG-11 (Simonyan & Zisserman, 2015, config A) for small inputs, any norm after each conv."""

from __future__ import annotations

from typing import Any

import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from normcore.models.blocks import ConvNormAct, check_args, dropout_layer, init_weights

# channels of VGG-11 at base width 64; "M" is a 2x2 max pool
VGG11_CONFIG: tuple[int | str, ...] = (
    64,
    "M",
    128,
    "M",
    256,
    256,
    "M",
    512,
    512,
    "M",
    512,
    512,
    "M",
)


def small_input_max_pool(x: Tensor) -> Tensor:
    """2x2 max pool of ``x``, or ``x`` itself when a side is already 1.

    A leaf for torch.fx (``torch.fx.wrap``): the branch on the input's size becomes one
    ``call_function`` node that decides when the traced model runs.
    """
    if x.shape[-1] < 2 or x.shape[-2] < 2:
        return x
    return F.max_pool2d(x, 2, 2)


torch.fx.wrap("small_input_max_pool")


class SmallInputMaxPool(nn.Module):
    """2x2 max pool that passes maps smaller than 2x2 through, so tiny inputs reach the head."""

    def forward(self, x: Tensor) -> Tensor:
        """Pool by 2, or return ``x`` when a side is already 1."""
        return small_input_max_pool(x)


class VGG(nn.Module):
    """conv3-norm-ReLU stages with pools, adaptive average pool, two-layer classifier."""

    def __init__(
        self,
        config: tuple[int | str, ...],
        *,
        in_channels: int,
        num_classes: int,
        norm: Any,
        dropout: float,
        norm_position: str,
        width: int,
    ) -> None:
        super().__init__()
        check_args(
            in_channels=in_channels,
            num_classes=num_classes,
            dropout=dropout,
            norm_position=norm_position,
            width=width,
        )
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(SmallInputMaxPool())
                continue
            out = int(item) * width // 64
            layers.append(ConvNormAct(channels, out, 3, norm=norm, norm_position=norm_position))
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, channels),
            nn.ReLU(inplace=True),
            dropout_layer(dropout),
            nn.Linear(channels, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, num_classes)."""
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg11(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    norm: Any = "bn",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
) -> nn.Module:
    """VGG-11 with a norm after every conv; ``width`` is the first stage's channels (default 64)."""
    return VGG(
        VGG11_CONFIG,
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=64 if width is None else width,
    )
