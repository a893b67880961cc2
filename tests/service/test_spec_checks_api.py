"""Spec checks validate and submit share, through the real API (in-process, real SQLite store):

- split BN's constraint on the per-device batch (``split_bn:K`` needs ``data.batch_size``
  divisible by K, and more than one sample per split where a layer sees one value per channel)
  is a 422 at ``POST /jobs/validate`` and at ``POST /jobs``, at ["data", "batch_size"];
- ``resources.device "cuda"`` with no gpu worker ever registered is the same 422 at validate as
  at submit, and validates once such a worker has registered;
- the small-batch advice suggests a GroupNorm that fits the model's layers, and validating
  that suggestion gives no ``gn_one_channel_per_group``;
- recalibrating a checkpoint of a model without running statistics is a 422 at request time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store import Store
from tests.harness import make_env

pytestmark = pytest.mark.xdist_group("service-spec-checks")


def _spec(norm: Any = "bn", batch: int = 32, arch: str = "lenet", **extra: Any) -> dict[str, Any]:
    return {
        "model": {"arch": arch, "norm": norm},
        "data": {"dataset": "digits", "batch_size": batch},
        **extra,
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Store]]:
    """An in-process API on SQLite (no lifespan: no worker, no reapers), alice signed in."""
    env = make_env(tmp_path_factory.mktemp("spec-checks") / "nc")
    app = create_app(env.settings())
    store: Store = app.state.store
    token = store.create_token("alice", "alice-token")
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    try:
        yield client, store
    finally:
        client.close()
        store.dispose()


@pytest.fixture
def client(api: tuple[TestClient, Store]) -> TestClient:
    return api[0]


def _refusal(client: TestClient, path: str, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=spec)
    assert r.status_code == 422, (path, r.status_code, r.text)
    (detail,) = r.json()["detail"]
    return detail


# ------------------------------------------------------------------ split BN and the batch


@pytest.mark.parametrize(("norm", "batch"), [("split_bn:3", 32), ("split_bn:4", 2)])
def test_split_bn_with_an_indivisible_batch_is_refused_at_validate_and_submit(
    client: TestClient, norm: str, batch: int
) -> None:
    spec = _spec(norm, batch)
    for path in ("/jobs/validate", "/jobs"):
        detail = _refusal(client, path, spec)
        assert detail["loc"] == ["data", "batch_size"], detail
        splits = norm.split(":")[1]
        assert f"data.batch_size {batch} is not divisible by the {splits} splits" in detail["msg"]
        assert repr(norm) in detail["msg"]
    # the fix the message offers is accepted, with the splits it says
    fixed = _spec(norm, 33 if batch == 32 else 8)  # lenet: 2 samples per split
    r = client.post("/jobs/validate", json=fixed)
    assert r.status_code == 200, r.text
    k = int(norm.split(":")[1])
    assert {row["norm_batch"] for row in r.json()["layers"]} == {fixed["data"]["batch_size"] // k}


def test_split_bn_keyword_form_and_the_default_two_splits(client: TestClient) -> None:
    detail = _refusal(client, "/jobs/validate", _spec("split_bn(num_splits=5)", 32))
    assert "5 splits" in detail["msg"] and detail["loc"] == ["data", "batch_size"]
    detail = _refusal(client, "/jobs", _spec("split_bn", 33))
    assert "2 splits" in detail["msg"]
    assert client.post("/jobs/validate", json=_spec("split_bn", 34)).status_code == 200


def test_one_sample_per_split_on_a_layer_with_one_value_per_channel(client: TestClient) -> None:
    # lenet's fc norms see (N, C): one sample per split is a single value per channel
    detail = _refusal(client, "/jobs", _spec("split_bn:2", 2))
    assert detail["loc"] == ["data", "batch_size"]
    assert "one sample" in detail["msg"] and "norm1" in detail["msg"], detail
    assert "at least 4" in detail["msg"]
    assert _refusal(client, "/jobs/validate", _spec("split_bn:2", 2)) == detail
    # resnet20's norms all see maps (no norm after the pool): a split of one sample trains
    r = client.post("/jobs/validate", json=_spec("split_bn:2", 2, arch="resnet20"))
    assert r.status_code == 200, r.text


def test_ghost_bn_takes_a_batch_its_virtual_batch_does_not_divide(client: TestClient) -> None:
    # GhostBatchNorm2d normalizes a last, smaller virtual batch on its own: no constraint
    r = client.post("/jobs/validate", json=_spec("ghost_bn:12", 32, arch="resnet20"))
    assert r.status_code == 200, r.text
    assert {row["norm_batch"] for row in r.json()["layers"]} == {12}


# ------------------------------------------------------------------ gpu workers


def test_cuda_without_a_gpu_worker_is_the_same_422_at_validate_and_submit(
    api: tuple[TestClient, Store],
) -> None:
    client, store = api
    spec = _spec(resources={"device": "cuda"})
    at_validate = _refusal(client, "/jobs/validate", spec)
    at_submit = _refusal(client, "/jobs", spec)
    assert at_validate == at_submit
    assert at_validate["loc"] == ["resources", "device"]
    assert "no worker with 1 GPU has ever registered" in at_validate["msg"]
    # two GPUs: the queue gpu2, and no worker with 2 GPUs either
    two = _refusal(client, "/jobs/validate", _spec(resources={"device": "cuda", "gpus": 2}))
    assert "no worker with 2 GPUs" in two["msg"]

    store.register_worker("gpu-box", host="h", pid=1, gpus=1, queues=["gpu"])
    r = client.post("/jobs/validate", json=spec)
    assert r.status_code == 200, r.text
    # more GPUs than the largest live worker has: refused at both, as before
    detail = _refusal(client, "/jobs/validate", _spec(resources={"device": "cuda", "gpus": 2}))
    assert detail == _refusal(client, "/jobs", _spec(resources={"device": "cuda", "gpus": 2}))
    assert detail["loc"] == ["resources", "gpus"]


# ------------------------------------------------------------------ the GroupNorm advice


@pytest.mark.parametrize(("arch", "groups"), [("lenet", 4), ("resnet20", 8)])
def test_small_batch_advice_suggests_a_gn_the_model_fits(
    client: TestClient, arch: str, groups: int
) -> None:
    r = client.post("/jobs/validate", json=_spec("bn", 4, arch=arch))
    assert r.status_code == 200, r.text
    small = next(w for w in r.json()["warnings"] if w["code"] == "bn_small_batch")
    assert f'"gn:{groups}"' in small["message"], small["message"]
    assert "gn:8" not in small["message"] or groups == 8
    # the suggestion, validated, has no group of one channel
    r = client.post("/jobs/validate", json=_spec(f"gn:{groups}", 4, arch=arch))
    assert r.status_code == 200, r.text
    codes = {w["code"] for w in r.json()["warnings"]}
    assert "gn_one_channel_per_group" not in codes, r.json()["warnings"]
    assert {row["channels_per_group"] for row in r.json()["layers"]} >= {2}


# ------------------------------------------------------------------ recalibration


def _job_with_checkpoint(store: Store, norm: str, tmp: Path) -> str:
    alice = store.get_user("alice")
    assert alice is not None
    job, _ = store.create_job(
        owner_id=alice.id, spec=_spec(norm, 32), name=f"recal-{norm}", queue="cpu"
    )
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    store.add_checkpoint(
        job.id,
        attempt=attempt,
        name="epoch-0001",
        epoch=1,
        step=44,
        bytes=1,
        sha256="0" * 64,
        files={},
        metrics={},
        path=str(tmp / "epoch-0001"),
    )
    return job.id


def test_recalibrating_a_groupnorm_checkpoint_is_refused_at_request_time(
    api: tuple[TestClient, Store], tmp_path: Path
) -> None:
    client, store = api
    job_id = _job_with_checkpoint(store, "gn:4", tmp_path)
    r = client.post(f"/jobs/{job_id}/checkpoints/epoch-0001/recalibrate", json={"batches": 8})
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["path", "name"]
    assert "model.norm 'gn:4' keeps no running statistics" in detail["msg"]
    assert client.get(f"/jobs/{job_id}/artifacts").json() == []  # nothing queued
    # an unknown checkpoint is still a 404, before the norm is looked at
    missing = client.post(f"/jobs/{job_id}/checkpoints/epoch-0009/recalibrate", json={})
    assert missing.status_code == 404
    # BN keeps running statistics: the request is taken (a worker builds it)
    bn_job = _job_with_checkpoint(store, "bn", tmp_path)
    r = client.post(f"/jobs/{bn_job}/checkpoints/epoch-0001/recalibrate", json={"batches": 8})
    assert r.status_code == 202, r.text
    # BN without running statistics keeps none either
    untracked = _job_with_checkpoint(store, "bn(track_running_stats=False)", tmp_path)
    r = client.post(f"/jobs/{untracked}/checkpoints/epoch-0001/recalibrate", json={})
    assert r.status_code == 422, r.text
