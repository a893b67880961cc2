"""Sweeps: grid expansion and the LR rule, report maths (float64, numpy's ddof=1 std), the
figure, the store's run reservation on SQLite and PostgreSQL, and the HTTP API on a real uvicorn
process (no worker: the worker's side is written through the Store, as a worker would).
"""

from __future__ import annotations

import csv
import io
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from service.cli import app as cli_app
from service.store import Store
from service.sweeps.figure import is_power_of_two, render
from service.sweeps.grid import SweepRequest, build_spec, run_of, set_dotted
from service.sweeps.report import best_of, mean_std
from tests.harness import Proc, ServiceEnv, make_env, start_api, wait_for
from tests.service.store_backends import BACKENDS, open_store, pg_database

BASE: dict[str, Any] = {
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "optim": {"lr": 0.1},
    "epochs": 2,
}
SVG_NS = "{http://www.w3.org/2000/svg}"


def sweep_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "t",
        "base": BASE,
        "grid": {"model.norm": ["bn", "gn:2", "none"], "data.batch_size": [4, 16]},
        "seeds": [0, 1],
        "concurrency": 3,
    }
    body.update(over)
    return body


# ------------------------------------------------------------------ grid, report maths, figure


def test_grid_runs_are_seed_major_with_overrides_and_linear_lr_rule() -> None:
    req = SweepRequest.model_validate(sweep_body(lr_rule={"rule": "linear", "reference_batch": 16}))
    assert req.runs == 12 and len(req.cells()) == 6
    first, seventh = run_of(req, 0), run_of(req, 7)
    assert (first.cell, first.seed) == (0, 0)
    assert (seventh.cell, seventh.seed) == (1, 1)
    assert seventh.values == {"model.norm": "bn", "data.batch_size": 16}
    spec = build_spec(req, run_of(req, 4))  # cell 4: none x 4
    assert spec.model.norm == "none" and spec.data.batch_size == 4 and spec.seed == 0
    # Goyal et al. 2017: lr = base_lr * batch / reference_batch
    assert spec.optim.lr == pytest.approx(0.1 * 4 / 16, rel=0, abs=1e-15)
    assert build_spec(req, run_of(req, 1)).optim.lr == pytest.approx(0.1, abs=1e-15)
    nested: dict[str, Any] = {"a": {"b": 1}}
    set_dotted(nested, "a.c.d", 5)
    assert nested == {"a": {"b": 1, "c": {"d": 5}}}
    with pytest.raises(ValueError, match="not an object"):
        set_dotted(nested, "a.b.x", 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"grid": {"seed": [1, 2]}}, "seeds"),
        ({"grid": {"Model..norm": ["bn"]}}, "dotted"),
        ({"grid": {"model.norm": ["bn", "bn"]}}, "twice"),
        ({"seeds": [3, 3]}, "twice"),
        ({"lr_rule": {"reference_batch": 32}, "grid": {"model.norm": ["bn"]}}, "batch_size"),
        ({"grid": {"model.width": list(range(9)), "data.batch_size": list(range(1, 9))}}, "64"),
        ({"grid": {"model.width": list(range(32))}, "seeds": list(range(17))}, "512"),
    ],
)
def test_bad_requests_are_refused(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SweepRequest.model_validate(sweep_body(**change))


def test_a_grid_key_typo_names_the_key_and_the_close_fields() -> None:
    for key, close in [("model.nrom", "model.norm"), ("data.batchsize", "data.batch_size")]:
        with pytest.raises(ValueError, match=f"unknown field '{key}'.*'{close}'"):
            SweepRequest.model_validate(sweep_body(grid={key: [1]}))
    with pytest.raises(ValueError, match=r"'optim\.lr'"):
        SweepRequest.model_validate(sweep_body(grid={"optimizer.lr": [0.1]}))
    # inside a field that takes free-form values (a norm as a dict) any name is left to the spec
    SweepRequest.model_validate(sweep_body(grid={"model.norm.kind": ["bn"]}))


def test_mean_std_is_numpy_sample_std_and_best_of() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 3, 7):
        xs = rng.normal(size=n).astype(np.float64)
        mean, std = mean_std(list(xs))
        assert mean == pytest.approx(float(xs.mean()), rel=1e-12)
        assert std == pytest.approx(float(xs.std(ddof=1)), rel=1e-12)
    assert mean_std([0.5]) == (0.5, None)
    assert mean_std([]) == (None, None)
    rows = [(10, 1, 0.3), (20, 2, 0.7), (30, 3, 0.7), (40, 4, 0.6)]
    assert best_of(rows, "max") == (0.7, 2)
    assert best_of(rows, "min") == (0.3, 1)


