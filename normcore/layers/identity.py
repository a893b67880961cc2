"""Identity: the ``"none"`` norm."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["Identity"]


class Identity(nn.Identity):
    """Returns its input unchanged; accepts and ignores any constructor arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
