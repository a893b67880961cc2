"""The runner end to end: real store (SQLite), real spawned training child, real normcore.train."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings
from service.store import Store
from worker.runner import ShutdownFlags, describe_error, run_job

# A few milliseconds a step on CPU: 256 samples of 8x8, 204 for training: 6 steps an epoch.
TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2,
}
# EDSR at lr 10 without clipping: the loss is NaN within a handful of steps.
DIVERGING: dict[str, Any] = {
    "model": {"arch": "edsr", "width": 4, "depth": 1, "scale": 2},
    "data": {"dataset": "sr-synthetic", "batch_size": 16, "num_samples": 64, "image_size": 8},
    "optim": {"name": "sgd", "lr": 10.0, "momentum": 0.9, "weight_decay": 0.0},
    "resources": {"device": "cpu"},
    "epochs": 3,
}


def spec(epochs: int = 2, **changes: Any) -> dict[str, Any]:
    """TINY with another epoch count and top-level changes."""
    return {**TINY, "epochs": epochs, **changes}


def new_job(store: Store, job_spec: dict[str, Any]) -> str:
    user = store.create_user("alice")
    job, created = store.create_job(
        owner_id=user.id, spec=job_spec, name=job_spec.get("name", "job"), queue="cpu"
    )
    assert created
    return job.id


def log_text(store: Store, job_id: str) -> str:
    lines, _ = store.get_logs(job_id, limit=10_000)
    return "\n".join(line.message for line in lines)


def wait_for(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class Background:
    """run_job in a thread, as the Celery task would call it, with its return value kept."""

    def __init__(self, job_id: str, settings: Settings, store: Store, **kwargs: Any) -> None:
        self.result: str | None = None
        self.flags = kwargs.setdefault("flags", ShutdownFlags.new())
        self.thread = threading.Thread(
            target=self._run, args=(job_id, settings, store), kwargs=kwargs, daemon=True
        )
        self.thread.start()

    def _run(self, *args: Any, **kwargs: Any) -> None:
        self.result = run_job(*args, **kwargs)

    def join(self, timeout: float = 60.0) -> str | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_job did not return"
        return self.result


def child_pid(store: Store, job_id: str, attempt: int = 1) -> int:
    """The training child's pid, from the line it logs when it starts."""

    def find() -> int | None:
        m = re.search(
            rf"attempt {attempt} started on worker \S+ \(pid (\d+)\)", log_text(store, job_id)
        )
        return int(m.group(1)) if m else None

    return wait_for(find, what="the child's start line")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_job_succeeds_with_unique_metrics_and_verified_checkpoints(
    settings: Settings, store: Store
) -> None:
    job_id = new_job(store, spec(epochs=2))
    assert run_job(job_id, settings, store) == "succeeded"

    job = store.get_job(job_id)
    assert job.status == "succeeded" and job.attempt == 1 and job.error is None

    rows, _ = store.get_metrics(job_id, limit=10_000)
    keys = [(r.split, r.step) for r in rows]
    assert len(keys) == len(set(keys)), "a (split, step) appears twice"
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    train_steps = [r.step for r in rows if r.split == "train"]
    assert train_steps == list(range(1, 13))  # 6 steps x 2 epochs, in order
    val = [r for r in rows if r.split == "val"]
    assert [(r.epoch, r.step) for r in val] == [(1, 6), (2, 12)]
    assert 0.0 <= val[-1].values["val_accuracy"] <= 1.0

    ckpts = store.list_checkpoints(job_id)
    assert [c.name for c in ckpts] == ["epoch-0001", "epoch-0002"]
    for c in ckpts:
        model_file = settings.artifact_dir / c.path / "model.safetensors"
        data = model_file.read_bytes()
        assert hashlib.sha256(data).hexdigest() == c.sha256
        assert len(data) == c.bytes
        assert Path(c.path).parts[:2] == ("jobs", job_id)

    text = log_text(store, job_id)
    assert text.count("attempt 1 started on worker") == 1
    # engine lines arrive once each, although the engine sends them to logging and on_log
    assert text.count("epoch 2/2 step 12") == 1
    assert "checkpoint epoch-0002 saved" in text
    # one line per checkpoint, by name: the server's folders stay out of the job's logs
    assert text.count("checkpoint epoch-0002") == 1
    assert str(settings.artifact_dir) not in text

    # A duplicate delivery after the end: nothing runs, nothing changes.
    assert run_job(job_id, settings, store) == "duplicate"
    assert store.get_job(job_id).attempt == 1
    assert log_text(store, job_id).count("started on worker") == 1


