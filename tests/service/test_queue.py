"""Queue: Celery configuration, publishing by name and reading it back with kombu on real brokers."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from service import queue
from service.settings import Settings

SPEC = {"model": {"arch": "lenet"}, "data": {"dataset": "digits"}}


@pytest.fixture(params=["redis", "sqlite"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on a real broker: a Redis db of this test's own, or the embedded SQLite broker."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    return Settings(data_dir=tmp_path, broker_url=url, visibility_timeout_seconds=120)


def _consume(settings: Settings, queue_name: str, n: int, timeout: float = 15.0) -> list[Any]:
    """Read n messages from a queue with plain kombu (no worker), acking each."""
    config = queue.celery_config(settings)
    declared = {q.name: q for q in config["task_queues"]}
    got: list[Any] = []

    def on_message(body: Any, message: Any) -> None:
        got.append((message.headers, body, message.delivery_info))
        message.ack()

    with (
        Connection(
            settings.broker_url, transport_options=config["broker_transport_options"]
        ) as conn,
        conn.Consumer(declared[queue_name], callbacks=[on_message], accept=["json"]),
    ):
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
    return got


def test_celery_config_for_redis() -> None:
    s = Settings(broker_url="redis://127.0.0.1:6379/3", visibility_timeout_seconds=7200)
    c = queue.celery_config(s)
    assert c["broker_url"] == "redis://127.0.0.1:6379/3"
    assert c["broker_transport_options"] == {
        "visibility_timeout": 7200,
        "health_check_interval": 10,
        "socket_keepalive": True,
    }
    assert c["result_backend_transport_options"] == {"visibility_timeout": 7200}
    assert c["visibility_timeout"] == 7200
    assert c["broker_connection_retry_on_startup"] is True
    assert c["task_default_queue"] == "cpu"
    assert [q.name for q in c["task_queues"]] == list(queue.QUEUES)
    assert c["worker_prefetch_multiplier"] == 1
    assert c["task_acks_late"] is False and c["task_reject_on_worker_lost"] is False
    assert c["worker_cancel_long_running_tasks_on_connection_loss"] is True
    assert c["task_ignore_result"] is True


def test_celery_config_for_sqlite_broker_passes_only_engine_options(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    c = queue.celery_config(s)
    assert c["broker_url"].startswith("sqla+sqlite:///")
    # kombu's SQLAlchemy transport hands these to create_engine: nothing else may be in there.
    assert c["broker_transport_options"] == {"connect_args": {"timeout": 30.0}}
    assert not (tmp_path / "broker.db").exists()
    assert "visibility_timeout" not in c and "result_backend_transport_options" not in c
    app = queue.make_celery(s)
    assert app.conf.task_acks_late is False
    assert app.conf.worker_prefetch_multiplier == 1
    assert set(app.amqp.queues) == set(queue.QUEUES)
    assert {"cpu", "gpu", "gpu2", "gpu16"} <= set(queue.QUEUES)
    # make_celery leaves the embedded broker's file in WAL mode (one fsync per publish).
    with sqlite3.connect(tmp_path / "broker.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_waiting_worker_polls_the_sqlite_broker_every_broker_poll_seconds(
    tmp_path: Path,
) -> None:
    """kombu sleeps 1 s between empty polls by default: a job waited up to 1 s for its claim."""
    s = Settings(data_dir=tmp_path, broker_poll_seconds=0.3)
    app = queue.make_celery(s)
    with app.connection_for_read() as conn:
        assert conn.transport.polling_interval == 0.3  # what the consumer sleeps between polls
    assert Settings(data_dir=tmp_path).broker_poll_seconds == 0.25


def test_queue_for() -> None:
    from normcore.spec import JobSpec

    assert queue.queue_for(SPEC) == "cpu"
    assert queue.queue_for({**SPEC, "resources": {"device": "cpu"}}) == "cpu"
    assert queue.queue_for({**SPEC, "resources": {"device": "auto", "gpus": 4}}) == "cpu"
    assert queue.queue_for(JobSpec.model_validate({**SPEC, "resources": {"device": "cuda"}})) == (
        "gpu"
    )
    # a job for K > 1 GPUs goes where only workers with K or more GPUs listen
    assert queue.queue_for({**SPEC, "resources": {"device": "cuda", "gpus": 2}}) == "gpu2"
    assert queue.queue_for({**SPEC, "resources": {"device": "cuda", "gpus": 16}}) == "gpu16"
    assert queue.gpu_queues(3) == ["gpu", "gpu2", "gpu3"]
    assert queue.gpu_queues(0) == []
    for bad in (0, 17):
        with pytest.raises(ValueError, match="between 1 and 16"):
            queue.gpu_queue(bad)


def test_workers_expand_gpu_to_the_queues_their_gpu_count_serves() -> None:
    from worker.__main__ import expand_gpu_queues

    assert expand_gpu_queues(["gpu", "cpu"], 4) == ["gpu", "gpu2", "gpu3", "gpu4", "cpu"]
    assert expand_gpu_queues(["gpu", "cpu"], 1) == ["gpu", "cpu"]
    # no CUDA: no gpu queue at all; a queue for more GPUs than the machine has is dropped
    assert expand_gpu_queues(["gpu", "cpu"], 0) == ["cpu"]
    assert expand_gpu_queues(["gpu4", "gpu2", "cpu"], 2) == ["gpu2", "cpu"]
    assert expand_gpu_queues(["gpu", "gpu2"], 2) == ["gpu", "gpu2"]


def test_enqueue_and_consume(settings: Settings) -> None:
    assert queue.broker_ping(settings) is True
    assert queue.queue_depth(settings) == 0
    ids = ["a" * 32, "b" * 32, "c" * 32]
    task_ids = [queue.enqueue(ids[0], "cpu", settings), queue.enqueue(ids[1], "gpu", settings)]
    task_ids.append(queue.enqueue(ids[2], "cpu", settings))
    assert len(set(task_ids)) == 3
    depths = queue.queue_depths(settings)
    assert depths is not None and set(depths) == set(queue.QUEUES)
    assert {q: n for q, n in depths.items() if n} == {"cpu": 2, "gpu": 1}
    assert queue.queue_depth(settings) == 3

    cpu = _consume(settings, "cpu", 2)
    assert [headers["task"] for headers, _, _ in cpu] == ["normcore.run_job"] * 2
    assert [body[0] for _, body, _ in cpu] == [[ids[0]], [ids[2]]]  # protocol 2: (args, kw, ..)
    assert [headers["id"] for headers, _, _ in cpu] == [task_ids[0], task_ids[2]]
    gpu = _consume(settings, "gpu", 1)
    assert [body[0] for _, body, _ in gpu] == [[ids[1]]]
    assert queue.queue_depth(settings) == 0

    with pytest.raises(ValueError, match="queue"):
        queue.enqueue(ids[0], "tpu", settings)


def test_publishing_is_fast_and_reuses_one_app(settings: Settings) -> None:
    assert queue._publisher(settings) is queue._publisher(settings.model_copy())
    queue.enqueue("0" * 32, "cpu", settings)  # warm: connection made once
    times = []
    for i in range(40):
        t0 = time.perf_counter()
        queue.enqueue(f"{i:032x}", "cpu", settings)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(f"\n{settings.broker_url.split(':')[0]}: publish median {median * 1e3:.2f} ms")
    # Measured ~0.4 ms (Redis) and ~3 ms (SQLite broker); a new connection per call costs ~20 ms.
    assert median < (0.02 if queue.is_redis(settings.broker_url) else 0.1)
    assert queue.queue_depth(settings) == 41


def test_broker_down_is_reported_not_raised(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connection refused
        down = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{port}/0")
        t0 = time.perf_counter()
        assert queue.broker_ping(down) is False
        assert queue.queue_depth(down) is None
        assert time.perf_counter() - t0 < 10
        with pytest.raises(Exception):  # noqa: B017 - kombu's or redis's connection error
            queue.enqueue("f" * 32, "cpu", down)
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("x")
    bad_sqlite = Settings(data_dir=tmp_path, broker_url=f"sqla+sqlite:///{not_a_dir}/b.db")
    assert queue.broker_ping(bad_sqlite) is False
    assert queue.queue_depth(bad_sqlite) is None
