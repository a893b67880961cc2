"""Seeding and capturing every RNG a training run draws from: python, numpy, torch CPU and CUDA."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["capture_rng", "restore_rng", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The current RNG states: torch states as uint8 tensors, python and numpy states as JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": kind,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    return tensors, states


def restore_rng(tensors: dict[str, Tensor], states: dict[str, Any]) -> list[str]:
    """Restore states saved by ``capture_rng``; returns warnings for states it could not restore."""
    warnings = []
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() >= len(cuda):
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
        else:
            warnings.append(
                f"checkpoint holds {len(cuda)} CUDA RNG state(s) but this machine has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s); "
                "CUDA RNG not restored"
            )
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npst = states["numpy"]
    np.random.set_state(
        (
            npst["kind"],
            np.asarray(npst["keys"], dtype=np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    return warnings
