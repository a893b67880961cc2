"""Data sets made on the fly from a seed: shapes, seed 002's brightness set, SR image pairs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = (
    "square",
    "circle",
    "plus",
    "triangle",
    "h-stripes",
    "v-stripes",
    "ring",
    "x",
    "frame",
    "checkers",
)
BRIGHTNESS_CLASSES = ("dark-low", "dark-high", "bright-low", "bright-high")


def _grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1], each (1, size, size), rows then columns."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return yy[None], xx[None]


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]


def _shape_masks(label: int, n: int, size: int, gen: torch.Generator) -> Tensor:
    """(n, size, size) float masks of shape ``SHAPES[label]`` at random position and size."""
    yy, xx = _grid(size)
    cy = _uniform(n, 0.32, 0.68, gen)[:, None, None]
    cx = _uniform(n, 0.32, 0.68, gen)[:, None, None]
    r = _uniform(n, 0.2, 0.3, gen)[:, None, None]
    dy, dx = yy - cy, xx - cx
    ady, adx = dy.abs(), dx.abs()
    box = torch.maximum(ady, adx)
    dist = (dy.square() + dx.square()).sqrt()
    cycles = torch.randint(2, 5, (n, 1, 1), generator=gen).float()
    phase = _uniform(n, 0.0, 2 * math.pi, gen)[:, None, None]
    name = SHAPES[label]
    if name == "square":
        mask = box < r
    elif name == "circle":
        mask = dist < r
    elif name == "plus":
        mask = ((adx < r / 3) & (ady < r)) | ((ady < r / 3) & (adx < r))
    elif name == "triangle":  # apex up, base down
        mask = (dy > -r) & (dy < r) & (adx < (dy + r) / 2)
    elif name == "h-stripes":
        mask = torch.sin(2 * math.pi * cycles * yy + phase) > 0
    elif name == "v-stripes":
        mask = torch.sin(2 * math.pi * cycles * xx + phase) > 0
    elif name == "ring":
        mask = (dist < r) & (dist > 0.55 * r)
    elif name == "x":
        mask = ((adx - ady).abs() < r / 3) & (box < r)
    elif name == "frame":
        mask = (box < r) & (box > 0.55 * r)
    else:  # checkers
        mask = ((torch.floor(xx * cycles * 2) + torch.floor(yy * cycles * 2)) % 2) == 0
    return mask.float()


def make_shapes(
    num_samples: int, image_size: int, channels: int, num_classes: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Class k is ``SHAPES[k]`` at a random place, size and colour, over noise; values in [0, 1].

    Foreground and background colours swap at random, so neither brightness nor colour tells
    the class: only the shape does.
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"synthetic num_classes must be 2..{len(SHAPES)}, got {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    y = _balanced_labels(num_samples, num_classes, gen)
    x = torch.empty(num_samples, channels, image_size, image_size)
    for k in range(num_classes):
        idx = (y == k).nonzero().flatten()
        n = len(idx)
        mask = _shape_masks(k, n, image_size, gen)[:, None]
        dark = _uniform(n * channels, 0.0, 0.4, gen).view(n, channels, 1, 1)
        light = _uniform(n * channels, 0.6, 1.0, gen).view(n, channels, 1, 1)
        swap = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
        fg = swap * dark + (1 - swap) * light
        bg = swap * light + (1 - swap) * dark
        x[idx] = bg + (fg - bg) * mask
    x += 0.05 * torch.randn(x.shape, generator=gen)
    return x.clamp_(0.0, 1.0), y


def make_brightness(
    num_samples: int, image_size: int, channels: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Seed 002's example: the label is only a picture's global brightness and contrast.

    Classes ``BRIGHTNESS_CLASSES``: {dark, bright} x {low, high contrast} of random smooth
    textures. Per-sample normalization of the input removes exactly these two cues.
    """
    gen = torch.Generator().manual_seed(seed)
    y = _balanced_labels(num_samples, 4, gen)
    low_res = max(2, image_size // 4)
    tex = torch.randn(num_samples, channels, low_res, low_res, generator=gen)
    tex = F.interpolate(tex, size=(image_size, image_size), mode="bilinear", align_corners=False)
    tex = tex + 0.3 * torch.randn(tex.shape, generator=gen)
    flat = tex.flatten(1)
    tex = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True)).view_as(tex)
    bright = (y // 2).bool()
    high = (y % 2).bool()
    level = torch.where(
        bright, _uniform(num_samples, 0.65, 0.8, gen), _uniform(num_samples, 0.2, 0.35, gen)
    )
    contrast = torch.where(
        high, _uniform(num_samples, 0.12, 0.18, gen), _uniform(num_samples, 0.02, 0.05, gen)
    )
    x = level.view(-1, 1, 1, 1) + contrast.view(-1, 1, 1, 1) * tex
    return x.clamp_(0.0, 1.0), y


def make_sr_images(num_samples: int, image_size: int, channels: int, seed: int) -> Tensor:
    """Smooth images with some sharp edges (gradient + blobs + step edges), values in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    n, c = num_samples, channels
    yy, xx = _grid(image_size)
    yy, xx = yy[:, None], xx[:, None]  # (1, 1, S, S)

    def rand(*shape: int, low: float = 0.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=gen)

    angle = rand(n, 1, 1, 1, high=2 * math.pi)
    ramp = (torch.cos(angle) * (xx - 0.5) + torch.sin(angle) * (yy - 0.5)) + 0.5
    start, end = rand(n, c, 1, 1), rand(n, c, 1, 1)
    x = start + (end - start) * ramp
    for _ in range(3):  # soft blobs
        cy, cx = rand(n, 1, 1, 1), rand(n, 1, 1, 1)
        width = rand(n, 1, 1, 1, low=0.05, high=0.2)
        blob = torch.exp(-((yy - cy).square() + (xx - cx).square()) / (2 * width.square()))
        x = x + rand(n, c, 1, 1, low=-0.5, high=0.5) * blob
    for _ in range(2):  # step edges along random lines, slightly smoothed
        theta = rand(n, 1, 1, 1, high=2 * math.pi)
        offset = rand(n, 1, 1, 1, low=-0.25, high=0.25)
        side = torch.cos(theta) * (xx - 0.5) + torch.sin(theta) * (yy - 0.5) - offset
        x = x + rand(n, c, 1, 1, low=-0.3, high=0.3) * torch.sigmoid(side * image_size * 2)
    return x.clamp_(0.0, 1.0)


def downsample(hr: Tensor, scale: int) -> Tensor:
    """Low-resolution twin of ``hr`` by antialiased bicubic interpolation, clamped to [0, 1]."""
    if scale == 1:
        return hr.clone()
    size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    lr = F.interpolate(hr, size=size, mode="bicubic", align_corners=False, antialias=True)
    return lr.clamp_(0.0, 1.0)