def test_cancel_stops_within_two_seconds_and_keeps_checkpoints(
    settings: Settings, store: Store
) -> None:
    job_id = new_job(store, spec(epochs=500, checkpoint={"keep_last": 2}))
    bg = Background(job_id, settings, store)
    wait_for(
        lambda: any(c.epoch >= 3 for c in store.list_checkpoints(job_id)),
        what="a third checkpoint",
    )

    # A duplicate delivery while the job runs: dropped at once, no second training process.
    assert run_job(job_id, settings, store) == "duplicate"

    t0 = time.monotonic()
    store.request_cancel(job_id)
    wait_for(lambda: store.get_job(job_id).status != "running", timeout=10, what="the cancel")
    elapsed = time.monotonic() - t0
    assert store.get_job(job_id).status == "cancelled"
    assert elapsed < 2.0, f"cancel took {elapsed:.2f}s"
    assert bg.join() == "cancelled"

    ckpts = store.list_checkpoints(job_id)
    assert ckpts, "the checkpoints written before the cancel are kept"
    # keep_last=2: the records follow the folders the engine pruned
    on_disk = sorted(p.name for p in (settings.job_dir(job_id) / "checkpoints").glob("epoch-*"))
    assert sorted(c.name for c in ckpts) == on_disk and len(on_disk) == 2
    for c in ckpts:
        assert (settings.artifact_dir / c.path / "model.safetensors").is_file()
    text = log_text(store, job_id)
    assert text.count("started on worker") == 1
    assert "cancelled at step" in text


def test_cancel_of_a_data_parallel_job_stops_every_rank(settings: Settings, store: Store) -> None:
    # Two gloo ranks spawned by the engine inside the training child: SIGTERM goes to the child
    # alone (a rank would die of it), the engine relays the stop, and no rank is left behind.
    ddp = {**TINY, "model": {**TINY["model"], "norm": "sync_bn"}}
    job_id = new_job(store, {**ddp, "epochs": 500, "resources": {"device": "cpu", "gpus": 2}})
    bg = Background(job_id, settings, store)
    pid = child_pid(store, job_id)
    wait_for(lambda: store.list_checkpoints(job_id), what="a first checkpoint")
    t0 = time.monotonic()
    store.request_cancel(job_id)
    wait_for(lambda: store.get_job(job_id).status != "running", timeout=10, what="the cancel")
    assert store.get_job(job_id).status == "cancelled"
    assert time.monotonic() - t0 < 2.0
    assert bg.join() == "cancelled"
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the child's process group survives


def test_diverging_job_fails_with_the_engines_message(settings: Settings, store: Store) -> None:
    job_id = new_job(store, DIVERGING)
    assert run_job(job_id, settings, store) == "failed"
    job = store.get_job(job_id)
    assert job.status == "failed"
    assert job.error.startswith("training diverged: loss is nan at step")
    assert "Lower optim.lr" in job.error
    assert "Traceback" not in job.error
    assert "Traceback (most recent call last)" in log_text(store, job_id)


def test_missing_dataset_file_fails_naming_the_relative_path(
    settings: Settings, store: Store
) -> None:
    missing = {**TINY, "data": {"dataset": "npz", "path": "sets/missing.npz"}}
    job_id = new_job(store, missing)
    assert run_job(job_id, settings, store) == "failed"
    error = store.get_job(job_id).error
    assert "sets/missing.npz" in error
    assert str(settings.data_root) not in error


def test_out_of_memory_names_the_step_and_the_fix(settings: Settings, store: Store) -> None:
    job_id = new_job(store, spec())
    result = run_job(job_id, settings, store, train_target="tests.worker.fake_train:out_of_memory")
    assert result == "failed"
    assert store.get_job(job_id).error == (
        "out of memory at step 4 (tried to allocate 2.00 GiB): lower data.batch_size or model width"
    )
    # the three rows written before the failure are flushed, not lost
    rows, _ = store.get_metrics(job_id)
    assert [r.step for r in rows] == [1, 2, 3]


