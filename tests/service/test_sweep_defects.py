"""Sweep and name defects through the real API (in-process, TestClient, on a real SQLite store;
no worker: the worker's side is written through the Store, as a worker would):

- a sweep's run cannot be deleted alone (409 naming the sweep), and a run whose job went away
  some other way counts as ``deleted``: the sweep still reaches a final status, its report is
  complete;
- a sweep's ``metric`` must be one its jobs record (422 at submit listing them);
- an over-long checkpoint name is a 404 before any query, and no error repeats an unbounded
  user string.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import disk
from service.api.app import ECHO_MAX, create_app
from service.settings import Settings
from service.store import Store
from service.sweeps import ops
from tests.harness import make_env

BASE: dict[str, Any] = {
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "digits", "batch_size": 8},
    "optim": {"lr": 0.1},
    "epochs": 2,
}


class Api:
    """The app in process: its client (alice's token), store and settings."""

    def __init__(self, client: TestClient, store: Store, settings: Settings) -> None:
        self.client, self.store, self.settings = client, store, settings


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    env = make_env(tmp_path / "nc", NORMCORE_MAX_ACTIVE_JOBS_PER_USER="1000")
    settings = env.settings()
    app = create_app(settings)
    store: Store = app.state.store
    token = store.create_token("alice", "alice-token")
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    try:
        yield Api(client, store, settings)
    finally:
        client.close()
        store.dispose()


def _sweep(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "d",
        "base": BASE,
        "grid": {"model.norm": ["bn", "gn:2"]},
        "seeds": [0, 1],
        "concurrency": 4,  # every run released at submit
    }
    body.update(over)
    return body


def _succeed(store: Store, job_id: str, value: float) -> None:
    attempt = store.claim_job(job_id, worker_id="w", lease_seconds=60)
    assert attempt is not None
    rows = [{"step": 10, "epoch": 1, "split": "val", "values": {"val_accuracy": value}}]
    store.add_metrics(job_id, attempt=attempt, rows=rows)
    store.finish_job(job_id, attempt=attempt, status="succeeded")


def _job_ids(detail: dict[str, Any]) -> list[str]:
    """The sweep's jobs in run order (run = seed index * cells + cell)."""
    jobs = sorted((j["run"], j["job_id"]) for cell in detail["cells"] for j in cell["jobs"])
    return [job_id for _, job_id in jobs]


def _finished_sweep(api: Api) -> tuple[str, list[str]]:
    """A sweep of 4 runs, all succeeded, the releaser's round done (nothing left to release)."""
    r = api.client.post("/sweeps", json=_sweep())
    assert r.status_code == 201, r.text
    sid, ids = r.json()["id"], _job_ids(r.json())
    assert len(ids) == 4
    for i, job_id in enumerate(ids):
        _succeed(api.store, job_id, 0.5 + 0.1 * i)
    assert ops.release_all(api.store, api.settings) == 0  # what the releaser thread runs
    detail = api.client.get(f"/sweeps/{sid}").json()
    assert detail["status"] == "succeeded" and detail["counts"]["deleted"] == 0
    return sid, ids


def test_a_sweeps_run_is_not_deleted_alone(api: Api) -> None:
    sid, ids = _finished_sweep(api)
    r = api.client.delete(f"/jobs/{ids[1]}")
    assert r.status_code == 409, r.text
    msg = r.json()["detail"]
    assert sid in msg and f"DELETE /sweeps/{sid}" in msg and "run 1" in msg
    assert api.client.get(f"/jobs/{ids[1]}").status_code == 200  # nothing deleted
    detail = api.client.get(f"/sweeps/{sid}").json()
    assert detail["status"] == "succeeded" and detail["counts"]["succeeded"] == 4
    # the sweep's delete still removes every run
    assert api.client.delete(f"/sweeps/{sid}").status_code == 204
    assert all(api.client.get(f"/jobs/{j}").status_code == 404 for j in ids)
    # a job of no sweep is deleted as before
    job = api.client.post("/jobs", json=BASE)
    assert job.status_code == 201, job.text
    assert api.client.delete(f"/jobs/{job.json()['id']}").status_code == 204


def test_a_run_whose_job_went_away_counts_as_deleted_and_the_sweep_ends(api: Api) -> None:
    sid, ids = _finished_sweep(api)
    # as a server before the 409 (or a row removed by hand) would have left it
    assert disk.delete(api.store, api.settings, ids[2])
    detail = api.client.get(f"/sweeps/{sid}").json()
    assert detail["status"] == "succeeded", detail
    assert detail["counts"]["succeeded"] == 3 and detail["counts"]["deleted"] == 1
    assert detail["counts"]["queued"] == detail["counts"]["running"] == 0
    report = api.client.get(f"/sweeps/{sid}/report").json()
    assert report["complete"] and report["deleted"] == 1 and report["finished"] == 3
    assert report["status_counts"]["deleted"] == 1
    assert [c["n"] for c in report["cells"]] == [1, 2]  # run 2 was cell 0, seed 1
    assert report["cells"][0]["final_mean"] == pytest.approx(0.5)
    assert report["cells"][1]["final_mean"] == pytest.approx(0.7)
    # the releaser does not bring the run back once the sweep released every run
    assert ops.release_all(api.store, api.settings) == 0
    assert len(api.client.get(f"/sweeps/{sid}").json()["cells"][0]["jobs"]) == 1

    # a failed run and a deleted one: the sweep fails, it does not stay running
    r = api.client.post("/sweeps", json=_sweep(name="e"))
    sid2, ids2 = r.json()["id"], _job_ids(r.json())
    for job_id in ids2[:3]:
        _succeed(api.store, job_id, 0.7)
    attempt = api.store.claim_job(ids2[3], worker_id="w", lease_seconds=60)
    assert attempt is not None
    ops.release_all(api.store, api.settings)
    assert disk.delete(api.store, api.settings, ids2[0])
    assert api.client.get(f"/sweeps/{sid2}").json()["status"] == "running"
    api.store.finish_job(ids2[3], attempt=attempt, status="failed")
    detail = api.client.get(f"/sweeps/{sid2}").json()
    assert detail["status"] == "failed" and detail["counts"]["deleted"] == 1


def test_a_sweep_run_deleted_while_releasing_is_submitted_again(api: Api) -> None:
    r = api.client.post("/sweeps", json=_sweep(concurrency=2))
    sid, ids = r.json()["id"], _job_ids(r.json())
    assert len(ids) == 2
    assert disk.delete(api.store, api.settings, ids[0])  # not through the API (a 409 there)
    detail = api.client.get(f"/sweeps/{sid}").json()
    assert detail["counts"]["deleted"] == 0 and detail["status"] == "queued"
    again = ops.release(api.store, api.settings, sid)
    assert len(again) == 1 and again[0] not in ids
    for _ in range(4):  # finish whatever is queued; the releaser gives out the rest
        for job_id in _job_ids(api.client.get(f"/sweeps/{sid}").json()):
            if api.store.get_job(job_id).status == "queued":  # type: ignore[union-attr]
                _succeed(api.store, job_id, 0.8)
        ops.release_all(api.store, api.settings)
    detail = api.client.get(f"/sweeps/{sid}").json()
    assert detail["status"] == "succeeded" and detail["counts"]["succeeded"] == 4


def test_a_metric_the_jobs_do_not_record_is_a_422_listing_those_they_do(api: Api) -> None:
    r = api.client.post("/sweeps", json=_sweep(metric="val_psnr"))
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["metric"] and detail["type"] == "invalid_metric"
    assert "'val_psnr'" in detail["msg"]
    for name in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
        assert name in detail["msg"]
    assert api.client.get("/sweeps").json()["items"] == []
    assert api.client.get("/jobs").json()["items"] == []
    # every name a classification job records is accepted
    for metric in ("val_loss", "train_accuracy"):
        ok = api.client.post("/sweeps", json=_sweep(name=metric, metric=metric, direction="min"))
        assert ok.status_code == 201, ok.text
    # a super-resolution job records PSNR, not accuracy
    sr = {
        "model": {"arch": "edsr", "norm": "none"},
        "data": {"dataset": "sr-synthetic", "batch_size": 4},
        "epochs": 1,
    }
    body = _sweep(name="sr", base=sr, grid={"data.batch_size": [2, 4]}, seeds=[0])
    r = api.client.post("/sweeps", json={**body, "metric": "val_accuracy"})
    assert r.status_code == 422, r.text
    assert "val_psnr" in r.json()["detail"][0]["msg"]
    assert api.client.post("/sweeps", json={**body, "metric": "val_psnr"}).status_code == 201


def test_an_over_long_name_is_a_404_and_no_error_repeats_a_long_value(api: Api) -> None:
    job = api.client.post("/jobs", json=BASE).json()["id"]
    name = "e" * 300
    for path in (
        f"/jobs/{job}/checkpoints/{name}",
        f"/jobs/{job}/checkpoints/{name}/stats",
        f"/jobs/{job}/checkpoints/{name}/diff?against={job}/epoch-0001",
        f"/jobs/{'a' * 300}",
        f"/sweeps/{'a' * 300}",
    ):
        r = api.client.get(path)
        assert r.status_code == 404, (path, r.text)
        assert "e" * 100 not in r.text and "a" * 100 not in r.text, path
    # a 422 that shows the value it refuses shows its start and its length only
    long = "n" * 5000
    r = api.client.post("/jobs", json={**BASE, "name": long})
    assert r.status_code == 422, r.text
    msg = r.json()["detail"][0]["msg"]
    assert "n" * ECHO_MAX in msg and "n" * (ECHO_MAX + 1) not in msg and "5000" in msg, msg
    r = api.client.get("/jobs", params={"limit": "9" * 5000})
    assert r.status_code == 422 and len(r.text) < 1000, r.text[:300]
