"""Tensor ops on whole image sets and batches: conversion, statistics, split, augmentation."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R BT.601 luma, what Pillow's convert("L") uses
_LUMA = (0.299, 0.587, 0.114)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (e.g. ``("perm", seed, epoch)``); stable across runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``parts``, so no global RNG is consumed."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def to_float(x: np.ndarray | Tensor) -> Tensor:
    """Images as float32: uint8 is scaled to [0, 1], floats are kept as they are."""
    if isinstance(x, np.ndarray):
        # arrays unpickled from bytes are read-only, which torch.from_numpy warns about
        x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x, order="C")
        t = torch.from_numpy(x)
    else:
        t = x
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0)
    return t.to(torch.float32)


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """(N, C, H, W) to ``channels``: grey is repeated, RGB(A) becomes luma, RGBA drops alpha."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if have in (3, 4) and channels == 1:
        luma = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x[:, :3] * luma).sum(1, keepdim=True)
    if have == 4 and channels == 3:
        return x[:, :3].contiguous()
    raise ValueError(f"cannot convert images with {have} channels to {channels} channels")


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear (antialiased when shrinking) resize of float (N, C, H, W) images."""
    hw = (size, size) if isinstance(size, int) else size
    if tuple(x.shape[-2:]) == hw:
        return x
    out = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out


def channel_stats(x: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of float (N, C, H, W) images, in float64."""
    channels = x.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for part in x.split(chunk):
        part = part.to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (squares / count - mean.square()).clamp_min(0.0)
    std = var.sqrt()
    # a constant channel has nothing to scale: divide by 1 instead of by ~0
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def normalize_(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """``(x - mean) / std`` per channel, in place."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def split_indices(
    n: int, val_fraction: float, gen: torch.Generator, labels: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Seeded (train, val) index tensors; stratified by ``labels`` when given.

    Each class gives its share ``count * val_fraction`` to val, rounded so that the total is
    ``round(n * val_fraction)`` (largest remainders first); at least one sample goes to each
    side. Both index tensors are sorted, so the stored order is the file order.
    """
    if n < 2:
        raise ValueError(f"need at least 2 samples to split into train and val, got {n}")
    total = min(max(1, round(n * val_fraction)), n - 1)
    perm = torch.randperm(n, generator=gen)
    if labels is None:
        val, train = perm[:total], perm[total:]
    else:
        shuffled = labels[perm]
        classes, counts = torch.unique(shuffled, return_counts=True)
        quota = counts.double() * (total / n)
        take_n = quota.floor().long()
        short = total - int(take_n.sum())
        # stable sort: equal remainders go to the lower class first
        order = torch.sort(quota - take_n, descending=True, stable=True).indices
        take_n[order[:short]] += 1
        take = torch.zeros(n, dtype=torch.bool)
        for c, k in zip(classes.tolist(), take_n.tolist(), strict=True):
            take[(shuffled == c).nonzero().flatten()[:k]] = True
        val, train = perm[take], perm[~take]
    return train.sort().values, val.sort().values


def crop_flip_params(n: int, padding: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample crop offsets in [0, 2*padding] (rows, cols) and horizontal-flip flags."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return dy, dx, flip


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Random crop of the zero-padded batch and horizontal flip, as one gather (no loop).

    ``x`` is normalized, so zero padding is the mean colour rather than black.
    """
    n, c, h, w = x.shape
    device = x.device
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=device)  # (N, H)
    cols = torch.arange(w, device=device).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W)
    batch = torch.arange(n, device=device)[:, None, None, None]
    chan = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]
