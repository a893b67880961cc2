"""GET /jobs/{id}/metrics?max_points=N: a downsampled series that keeps each bucket's extremes."""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.store import Store
from service.store.downsample import downsample
from service.store.records import MetricRecord
from tests.harness import make_env
from tests.service.store_backends import BACKENDS, open_store, pg_database

SPIKE_STEP, DIP_STEP = 7_777, 3_333


def _series(n: int) -> list[dict[str, Any]]:
    """n train rows (smooth noisy loss, lr) with one planted spike and one planted dip, and a
    val row (loss, accuracy) every 100 steps."""
    rng = random.Random(0)
    rows: list[dict[str, Any]] = []
    for s in range(1, n + 1):
        loss = 2.0 / math.sqrt(s) + 0.01 * rng.random()
        if s == SPIKE_STEP:
            loss = 50.0
        if s == DIP_STEP:
            loss = -5.0
        rows.append({"step": s, "split": "train", "values": {"loss": loss, "lr": 0.1}})
        if s % 100 == 0:
            rows.append({"step": s, "split": "val", "values": {"loss": loss, "accuracy": s / n}})
    return rows


def _records(rows: list[dict[str, Any]]) -> list[MetricRecord]:
    return [
        MetricRecord(
            seq=i + 1,
            job_id="j",
            attempt=1,
            step=r["step"],
            epoch=1,
            split=r["split"],
            values=r["values"],
            time=0.0,
        )
        for i, r in enumerate(rows)
    ]


def _points(rows: list[Any], split: str, name: str) -> dict[int, float]:
    return {r.step: r.values[name] for r in rows if r.split == split and name in r.values}


def test_each_bucket_keeps_its_minimum_and_maximum() -> None:
    records = _records(_series(10_000))
    out = downsample(records, 200)
    train = [r for r in records if r.split == "train"]
    kept = _points(out, "train", "loss")
    assert len(kept) <= 200
    assert kept[SPIKE_STEP] == 50.0 and kept[DIP_STEP] == -5.0
    # Brute force: 100 buckets of 100 rows; each bucket's min and max of every series is kept.
    for b in range(100):
        bucket = train[b * 100 : (b + 1) * 100]
        for name in ("loss", "lr"):
            values = [r.values[name] for r in bucket]
            pts = {r.step: r.values[name] for r in out if r.split == "train" and name in r.values}
            in_bucket = [v for s, v in pts.items() if bucket[0].step <= s <= bucket[-1].step]
            assert min(values) in in_bucket and max(values) in in_bucket
            assert len(in_bucket) <= 2
    # The val split (100 rows) is under the budget: returned whole, values untouched.
    assert _points(out, "val", "accuracy") == _points(records, "val", "accuracy")
    assert [r.seq for r in out] == sorted(r.seq for r in out)


def test_short_series_and_non_finite_values() -> None:
    records = _records(_series(150))
    assert downsample(records, 1000) == records
    with_nan = _records(
        [{"step": s, "split": "train", "values": {"loss": 1.0}} for s in range(100)]
    )
    with_nan[42] = MetricRecord(**{**with_nan[42].__dict__, "values": {"loss": None}})
    kept = _points(downsample(with_nan, 10), "train", "loss")
    assert 42 in kept and kept[42] is None  # a non-finite value counts as its bucket's maximum
    with pytest.raises(ValueError):
        downsample(records, 1)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, str, list[dict[str, Any]]]]:
    """An in-process API on a SQLite file with alice's job of 20,000 train + 200 val rows."""
    env = make_env(tmp_path / "nc")
    app = create_app(env.settings())
    store: Store = app.state.store
    token = store.create_token("alice", "alice-token")
    alice = store.get_user("alice")
    assert alice is not None
    job, _ = store.create_job(owner_id=alice.id, spec={}, name="long", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    rows = _series(20_000)
    for i in range(0, len(rows), 5_000):
        store.add_metrics(job.id, attempt=attempt, rows=rows[i : i + 5_000])
    client = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    try:
        yield client, job.id, rows
    finally:
        client.close()
        store.dispose()


def test_metrics_route_downsamples_and_keeps_spikes(
    api: tuple[TestClient, str, list[dict[str, Any]]],
) -> None:
    client, job_id, rows = api
    page = client.get(f"/jobs/{job_id}/metrics", params={"max_points": 500}).json()
    series: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for item in page["items"]:
        for name, v in item["values"].items():
            series[(item["split"], name)][item["step"]] = v
    assert all(len(pts) <= 500 for pts in series.values())
    assert series[("train", "loss")][SPIKE_STEP] == 50.0
    assert series[("train", "loss")][DIP_STEP] == -5.0
    assert len(series[("val", "accuracy")]) == 200  # under the budget: whole
    # next is the last seq read, so a follower continues after every row.
    full = client.get(f"/jobs/{job_id}/metrics", params={"after": page["next"] - 1}).json()
    assert len(full["items"]) == 1 and full["next"] == page["next"] == len(rows)
    assert client.get(f"/jobs/{job_id}/metrics", params={"max_points": 1}).status_code == 422
    after = client.get(f"/jobs/{job_id}/metrics", params={"max_points": 50, "after": 20_000})
    assert {i["split"] for i in after.json()["items"]} <= {"train", "val"}


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def backend_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(request, tmp_path, "pg_url")


def test_store_downsamples_on_both_backends(backend_store: Store) -> None:
    """The store's read (driver rows, one JSON decode, numpy selection) on SQLite and
    PostgreSQL: the planted spike and dip survive, mixed columns (a string, a bool, a null, a
    missing value) take the slow path, and the result equals ``downsample`` of every row."""
    store = backend_store
    store.create_token("carol", "carol-token")
    user = store.get_user("carol")
    assert user is not None
    job, _ = store.create_job(owner_id=user.id, spec={}, name="ds", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    rows = _series(4_000)  # the dip planted at DIP_STEP; a spike at step 1,500 too
    spike = next(r for r in rows if r["step"] == 1_500 and r["split"] == "train")
    spike["values"]["loss"] = 50.0
    rows[10]["values"] = {"loss": None, "lr": 0.1, "note": "text", "flag": True}
    rows[20]["values"] = {"lr": 0.1}  # no loss: a gap in that series only
    for i in range(0, len(rows), 5_000):
        store.add_metrics(job.id, attempt=attempt, rows=rows[i : i + 5_000])
    got, nxt = store.get_metrics_downsampled(job.id, max_points=100)
    every, _ = store.get_metrics(job.id, limit=10_000)
    assert len(every) == len(rows) and nxt == every[-1].seq
    want = downsample(every, 100)
    assert got == want  # every field of every kept row, values cut to the names kept
    loss = _points(got, "train", "loss")
    assert len(loss) <= 100
    assert loss[1_500] == 50.0 and loss[DIP_STEP] == -5.0
    assert loss[11] is None  # a null counts as its bucket's maximum
    assert 21 not in loss  # no loss value in that row
    # The last row of each split comes from an index probe per split.
    last = store.last_metrics(job.id)
    assert last is not None and last["train"]["step"] == 4_000 and last["val"]["step"] == 4_000