def _report(values: dict[tuple[str, int], list[float]]) -> dict[str, Any]:
    cells = []
    for i, ((norm, batch), xs) in enumerate(values.items()):
        mean, std = mean_std(xs)
        cells.append(
            {
                "cell": i,
                "values": {"model.norm": norm, "data.batch_size": batch},
                "final_mean": mean,
                "final_std": std,
            }
        )
    return {
        "name": "fig",
        "metric": "val_accuracy",
        "axes": ["model.norm", "data.batch_size"],
        "grid": {"model.norm": ["bn", "gn:2"], "data.batch_size": [2, 8, 32]},
        "complete": True,
        "cells": cells,
    }


def test_figure_svg_has_one_line_per_norm_and_log2_axis() -> None:
    assert [is_power_of_two(v) for v in (1, 2, 32, 3, 0, 2.5, True)] == [
        True, True, True, False, False, False, False,
    ]  # fmt: skip
    report = _report(
        {(n, b): [0.5 + 0.01 * b, 0.52 + 0.01 * b] for n in ("bn", "gn:2") for b in (2, 8, 32)}
    )
    svg = render(report, "svg")
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    series = [g.get("id") for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith("series-")]
    assert sorted(series) == ["series-bn", "series-gn:2"]
    # a log2 axis puts 2, 8 and 32 at equal spacing; the tick labels are the values
    texts = "".join(t for t in root.itertext())
    assert "32" in texts
    png = render(report, "png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert render(report, "svg") is svg  # cached


# ------------------------------------------------------------------ store, both backends


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(request, tmp_path, "pg_url")


def _finish(store: Store, job_id: str, status: str = "succeeded") -> None:
    attempt = store.claim_job(job_id, worker_id="w", lease_seconds=60)
    assert attempt is not None
    store.finish_job(job_id, attempt=attempt, status=status)


def test_reserve_runs_keeps_the_concurrency_limit(store: Store) -> None:
    user = store.create_user("sam")
    sweep, created = store.create_sweep(
        owner_id=user.id, name="s", request={}, runs=5, idempotency_key="k", request_hash="h"
    )
    assert created
    again, created = store.create_sweep(
        owner_id=user.id, name="s", request={}, runs=5, idempotency_key="k", request_hash="h"
    )
    assert again.id == sweep.id and not created
    assert store.reserve_runs(sweep.id, 2) == [0, 1]
    # released but without a job: handed out again, and no new run while they are missing
    assert store.reserve_runs(sweep.id, 2) == [0, 1]
    ids = []
    for run in (0, 1):
        job, _ = store.create_job(owner_id=user.id, spec={}, name="j", queue="cpu")
        store.attach_sweep_job(job.id, sweep_id=sweep.id, cell={"run": run, "cell": run})
        ids.append(job.id)
    assert store.reserve_runs(sweep.id, 2) == []
    _finish(store, ids[0])
    assert store.reserve_runs(sweep.id, 2) == [2]
    assert store.get_sweep(sweep.id).released == 3  # type: ignore[union-attr]
    assert {c.job.id for c in store.sweep_children(sweep.id)} == set(ids)
    assert store.request_sweep_cancel(sweep.id) == [ids[1]]
    assert store.reserve_runs(sweep.id, 5) == []
    assert store.releasing_sweep_ids() == []
    assert store.sweep_owner(sweep.id).name == "sam"


# ------------------------------------------------------------------ HTTP API (real uvicorn)


class Api:
    """A running API process with its store."""

    def __init__(self, env: ServiceEnv, proc: Proc, url: str) -> None:
        self.env, self.proc, self.url = env, proc, url
        self.store = env.store()
        self.tokens: dict[str, str] = {}

    def client(self, user: str = "alice") -> httpx.Client:
        if user not in self.tokens:
            self.tokens[user] = self.store.create_token(user, f"{user}-tok")
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.tokens[user]}"},
            timeout=60,
        )


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    env = make_env(
        tmp_path_factory.mktemp("sweeps") / "nc",
        NORMCORE_MAX_ACTIVE_JOBS_PER_USER="1000",
        NORMCORE_REPUBLISH_AFTER_SECONDS="3600",
        NORMCORE_REAPER_INTERVAL_SECONDS="0.2",
    )
    proc, url = start_api(env)
    running = Api(env, proc, url)
    try:
        yield running
    finally:
        proc.stop()
        running.store.dispose()


