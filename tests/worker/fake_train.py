"""Training functions with ``normcore.train``'s signature that fail in ways a real run rarely does.

Used by the runner tests through ``run_job(train_target=...)``; never imported by product code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from normcore.engine import MetricRow


def out_of_memory(spec: Any, workdir: Path, callbacks: Any = (), resume: Any = None, **_: Any):
    """Report three train steps, then fail the way a CUDA allocation does."""
    import torch

    for cb in callbacks:
        for step in (1, 2, 3):
            cb.on_metrics(MetricRow(step, 1, "train", {"loss": 1.0 / step}, time.time()))
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def ignore_sigterm(spec: Any, workdir: Path, callbacks: Any = (), resume: Any = None, **_: Any):
    """Never poll should_stop: only SIGKILL after the grace period ends this one."""
    for cb in callbacks:
        cb.on_metrics(MetricRow(1, 1, "train", {"loss": 1.0}, time.time()))
    time.sleep(600)


def cuda_state(spec: Any, workdir: Path, callbacks: Any = (), resume: Any = None, **_: Any):
    """Log whether CUDA was initialized in this process before its job's training began."""
    import torch

    from normcore.engine import TrainResult

    for cb in callbacks:
        cb.on_log(f"cuda initialized before the job: {torch.cuda.is_initialized()}")
    return TrainResult("succeeded", 0, 0, {}, [], Path(workdir), 0.0)


def allocate_16_gib(spec: Any, workdir: Path, callbacks: Any = (), resume: Any = None, **_: Any):
    """Ask for 16 GiB at once: past the address-space limit, the allocation fails here."""
    import torch

    torch.empty(16 * 2**30, dtype=torch.uint8)
    raise AssertionError("16 GiB allocated: the address-space limit was not applied")
