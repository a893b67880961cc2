"""`python -m worker` as a real process: consume from the SQLite broker and from Redis, stop
cleanly on SIGTERM, and recover a job whose worker died (reaper, re-queue, resume)."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.queue import enqueue, queue_depth
from service.reaper import reap_once, republish_unpublished
from service.store import Store
from tests.harness import Proc, ServiceEnv, make_env, start_worker, wait_for

SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "convblock", "norm": "gn:4", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 256, "image_size": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 2,
}
# A job that outlives the ~0.5 s between "first checkpoint recorded" and a test's SIGTERM or
# kill even on an idle machine (~0.1 s an epoch of 51 steps), with few epoch-end flushes.
LONG: dict[str, Any] = {
    **SPEC,
    "data": {**SPEC["data"], "num_samples": 2048},
    "epochs": 20,
    "checkpoint": {"every_epochs": 2},
}
# Short leases so a lost worker's job comes back within seconds.
FAST = {
    "NORMCORE_LEASE_SECONDS": "3",
    "NORMCORE_HEARTBEAT_SECONDS": "0.5",
    "NORMCORE_REAPER_INTERVAL_SECONDS": "0.5",
}


@pytest.fixture
def workers() -> Iterator[list[Proc]]:
    """Worker processes a test started; all stopped at the end."""
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


def sqlite(tmp_path: Path) -> ServiceEnv:
    return make_env(tmp_path / "nc", mode="sqlite", **FAST)


def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> ServiceEnv:
    pg = request.getfixturevalue("postgres_url")
    rd = request.getfixturevalue("redis_url")
    return make_env(tmp_path / "nc", mode="cluster", postgres_url=pg, redis_url=rd, **FAST)


@pytest.fixture(params=["sqlite", "cluster"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> ServiceEnv:
    """SQLite store + SQLite broker, then PostgreSQL + Redis."""
    if request.param == "sqlite":
        return sqlite(tmp_path)
    return cluster(tmp_path, request)


def submit(env: ServiceEnv, store: Store, spec: dict[str, Any]) -> str:
    """Create the job row and publish it, as the API does."""
    user = store.create_user("alice")
    job, _ = store.create_job(owner_id=user.id, spec=spec, name=spec["name"], queue="cpu")
    enqueue(job.id, "cpu", env.settings())
    return job.id


def status(store: Store, job_id: str) -> str:
    return store.get_job(job_id).status


def logs(store: Store, job_id: str) -> str:
    lines, _ = store.get_logs(job_id, limit=10_000)
    return "\n".join(line.message for line in lines)


def child_pid(store: Store, job_id: str, attempt: int) -> int:
    pattern = rf"attempt {attempt} started on worker \S+ \(pid (\d+)\)"

    def find() -> int | None:
        m = re.search(pattern, logs(store, job_id))
        return int(m.group(1)) if m else None

    return wait_for(find, timeout=60, what=f"attempt {attempt} to start")


def assert_one_row_per_step(rows: list[Any], epochs: int) -> None:
    """Every train step once, in order of step, and one val row per epoch, across attempts."""
    val = sorted((r for r in rows if r.split == "val"), key=lambda r: r.step)
    assert [r.epoch for r in val] == list(range(1, epochs + 1))
    steps = sorted(r.step for r in rows if r.split == "train")
    assert steps == list(range(1, val[-1].step + 1))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_reaper_requeues_expired_leases_and_republishes_unsent_jobs(tmp_path: Path) -> None:
    env = sqlite(tmp_path)
    settings, store = env.settings(), env.store()
    user = store.create_user("alice")
    lost, _ = store.create_job(owner_id=user.id, spec=SPEC, name="lost", queue="cpu")
    unsent, _ = store.create_job(owner_id=user.id, spec=SPEC, name="unsent", queue="cpu")
    assert store.claim_job(lost.id, worker_id="gone:1", lease_seconds=0.05) == 1
    store.mark_enqueue_failed(unsent.id, "broker down")
    time.sleep(0.1)

    assert reap_once(store, settings) == [lost.id]
    assert reap_once(store, settings) == []  # a second reaper finds nothing left to do
    job = store.get_job(lost.id)
    assert job.status == "queued" and job.attempt == 1 and job.lease_owner is None
    assert queue_depth(settings) == 1

    # The unsent job is due at once; the re-queued one was just published: not yet due.
    assert republish_unpublished(store, settings) == [unsent.id]
    assert store.get_job(unsent.id).status_reason is None
    assert republish_unpublished(store, settings) == []
    assert queue_depth(settings) == 2
    store.dispose()


def test_worker_runs_a_job_from_the_broker(env: ServiceEnv, workers: list[Proc]) -> None:
    store = env.store()
    workers.append(start_worker(env, name="w1"))
    job_id = submit(env, store, SPEC)
    wait_for(lambda: status(store, job_id) not in ("queued", "running"), timeout=90, what="end")
    job = store.get_job(job_id)
    assert job.status == "succeeded", (job.error, workers[0].log()[-3000:])
    assert job.lease_owner and job.lease_owner.split(":")[-1].isdigit()
    assert [c.name for c in store.list_checkpoints(job_id)] == ["epoch-0001", "epoch-0002"]
    rows, _ = store.get_metrics(job_id, limit=10_000)
    assert len({(r.split, r.step) for r in rows}) == len(rows) == 12 + 2
    # A second message for the same job (a duplicate delivery) runs nothing.
    enqueue(job_id, "cpu", env.settings())
    wait_for(lambda: "not claimable" in workers[0].log(), timeout=30, what="the duplicate")
    assert logs(store, job_id).count("started on worker") == 1
    # Training ran in the spawned child: torch (so CUDA) was never even loaded by the worker.
    maps = Path(f"/proc/{workers[0].pid}/maps")
    if maps.exists():
        assert "libtorch" not in maps.read_text()
    store.dispose()


def test_duplicate_deliveries_while_the_lease_is_held_train_once(
    env: ServiceEnv, workers: list[Proc]
) -> None:
    """Three more messages for a running job reach an idle second worker: each is dropped."""
    store = env.store()
    workers.extend([start_worker(env, name="w1"), start_worker(env, name="w2")])
    job_id = submit(env, store, LONG)
    child_pid(store, job_id, 1)
    holder = store.get_job(job_id).lease_owner
    for _ in range(3):
        enqueue(job_id, "cpu", env.settings())

    def dropped() -> int:
        return sum(w.log().count(f"job {job_id}: not claimable") for w in workers)

    wait_for(lambda: dropped() == 3, timeout=60, what="the three duplicates to be dropped")
    assert store.get_job(job_id).status == "running"  # still the first attempt, untouched
    wait_for(lambda: status(store, job_id) == "succeeded", timeout=120, what="the job")
    job = store.get_job(job_id)
    assert job.attempt == 1 and job.lease_owner == holder
    assert [(h["attempt"], h["outcome"]) for h in job.attempts] == [(1, "succeeded")]
    # The side effects of training, counted: one child started, one training run, one set of rows.
    text = logs(store, job_id)
    assert text.count("started on worker") == 1
    assert text.count("training started (attempt") == 1
    rows, _ = store.get_metrics(job_id, limit=10_000)
    assert len({(r.split, r.step) for r in rows}) == len(rows)
    assert_one_row_per_step(rows, epochs=20)
    store.dispose()


def test_a_lost_message_is_published_again(env: ServiceEnv, workers: list[Proc]) -> None:
    """The early-ack gap: a worker acked the message and died before its claim."""
    from kombu import Connection

    env.env["NORMCORE_REPUBLISH_AFTER_SECONDS"] = "1"
    store = env.store()
    job_id = submit(env, store, SPEC)
    with Connection(env.settings().broker_url) as conn:
        conn.default_channel.queue_purge("cpu")  # the message is gone, the job still queued
    assert queue_depth(env.settings()) == 0
    workers.append(start_worker(env, name="w1"))
    wait_for(lambda: status(store, job_id) == "succeeded", timeout=90, what="the job")
    job = store.get_job(job_id)
    assert job.attempt == 1 and job.enqueues >= 2
    assert logs(store, job_id).count("started on worker") == 1
    store.dispose()


def test_sigterm_stops_the_worker_and_another_resumes_the_job(
    tmp_path: Path, workers: list[Proc]
) -> None:
    env = sqlite(tmp_path)
    store = env.store()
    first = start_worker(env, name="w1")
    workers.append(first)
    job_id = submit(env, store, LONG)
    pid = child_pid(store, job_id, 1)
    wait_for(lambda: store.list_checkpoints(job_id), 60, interval=0.05, what="a checkpoint")

    first.popen.send_signal(signal.SIGTERM)  # warm shutdown of the worker alone
    assert first.popen.wait(30) == 0, first.log()[-3000:]
    assert gone(pid), "the training child outlived its worker"
    assert status(store, job_id) == "running"  # left for the reaper, not failed
    assert "worker shut down mid-training" in logs(store, job_id)
    saved = max(c.epoch for c in store.list_checkpoints(job_id))

    workers.append(start_worker(env, name="w2"))
    wait_for(lambda: status(store, job_id) == "succeeded", timeout=120, what="attempt 2")
    job = store.get_job(job_id)
    assert job.attempt == 2
    text = logs(store, job_id)
    assert f"resuming attempt 2 from checkpoint epoch-{saved:04d} at epoch {saved}" in text
    rows, _ = store.get_metrics(job_id, limit=10_000)
    assert len({(r.split, r.step) for r in rows}) == len(rows)
    assert_one_row_per_step(rows, epochs=20)
    store.dispose()


def test_kill_9_of_the_worker_is_recovered_by_another_workers_reaper(
    tmp_path: Path, request: pytest.FixtureRequest, workers: list[Proc]
) -> None:
    env = cluster(tmp_path, request)
    store = env.store()
    first = start_worker(env, name="w1")
    workers.extend([first, start_worker(env, name="w2")])
    job_id = submit(env, store, LONG)
    job = wait_for(lambda: store.get_job(job_id).lease_owner and store.get_job(job_id), 60)
    victim = next(w for w in workers if job.lease_owner.endswith(f":{w.pid}"))
    pid = child_pid(store, job_id, 1)
    wait_for(lambda: store.list_checkpoints(job_id), 60, interval=0.05, what="a checkpoint")

    victim.kill_group(signal.SIGKILL)  # the worker's group; the child has a group of its own
    victim.popen.wait(10)
    # The orphaned child notices its supervisor is gone and stops instead of training on.
    wait_for(lambda: gone(pid), timeout=10, what="the orphaned child to exit")
    wait_for(lambda: status(store, job_id) == "succeeded", timeout=120, what="recovery")
    job = store.get_job(job_id)
    assert job.attempt == 2 and job.error is None
    assert "resuming attempt 2 from checkpoint" in logs(store, job_id)
    rows, _ = store.get_metrics(job_id, limit=10_000)
    assert len({(r.split, r.step) for r in rows}) == len(rows)
    assert_one_row_per_step(rows, epochs=20)
    store.dispose()