def _write_val_rows(store: Store, job_id: str, values: list[float]) -> None:
    attempt = store.claim_job(job_id, worker_id="w", lease_seconds=60)
    assert attempt is not None
    rows = [
        {"step": 10 * (e + 1), "epoch": e + 1, "split": "val", "values": {"val_accuracy": v}}
        for e, v in enumerate(values)
    ]
    store.add_metrics(job_id, attempt=attempt, rows=rows)
    store.finish_job(job_id, attempt=attempt, status="succeeded")


def _active(detail: dict[str, Any]) -> int:
    return detail["counts"]["queued"] + detail["counts"]["running"]


def test_sweep_api_release_report_and_isolation(api: Api) -> None:
    with api.client() as c, api.client("mallory") as other:
        body = sweep_body(lr_rule={"rule": "linear", "reference_batch": 16})
        r = c.post("/sweeps", json=body, headers={"Idempotency-Key": "sweep-1"})
        assert r.status_code == 201, r.text
        sweep = r.json()
        sid = sweep["id"]
        assert sweep["runs"] == 12 and sweep["released"] == 3 and _active(sweep) == 3
        replay = c.post("/sweeps", json=body, headers={"Idempotency-Key": "sweep-1"})
        assert replay.status_code == 200 and replay.json()["id"] == sid
        changed = c.post(
            "/sweeps", json={**body, "seeds": [5, 6]}, headers={"Idempotency-Key": "sweep-1"}
        )
        assert changed.status_code == 409
        assert other.get(f"/sweeps/{sid}").status_code == 404
        assert other.get(f"/sweeps/{sid}/report").status_code == 404
        assert other.post(f"/sweeps/{sid}/cancel").status_code == 404
        assert sid not in [s["id"] for s in other.get("/sweeps").json()["items"]]

        # each child is an ordinary job with its cell's overrides, seed and scaled lr
        jobs = [j for cell in sweep["cells"] for j in cell["jobs"]]
        assert sorted(j["run"] for j in jobs) == [0, 1, 2]
        job = c.get(f"/jobs/{jobs[0]['job_id']}").json()
        assert job["spec"]["model"]["norm"] == "bn" and job["spec"]["data"]["batch_size"] == 4
        assert job["spec"]["optim"]["lr"] == pytest.approx(0.1 * 4 / 16)

        # finish children through the store as a worker would; the releaser keeps 3 active
        accs: dict[str, list[float]] = {}
        rng = np.random.default_rng(0)
        for _ in range(12):
            detail = wait_for(
                lambda: (d := c.get(f"/sweeps/{sid}").json()) and _active(d) > 0 and d,
                timeout=30,
                what="an active child",
            )
            assert _active(detail) <= 3
            queued = [
                j["job_id"]
                for cell in detail["cells"]
                for j in cell["jobs"]
                if j["status"] == "queued"
            ]
            values = [float(v) for v in rng.uniform(0.1, 0.9, size=2)]
            _write_val_rows(api.store, queued[0], values)
            accs[queued[0]] = values
            if len(accs) == 1:  # a partial report while the sweep runs
                partial = c.get(f"/sweeps/{sid}/report").json()
                assert not partial["complete"] and partial["finished"] == 1
                assert [x["n"] for x in partial["cells"]] == [1, 0, 0, 0, 0, 0]
                assert partial["cells"][0]["final_mean"] == values[-1]
                assert partial["cells"][0]["final_std"] is None
        detail = wait_for(
            lambda: (d := c.get(f"/sweeps/{sid}").json())["status"] == "succeeded" and d,
            timeout=30,
            what="the sweep to succeed",
        )
        assert detail["counts"]["succeeded"] == 12

        report = c.get(f"/sweeps/{sid}/report").json()
        assert report["complete"] and len(report["cells"]) == 6
        for cell in report["cells"]:
            ids = [r["job_id"] for r in cell["runs"]]
            finals = np.array([accs[j][-1] for j in ids], dtype=np.float64)
            bests = np.array([max(accs[j]) for j in ids], dtype=np.float64)
            assert cell["n"] == 2
            assert cell["final_mean"] == pytest.approx(finals.mean(), rel=1e-12)
            assert cell["final_std"] == pytest.approx(finals.std(ddof=1), rel=1e-12)
            assert cell["best_mean"] == pytest.approx(bests.mean(), rel=1e-12)
            assert cell["best_epochs"] == [1 + int(np.argmax(accs[j])) for j in ids]
        rows = list(csv.DictReader(io.StringIO(c.get(f"/sweeps/{sid}/report?format=csv").text)))
        assert len(rows) == 6 and rows[0]["model.norm"] == "bn"
        svg = c.get(f"/sweeps/{sid}/report", params={"format": "svg"})
        assert svg.headers["content-type"].startswith("image/svg+xml")
        root = ET.fromstring(svg.content)
        lines = [
            g.get("id") for g in root.iter(f"{SVG_NS}g") if g.get("id", "").startswith("series-")
        ]
        assert sorted(lines) == ["series-bn", "series-gn:2", "series-none"]
        assert c.get(f"/sweeps/{sid}/report", params={"format": "pdf"}).status_code == 422

        # the CLI, its output piped (CliRunner): one line per cell, the counts as words
        env = {"NORMCORE_URL": api.url, "NORMCORE_TOKEN": api.tokens["alice"], "COLUMNS": "80"}
        shown = CliRunner().invoke(cli_app, ["sweep", "show", sid], env=env)
        assert shown.exit_code == 0, shown.output
        assert f"sweep {sid} succeeded: 12 runs, 12 released; 12 succeeded" in shown.output
        assert "{" not in shown.output
        rows = [line for line in shown.output.splitlines() if line.lstrip().startswith("bn")]
        assert len(rows) == 2 and all(line.count("±") == 2 for line in rows), shown.output

        assert c.delete(f"/sweeps/{sid}").status_code == 204
        assert c.get(f"/sweeps/{sid}").status_code == 404
        assert c.get(f"/jobs/{jobs[0]['job_id']}").status_code == 404


