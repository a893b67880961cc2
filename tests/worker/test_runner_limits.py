"""The worker's limits: time left across attempts, the default memory limit sized from the
machine, and a data-loading OOM told apart from a model one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from normcore.data.loader import DataMemoryError
from service.settings import RUNTIME_ALLOWANCE, Settings, machine_memory_bytes
from worker.runner import _time_limit, describe_error


def _attempt(n: int, seconds: float | None) -> dict[str, object]:
    start = datetime(2026, 1, 1, 12, tzinfo=UTC) + timedelta(hours=n)
    end = None if seconds is None else (start + timedelta(seconds=seconds)).isoformat()
    return {"attempt": n, "started_at": start.isoformat(), "ended_at": end, "outcome": "lost"}


def test_time_left_counts_earlier_attempts_and_the_cap(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_runtime_minutes=10)
    job = SimpleNamespace(
        spec={"max_runtime": 2}, attempts=[_attempt(1, 30), _attempt(2, 30), _attempt(3, None)]
    )
    assert _time_limit(job, settings) == (60.0, 2.0)
    job.spec = {"max_runtime": 60}  # over the cap: the cap wins
    assert _time_limit(job, settings) == (540.0, 10.0)
    job.spec = {}  # none: the cap
    assert _time_limit(job, settings) == (540.0, 10.0)
    job.attempts = [_attempt(1, 3600)]  # used up: one last second to checkpoint and stop
    assert _time_limit(job, settings) == (1.0, 10.0)


def test_default_memory_limit_is_a_share_of_the_machine(tmp_path: Path) -> None:
    total = machine_memory_bytes()
    assert total is not None and total > 0
    one = Settings(data_dir=tmp_path)
    assert one.train_memory_limit() == int(total * 0.8)
    four = Settings(data_dir=tmp_path, worker_concurrency=4, train_memory_fraction=0.5)
    assert four.train_memory_limit() == int(total * 0.5 / 4)
    assert four.job_memory_budget() == int(total * 0.5 / 4) - RUNTIME_ALLOWANCE
    assert Settings(data_dir=tmp_path, train_memory_limit_bytes=0).train_memory_limit() is None
    assert Settings(data_dir=tmp_path, job_memory_budget_bytes=0).job_memory_budget() is None
    fixed = Settings(data_dir=tmp_path, train_memory_limit_bytes=2**30)
    assert fixed.train_memory_limit() == 2**30
    with pytest.raises(ValueError, match="0 \\(no limit\\) or at least"):
        Settings(data_dir=tmp_path, train_memory_limit_bytes=100)


def test_data_loading_oom_is_not_blamed_on_the_batch_size(tmp_path: Path) -> None:
    exc = DataMemoryError("out of memory while loading data set 'synthetic' into memory: lower ...")
    text = describe_error(exc, data_root=tmp_path, step=0)
    assert text.startswith("out of memory while loading data set 'synthetic'")
    assert "lower data.batch_size or model width" not in text
    model = describe_error(MemoryError(), data_root=tmp_path, step=3)
    assert "out of memory at step 4" in model and "data.batch_size" in model
