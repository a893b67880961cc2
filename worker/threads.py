"""How many torch CPU threads a training process gets by default.

torch's own default is one thread per core of the machine, whatever else runs on it. Beside a
busy API and other training processes that oversubscribes the cores: on 2 cores with the API
beside it, a lenet epoch took 8.3 s at torch's 2 threads against 0.4 s at 1 (issue 12). So the
default divides the cores this worker may use (its CPU affinity, and a cgroup's ``cpu.max``
quota when lower) among the jobs it runs at once, after keeping one core for the API when it
runs on the same host (``normcore serve``). ``train_threads`` (``NORMCORE_TRAIN_THREADS``) set
to a positive number overrides it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")  # cgroup v1: -1 for no quota
_CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and the sentence that explains it in the job's log."""

    threads: int
    reason: str


def cgroup_cpu_limit(
    cpu_max: Path = _CPU_MAX, cfs_quota: Path = _CFS_QUOTA, cfs_period: Path = _CFS_PERIOD
) -> int | None:
    """CPUs a cgroup quota allows (``ceil(quota / period)``), or None without a quota.

    Reads cgroup v2's ``cpu.max``, else cgroup v1's ``cpu.cfs_quota_us``/``cpu.cfs_period_us``
    (the files a container's ``--cpus`` writes). Unreadable or malformed files count as no quota.
    """
    try:
        quota, _, period = cpu_max.read_text().strip().partition(" ")
        if quota != "max" and int(quota) > 0 and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        q, p = int(cfs_quota.read_text()), int(cfs_period.read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def usable_cpus() -> tuple[int, str]:
    """(CPUs this process may run on, where that number comes from) for log lines.

    The smaller of ``os.sched_getaffinity`` (``taskset``, a container's cpuset; ``os.cpu_count``
    where the OS has no affinity call) and the cgroup quota.
    """
    try:
        cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except AttributeError:  # macOS
        cpus, source = os.cpu_count() or 1, "cpu_count"
    quota = cgroup_cpu_limit()
    if quota is not None and quota < cpus:
        return quota, "cgroup cpu.max quota"
    return cpus, source


def choose_train_threads(
    requested: int,
    *,
    concurrency: int,
    api_beside: bool,
    cpus: tuple[int, str] | None = None,
) -> ThreadChoice:
    """The torch thread count of one training process, and why.

    ``requested`` is ``train_threads`` (0: choose); ``concurrency`` the jobs this worker runs
    at once; ``api_beside`` whether the API runs on this host (one core is kept for it when
    there is more than one); ``cpus`` is ``usable_cpus()`` unless given (for tests). The
    default is ``max(1, (cpus - api) // concurrency)``: never more threads than cores in all.

    Raises ValueError for a negative ``requested`` or a ``concurrency`` below 1.
    """
    if requested < 0 or concurrency < 1:
        raise ValueError(
            f"need requested >= 0 and concurrency >= 1, got {requested}, {concurrency}"
        )
    if requested:
        return ThreadChoice(requested, "set by train_threads (NORMCORE_TRAIN_THREADS)")
    count, source = cpus if cpus is not None else usable_cpus()
    kept = 1 if api_beside and count > 1 else 0
    threads = max(1, (count - kept) // concurrency)
    parts = [f"{count} CPU{'s' if count != 1 else ''} usable ({source})"]
    if kept:
        parts.append("1 kept for the API beside this worker")
    parts.append(
        f"{concurrency} job{'s' if concurrency != 1 else ''} at a time (worker concurrency)"
    )
    return ThreadChoice(
        threads, f"chosen from {', '.join(parts)}; NORMCORE_TRAIN_THREADS overrides it"
    )