def test_invalid_cell_refuses_the_whole_sweep(api: Api) -> None:
    with api.client("ivan") as c:
        body = sweep_body(grid={"model.norm": ["bn", "gn:7"]}, seeds=[0])
        r = c.post("/sweeps", json=body)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"][0]
        assert detail["loc"][:2] == ["grid", 1]
        assert "cell 1" in detail["msg"] and "gn:7" in detail["msg"]
        assert c.get("/sweeps").json()["items"] == []
        assert c.get("/jobs").json()["items"] == []
        bad = sweep_body(grid={"data.batch_size": [8, 100000]}, seeds=[0])
        r = c.post("/sweeps", json=bad)
        assert r.status_code == 422 and "cell 1" in r.json()["detail"][0]["msg"]
        assert c.post("/sweeps", json={**body, "grid": {"seed": [1]}}).status_code == 422
        r = c.post("/sweeps", json={**body, "grid": {"model.nrom": ["bn"]}})
        assert r.status_code == 422 and "did you mean 'model.norm'" in r.text, r.text


def test_cancel_stops_every_child(api: Api) -> None:
    with api.client("carol") as c:
        r = c.post("/sweeps", json=sweep_body(concurrency=4))
        assert r.status_code == 201
        sid = r.json()["id"]
        first = [j["job_id"] for cell in r.json()["cells"] for j in cell["jobs"]]
        attempt = api.store.claim_job(first[0], worker_id="w", lease_seconds=60)
        assert attempt is not None  # one running, three queued
        done = c.post(f"/sweeps/{sid}/cancel").json()
        assert done["cancel_requested"]
        assert done["counts"]["cancelled"] == 3
        assert api.store.get_job(first[0]).cancel_requested  # type: ignore[union-attr]
        api.store.finish_job(first[0], attempt=attempt, status="cancelled")
        time.sleep(0.6)  # three releaser rounds: nothing more is released
        final = c.get(f"/sweeps/{sid}").json()
        assert final["status"] == "cancelled" and final["released"] == 4
        assert final["counts"]["cancelled"] == 4


