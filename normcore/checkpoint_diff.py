"""Per-layer change between two model state dicts of the same architecture.

For every tensor both state dicts hold, in float64, the change of ``a`` (the checkpoint looked
at) relative to ``b`` (the reference it is compared against):

- ``rel_l2``: ``||a - b||_2 / ||b||_2`` (0 when both are zero, None when ``b`` is zero and ``a``
  not; None too for any value that is not finite, as JSON has no NaN or infinity);
- ``max_abs``: ``max |a - b|``; ``mean_abs``: the mean of ``|a - b|``;
- ``norm_a``, ``norm_b``: the two L2 norms.

Integer counters (``num_batches_tracked``) report ``a``, ``b`` and ``change`` (``a - b``) instead. Tensors are
grouped by module: the key ``layer1.0.bn1.running_var`` is the ``running_var`` of module
``layer1.0.bn1``. State dicts whose keys or shapes differ are not comparable:
:class:`ArchitectureMismatch` names the first differences, and the side (by the names the caller
gives the two state dicts) that holds a tensor the other lacks.
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
    """The change of ``a`` relative to the reference ``b`` (same shape), computed in float64;
    see the module doc.

    Raises:
        ArchitectureMismatch: the shapes differ.
    """
    if a.shape != b.shape:
        raise ArchitectureMismatch(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if not (a.is_floating_point() or a.is_complex()):
        va, vb = int(a.sum().item()), int(b.sum().item())
        if a.numel() == 1:
            return {"a": va, "b": vb, "change": va - vb}
        diff = (a.to(torch.int64) - b.to(torch.int64)).abs()
        return {
            "max_abs": int(diff.max().item()) if diff.numel() else 0,
            "changed": int((diff > 0).sum()),
        }
    ta = a.detach().to(torch.float64).reshape(-1)
    tb = b.detach().to(torch.float64).reshape(-1)
    d = ta - tb
    norm_a = torch.linalg.vector_norm(ta).item()
    norm_b = torch.linalg.vector_norm(tb).item()
    norm_d = torch.linalg.vector_norm(d).item()
    # ||b|| = 0 with a change: no finite relative change (None in JSON)
    rel = norm_d / norm_b if norm_b > 0 else 0.0 if norm_d == 0 else math.inf
    empty = d.numel() == 0
    return {
        "rel_l2": _finite(rel),
        "max_abs": 0.0 if empty else _finite(d.abs().max().item()),
        "mean_abs": 0.0 if empty else _finite(d.abs().mean().item()),
        "norm_a": _finite(norm_a),
        "norm_b": _finite(norm_b),
    }


def _mismatch(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], names: tuple[str, str]
) -> str | None:
    """A message naming the keys only one side has (that side by its name in ``names``) and the
    shapes that differ (``a``'s first), or None."""
    only_a = sorted(set(a) - set(b), key=_natural_key)
    only_b = sorted(set(b) - set(a), key=_natural_key)
    shapes = [
        f"{k}: {list(a[k].shape)} vs {list(b[k].shape)}"
        for k in sorted(set(a) & set(b), key=_natural_key)
        if a[k].shape != b[k].shape
    ]
    parts = []
    for label, items in (
        (f"only in {names[0]}", only_a),
        (f"only in {names[1]}", only_b),
        (f"of different shapes ({names[0]} vs {names[1]})", shapes),
    ):
        if items:
            more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
            parts.append(f"{len(items)} tensor(s) {label}: {', '.join(items[:MAX_NAMED])}{more}")
    return "; ".join(parts) or None


def diff_state_dicts(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, dict[str, Any]]:
    """Per module name (natural order), per tensor name: the change of ``a`` relative to the
    reference ``b``.

    ``{"layer1.0.bn1": {"weight": {"rel_l2": ..., "max_abs": ...}, "running_mean": {...},
    "num_batches_tracked": {"a": 200, "b": 100, "change": 100}}, ...}``. A top-level tensor
    (a key without a dot) is reported under the module name ``""``. ``names`` are how a
    mismatch message calls ``a`` and ``b`` (a job id and checkpoint name, say).

    Raises:
        ArchitectureMismatch: the keys or shapes differ (the message names them and the side).
    """
    problem = _mismatch(a, b, names)
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
