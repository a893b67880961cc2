"""Bounds on a job spec's ``model.norm``: its length, its shape and every argument it gives.

A spec comes from a user over the network, so the norm it names must be cheap to check and cheap
to build: a parser fed a 200 kB string, a split BN with 100000 splits (100000 BatchNorms per
layer) or an ``eps`` of ``inf`` must be refused up front with a message naming the argument and
its limit. ``make_norm`` itself stays unbounded for library users; these limits apply to job
specs only (``normcore.spec.ModelSpec`` calls :func:`check_spec_norm`).

The limits, in one table (:data:`NORM_ARG_LIMITS`), are generous for real networks:
split_bn's ``num_splits`` (AugMix uses 3), ghost_bn's ``virtual_batch_size`` (at most the
largest ``data.batch_size``), group counts (at most the widest layer any arch builds), LRN's
window (AlexNet uses 5).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_NORM_DICT_KEYS",
    "MAX_NORM_TEXT",
    "NORM_ARG_LIMITS",
    "SERVICE_ONLY_ARGS",
    "check_norm_arguments",
    "check_spec_norm",
]

MAX_NORM_TEXT = 200  # characters of a norm string (the longest real one is ~60)
MAX_NORM_DICT_KEYS = 16
MAX_ARG_TEXT = 64  # characters of a string argument, e.g. small_batch="running_stats"

# Inclusive (low, high) per argument name, whatever the norm. Integers must be ints; floats any
# finite number in range. Names not listed take any finite number, bool, None or short string.
NORM_ARG_LIMITS: dict[str, tuple[float, float]] = {
    "num_groups": (1, 8192),  # widest layer: resnet18's last stage at model.width 1024
    "num_splits": (2, 16),  # split_bn builds one BatchNorm per split in every norm layer
    "virtual_batch_size": (2, 4096),  # data.batch_size's maximum
    "size": (1, 1024),  # LRN window, in channels
    "warmup_steps": (0, 10**9),
    "warmup_start": (0, 10**9),
    "eps": (0.0, 1.0),  # must also be > 0 (checked by the factory)
    "momentum": (0.0, 1.0),
    "r_max": (1.0, 1e6),
    "d_max": (0.0, 1e6),
    "scale": (-1e6, 1e6),
    "alpha": (-1e6, 1e6),
    "beta": (-1e6, 1e6),
    "k": (-1e6, 1e6),
}
_INT_ARGS = (
    "num_groups",
    "num_splits",
    "virtual_batch_size",
    "size",
    "warmup_steps",
    "warmup_start",
)

# Keywords make_norm accepts that a job spec must not set: the service places and types the model.
SERVICE_ONLY_ARGS = ("device", "dtype", "process_group")

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def _show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, so a hostile value never floods a message."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_value(where: str, key: str, value: Any) -> None:
    """One argument: a scalar, finite, and inside NORM_ARG_LIMITS when it is listed there."""
    if key in SERVICE_ONLY_ARGS:
        raise ValueError(
            f"{where}: {key!r} is set by the service (device placement, dtype, process group), "
            "not by a job spec; remove it"
        )
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        if len(value) > MAX_ARG_TEXT or not _PRINTABLE_ASCII.fullmatch(value):
            raise ValueError(
                f"{where}: {key} must be printable ASCII of at most {MAX_ARG_TEXT} characters, "
                f"got {_show(value)}"
            )
        return
    if not isinstance(value, int | float):
        raise ValueError(
            f"{where}: {key} must be a number, true/false, null or a short string, "
            f"got {type(value).__name__}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
    bounds = NORM_ARG_LIMITS.get(key)
    if bounds is None:
        if abs(value) > 1e9:
            raise ValueError(f"{where}: {key} must lie in [-1e9, 1e9], got {_show(value)}")
        return
    low, high = bounds
    if key in _INT_ARGS:
        if not isinstance(value, int):
            raise ValueError(f"{where}: {key} must be an integer, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(
                f"{where}: {key} must be an integer in [{low:g}, {high:g}], got {_show(value)}"
            )
        return
    if not low <= value <= high:
        raise ValueError(f"{where}: {key} must lie in [{low:g}, {high:g}], got {_show(value)}")


def check_norm_arguments(norm: str | Mapping[str, Any]) -> None:
    """Refuse a norm whose parsed arguments are out of :data:`NORM_ARG_LIMITS` (ValueError).

    ``norm`` is parsed with ``normcore.factory.parse_norm`` first (its ValueError passes
    through), so ``"split_bn:100000"``, ``"split_bn(num_splits=100000)"`` and
    ``{"type": "split_bn", "num_splits": 100000}`` are refused alike.
    """
    from normcore.factory import parse_norm

    parsed = parse_norm(norm)
    label = parsed.entry.name if parsed.entry is not None else parsed.text
    for key, value in parsed.kwargs.items():
        _check_value(f"norm {label!r}", str(key), value)


def check_spec_norm(norm: Any) -> None:
    """Check a job spec's ``model.norm`` before anything parses it deeply (ValueError if bad).

    A string: printable ASCII, at most :data:`MAX_NORM_TEXT` characters. A dict: at most
    :data:`MAX_NORM_DICT_KEYS` keys, each an identifier, each value a scalar (no lists or
    objects: no norm argument is one). Then the parsed arguments against the limits.
    """
    if isinstance(norm, str):
        if len(norm) > MAX_NORM_TEXT:
            raise ValueError(
                f"model.norm is {len(norm)} characters long; the limit is {MAX_NORM_TEXT} "
                "(a norm reads like 'gn:8' or 'bn(momentum=0.01, eps=1e-3)')"
            )
        if not _PRINTABLE_ASCII.fullmatch(norm):
            raise ValueError(
                "model.norm must be printable ASCII, such as 'gn:8' or 'bn(momentum=0.01)'"
            )
    elif isinstance(norm, Mapping):
        if len(norm) > MAX_NORM_DICT_KEYS:
            raise ValueError(f"model.norm has {len(norm)} keys; the limit is {MAX_NORM_DICT_KEYS}")
        for key, value in norm.items():
            if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
                raise ValueError(
                    f"model.norm key {_show(key)} must be an identifier of at most 64 characters"
                )
            if isinstance(value, list | tuple | dict | Mapping):
                raise ValueError(
                    f"model.norm.{key} must be a number, true/false, null or a string, "
                    f"got {'a list' if isinstance(value, list | tuple) else 'an object'}"
                )
            if isinstance(value, str) and key in ("type", "name"):
                check_spec_norm(value)
    check_norm_arguments(norm)
