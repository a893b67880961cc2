"""All-or-nothing module replacement: every replacement is built before the model is touched.

``replace_modules(model, swap)`` walks ``model`` (detectron2's ``convert_frozen_batchnorm``
order: a module that ``swap`` replaces is not descended into) and asks ``swap`` for each module's
replacement. ``swap`` must not modify the model: it builds new modules (which may share the old
one's parameters and buffers) and may return a ``Swap`` whose ``commit`` callback does what has
to wait (moving a module the model still holds). Only when every replacement is built are the
commits run and the new modules assigned, so an error raised while building leaves the model
exactly as it was: the same modules, parameters, buffers and state dict.

This module imports nothing of normcore's: the layers (``SyncBatchNorm.convert_sync_batchnorm``)
and the conversions (``normcore.convert``) both use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["Swap", "replace_modules"]


@dataclass(frozen=True)
class Swap:
    """A replacement for one module, with what to do to it once every replacement is built."""

    new: nn.Module
    commit: Callable[[], None] | None = None


def replace_modules(
    model: nn.Module, swap: Callable[[nn.Module], nn.Module | Swap | None]
) -> nn.Module:
    """Replace every module ``swap`` gives a replacement for; return ``model`` or its replacement.

    A module registered under several names (or in several parents) is asked about once and its
    replacement shared, so aliasing survives. Nothing is changed unless every call of ``swap``
    returned.
    """
    memo: dict[int, nn.Module] = {}
    commits: list[Callable[[], None]] = []
    assignments: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(module: nn.Module) -> nn.Module:
        known = memo.get(id(module))
        if known is not None:
            return known
        found = swap(module)
        if isinstance(found, Swap):
            if found.commit is not None:
                commits.append(found.commit)
            found = found.new
        if found is not None:
            memo[id(module)] = found
            return found
        memo[id(module)] = module
        # _modules, not named_children(): that skips a second name for the same child
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = visit(child)
            if new is not child:
                assignments.append((module, name, new))
        return module

    root = visit(model)
    for commit in commits:
        commit()
    for parent, name, new in assignments:
        parent._modules[name] = new
    return root
