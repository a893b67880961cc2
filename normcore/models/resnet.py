"""ResNets (He et al., 2016) with the norm as a knob: CIFAR ResNet-20 and ImageNet ResNet-18."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normcore.factory import make_norm
from normcore.models.blocks import (
    ConvNormAct,
    check_args,
    conv_bias,
    dropout_layer,
    init_weights,
    stem_conv_padding,
)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        """Strided identity with ``extra`` zero channels split before and after."""
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut.

    "before": ``relu(norm2(conv2(relu(norm1(conv1(x))))) + shortcut(x))``;
    "after": ``norm2(relu(conv2(norm1(relu(conv1(x)))) + shortcut(x)))``, i.e. every norm
    follows the activation it belongs to.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        norm: Any,
        norm_position: str,
        shortcut: str,
    ) -> None:
        super().__init__()
        self.norm_position = norm_position
        self.conv1 = ConvNormAct(
            in_channels, out_channels, 3, stride, norm=norm, norm_position=norm_position
        )
        self.conv2 = nn.Conv2d(
            out_channels, out_channels, 3, padding=1, bias=conv_bias(norm, norm_position)
        )
        self.norm2 = make_norm(norm, out_channels, dims=2)
        self.act = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = ConvNormAct(
                in_channels, out_channels, 1, stride, padding=0, norm=norm, act=False
            )

    def forward(self, x: Tensor) -> Tensor:
        """One residual step."""
        h = self.conv2(self.conv1(x))
        if self.norm_position == "before":
            return self.act(self.norm2(h) + self.shortcut(x))
        return self.norm2(self.act(h + self.shortcut(x)))


class ResNet(nn.Module):
    """A stem, stages of basic blocks, global average pool, dropout and a linear classifier.

    ``stem`` "cifar" is one 3x3 conv; "imagenet" a 7x7/2 conv and a 3x3/2 max pool.
    ``blocks`` gives the blocks per stage; stage i has ``width * 2**i`` channels and halves
    the size from the second stage on. ``shortcut`` "A" zero-pads, "B" is a 1x1 conv + norm.
    ``stem_padding`` is the stem conv's padding ("zeros", "none", "reflect", "replicate").
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        norm: Any,
        dropout: float,
        norm_position: str,
        width: int,
        blocks: tuple[int, ...],
        stem: str,
        shortcut: str,
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
        kernel = 3 if stem == "cifar" else 7
        padding, padding_mode = stem_conv_padding(kernel, stem_padding)
        stem_conv = ConvNormAct(
            in_channels,
            width,
            kernel,
            1 if stem == "cifar" else 2,
            padding=padding,
            padding_mode=padding_mode,
            norm=norm,
            norm_position=norm_position,
        )
        if stem == "cifar":
            self.stem = stem_conv
        else:
            self.stem = nn.Sequential(
                stem_conv,
                nn.MaxPool2d(3, 2, 1),
            )
        stages = []
        channels = width
        for i, count in enumerate(blocks):
            out_channels = width * 2**i
            stage = [
                BasicBlock(
                    channels if j == 0 else out_channels,
                    out_channels,
                    2 if i > 0 and j == 0 else 1,
                    norm=norm,
                    norm_position=norm_position,
                    shortcut=shortcut,
                )
                for j in range(count)
            ]
            stages.append(nn.Sequential(*stage))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = dropout_layer(dropout)
        self.fc = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape (N, num_classes)."""
        x = self.stages(self.stem(x))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


def resnet20(
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    norm: Any = "bn",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
    stem_padding: str = "zeros",
) -> nn.Module:
    """CIFAR ResNet-20: 3x3 stem, 3 stages x 3 blocks at 16/32/64 channels, option-A shortcuts.

    0.27M parameters at 10 classes, as in the paper; ``width`` replaces the 16.
    ``stem_padding`` is the stem conv's padding (see ``ResNet``); "none" trims 2 pixels.
    """
    return ResNet(
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=16 if width is None else width,
        blocks=(3, 3, 3),
        stem="cifar",
        shortcut="A",
        stem_padding=stem_padding,
    )


def resnet18(
    *,
    in_channels: int = 3,
    num_classes: int = 1000,
    norm: Any = "bn",
    dropout: float = 0.0,
    norm_position: str = "before",
    width: int | None = None,
    stem_padding: str = "zeros",
) -> nn.Module:
    """ImageNet ResNet-18: 7x7/2 stem and 3x3/2 max pool, 4 stages x 2 blocks at 64..512.

    11.69M parameters at 1000 classes with BN (torchvision's layout: 1x1 conv shortcuts).
    Inputs as small as 32x32 run; the last stage then works on 1x1 maps, which instance
    norm cannot normalize (use 64x64 or more with "in"). ``stem_padding`` is the 7x7 stem
    conv's padding (see ``ResNet``); "none" needs inputs of at least 7x7.
    """
    return ResNet(
        in_channels=in_channels,
        num_classes=num_classes,
        norm=norm,
        dropout=dropout,
        norm_position=norm_position,
        width=64 if width is None else width,
        blocks=(2, 2, 2, 2),
        stem="imagenet",
        shortcut="B",
        stem_padding=stem_padding,
    )
