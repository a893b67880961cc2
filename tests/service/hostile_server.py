"""A real API (uvicorn subprocess) with a user, a token and one finished job carrying metric rows,
log lines and a checkpoint file, for the hostile-input and fuzz tests: routes with ids are then
exercised on a job that exists, not only on 404s."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import Proc, ServiceEnv, start_api

# A spec every server accepts quickly: LeNet with BN on a small synthetic set.
SMALL_SPEC: dict[str, Any] = {
    "name": "hostile",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "epochs": 1,
}


@dataclass
class HostileServer:
    """The running API, its bearer token, the job's id and its checkpoint's name."""

    proc: Proc
    url: str
    token: str
    job_id: str
    checkpoint: str
    env: ServiceEnv

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def rss_bytes(self) -> int:
        """Resident memory of the API process (Linux /proc), for "memory unchanged" checks."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")


def finished_job(store: Any, artifact_dir: Path, owner_id: int) -> tuple[str, str]:
    """A succeeded job of ``owner_id`` with rows, logs and one checkpoint file: (id, name)."""
    import torch
    from safetensors.torch import save_file

    job, _ = store.create_job(owner_id=owner_id, spec=SMALL_SPEC, name="real", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    store.add_metrics(
        job.id,
        attempt=attempt,
        rows=[
            {"step": 1, "epoch": 1, "split": "train", "values": {"loss": 1.0, "lr": 0.1}},
            {"step": 1, "epoch": 1, "split": "val", "values": {"val_loss": 0.9, "val_acc": 0.5}},
        ],
    )
    store.add_logs(job.id, attempt=attempt, lines=[("info", "epoch 1/1"), ("warning", "w")])
    name = "epoch-0001"
    folder = artifact_dir / "jobs" / job.id / "checkpoints" / name
    folder.mkdir(parents=True)
    save_file(
        {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)},
        str(folder / "model.safetensors"),
    )
    data = (folder / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store.add_checkpoint(
        job.id,
        attempt=attempt,
        name=name,
        epoch=1,
        step=1,
        bytes=len(data),
        sha256=sha,
        files={"model.safetensors": sha},
        metrics={"val_acc": 0.5},
        path=str(folder.relative_to(artifact_dir)),
    )
    store.finish_job(job.id, attempt=attempt, status="succeeded")
    return job.id, name


@contextlib.contextmanager
def hostile_server(env: ServiceEnv) -> Iterator[HostileServer]:
    """Start the API on ``env`` with a "fuzzer" user and a finished job; stop it afterwards."""
    store = env.store()
    token = store.create_token("fuzzer", "fuzzer-token")
    job_id, name = finished_job(store, env.artifact_dir, store.get_user("fuzzer").id)
    store.dispose()
    os.makedirs(env.data_root / "mnist", exist_ok=True)
    proc, url = start_api(env)
    try:
        yield HostileServer(proc, url, token, job_id, name, env)
    finally:
        proc.stop()


@contextlib.contextmanager
def hostile_server_on(
    backend: str, data_dir: Path, request: Any, **extra: str
) -> Iterator[HostileServer]:
    """``hostile_server`` on ``backend``: "sqlite" (embedded files) or "cluster" (a PostgreSQL
    database of its own, created and dropped here, and a Redis database for this xdist worker)."""
    from tests.harness import make_env

    if backend == "sqlite":
        with hostile_server(make_env(data_dir, **extra)) as running:
            yield running
        return
    import psycopg

    from tests.conftest import REDIS_PORT, _xdist_index

    admin = request.getfixturevalue("postgres_server")
    name = f"normcore_hostile_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        env = make_env(
            data_dir,
            mode="cluster",
            postgres_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
            redis_url=f"redis://127.0.0.1:{REDIS_PORT}/{1 + _xdist_index() % 15}",
            **extra,
        )
        with hostile_server(env) as running:
            yield running
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
