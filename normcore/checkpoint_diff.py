"""Per-layer change between two model state dicts of the same architecture.

For every tensor both state dicts hold, in float64 (``a`` is the reference, ``b`` the other):

- ``rel_l2``: ``||b - a||_2 / ||a||_2`` (0 when both are zero, None when ``a`` is zero and ``b`` not; None too
  for any value that is not finite, as JSON has no NaN or infinity);
- ``max_abs``: ``max |b - a|``; ``mean_abs``: the mean of ``|b - a|``;
- ``norm_a``, ``norm_b``: the two L2 norms.

Integer counters (``num_batches_tracked``) report ``a``, ``b`` and ``change`` instead. Tensors are
grouped by module: the key ``layer1.0.bn1.running_var`` is the ``running_var`` of module
``layer1.0.bn1``. State dicts whose keys or shapes differ are not comparable:
:class:`ArchitectureMismatch` names the first differences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["ArchitectureMismatch", "diff_state_dicts", "summarize", "tensor_change"]

MAX_NAMED = 5  # keys named in a mismatch message


class ArchitectureMismatch(ValueError):
    """Two state dicts with different keys or shapes: the message names what differs."""


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _finite(value: float) -> float | None:
    """``value``, or None when it is NaN or infinite (JSON has neither)."""
    return value if math.isfinite(value) else None


def tensor_change(a: Tensor, b: Tensor) -> dict[str, Any]:
    """The change from ``a`` to ``b`` (same shape), computed in float64; see the module doc.

    Raises:
        ArchitectureMismatch: the shapes differ.
    """
    if a.shape != b.shape:
        raise ArchitectureMismatch(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if not (a.is_floating_point() or a.is_complex()):
        va, vb = int(a.sum().item()), int(b.sum().item())
        if a.numel() == 1:
            return {"a": va, "b": vb, "change": vb - va}
        diff = (b.to(torch.int64) - a.to(torch.int64)).abs()
        return {
            "max_abs": int(diff.max().item()) if diff.numel() else 0,
            "changed": int((diff > 0).sum()),
        }
    ta = a.detach().to(torch.float64).reshape(-1)
    tb = b.detach().to(torch.float64).reshape(-1)
    d = tb - ta
    norm_a = torch.linalg.vector_norm(ta).item()
    norm_b = torch.linalg.vector_norm(tb).item()
    norm_d = torch.linalg.vector_norm(d).item()
    # ||a|| = 0 with a change: no finite relative change (None in JSON)
    rel = norm_d / norm_a if norm_a > 0 else 0.0 if norm_d == 0 else math.inf
    empty = d.numel() == 0
    return {
        "rel_l2": _finite(rel),
        "max_abs": 0.0 if empty else _finite(d.abs().max().item()),
        "mean_abs": 0.0 if empty else _finite(d.abs().mean().item()),
        "norm_a": _finite(norm_a),
        "norm_b": _finite(norm_b),
    }


def _mismatch(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> str | None:
    """A message naming the keys only one side has and the shapes that differ, or None."""
    only_a = sorted(set(a) - set(b), key=_natural_key)
    only_b = sorted(set(b) - set(a), key=_natural_key)
    shapes = [
        f"{k}: {list(a[k].shape)} vs {list(b[k].shape)}"
        for k in sorted(set(a) & set(b), key=_natural_key)
        if a[k].shape != b[k].shape
    ]
    parts = []
    for label, items in (
        ("only in the first", only_a),
        ("only in the second", only_b),
        ("of different shapes", shapes),
    ):
        if items:
            more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
            parts.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:MAX_NAMED])}{more}")
    return "; ".join(parts) or None


def diff_state_dicts(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Per module name (natural order), per tensor name: the change from ``a`` to ``b``.

    ``{"layer1.0.bn1": {"weight": {"rel_l2": ..., "max_abs": ...}, "running_mean": {...},
    "num_batches_tracked": {"a": 100, "b": 200, "change": 100}}, ...}``. A top-level tensor
    (a key without a dot) is reported under the module name ``""``.

    Raises:
        ArchitectureMismatch: the keys or shapes differ (the message names them).
    """
    problem = _mismatch(a, b)
    if problem is not None:
        raise ArchitectureMismatch(f"the checkpoints are of different architectures: {problem}")
    out: dict[str, dict[str, Any]] = {}
    for key in sorted(a, key=_natural_key):
        module, _, leaf = key.rpartition(".")
        out.setdefault(module, {})[leaf] = tensor_change(a[key], b[key])
    return out


def summarize(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The module whose weight and whose running variance changed most (by ``rel_l2``)."""
    best: dict[str, Any] = {}
    for leaf in ("weight", "running_mean", "running_var"):
        rows = [
            (m[leaf]["rel_l2"], name)
            for name, m in modules.items()
            if leaf in m and isinstance(m[leaf].get("rel_l2"), float)
        ]
        if rows:
            value, name = max(rows)
            best[f"largest_{leaf}_change"] = {"module": name, "rel_l2": value}
    return best
