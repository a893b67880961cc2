"""Seed 003's LeNet-style network: conv-norm-pool twice, fc-norm twice, fc.

Deviations from the seed, both so that any input size and any norm fit: the convs are padded
(an 8x8 digit survives two 2x2 pools) and an adaptive pool to 5x5 sits before the first fc.
Widths are 8/16 channels and 128/64 features (the seed has 6/16 and 120/84) so that common
group counts (gn:4, gn:8) divide every layer.

``stem_padding`` changes the first conv only: "none" makes it a valid conv (a 16x16 input gives
12x12 maps; the adaptive pool absorbs the smaller size), "reflect" and "replicate" pad with the
image's own border instead of zeros.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from normcore.models.blocks import (
    ConvNormAct,
    FeatureNorm,
    check_args,
    conv_bias,
    dropout_layer,
    init_weights,
    stem_conv_padding,
)


class LeNet(nn.Module):
    """conv5-norm-ReLU-pool x2, adaptive pool 5x5, (fc-norm-ReLU-dropout) x2, fc."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        norm: Any,
        dropout: float,
        norm_position: str,
        width: int,
        stem_padding: str = "zeros",
    ) -> None:
        super().__init__()
        check_args(
            in_channels=in_channels,
            num_classes=num_classes,
            dropout=dropout,
            norm_position=norm_position,
            width=width,
        )
        c1, c2, f1, f2 = width, 2 * width, 16 * width, 8 * width
        self.norm_position = norm_position
        padding, padding_mode = stem_conv_padding(5, stem_padding)
        self.conv1 = ConvNormAct(
            in_channels,
            c1,
            5,
            padding=padding,
            padding_mode=padding_mode,
            norm=norm,
            norm_position=norm_position,
        )
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = ConvNormAct(c1, c2, 5, norm=norm, norm_position=norm_position)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.resize = nn.AdaptiveAvgPool2d((5, 5))
        self.fc1 = nn.Linear(c2 * 25, f1, bias=conv_bias(norm, norm_position))
        self.norm1 = FeatureNorm(norm, f1)
        self.fc2 = nn.Linear(f1, f2, bias=conv_bias(norm, norm_position))
        self.norm2 = FeatureNorm(norm, f2)
        self.act = nn.ReLU(inplace=True)
        self.dropout = dropout_layer(dropout)
        self.fc3 = nn.Linear(f2, num_classes)
        init_weights(self)

    def _fc(self, fc: nn.Linear, norm: nn.Module, x: Tensor) -> Tensor:
        if self.norm_position == "before":
            return self.dropout(self.act(norm(fc(x))))
        return self.dropout(norm(self.act(fc(x))))

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, num_classes)."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.resize(x).flatten(1)
        x = self._fc(self.fc1, self.norm1, x)
        x = self._fc(self.fc2, self.norm2, x)
        return self.fc3(x)


def lenet(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    norm: Any = "bn",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
    stem_padding: str = "zeros",
) -> nn.Module:
    """Seed 003's LeNet with the chosen norm; ``width`` is the first conv's channels (default 8).

    ``stem_padding`` ("zeros", "none", "reflect", "replicate") is the first conv's padding;
    "none" needs inputs of at least 5x5. Raises ValueError for bad arguments.
    """
    return LeNet(
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=8 if width is None else width,
        stem_padding=stem_padding,
    )
