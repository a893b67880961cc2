"""A small EDSR (Lim et al., 2017) super-resolution net whose norm is a knob (default none).

Seed 000 explains why EDSR drops BN: an SR output must keep the input's colour, contrast and
brightness, which a norm's statistics wash out. The knob lets that be shown rather than told.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from normcore.factory import make_norm
from normcore.models.blocks import check_args, conv_bias, dropout_layer, init_weights


class ResBlock(nn.Module):
    """``x + res_scale * (conv-[norm]-ReLU-conv-[norm])(x)``; "after" puts norm1 after the ReLU."""

    def __init__(self, channels: int, *, norm: Any, norm_position: str, res_scale: float) -> None:
        super().__init__()
        self.norm_position = norm_position
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(
            channels, channels, 3, padding=1, bias=conv_bias(norm, norm_position)
        )
        self.norm1 = make_norm(norm, channels, dims=2)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=conv_bias(norm))
        self.norm2 = make_norm(norm, channels, dims=2)

    def forward(self, x: Tensor) -> Tensor:
        """One scaled residual step."""
        if self.norm_position == "before":
            h = self.act(self.norm1(self.conv1(x)))
        else:
            h = self.norm1(self.act(self.conv1(x)))
        return x + self.res_scale * self.norm2(self.conv2(h))


def _factors(scale: int) -> list[int]:
    """``scale`` as pixel-shuffle steps of 2 and 3 (8 -> [2, 2, 2], 6 -> [2, 3]), or raise."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"edsr scale must be a positive int, got {scale!r}")
    steps, rest = [], scale
    for f in (2, 3):
        while rest % f == 0:
            steps.append(f)
            rest //= f
    if rest != 1:
        raise ValueError(
            f"edsr scale must be 1 or a product of 2s and 3s (2, 3, 4, 8), got {scale}"
        )
    return steps


class EDSR(nn.Module):
    """Head conv, residual body with a global skip, pixel-shuffle upsampler, tail conv."""

    def __init__(
        self,
        *,
        in_channels: int,
        scale: int,
        norm: Any,
        dropout: float,
        norm_position: str,
        width: int,
        depth: int,
        res_scale: float = 0.1,
    ) -> None:
        super().__init__()
        check_args(
            in_channels=in_channels,
            dropout=dropout,
            norm_position=norm_position,
            width=width,
            depth=depth,
        )
        self.scale = scale
        self.head = nn.Conv2d(in_channels, width, 3, padding=1)
        self.body = nn.Sequential(
            *[
                ResBlock(width, norm=norm, norm_position=norm_position, res_scale=res_scale)
                for _ in range(depth)
            ],
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.dropout = dropout_layer(dropout)
        up: list[nn.Module] = []
        for f in _factors(scale):
            up += [nn.Conv2d(width, width * f * f, 3, padding=1), nn.PixelShuffle(f)]
        self.upsample = nn.Sequential(*up)
        self.tail = nn.Conv2d(width, in_channels, 3, padding=1)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) low-resolution input to (N, C, scale*H, scale*W)."""
        h = self.head(x)
        h = self.dropout(h + self.body(h))
        return self.tail(self.upsample(h))


def edsr(
    *,
    in_channels: int = 3,
    scale: int = 2,
    norm: Any = "none",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
    depth: int | None = None,
) -> nn.Module:
    """EDSR with ``depth`` residual blocks (default 4) of ``width`` channels (default 64)."""
    return EDSR(
        in_channels=in_channels,
        scale=scale,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=64 if width is None else width,
        depth=4 if depth is None else depth,
    )