def test_child_killed_by_a_signal_fails_the_job(settings: Settings, store: Store) -> None:
    job_id = new_job(store, spec(epochs=500))
    bg = Background(job_id, settings, store)
    pid = child_pid(store, job_id)
    os.kill(pid, signal.SIGKILL)
    assert bg.join() == "failed"
    assert store.get_job(job_id).error == "training process killed by signal 9 (SIGKILL)"


def test_cancel_of_a_child_that_ignores_sigterm_kills_it_after_the_grace(
    tmp_path: Path, settings: Settings, store: Store
) -> None:
    quick = settings.model_copy(update={"cancel_grace_seconds": 1.0})
    job_id = new_job(store, spec())
    bg = Background(job_id, quick, store, train_target="tests.worker.fake_train:ignore_sigterm")
    pid = child_pid(store, job_id)
    store.request_cancel(job_id)
    assert bg.join(timeout=20) == "cancelled"
    assert store.get_job(job_id).status == "cancelled"
    assert not pid_alive(pid)


def test_stale_attempt_kills_the_child_and_writes_nothing(settings: Settings, store: Store) -> None:
    job_id = new_job(store, spec(epochs=500))
    bg = Background(job_id, settings, store)
    pid = child_pid(store, job_id)
    wait_for(lambda: store.get_metrics(job_id)[0], what="metric rows")
    # The lease "expires" (as if this worker had been cut off) and the reaper re-queues the job.
    later = datetime.now(UTC) + timedelta(hours=1)
    assert store.requeue_expired(now=later, max_attempts=3) == [job_id]
    assert bg.join() == "stale"
    assert not pid_alive(pid)
    job = store.get_job(job_id)
    assert job.status == "queued" and job.attempt == 1 and job.error is None
    _, last_seq = store.get_metrics(job_id, limit=10_000)
    time.sleep(1.0)
    assert store.get_metrics(job_id, after=last_seq)[0] == [], "a zombie wrote after losing"


def test_worker_shutdown_leaves_the_job_and_the_next_attempt_resumes(
    settings: Settings, store: Store
) -> None:
    short = settings.model_copy(update={"lease_seconds": 2.0})
    # ~0.1 s an epoch of 51 steps on an idle machine: the job outlives the test's reaction
    long = {**TINY, "data": {**TINY["data"], "num_samples": 2048}}
    job_id = new_job(store, {**long, "epochs": 20, "checkpoint": {"every_epochs": 2}})
    bg = Background(job_id, short, store)
    wait_for(lambda: store.list_checkpoints(job_id), what="a first checkpoint")
    bg.flags.warm.set()  # what Celery's SIGTERM handler does in the worker
    assert bg.join() == "shutdown"
    job = store.get_job(job_id)
    assert job.status == "running" and job.attempt == 1
    last = max(c.epoch for c in store.list_checkpoints(job_id))

    # What the reaper does once the lease has run out.
    wait_for(lambda: store.requeue_expired(max_attempts=3), timeout=10, what="the lease to expire")
    assert run_job(job_id, short, store) == "succeeded"
    job = store.get_job(job_id)
    assert job.status == "succeeded" and job.attempt == 2
    text = log_text(store, job_id)
    assert f"resuming attempt 2 from checkpoint epoch-{last:04d} at epoch {last}" in text

    rows, _ = store.get_metrics(job_id, limit=10_000)
    keys = [(r.split, r.step) for r in rows]
    assert len(keys) == len(set(keys))
    val = sorted((r for r in rows if r.split == "val"), key=lambda r: r.step)
    assert [r.epoch for r in val] == list(range(1, 21))
    assert sorted(r.step for r in rows if r.split == "train") == list(range(1, val[-1].step + 1))


def test_describe_error_messages(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    missing = FileNotFoundError(2, "No such file or directory", str(root / "a" / "b.npz"))
    assert describe_error(missing, data_root=root, step=0) == (
        "file not found: a/b.npz (paths are relative to the data root)"
    )
    assert describe_error(MemoryError(), data_root=root, step=41) == (
        "out of memory at step 42: lower data.batch_size or model width"
    )
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 12884901888 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert describe_error(cpu, data_root=root, step=0) == (
        "out of memory at step 1 (tried to allocate 12.00 GiB): lower data.batch_size or model width"
    )
    assert describe_error(ValueError("data.batch_size 64 is larger"), data_root=root, step=0) == (
        "data.batch_size 64 is larger"
    )
    assert describe_error(KeyError("x"), data_root=root, step=0) == "KeyError: 'x'"
