"""Device choice, mixed precision (autocast + GradScaler), channels_last and determinism flags."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normcore.spec import ResourcesSpec

__all__ = ["Precision", "determinism", "resolve_device", "setup_precision"]


def resolve_device(requested: str | torch.device, processes: int = 1) -> torch.device:
    """``auto`` is CUDA when the machine has ``processes`` CUDA devices (one per data-parallel
    process), else CPU; asking for CUDA without it is an error."""
    if isinstance(requested, torch.device):
        device = requested
    elif requested == "auto":
        enough = torch.cuda.is_available() and torch.cuda.device_count() >= processes
        device = torch.device("cuda" if enough else "cpu")
    else:
        device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "resources.device is 'cuda' but this machine has no usable CUDA device; "
            "use 'auto' or 'cpu'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {str(device)!r}: use 'auto', 'cpu' or 'cuda'")
    return device


@dataclass
class Precision:
    """What the step needs to know about the numeric setup of this run."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    scaler: torch.amp.GradScaler

    @property
    def amp_name(self) -> str:
        """``bfloat16``, ``float16`` or ``none``."""
        return str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "none"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the AMP dtype on CUDA; a no-op otherwise."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def inputs(self, x: Tensor) -> Tensor:
        """Inputs in the memory format the model was converted to."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x


def setup_precision(
    resources: ResourcesSpec, device: torch.device, model: nn.Module, log: Callable[[str], None]
) -> Precision:
    """Resolve AMP and channels_last for ``device`` and convert ``model``'s memory format."""
    amp_dtype = None
    if resources.amp != "none":
        if device.type != "cuda":
            log(f"amp {resources.amp!r} ignored on {device.type}: training in float32")
        elif resources.amp == "bf16" and not torch.cuda.is_bf16_supported():
            log("amp 'bf16' ignored: this GPU does not support bfloat16; training in float32")
        else:
            amp_dtype = torch.bfloat16 if resources.amp == "bf16" else torch.float16
    channels_last = resources.channels_last and device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # Loss scaling only matters for float16; a disabled scaler is a pass-through.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return Precision(device, amp_dtype, channels_last, scaler)


@contextlib.contextmanager
def determinism(device: torch.device) -> Iterator[bool]:
    """Deterministic algorithms on CPU; cuDNN autotuning (faster, not bit-exact) on CUDA.

    The global flags are restored on exit, so calling ``train`` leaves the process as it was.
    Yields whether the run is meant to be bit-reproducible.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    deterministic = device.type == "cpu"
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        yield deterministic
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark = saved[2]
