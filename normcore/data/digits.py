"""scikit-learn's bundled 8x8 handwritten digits: 1797 images, 10 classes, no download."""

from __future__ import annotations

import torch
from torch import Tensor


def load_digits() -> tuple[Tensor, Tensor]:
    """(1797, 1, 8, 8) float32 images in [0, 1] (the 0..16 ink counts / 16) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError(
            "the digits dataset ships with scikit-learn: pip install 'normcore[data]'"
        ) from exc

    images, labels = sk_load_digits(return_X_y=True)
    x = torch.from_numpy(images.reshape(-1, 1, 8, 8)).to(torch.float32) / 16.0
    return x, torch.from_numpy(labels).to(torch.int64)
