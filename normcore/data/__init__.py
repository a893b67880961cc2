"""Data that needs no download (synthetic, brightness, digits, sr-synthetic) and readers of
MNIST IDX, CIFAR-10 batches, image folders and ``.npz`` under a data root, as ``DataBundle``s.
"""

from __future__ import annotations

from normcore.data.loader import DataBundle, build_data
from normcore.data.paths import DataNotFoundError, DataPathError, resolve_under

__all__ = ["DataBundle", "DataNotFoundError", "DataPathError", "build_data", "resolve_under"]
