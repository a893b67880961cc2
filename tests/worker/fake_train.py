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
