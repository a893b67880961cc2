"""The newcomer mistakes of issue 17 each answer 422 at POST /jobs, through a real uvicorn: the
message names the field and the value it needs; a memory estimate over the budget carries every
part in MB; a max_runtime over the server's cap is refused."""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.harness import make_env, start_api

pytestmark = pytest.mark.xdist_group("service-submit-checks")

LENET = {"arch": "lenet", "norm": "bn"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    env = make_env(
        tmp_path_factory.mktemp("checks") / "nc",
        NORMCORE_REPUBLISH_AFTER_SECONDS="3600",
        NORMCORE_JOB_MEMORY_BUDGET_BYTES=str(512 * 2**20),
        NORMCORE_MAX_RUNTIME_MINUTES="60",
    )
    root = env.data_root
    root.mkdir(parents=True, exist_ok=True)
    _write_files(root)
    store = env.store()
    token = store.create_token("newcomer", "newcomer-tok")
    proc, url = start_api(env)
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as c:
            yield c
    finally:
        proc.stop()
        store.dispose()


def _write_files(root: Path) -> None:
    mnist = root / "mnist"
    mnist.mkdir()
    n = 50
    images = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", n, 28, 28) + bytes(n * 784)
    labels = struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", n) + bytes(range(10)) * 5
    (mnist / "train-images-idx3-ubyte").write_bytes(images)
    (mnist / "train-labels-idx1-ubyte").write_bytes(labels)
    cifar = root / "cifar"
    cifar.mkdir()
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    (cifar / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=4))
    lie = root / "lie"
    lie.mkdir()
    # 121 bytes that unpickle to bytes(100000 * 3072) if nothing checks
    blob = b"\x80\x02cbuiltins\nbytes\nJ" + struct.pack("<i", 100_000 * 3072) + b"\x85R."
    (lie / "data_batch_1").write_bytes(blob.ljust(121, b"."))


def _post(client: httpx.Client, spec: dict[str, Any]) -> httpx.Response:
    return client.post("/jobs", json={"name": "newcomer", **spec})


@pytest.mark.parametrize(
    ("spec", "loc", "needles"),
    [
        (
            {"model": LENET, "data": {"dataset": "digits", "batch_size": 2000}},
            ["data", "batch_size"],
            ["data.batch_size is 2000", "use a batch_size of at most 1438"],
        ),
        (
            {"model": {**LENET, "num_classes": 3}, "data": {"dataset": "digits"}},
            ["model", "num_classes"],
            ["model.num_classes is 3", "set model.num_classes to 10"],
        ),
        (
            {"model": LENET, "data": {"dataset": "cifar10", "path": "mnist"}},
            ["data", "path"],
            ["no data_batch_1", "looks like mnist data: set data.dataset to 'mnist'"],
        ),
        (
            {"model": LENET, "data": {"dataset": "mnist", "path": "cifar"}},
            ["data", "path"],
            ["looks like cifar10 data: set data.dataset to 'cifar10'"],
        ),
        (
            {
                "model": {**LENET, "num_classes": 10},
                "data": {"dataset": "mnist", "path": "mnist", "batch_size": 64},
            },
            ["data", "batch_size"],
            ["train split of 'mnist' has 40 samples", "at most 40"],
        ),
        (
            {"model": LENET, "data": {"dataset": "cifar10", "path": "lie", "batch_size": 2}},
            ["data", "path"],
            ["lie/data_batch_1: 121 bytes cannot hold one 3072-byte image"],
        ),
        (
            {"model": {**LENET, "in_channels": 3}, "data": {"dataset": "digits"}},
            ["model", "in_channels"],
            ["set it to 1"],
        ),
        (
            {"model": LENET, "data": {"dataset": "digits"}, "max_runtime": 90},
            ["max_runtime"],
            ["cap is 60", "at most 60"],
        ),
    ],
    ids=[
        "batch-over-split",
        "classes",
        "cifar-reader-on-mnist",
        "mnist-reader-on-cifar",
        "file-batch-over-split",
        "lying-cifar",
        "channels",
        "runtime-cap",
    ],
)
def test_newcomer_mistakes_answer_422_naming_the_field(
    client: httpx.Client, spec: dict[str, Any], loc: list[str], needles: list[str]
) -> None:
    r = _post(client, spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == loc, error
    for needle in needles:
        assert needle in error["msg"], error["msg"]
    assert "/nc/" not in error["msg"]  # paths relative to the data root only


def test_memory_over_budget_answers_422_with_the_numbers(client: httpx.Client) -> None:
    spec = {
        "model": {"arch": "resnet18", "norm": "bn"},
        "data": {"dataset": "synthetic", "batch_size": 128, "image_size": 128},
    }
    r = _post(client, spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["type"] == "memory_budget"
    numbers = error["ctx"]
    assert numbers["budget_mb"] == 512.0
    assert numbers["total_mb"] > 512.0
    parts = numbers["data_mb"] + numbers["model_mb"] + numbers["activations_mb"]
    assert abs(parts - numbers["total_mb"]) < 0.5
    for key in ("data_mb", "model_mb", "activations_mb", "total_mb"):
        assert f"{numbers[key]:.1f} MB" in error["msg"]
    assert "budget per job is 512.0 MB" in error["msg"]


def test_a_fitting_spec_is_accepted(client: httpx.Client) -> None:
    r = _post(
        client,
        {
            "model": {**LENET, "num_classes": 10},
            "data": {"dataset": "mnist", "path": "mnist", "batch_size": 8},
            "max_runtime": 0.5,
        },
    )
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["max_runtime"] == 0.5


def test_cuda_without_any_gpu_worker_ever_is_refused(client: httpx.Client) -> None:
    spec = {"model": LENET, "data": {"dataset": "digits"}, "resources": {"device": "cuda"}}
    r = _post(client, spec)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["resources", "device"]
    assert "no worker with 1 GPU has ever registered" in error["msg"]
    assert "resources.device 'cpu' or 'auto'" in error["msg"]
