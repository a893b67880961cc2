"""Deleting a job: its rows on a SQLite file and PostgreSQL; ``DELETE /jobs/{id}`` against a real
uvicorn process (files, owners, admins); and a running job deleted under a real worker.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.db import checkpoints, job_tags, jobs, logs, metrics
from service.store import NotFound, Store
from tests.harness import Proc, ServiceEnv, make_env, running_stack, start_api, wait_for
from tests.service.store_backends import BACKENDS, open_store, pg_database

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-delete")

SPEC: dict[str, Any] = {
    "name": "delete-me",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "epochs": 2,
}


# ------------------------------------------------------------------------------ the store


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(request, tmp_path, "pg_url")


def _job_with_everything(store: Store, owner: str, *, ckpt_bytes: int = 1000) -> tuple[str, int]:
    """A running job with metric rows, log lines, a checkpoint and tags: (id, attempt)."""
    user = store.create_user(owner)
    job, _ = store.create_job(
        owner_id=user.id, spec={"epochs": 1}, name="j", queue="cpu", tags=["a", "b"]
    )
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    assert attempt == 1
    store.add_metrics(
        job.id,
        attempt=attempt,
        rows=[{"step": s, "epoch": 1, "split": "train", "values": {"loss": 1.0}} for s in (1, 2)],
    )
    store.add_logs(job.id, attempt=attempt, lines=[("info", "x" * 100)])
    store.add_checkpoint(
        job.id,
        attempt=attempt,
        name="epoch-0001",
        epoch=1,
        step=2,
        bytes=ckpt_bytes,
        sha256="0" * 64,
        files={},
        metrics={},
        path=f"jobs/{job.id}/checkpoints/epoch-0001",
    )
    return job.id, attempt


def _count(store: Store, table: sa.Table, job_id: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(table).where(table.c[_key(table)] == job_id)
        ).scalar_one()


def _key(table: sa.Table) -> str:
    return "id" if table is jobs else "job_id"


def test_delete_job_removes_its_rows_and_fences_its_worker(store: Store) -> None:
    doomed, attempt = _job_with_everything(store, "alice")
    kept, _ = _job_with_everything(store, "alice")
    later = datetime.now(UTC) + timedelta(hours=1)
    assert store.heartbeat(doomed, attempt=attempt, lease_seconds=600) is False  # it holds it
    tables = (jobs, metrics, logs, checkpoints, job_tags)
    assert all(_count(store, t, doomed) > 0 for t in tables)

    gone = store.delete_job(doomed)
    assert gone is not None and gone.id == doomed and gone.status == "running"
    assert [_count(store, t, doomed) for t in tables] == [0] * len(tables)
    assert [_count(store, t, kept) > 0 for t in tables] == [True] * len(tables)
    assert store.get_job(doomed) is None
    assert store.delete_job(doomed) is None

    # The worker still running it is refused every write: it stops instead of writing on.
    with pytest.raises(NotFound):
        store.heartbeat(doomed, attempt=attempt, lease_seconds=600)
    with pytest.raises(NotFound):
        store.add_metrics(doomed, attempt=attempt, rows=[{"step": 3, "split": "t", "values": {}}])
    with pytest.raises(NotFound):
        store.finish_job(doomed, attempt=attempt, status="succeeded")
    assert store.claim_job(doomed, worker_id="w2", lease_seconds=10) is None
    assert store.requeue_expired(now=later, max_attempts=3) == [kept]


def test_service_delete_frees_files_and_rows(store: Store, tmp_path: Path) -> None:
    from service import disk
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=str(store.url))
    job_id, _ = _job_with_everything(store, "alice")
    other, _ = _job_with_everything(store, "alice")
    for jid in (job_id, other):
        ckpt = settings.job_dir(jid) / "checkpoints" / "epoch-0001"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"w" * 1000)
    used = store.disk_usage(store.get_user("alice").id)

    assert disk.delete(store, settings, job_id) is True
    assert not settings.job_dir(job_id).exists() and settings.job_dir(other).is_dir()
    assert store.get_job(job_id) is None and store.list_checkpoints(job_id) == []
    assert store.disk_usage(store.get_user("alice").id) == used - 1000 - 100
    assert disk.delete(store, settings, job_id) is False


def test_disk_usage_counts_checkpoints_and_logs_per_owner(store: Store) -> None:
    first, _ = _job_with_everything(store, "alice", ckpt_bytes=5000)
    _job_with_everything(store, "alice", ckpt_bytes=7000)
    _job_with_everything(store, "bob", ckpt_bytes=123)
    alice, bob = store.get_user("alice"), store.get_user("bob")
    assert store.disk_usage(alice.id) == 5000 + 7000 + 2 * 100
    assert store.disk_usage(bob.id) == 123 + 100
    store.delete_job(first)
    assert store.disk_usage(alice.id) == 7000 + 100
    assert store.disk_usage(store.create_user("carol").id) == 0


# ------------------------------------------------------------------------- the HTTP route


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceEnv, str, Store]]:
    """A running API (no worker) on SQLite, and its store."""
    env = make_env(
        tmp_path_factory.mktemp("delete") / "nc", NORMCORE_REPUBLISH_AFTER_SECONDS="3600"
    )
    store = env.store()
    proc: Proc
    proc, url = start_api(env)
    try:
        yield env, url, store
    finally:
        proc.stop()
        store.dispose()


def _client(url: str, store: Store, user: str, *, admin: bool = False) -> httpx.Client:
    token = store.create_token(user, f"{user}-{time.monotonic_ns()}", admin=admin)
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _files(env: ServiceEnv, job_id: str) -> Path:
    """Checkpoint and log files under the job's folder, as a worker leaves them."""
    folder = env.artifact_dir / "jobs" / job_id
    (folder / "checkpoints" / "epoch-0001").mkdir(parents=True)
    (folder / "checkpoints" / "epoch-0001" / "model.safetensors").write_bytes(b"w" * 4096)
    (folder / "train.log").write_text("line\n")
    return folder