@pytest.fixture(scope="module")
def pg_api(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Api]:
    """The API in cluster mode: PostgreSQL store (its own database), Redis broker, no worker."""
    import redis

    from tests.conftest import REDIS_HOST, REDIS_PORT, _missing, _xdist_index

    db = 1 + _xdist_index() % 15
    broker = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=3)
    try:
        broker.ping()
    except Exception as exc:
        _missing("Redis at 127.0.0.1:6379", exc)  # fails under CI=true, skips on a laptop
    env = make_env(
        tmp_path_factory.mktemp("sweeps-pg") / "nc",
        mode="cluster",
        postgres_url=pg_url.replace("postgresql://", "postgresql+psycopg://"),
        redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}",
        NORMCORE_REPUBLISH_AFTER_SECONDS="3600",
        NORMCORE_REAPER_INTERVAL_SECONDS="0.2",
    )
    proc, url = start_api(env)
    running = Api(env, proc, url)
    try:
        yield running
    finally:
        proc.stop()
        running.store.dispose()
        broker.flushdb()
        broker.close()


def test_sweep_api_on_postgresql(pg_api: Api) -> None:
    with pg_api.client("pat") as c:
        bad = sweep_body(grid={"model.norm": ["gn:2", "gn:7"]}, seeds=[0])
        r = c.post("/sweeps", json=bad)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["grid", 1]
        body = sweep_body(grid={"model.norm": ["bn", "gn:2"]}, seeds=[0, 1], concurrency=2)
        r = c.post("/sweeps", json=body, headers={"Idempotency-Key": "pg-1"})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        assert c.post("/sweeps", json=body, headers={"Idempotency-Key": "pg-1"}).json()["id"] == sid
        finals: dict[str, float] = {}
        for i in range(4):
            detail = wait_for(
                lambda: (d := c.get(f"/sweeps/{sid}").json())["counts"]["queued"] > 0 and d,
                timeout=30,
                what="a queued child",
            )
            assert _active(detail) <= 2
            job_id = next(
                j["job_id"] for x in detail["cells"] for j in x["jobs"] if j["status"] == "queued"
            )
            _write_val_rows(pg_api.store, job_id, [0.5, 0.6 + 0.1 * i])
            finals[job_id] = 0.6 + 0.1 * i
        wait_for(
            lambda: c.get(f"/sweeps/{sid}").json()["status"] == "succeeded",
            timeout=30,
            what="the sweep to succeed",
        )
        report = c.get(f"/sweeps/{sid}/report").json()
        for cell in report["cells"]:
            xs = np.array([finals[r["job_id"]] for r in cell["runs"]], dtype=np.float64)
            assert cell["n"] == 2
            assert cell["final_mean"] == pytest.approx(xs.mean(), rel=1e-12)
            assert cell["final_std"] == pytest.approx(xs.std(ddof=1), rel=1e-12)
        other = c.post("/sweeps", json={**body, "name": "two"}).json()
        done = c.post(f"/sweeps/{other['id']}/cancel").json()
        assert done["counts"]["cancelled"] == 2 and done["status"] == "cancelled"
        assert c.delete(f"/sweeps/{sid}").status_code == 204
        assert c.get(f"/sweeps/{sid}").status_code == 404
