"""POST /jobs/validate through a real uvicorn: the effective batch per layer (SyncBN over 2 gloo
ranks pools both), the momentum's half-life, the batch-4 BN warning, the 422s a submit would
give, the route not taken for a job id; and the same warnings stored on a submitted job."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from normcore.client import ApiError, Client
from tests.harness import make_env, start_api

pytestmark = pytest.mark.xdist_group("service-validate")

DIGITS = {"dataset": "digits", "batch_size": 32}


def _spec(norm: Any = "bn", batch: int = 32, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"arch": "lenet", "norm": norm},
        "data": {**DIGITS, "batch_size": batch},
        "epochs": 2,
        **extra,
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    env = make_env(tmp_path_factory.mktemp("validate") / "nc")
    store = env.store()
    token = store.create_token("val", "val-tok")
    proc, url = start_api(env)
    try:
        yield url, token
    finally:
        proc.stop()
        store.dispose()


@pytest.fixture
def client(api: tuple[str, str]) -> Iterator[httpx.Client]:
    url, token = api
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        yield c


def _validate(client: httpx.Client, spec: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/jobs/validate", json=spec)
    assert r.status_code == 200, r.text
    return r.json()


def test_layers_carry_class_as_stats_and_norms_do(client: httpx.Client) -> None:
    layers = _validate(client, _spec())["layers"]
    assert [(x["class"], x["cls"]) for x in layers] == [
        ("BatchNorm2d", "BatchNorm2d"),
        ("BatchNorm2d", "BatchNorm2d"),
        ("BatchNorm1d", "BatchNorm1d"),
        ("BatchNorm1d", "BatchNorm1d"),
    ]


def test_batch_4_bn_warns_and_names_every_bn_layer(client: httpx.Client) -> None:
    report = _validate(client, _spec(batch=4))
    bn_layers = [row["name"] for row in report["layers"] if row["batch_stats"]]
    assert bn_layers, report["layers"]
    codes = {w["code"]: w for w in report["warnings"]}
    assert "bn_small_batch" in codes, report["warnings"]
    assert codes["bn_small_batch"]["layers"] == bn_layers
    assert "4 sample" in codes["bn_small_batch"]["message"]
    # 1437 digits in the train split (80% of 1797, stratified), batch 4: 359 full batches
    assert report["steps_per_epoch"] == report["num_train"] // 4
    assert report["total_steps"] == 2 * report["steps_per_epoch"]
    big = _validate(client, _spec(batch=32))
    assert "bn_small_batch" not in {w["code"] for w in big["warnings"]}
    gn = _validate(client, _spec(norm="gn:4", batch=4))
    assert "bn_small_batch" not in {w["code"] for w in gn["warnings"]}


def test_half_life_of_momentum_0_1_and_the_runs_half_lives(client: httpx.Client) -> None:
    report = _validate(client, _spec())
    stats = report["running_stats"]
    assert stats["momenta"] == [0.1]
    assert round(stats["half_life_steps"], 2) == 6.58
    expected = math.log(0.5) / math.log(0.9)
    assert stats["half_lives_in_run"] == pytest.approx(report["total_steps"] / expected)
    for row in report["layers"]:
        assert row["half_life_steps"] == pytest.approx(expected)
    assert any("gradient accumulation" in n for n in report["notes"])
    assert report["parameters"] > 0 and report["memory_mb"]["total_mb"] > 0


def test_sync_bn_over_two_gloo_ranks_reports_the_global_batch(client: httpx.Client) -> None:
    two = {"device": "cpu", "gpus": 2}
    synced = _validate(client, _spec(batch=4, resources={**two, "sync_bn": True}))
    assert synced["world_size"] == 2 and synced["global_batch"] == 8
    assert synced["sync_bn"] is True
    for row in synced["layers"]:
        assert row["synced"] and row["per_device_batch"] == 4 and row["norm_batch"] == 8
    assert "bn_small_batch" not in {w["code"] for w in synced["warnings"]}
    # steps count global batches of 2 x 4 samples
    assert synced["steps_per_epoch"] == synced["num_train"] // 8
    plain = _validate(client, _spec(batch=4, resources=two))
    assert plain["global_batch"] == 8 and plain["sync_bn"] is False
    assert {row["norm_batch"] for row in plain["layers"]} == {4}
    warning = next(w for w in plain["warnings"] if w["code"] == "bn_small_batch")
    assert "sync_bn" in warning["message"]


def test_instance_norm_on_small_maps_and_one_channel_groups(client: httpx.Client) -> None:
    spec = _spec(norm="in")
    spec["model"]["arch"] = "resnet20"
    report = _validate(client, spec)
    tiny = next(w for w in report["warnings"] if w["code"] == "in_small_map")
    small = [r["name"] for r in report["layers"] if math.prod(r["map_size"]) < 16]
    assert tiny["layers"] == small and small
    groups = _validate(client, _spec(norm="gn:8"))  # lenet's first conv has 8 channels
    one = next(w for w in groups["warnings"] if w["code"] == "gn_one_channel_per_group")
    assert one["layers"] == ["conv1.norm"]


def test_refusals_match_submit_and_route_order(client: httpx.Client) -> None:
    r = client.post("/jobs/validate", json=_spec(norm="gn:3"))
    assert r.status_code == 422 and "3" in r.text
    r = client.post("/jobs/validate", json=_spec(batch=4096))
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][:2] == ["data", "batch_size"]
    # GET is no job route either: the id "validate" is simply not found
    assert client.get("/jobs/validate").status_code == 404
    assert httpx.post(f"{client.base_url}/jobs/validate", json=_spec()).status_code == 401


def test_client_and_cli(api: tuple[str, str], tmp_path: Path) -> None:
    url, token = api
    with Client(url, token) as client:
        report = client.validate(_spec(batch=4))
        assert "bn_small_batch" in {w["code"] for w in report["warnings"]}
        with pytest.raises(ApiError) as err:
            client.validate(_spec(norm="gn:3"))
        assert err.value.status == 422
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(_spec(batch=4)))
    args = [sys.executable, "-m", "service.cli", "validate", str(path), "--url", url]
    done = subprocess.run(
        [*args, "--token", token, "--strict"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr  # --strict: warnings fail
    assert "6.58 steps" in done.stdout and "bn_small_batch" in done.stdout
    assert "conv1.norm" in done.stdout
    # a layer after a Linear has no map: "-", as on the web page (validate.js), not "1"
    norm1 = next(
        line.split() for line in done.stdout.splitlines() if line.lstrip().startswith("norm1.")
    )
    assert norm1[1:3] == ["bn", "-"], norm1


def test_submit_stores_the_validate_warnings(client: httpx.Client) -> None:
    r = client.post("/jobs", json=_spec(batch=4))
    assert r.status_code == 201, r.text
    job = client.get(f"/jobs/{r.json()['id']}").json()
    codes = [(w["code"], w["source"]) for w in job["warnings"]]
    assert ("bn_small_batch", "validate") in codes
    quiet = client.post("/jobs", json=_spec(batch=32)).json()
    assert [w for w in quiet["warnings"] if w["code"] == "bn_small_batch"] == []


def test_json_body_without_the_json_content_type(client: httpx.Client) -> None:
    """``curl -d @spec.json`` (form Content-Type) and no Content-Type are read as JSON on every
    JSON-body route; another type gets a 422 that says to send application/json."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = json.dumps(_spec(batch=4)).encode()
    r = client.post("/jobs/validate", content=body, headers=form)
    assert r.status_code == 200, r.text
    assert "bn_small_batch" in {w["code"] for w in r.json()["warnings"]}
    r = client.post("/jobs", content=body, headers=form)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    r = client.patch(f"/jobs/{job_id}", content=b'{"note": "n1"}')  # no Content-Type at all
    assert "content-type" not in r.request.headers
    assert r.status_code == 200 and r.json()["note"] == "n1", r.text
    sweep = {"base": _spec(), "grid": {"model.norm": ["bn"]}, "seeds": [0, 1, 0]}
    r = client.post("/sweeps", content=json.dumps(sweep).encode(), headers=form)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "seeds", r.text
    r = client.post("/jobs/validate", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 422
    assert "Content-Type: application/json" in r.json()["detail"][0]["msg"], r.text
    r = client.post("/jobs/validate", content=b"norm=bn", headers=form)
    assert r.status_code == 400 and "malformed JSON" in r.text