def test_delete_frees_files_and_rows_and_only_for_owner_or_admin(
    api: tuple[ServiceEnv, str, Store],
) -> None:
    env, url, store = api
    with (
        _client(url, store, "dora") as dora,
        _client(url, store, "eve") as eve,
        _client(url, store, "root", admin=True) as admin,
    ):
        job_id = dora.post("/jobs", json=SPEC).json()["id"]
        attempt = store.claim_job(job_id, worker_id="w", lease_seconds=600)
        store.add_metrics(
            job_id, attempt=attempt, rows=[{"step": 1, "split": "train", "values": {"l": 1.0}}]
        )
        store.finish_job(job_id, attempt=attempt, status="succeeded")
        folder = _files(env, job_id)

        # Another user's DELETE is a 404, as for a job that does not exist; nothing is touched.
        r = eve.delete(f"/jobs/{job_id}")
        assert r.status_code == 404, r.text
        assert folder.is_dir() and dora.get(f"/jobs/{job_id}").status_code == 200

        r = dora.delete(f"/jobs/{job_id}")
        assert r.status_code == 204, r.text
        assert r.content == b""
        assert not folder.exists()
        assert store.get_job(job_id) is None and store.get_metrics(job_id)[0] == []
        for path in ("", "/metrics", "/logs", "/checkpoints"):
            assert dora.get(f"/jobs/{job_id}{path}").status_code == 404
        assert dora.delete(f"/jobs/{job_id}").status_code == 404

        # An admin deletes anyone's job; a queued one is never claimed afterwards.
        queued = dora.post("/jobs", json=SPEC).json()["id"]
        assert admin.delete(f"/jobs/{queued}").status_code == 204
        assert store.claim_job(queued, worker_id="w", lease_seconds=10) is None
        assert admin.delete("/jobs/" + "0" * 32).status_code == 404


def test_client_delete_and_the_cli_command(
    api: tuple[ServiceEnv, str, Store], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from normcore.client import ApiError, Client
    from service.cli import app as cli_app

    env, url, store = api
    token = store.create_token("ivy", "ivy-tok")
    with Client(url, token=token) as client:
        first, second = (client.submit(SPEC)["id"] for _ in range(2))
        client.delete(first)
        with pytest.raises(ApiError) as err:
            client.get(first)
        assert err.value.status == 404
        cli_env = {
            **env.env,
            "NORMCORE_URL": url,
            "NORMCORE_TOKEN": token,
            "XDG_CONFIG_HOME": str(tmp_path / "config-home"),
        }
        done = CliRunner().invoke(cli_app, ["delete", second], env=cli_env)
        assert done.exit_code == 0, done.output
        assert "deleted" in done.output
        assert store.get_job(second) is None
        again = CliRunner().invoke(cli_app, ["delete", second], env=cli_env)
        assert again.exit_code == 1 and "not found" in again.output


# ------------------------------------------------------------- a running job, a real worker

LONG_SPEC: dict[str, Any] = {
    "name": "long",
    "model": {"arch": "convblock", "norm": "bn", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 32, "num_samples": 1024, "image_size": 8},
    "resources": {"device": "cpu"},
    "epochs": 300,
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}


@pytest.mark.slow
def test_deleting_a_running_job_stops_its_training_process(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc", NORMCORE_TRAIN_THREADS="1")
    with running_stack(env, workers=1) as stack, stack.client() as c:
        job_id = c.post("/jobs", json=LONG_SPEC).json()["id"]
        folder = env.artifact_dir / "jobs" / job_id
        wait_for(
            lambda: c.get(f"/jobs/{job_id}/checkpoints").json(),
            timeout=300,
            what="a checkpoint",
            explain=lambda: stack.explain(job_id),
        )
        logs = c.get(f"/jobs/{job_id}/logs", params={"limit": 10_000}).json()["items"]
        # The newest attempt's training process (under load an earlier attempt may be lost).
        child = [
            int(m.group(1))
            for line in logs
            if (m := re.search(r"attempt \d+ started on worker \S+ \(pid (\d+)\)", line["message"]))
        ][-1]
        assert (folder / "checkpoints").is_dir()
        r = c.delete(f"/jobs/{job_id}")
        assert r.status_code == 204, r.text
        # The worker's next heartbeat finds the job gone: it kills the training process, writes
        # nothing, and removes whatever the process wrote after the API's removal.
        wait_for(
            lambda: "deleted while running; its folder is removed" in stack.workers[0].log(),
            timeout=30,
            what="the worker to stop the deleted job",
        )
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)
        assert not folder.exists()
        store = env.store()
        assert store.get_job(job_id) is None and store.get_metrics(job_id)[0] == []
        store.dispose()
        assert stack.workers[0].alive()
    shutil.rmtree(tmp_path / "nc", ignore_errors=True)
