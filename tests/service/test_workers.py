"""Workers register in the store, GET /workers shows them to admins, and the API sizes CUDA jobs.

Store methods run on SQLite and PostgreSQL; the HTTP checks run against a real uvicorn process
(workers registered straight through the Store, as ``python -m worker`` does), and the last test
starts a real worker and watches its row.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.db import gpu_queues_seen, utcnow, workers
from service.store import Store, waiting_reason
from tests.harness import Proc, ServiceEnv, make_env, running_stack, start_api, wait_for

pytestmark = pytest.mark.xdist_group("service-workers")

CPU_SPEC: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "convblock", "norm": "bn", "width": 4, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64, "image_size": 8},
    "resources": {"device": "cpu"},
    "epochs": 1,
}


def cuda_spec(gpus: int = 1) -> dict[str, Any]:
    """CPU_SPEC for CUDA with ``gpus`` GPUs (routed to the gpu queue)."""
    spec = copy.deepcopy(CPU_SPEC)
    spec["resources"] = {"device": "cuda", "gpus": gpus}
    return spec


def age(store: Store, name: str, seconds: float) -> None:
    """Move a worker's last heartbeat ``seconds`` into the past."""
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(workers)
            .where(workers.c.name == name)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )


# ----------------------------------------------------------------------------- store


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty store on a SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    s = Store(url)
    s.upgrade()
    yield s
    s.dispose()


def test_register_heartbeat_list_and_remove(store: Store) -> None:
    rec = store.register_worker(
        "w1@box",
        host="box",
        pid=42,
        gpus=2,
        gpu_names=["A100", "A100"],
        memory_bytes=64 << 30,
        queues=["cpu", "gpu"],
        version="0.1.0",
    )
    assert (rec.name, rec.host, rec.pid, rec.gpus) == ("w1@box", "box", 42, 2)
    assert rec.gpu_names == ["A100", "A100"] and rec.queues == ["cpu", "gpu"]
    assert rec.memory_bytes == 64 << 30 and rec.version == "0.1.0"
    assert rec.started_at == rec.heartbeat_at and rec.is_live(5)

    age(store, "w1@box", 100)
    assert not store.list_workers()[0].is_live(30)
    assert store.worker_heartbeat("w1@box") is True
    beat = store.list_workers()[0]
    assert beat.is_live(5) and beat.heartbeat_at > beat.started_at
    assert store.worker_heartbeat("nobody@box") is False

    # registering again replaces the row (a restarted worker with the same node name)
    again = store.register_worker("w1@box", host="box", pid=43, queues=["cpu"])
    assert (again.pid, again.gpus, again.queues) == (43, 0, ["cpu"])
    assert [w.name for w in store.list_workers()] == ["w1@box"]

    assert store.remove_worker("w1@box") is True
    assert store.remove_worker("w1@box") is False
    assert store.list_workers() == []


def test_max_live_gpus_counts_live_workers_of_the_queue(store: Store) -> None:
    assert store.max_live_gpus("gpu") is None
    store.register_worker("cpu@a", host="a", pid=1, gpus=0, queues=["cpu"])
    store.register_worker("gpu@b", host="b", pid=2, gpus=2, queues=["gpu"])
    store.register_worker("gpu@c", host="c", pid=3, gpus=4, queues=["cpu", "gpu"])
    assert store.max_live_gpus("gpu") == 4
    assert store.max_live_gpus("cpu") == 4
    assert store.max_live_gpus() == 4
    age(store, "gpu@c", 120)  # its heartbeat stopped: no longer counts
    assert store.max_live_gpus("gpu", live_within_seconds=30) == 2
    assert store.max_live_gpus("cpu", live_within_seconds=30) == 0
    assert [w.name for w in store.list_workers(live_within_seconds=30)] == ["cpu@a", "gpu@b"]
    assert len(store.list_workers()) == 3


