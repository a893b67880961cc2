"""A plain stack of seed 000's ConvBlock (conv → norm → ReLU → dropout), pooled and classified."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from normcore.models.blocks import ConvNormAct, check_args, init_weights


class ConvBlockNet(nn.Module):
    """``depth`` 3x3 ConvBlocks of ``width`` channels, global average pool, linear classifier."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        norm: Any,
        dropout: float,
        norm_position: str,
        width: int,
        depth: int,
    ) -> None:
        super().__init__()
        check_args(
            in_channels=in_channels,
            num_classes=num_classes,
            dropout=dropout,
            norm_position=norm_position,
            width=width,
            depth=depth,
        )
        blocks = [
            ConvNormAct(
                in_channels if i == 0 else width,
                width,
                3,
                norm=norm,
                norm_position=norm_position,
                dropout=dropout,
            )
            for i in range(depth)
        ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, num_classes)."""
        return self.fc(self.pool(self.features(x)).flatten(1))


def convblock(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    norm: Any = "bn",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
    depth: int | None = None,
) -> nn.Module:
    """Seed 000's ConvBlock stacked ``depth`` times (default 3) at ``width`` channels (default 32)."""
    return ConvBlockNet(
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=32 if width is None else width,
        depth=3 if depth is None else depth,
    )
