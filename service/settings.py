"""Service settings: one pydantic-settings class read from ``NORMCORE_*`` environment variables.

Paths default to folders under ``data_dir`` and are made absolute at construction, so the API,
the worker and its training child (which may run in another working directory) agree on them.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = "./normcore-data"
MIN_TRAIN_MEMORY = 256 * 2**20
# what Python, torch and the engine take before any data or model (about 0.65 GB of address
# space after `import torch, normcore` on x86-64 Linux)
RUNTIME_ALLOWANCE = 2**30
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or the container's cgroup memory limit if lower.

    None where the OS says neither (``os.sysconf`` names missing).
    """
    total: int | None = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        total = None
    for name in _CGROUP_LIMITS:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (total is None or int(text) < total):
            total = int(text)
    return total


def _is_loopback(host: str) -> bool:
    """True for localhost names and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Configuration shared by the API, the worker and the CLI (env prefix ``NORMCORE_``)."""

    model_config = SettingsConfigDict(env_prefix="NORMCORE_", extra="ignore")

    data_dir: Path = Field(default=Path(DEFAULT_DATA_DIR), description="Root of local state.")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; default sqlite:///<data_dir>/normcore.db."
    )
    broker_url: str = Field(
        default="", description="Celery broker URL; default sqla+sqlite:///<data_dir>/broker.db."
    )
    artifact_dir: Path = Field(
        default=Path(), description="Job files; default <data_dir>/artifacts."
    )
    data_root: Path = Field(
        default=Path(),
        description="Where file datasets are read from; default <data_dir>/datasets.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(default=True, description="False is only allowed on a loopback host.")
    max_body_bytes: int = Field(default=1_000_000, ge=1)
    access_log: bool = Field(
        default=False,
        description="uvicorn's access log (one line per request) in `normcore serve`'s API; off "
        "by default: followers poll many times a second, each poll would be a line.",
    )
    # Recovery after a worker dies takes lease_seconds + reaper_interval_seconds + a broker poll
    # (broker_poll_seconds on SQLite). The lease must still outlast a few missed heartbeats: a
    # heartbeat is one short write, but on SQLite it can queue behind other writers (a WAL
    # checkpoint, a burst of metric rows) for some hundreds of ms on a loaded machine; the
    # supervisor imports no torch, so its GC pauses are milliseconds. 6 s tolerates five missed
    # 1 s beats, and a false expiry is safe anyway: the attempt is fenced off and the next one
    # resumes from its checkpoint.
    lease_seconds: float = Field(default=6.0, gt=0)
    heartbeat_seconds: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often each reaper (API and workers) looks for work."
    )
    broker_poll_seconds: float = Field(
        default=0.25,
        gt=0,
        le=5,
        description="Embedded (SQLite) broker: seconds an idle worker sleeps between two looks "
        "at broker.db for a message (kombu's polling_interval, 1 s by default): at most this long "
        "between a job's POST and its claim. An idle worker costs about 1.3% of a core at 0.25 s "
        "(0.5% at 1 s, 2.9% at 0.1 s, on a 2-core VM).",
    )
    republish_after_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A queued job not claimed this long after its message was published gets "
        "another message (the first may have been lost: acked by a worker that died before its "
        "claim, or dropped by the broker). The wait doubles after each republish, up to 64x.",
    )
    api_reaper: bool = Field(
        default=True,
        description="Run a reaper loop in the API process too, so jobs of a dead worker come "
        "back even when no other worker is alive.",
    )
    cancel_grace_seconds: float = Field(default=10.0, ge=0)
    train_threads: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="torch CPU threads of the training process (0: chosen from the cores the "
        "worker may use, less one for an API beside it, over worker_concurrency; see "
        "worker/threads.py). CPU runs are bit-identical only at the same thread count; each "
        "checkpoint records it.",
    )
    train_memory_limit_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Address-space limit (RLIMIT_AS) of the training process, so a job that asks "
        "for too much memory fails with an out-of-memory error instead of waking the OOM killer. "
        "CPU only: CUDA reserves far more address space than it uses. None (the default): "
        "sized from the machine, train_memory_fraction of its memory (or of the container's "
        "cgroup limit) divided by worker_concurrency; 0: no limit; else at least 256 MiB.",
    )
    train_memory_fraction: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Share of the machine's memory the training processes of one worker may "
        "use together, when train_memory_limit_bytes is not set.",
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        description="Jobs one worker runs at once (`python -m worker --concurrency` sets it); "
        "divides the default training memory limit.",
    )
    job_memory_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Largest memory estimate (data + model + activations, all of a job's "
        "processes; normcore.resources.estimate_memory) a job may have at submit, 422 above it. "
        "None: the training memory limit less 1 GiB for the Python and torch runtime; 0: no "
        "check. Set it where the API runs on another machine than the workers.",
    )
    max_runtime_minutes: float = Field(
        default=24 * 60.0,
        gt=0.0,
        le=525_600.0,
        description="Server-wide cap on a job's training time, all attempts together: a spec's "
        "max_runtime may not exceed it (422) and a job without one gets it. At the limit the "
        "job writes a checkpoint and ends timed_out.",
    )
    data_read_timeout_seconds: float = Field(
        default=120.0,
        ge=0.0,
        description="Seconds one read of a data file may take before the job fails naming the "
        "file (a stalled network mount); 0: no timeout.",
    )
    max_model_parameters: int = Field(
        default=50_000_000,
        ge=1,
        description="Largest model a job may build (parameters, counted at submit).",
    )
    worker_queues: str = Field(default="cpu,gpu", description="Queues `python -m worker` consumes.")
    worker_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker refreshes its row in the workers table."
    )
    worker_live_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A worker whose last heartbeat is older than this is not live (GET /workers, "
        "and the GPU check at submit).",
    )
    max_active_jobs_per_user: int = Field(default=20, ge=1)
    fair_scheduling: bool = Field(
        default=True,
        description="A worker woken by a job's message claims the fairest queued job of that "
        "queue (its owner has the fewest running jobs, then was served longest ago), so one "
        "user's early jobs cannot starve another's; false: the job of the message, in order.",
    )
    disk_quota_bytes_per_user: int | None = Field(
        default=20 * 2**30,
        ge=0,
        description="Bytes a user's jobs may hold (their recorded checkpoint sizes plus log text); "
        "at or over it, submits are refused with 429 until jobs are deleted. None: no quota.",
    )
    max_keep_last: int = Field(
        default=10,
        ge=1,
        description="Largest checkpoint.keep_last a spec may ask for (422 above it).",
    )
    visibility_timeout_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="Redis broker: seconds before an unacked message is redelivered. Must exceed "
        "the longest job when tasks are acked late; the store's claim makes leftovers harmless.",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_paths(cls, data: Any) -> Any:
        # Runs on the merged input (init kwargs + env), before defaults: an absent or empty value
        # is derived from data_dir, so NORMCORE_DATA_DIR alone moves everything.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        data_dir = Path(data.get("data_dir") or DEFAULT_DATA_DIR).expanduser().absolute()
        data["data_dir"] = data_dir
        if not data.get("database_url"):
            data["database_url"] = f"sqlite:///{data_dir / 'normcore.db'}"
        if not data.get("broker_url"):
            data["broker_url"] = f"sqla+sqlite:///{data_dir / 'broker.db'}"
        if not data.get("artifact_dir"):
            data["artifact_dir"] = data_dir / "artifacts"
        if not data.get("data_root"):
            data["data_root"] = data_dir / "datasets"
        return data

    @model_validator(mode="after")
    def _check(self) -> Settings:
        self.artifact_dir = self.artifact_dir.expanduser().absolute()
        self.data_root = self.data_root.expanduser().absolute()
        if not self.auth and not _is_loopback(self.host):
            raise ValueError(
                f"auth=False is only allowed when host is a loopback address, not {self.host!r}: "
                "set NORMCORE_AUTH=true or NORMCORE_HOST=127.0.0.1"
            )
        if not self.queues:
            raise ValueError("worker_queues must name at least one queue, e.g. 'cpu,gpu'")
        limit = self.train_memory_limit_bytes
        if limit is not None and 0 < limit < MIN_TRAIN_MEMORY:
            raise ValueError(
                f"train_memory_limit_bytes must be 0 (no limit) or at least {MIN_TRAIN_MEMORY} "
                f"(256 MiB), not {limit}"
            )
        return self

    def train_memory_limit(self) -> int | None:
        """The training process's address-space limit in bytes, or None for no limit.

        ``train_memory_limit_bytes`` when set (0: None); else ``train_memory_fraction`` of the
        machine's memory (the cgroup limit if lower) over ``worker_concurrency``, at least
        256 MiB; None where the OS does not say how much memory there is.
        """
        if self.train_memory_limit_bytes is not None:
            return self.train_memory_limit_bytes or None
        total = machine_memory_bytes()
        if total is None:
            return None
        share = int(total * self.train_memory_fraction / self.worker_concurrency)
        return max(MIN_TRAIN_MEMORY, share)

    def job_memory_budget(self) -> int | None:
        """Bytes a job's memory estimate may reach at submit, or None for no check."""
        if self.job_memory_budget_bytes is not None:
            return self.job_memory_budget_bytes or None
        limit = self.train_memory_limit()
        return None if limit is None else max(MIN_TRAIN_MEMORY, limit - RUNTIME_ALLOWANCE)

    @property
    def queues(self) -> list[str]:
        """``worker_queues`` as a list of names."""
        return [q.strip() for q in self.worker_queues.split(",") if q.strip()]

    def job_dir(self, job_id: str) -> Path:
        """The artifact folder of one job: ``<artifact_dir>/jobs/<job_id>``."""
        return self.artifact_dir / "jobs" / job_id


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