def test_a_gpu_worker_clears_the_waiting_reason_of_queued_gpu_jobs(store: Store) -> None:
    user = store.create_user("alice")
    gpu_job, _ = store.create_job(owner_id=user.id, spec={}, name="g", queue="gpu")
    cpu_job, _ = store.create_job(owner_id=user.id, spec={}, name="c", queue="cpu")
    store.set_status_reason(gpu_job.id, waiting_reason("gpu"))
    store.set_status_reason(cpu_job.id, "enqueue failed: broker down")

    # a worker on the gpu queue without a GPU cannot run it: the reason stays
    store.register_worker("nogpu@a", host="a", pid=1, gpus=0, queues=["cpu", "gpu"])
    assert store.get_job(gpu_job.id).status_reason == waiting_reason("gpu")  # type: ignore[union-attr]
    store.register_worker("gpu@b", host="b", pid=2, gpus=1, queues=["gpu"])
    assert store.get_job(gpu_job.id).status_reason is None  # type: ignore[union-attr]
    # other reasons are left alone
    assert store.get_job(cpu_job.id).status_reason == "enqueue failed: broker down"  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- HTTP


class Api:
    """A running API process (no worker) with its store and tokens."""

    def __init__(self, env: ServiceEnv, proc: Proc, url: str) -> None:
        self.env, self.proc, self.url = env, proc, url
        self.store = env.store()
        self.alice = self.store.create_token("alice", "alice-tok")
        self.root = self.store.create_token("root", "root-tok", admin=True)

    def client(self, token: str) -> httpx.Client:
        """An httpx client with a bearer token."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    env = make_env(tmp_path_factory.mktemp("workers") / "nc", NORMCORE_WORKER_LIVE_SECONDS="30")
    proc, url = start_api(env)
    running = Api(env, proc, url)
    try:
        yield running
    finally:
        proc.stop()
        running.store.dispose()


@pytest.fixture
def clean(api: Api) -> Api:
    """The API with no registered worker, and none ever (gpu_queues_seen emptied)."""
    for w in api.store.list_workers():
        api.store.remove_worker(w.name)
    with api.store.engine.begin() as conn:
        conn.execute(sa.delete(gpu_queues_seen))
    return api


def test_get_workers_is_for_admins(clean: Api) -> None:
    clean.store.register_worker(
        "gpu@b",
        host="b",
        pid=7,
        gpus=2,
        gpu_names=["H100"] * 2,
        memory_bytes=1 << 30,
        queues=["gpu"],
        version="0.1.0",
    )
    clean.store.register_worker("old@c", host="c", pid=8, queues=["cpu"])
    age(clean.store, "old@c", 120)
    with clean.client(clean.alice) as client:
        r = client.get("/workers")
        assert r.status_code == 403, r.text
        assert "admin" in r.json()["detail"]
    assert httpx.get(f"{clean.url}/workers").status_code == 401
    with clean.client(clean.root) as client:
        r = client.get("/workers")
    assert r.status_code == 200, r.text
    items = {w["name"]: w for w in r.json()["items"]}
    assert set(items) == {"gpu@b", "old@c"}
    gpu = items["gpu@b"]
    assert gpu["live"] is True and items["old@c"]["live"] is False
    assert (gpu["host"], gpu["pid"], gpu["gpus"], gpu["queues"]) == ("b", 7, 2, ["gpu"])
    assert gpu["gpu_names"] == ["H100", "H100"] and gpu["memory_bytes"] == 1 << 30
    assert gpu["heartbeat_at"] and gpu["started_at"] and gpu["version"] == "0.1.0"


def test_cuda_job_waits_with_a_reason_while_no_gpu_worker_lives(clean: Api) -> None:
    clean.store.register_worker("cpu@a", host="a", pid=1, queues=["cpu"])
    with clean.client(clean.alice) as client:
        # no GPU worker ever registered: it would wait forever, so it is refused (issue 17)
        r = client.post("/jobs", json=cuda_spec())
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["resources", "device"]
        assert "no worker with 1 GPU has ever registered" in error["msg"]
        # one did and is gone (stopped cleanly): the job waits for it
        clean.store.register_worker("gpu@gone", host="g", pid=9, gpus=1, queues=["gpu"])
        clean.store.remove_worker("gpu@gone")
        r = client.post("/jobs", json=cuda_spec())
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["queue"] == "gpu" and body["status"] == "queued"
        assert body["status_reason"] == "waiting for a gpu worker: none is live"
        job_id = body["id"]
        assert client.get(f"/jobs/{job_id}").json()["status_reason"] == waiting_reason("gpu")

        # a gpu worker whose heartbeat stopped does not count either
        dead_queues = ["gpu", "gpu2", "gpu3", "gpu4"]
        clean.store.register_worker("gpu@dead", host="d", pid=2, gpus=8, queues=dead_queues)
        age(clean.store, "gpu@dead", 300)
        r = client.post("/jobs", json=cuda_spec(gpus=4))
        assert r.status_code == 201, r.text
        four = r.json()
        assert four["queue"] == "gpu4" and four["status_reason"] == waiting_reason("gpu4")
        assert four["status_reason"] == "waiting for a gpu4 worker: none is live"

        # once one registers, the reason goes away for the jobs it can run, and only for them
        clean.store.register_worker("gpu@b", host="b", pid=3, gpus=2, queues=["gpu", "gpu2"])
        assert client.get(f"/jobs/{job_id}").json()["status_reason"] is None
        assert client.get(f"/jobs/{four['id']}").json()["status_reason"] == waiting_reason("gpu4")
        # a worker that lists gpu4 without the GPUs for it does not count
        clean.store.register_worker("gpu@c", host="c", pid=4, gpus=1, queues=["gpu", "gpu4"])
        assert client.get(f"/jobs/{four['id']}").json()["status_reason"] == waiting_reason("gpu4")
        queues = ["gpu", "gpu2", "gpu3", "gpu4"]
        clean.store.register_worker("gpu@e", host="e", pid=5, gpus=4, queues=queues)
        assert client.get(f"/jobs/{four['id']}").json()["status_reason"] is None


def test_cuda_job_asking_for_more_gpus_than_any_live_worker_is_refused(clean: Api) -> None:
    clean.store.register_worker("gpu@b", host="b", pid=3, gpus=2, queues=["gpu"])
    clean.store.register_worker("cpu@a", host="a", pid=1, gpus=0, queues=["cpu"])
    with clean.client(clean.alice) as client:
        r = client.post("/jobs", json=cuda_spec(gpus=4))
        assert r.status_code == 422, r.text
        [error] = r.json()["detail"]
        assert error["loc"] == ["resources", "gpus"]
        assert error["msg"].startswith(
            "resources.gpus=4 but the largest live gpu worker has 2 GPUs"
        )
        ok = client.post("/jobs", json=cuda_spec(gpus=2))
        assert ok.status_code == 201 and ok.json()["status_reason"] is None
        # on CPU resources.gpus counts gloo processes: no GPU check, cpu queue
        cpu = copy.deepcopy(CPU_SPEC)
        cpu["resources"] = {"device": "cpu", "gpus": 4, "sync_bn": True}
        r = client.post("/jobs", json=cpu)
        assert r.status_code == 201, r.text
        assert r.json()["queue"] == "cpu" and r.json()["status_reason"] is None


# ----------------------------------------------------------------------------- a real worker


def test_a_real_worker_registers_heartbeats_and_leaves(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc", NORMCORE_WORKER_HEARTBEAT_SECONDS="0.5")
    with running_stack(env) as stack:
        worker = stack.workers[0]
        admin = stack.token_for("root", admin=True)
        with stack.client(admin) as client:

            def listed() -> list[dict[str, Any]]:
                return client.get("/workers").json()["items"]

            [row] = wait_for(listed, timeout=60, what="the worker's registration")
            assert row["name"] == "worker0@test" and row["pid"] == worker.pid
            assert row["queues"] == ["cpu"] and row["live"] is True
            assert row["gpus"] == 0 and row["memory_bytes"] > 0
            first = datetime.fromisoformat(row["heartbeat_at"])
            wait_for(
                lambda: datetime.fromisoformat(listed()[0]["heartbeat_at"]) > first,
                timeout=15,
                what="a heartbeat",
            )
            with stack.client() as alice:
                assert alice.get("/workers").status_code == 403
            worker.stop()  # SIGTERM: Celery's warm shutdown removes the row
            wait_for(lambda: listed() == [], timeout=30, what="the row to go")
