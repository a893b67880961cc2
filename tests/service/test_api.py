"""HTTP API against a real uvicorn process (no worker): jobs, validation, paging, metrics,
logs, checkpoints (ETag, 304, Range, stats), server-sent events, health and Prometheus.

Worker-side rows (metrics, logs, checkpoints, status) are written straight through the Store,
the way a worker would, so these tests need no training run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Proc, ServiceEnv, make_env, start_api, wait_for

SPEC: dict[str, Any] = {
    "name": "api-test",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64},
    "epochs": 2,
}

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-api")


@dataclass
class Api:
    """A running API process, its store and one token per test user."""

    env: ServiceEnv
    proc: Proc
    url: str
    store: Any
    tokens: dict[str, str] = field(default_factory=dict)

    def token(self, user: str, *, admin: bool = False) -> str:
        """A token for ``user`` (created on first use)."""
        if user not in self.tokens:
            self.tokens[user] = self.store.create_token(user, f"{user}-tok", admin=admin)
        return self.tokens[user]

    def client(self, user: str = "alice", *, admin: bool = False) -> httpx.Client:
        """An httpx client authenticated as ``user``."""
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token(user, admin=admin)}"},
            timeout=30,
        )

    def user_id(self, user: str) -> int:
        return self.store.get_user(user).id


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    env = make_env(
        tmp_path_factory.mktemp("api") / "nc",
        NORMCORE_MAX_ACTIVE_JOBS_PER_USER="1000",
        NORMCORE_MAX_BODY_BYTES="20000",
        # No worker consumes here: keep the reaper from republishing the waiting jobs, so the
        # queue depth counts only what a test publishes.
        NORMCORE_REPUBLISH_AFTER_SECONDS="3600",
    )
    store = env.store()
    proc, url = start_api(env)
    try:
        yield Api(env=env, proc=proc, url=url, store=store)
    finally:
        proc.stop()
        store.dispose()


def submit(client: httpx.Client, spec: dict[str, Any] | None = None, **headers: str) -> dict:
    r = client.post("/jobs", json=spec or SPEC, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


def running_job(api: Api, user: str = "alice") -> tuple[str, int]:
    """A job of ``user`` claimed as a worker would: (job id, attempt)."""
    with api.client(user) as c:
        job_id = submit(c)["id"]
    attempt = api.store.claim_job(job_id, worker_id="test-worker", lease_seconds=600)
    assert attempt == 1
    return job_id, attempt


def errors_of(response: httpx.Response) -> list[dict[str, Any]]:
    body = response.json()
    assert isinstance(body["detail"], list), body
    return body["detail"]


# ----------------------------------------------------------------------------------- submit


def test_submit_returns_job_and_get_reads_it(api: Api) -> None:
    with api.client() as c:
        job = submit(c)
        assert len(job["id"]) == 32
        assert job["status"] == "queued"
        assert job["queue"] == "cpu"
        assert job["attempt"] == 0
        assert job["name"] == "api-test"
        assert job["checkpoints"] == [] and job["last_metrics"] is None
        # The stored spec is the validated one, defaults filled in.
        assert job["spec"]["optim"]["name"] == "sgd"
        assert job["spec"]["model"]["arch"] == "lenet"
        got = c.get(f"/jobs/{job['id']}")
        assert got.status_code == 200
        assert got.json()["id"] == job["id"]
        assert got.json()["spec"] == job["spec"]


def test_idempotency_key(api: Api) -> None:
    with api.client() as c:
        first = c.post("/jobs", json=SPEC, headers={"Idempotency-Key": "same-key"})
        assert first.status_code == 201
        # Same key, same body (spelled differently: key order, defaults written out) -> same job.
        equivalent = {**SPEC, "seed": 0, "model": {"norm": "bn", "arch": "lenet"}}
        again = c.post("/jobs", json=equivalent, headers={"Idempotency-Key": "same-key"})
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        other = c.post("/jobs", json={**SPEC, "epochs": 3}, headers={"Idempotency-Key": "same-key"})
        assert other.status_code == 409
        assert "same-key" in other.json()["detail"]
    # Keys are per user: bob's identical key is his own job.
    with api.client("bob") as c:
        bobs = c.post("/jobs", json=SPEC, headers={"Idempotency-Key": "same-key"})
        assert bobs.status_code == 201
        assert bobs.json()["id"] != first.json()["id"]


def test_malformed_json_is_400(api: Api) -> None:
    with api.client() as c:
        r = c.post("/jobs", content=b'{"model": ', headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        assert "malformed JSON" in r.json()["detail"]
        r = c.post("/jobs", json=[1, 2, 3])
        assert r.status_code == 422
        r = c.post("/jobs", content=b"", headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422)
        # Bodies the JSON decoder cannot even start on get a reason too, never a bare message.
        for body, reason in (
            (b'{"name": "\xff"}', "not UTF-8"),
            (b"[" * 3000 + b"]" * 3000, "nested too deeply"),
            (b'{"seed": ' + b"9" * 5000 + b"}", "digits"),
        ):
            r = c.post("/jobs", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, r.text
            detail = r.json()["detail"]
            assert detail.startswith("malformed JSON body: ") and reason in detail, detail
        # Other HTTP errors keep their own answer (and headers).
        r = c.get("/jobs", headers={"Authorization": "Bearer nc_wrong"})
        assert r.status_code == 401 and r.headers.get("www-authenticate") == "Bearer"


def test_unknown_arch_and_norm_list_valid_ones(api: Api) -> None:
    with api.client() as c:
        r = c.post("/jobs", json={**SPEC, "model": {"arch": "resnet9000", "norm": "foo"}})
    assert r.status_code == 422
    by_loc = {tuple(e["loc"]): e["msg"] for e in errors_of(r)}
    arch = by_loc[("model", "arch")]
    assert "resnet9000" in arch and all(a in arch for a in ("lenet", "resnet20", "edsr"))
    norm = by_loc[("model", "norm")]
    assert "foo" in norm and all(n in norm for n in ("bn", "gn", "ln", "none"))
    assert not any(m.startswith("Value error") for m in by_loc.values())


def test_model_over_the_parameter_limit_is_422_naming_the_numbers(api: Api) -> None:
    huge = {**SPEC, "model": {"arch": "resnet18", "width": 1024}}  # 2.9 billion parameters
    with api.client() as c:
        r = c.post("/jobs", json=huge)
        assert r.status_code == 422, r.text
        (error,) = errors_of(r)
        assert error["loc"] == ["model"]
        assert "2,856,707,082 parameters" in error["msg"] and "50,000,000" in error["msg"]
        # A spec the model builder refuses is a 422 at submit too, not a failed job later.
        odd = {**SPEC, "model": {"arch": "convblock", "norm": "gn:8", "width": 12}}
        r = c.post("/jobs", json=odd)
        assert r.status_code == 422
        assert "divisible by 8" in errors_of(r)[0]["msg"]
        # The default resnet18 (11 M parameters) is fine.
        submit(c, {**SPEC, "model": {"arch": "resnet18"}})


def test_api_reaper_requeues_a_dead_workers_job_and_publishes_it(api: Api) -> None:
    """No worker runs here: only the API's reaper can bring the job back."""
    from service.queue import queue_depths

    with api.client() as c:
        job_id = submit(c)["id"]
    settings = api.env.settings()
    before = queue_depths(settings)["cpu"]
    assert api.store.claim_job(job_id, worker_id="dead:1", lease_seconds=0.2) == 1
    job = wait_for(lambda: (j := api.store.get_job(job_id)).status == "queued" and j, timeout=15)
    assert job.attempt == 1 and job.status_reason == "worker lost; re-queued as attempt 2"
    assert [(h["worker"], h["outcome"]) for h in job.attempts] == [("dead:1", "lost")]
    wait_for(lambda: queue_depths(settings)["cpu"] == before + 1, timeout=10)


def test_negative_lr_and_unknown_field(api: Api) -> None:
    with api.client() as c:
        r = c.post("/jobs", json={**SPEC, "optim": {"lr": -0.1}, "epochz": 3})
    assert r.status_code == 422
    by_loc = {tuple(e["loc"]): e["msg"] for e in errors_of(r)}
    assert "greater than 0" in by_loc[("optim", "lr")] and "-0.1" in by_loc[("optim", "lr")]
    assert "epochz" in by_loc[("epochz",)] and "unknown field" in by_loc[("epochz",)]


def test_batch_size_one_with_bn_is_explained(api: Api) -> None:
    with api.client() as c:
        r = c.post("/jobs", json={**SPEC, "data": {"dataset": "synthetic", "batch_size": 1}})
        assert r.status_code == 422
        (err,) = errors_of(r)
        assert "batch_size 1" in err["msg"] and "gn:8" in err["msg"]
        # The same batch size with a per-sample norm is fine.
        ok = {**SPEC, "model": {"arch": "lenet", "norm": "gn:2"}}
        ok["data"] = {"dataset": "synthetic", "batch_size": 1}
        assert c.post("/jobs", json=ok).status_code == 201


def test_data_path_must_stay_under_data_root(api: Api, tmp_path: Path) -> None:
    root = api.env.data_root
    (root / "sets").mkdir(exist_ok=True)
    # a real .npz: the data is checked against the spec at submit (issue 17, item 8)
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20) % 2)
    (root / "sets" / "ok.npz").write_bytes(buf.getvalue())
    outside = tmp_path / "secret.npz"
    outside.write_bytes(b"x")
    link = root / "escape.npz"
    if not link.exists():
        link.symlink_to(outside)

    def npz(path: str) -> dict[str, Any]:
        return {**SPEC, "data": {"dataset": "npz", "path": path, "batch_size": 8}}

    with api.client() as c:
        for bad in ("../secret.npz", str(outside), "sets/../../secret.npz"):
            r = c.post("/jobs", json=npz(bad))
            assert r.status_code == 422, bad
            assert errors_of(r)[0]["loc"] == ["data", "path"]
        r = c.post("/jobs", json=npz("escape.npz"))
        assert r.status_code == 422
        assert "outside the data root" in errors_of(r)[0]["msg"]
        r = c.post("/jobs", json=npz("sets/missing.npz"))
        assert r.status_code == 422
        assert "does not exist" in errors_of(r)[0]["msg"]
        assert str(root) not in r.text  # the server's folders are not disclosed
        assert c.post("/jobs", json=npz("sets/ok.npz")).status_code == 201


def test_body_over_limit_is_413(api: Api) -> None:
    big = {**SPEC, "name": "x" * 30_000}
    with api.client() as c:
        r = c.post("/jobs", json=big)
        assert r.status_code == 413
        assert "20000" in r.json()["detail"]

        # No Content-Length (chunked): the streamed size is checked too.
        def chunks() -> Iterator[bytes]:
            for _ in range(30):
                yield b" " * 1000

        r = c.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413


def test_unknown_job_is_404_on_every_route(api: Api) -> None:
    missing = "0" * 32
    with api.client() as c:
        for method, path in [
            ("GET", f"/jobs/{missing}"),
            ("GET", f"/jobs/{missing}/metrics"),
            ("GET", f"/jobs/{missing}/logs"),
            ("GET", f"/jobs/{missing}/events"),
            ("POST", f"/jobs/{missing}/cancel"),
            ("GET", f"/jobs/{missing}/checkpoints"),
            ("GET", f"/jobs/{missing}/checkpoints/epoch-0001"),
            ("GET", f"/jobs/{missing}/checkpoints/epoch-0001/stats"),
        ]:
            r = c.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert missing in r.json()["detail"]


# ------------------------------------------------------------------------------- listing


def test_list_pages_with_cursor_newest_first(api: Api) -> None:
    with api.client("pager") as c:
        ids = [submit(c, {**SPEC, "name": f"p{i}"})["id"] for i in range(5)]
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = c.get("/jobs", params=params).json()
            pages += 1
            seen += [j["id"] for j in page["items"]]
            cursor = page["next"]
            if not cursor:
                break
        assert pages == 3
        assert seen == list(reversed(ids))
        c.post(f"/jobs/{ids[0]}/cancel")
        cancelled = c.get("/jobs", params={"status": "cancelled"}).json()["items"]
        assert [j["id"] for j in cancelled] == [ids[0]]
        queued = c.get("/jobs", params={"status": "queued"}).json()["items"]
        assert ids[0] not in {j["id"] for j in queued} and len(queued) == 4
        assert c.get("/jobs", params={"limit": 0}).status_code == 422
        assert c.get("/jobs", params={"limit": 201}).status_code == 422
        assert c.get("/jobs", params={"status": "done"}).status_code == 422
        assert c.get("/jobs", params={"cursor": "not-a-cursor"}).status_code == 400


def test_list_filters_by_name_and_tag(api: Api) -> None:
    with api.client("tagger") as c:
        a = submit(c, {**SPEC, "name": "sweep-a", "tags": ["sweep", "bn"]})["id"]
        b = submit(c, {**SPEC, "name": "sweep-b", "tags": ["sweep"]})["id"]
        other = submit(c, {**SPEC, "name": "sweep-a"})["id"]
        assert c.get(f"/jobs/{a}").json()["spec"]["tags"] == ["sweep", "bn"]

        def ids(**params: Any) -> list[str]:
            r = c.get("/jobs", params=params)
            assert r.status_code == 200, r.text
            return [j["id"] for j in r.json()["items"]]

        assert ids(name="sweep-a") == [other, a]
        assert ids(tag="sweep") == [b, a]
        assert ids(tag="bn") == [a]
        assert ids(tag="sweep", name="sweep-b") == [b]
        assert ids(tag="sweep", status="cancelled") == []
        assert ids(tag="nothing") == [] and ids(name="nobody") == []
        # Paging within a filter.
        page = c.get("/jobs", params={"tag": "sweep", "limit": 1}).json()
        assert [j["id"] for j in page["items"]] == [b]
        assert ids(tag="sweep", limit=1, cursor=page["next"]) == [a]
    with api.client("someone-else") as c:
        assert c.get("/jobs", params={"tag": "sweep"}).json()["items"] == []
    with api.client("tagger") as c:
        bad = c.post("/jobs", json={**SPEC, "tags": ["has space"]})
        assert bad.status_code == 422 and errors_of(bad)[0]["loc"][:2] == ["tags", 0]
        assert c.post("/jobs", json={**SPEC, "tags": ["t"] * 17}).status_code == 422
        assert c.get("/jobs", params={"tag": ""}).status_code == 422


def test_unknown_query_parameters_are_422_naming_them(api: Api) -> None:
    with api.client() as c:
        job_id = submit(c)["id"]
        for path, params in [
            ("/jobs", {"stauts": "running"}),
            ("/jobs", {"owner": "bob", "limit": 5}),
            (f"/jobs/{job_id}", {"verbose": "1"}),
            (f"/jobs/{job_id}/metrics", {"since": "3"}),
            (f"/jobs/{job_id}/logs", {"after": 0, "level": "error"}),
            (f"/jobs/{job_id}/checkpoints", {"x": "1"}),
            ("/workers", {"live": "true"}),
            ("/healthz", {"probe": "1"}),
        ]:
            r = c.get(path, params=params)
            assert r.status_code == 422, (path, r.status_code, r.text)
            unknown = [k for k in params if k not in ("limit", "after")]
            errors = errors_of(r)
            assert [e["loc"] for e in errors] == [["query", k] for k in sorted(unknown)]
            assert all(e["type"] == "unknown_parameter" for e in errors)
            assert f"unknown query parameter {unknown[0]!r}" in errors[0]["msg"]
        r = c.post(f"/jobs/{job_id}/cancel", params={"force": "1"})
        assert r.status_code == 422 and "takes: none" in errors_of(r)[0]["msg"]
        r = c.post("/jobs", json=SPEC, params={"dry_run": "1"})
        assert r.status_code == 422 and errors_of(r)[0]["loc"] == ["query", "dry_run"]
        # Declared parameters still work, and a 422 comes before authentication is needed.
        assert c.get("/jobs", params={"limit": 1}).status_code == 200
    assert httpx.get(f"{api.url}/jobs", params={"nope": "1"}).status_code == 422


# -------------------------------------------------------------------------- metrics, logs


def test_metrics_polling_with_after(api: Api) -> None:
    job_id, attempt = running_job(api)
    rows = [
        {"step": s, "epoch": 1 + s // 3, "split": "train", "values": {"loss": 1.0 / s}, "time": 1.0}
        for s in range(1, 6)
    ]
    api.store.add_metrics(job_id, attempt=attempt, rows=rows)
    with api.client() as c:
        first = c.get(f"/jobs/{job_id}/metrics", params={"after": 0, "limit": 2}).json()
        assert [r["step"] for r in first["items"]] == [1, 2]
        assert first["next"] == first["items"][-1]["seq"]
        rest = c.get(f"/jobs/{job_id}/metrics", params={"after": first["next"]}).json()
        assert [r["step"] for r in rest["items"]] == [3, 4, 5]
        assert rest["items"][0]["values"] == {"loss": pytest.approx(1 / 3)}
        assert rest["items"][0]["split"] == "train"
        # epoch counts epochs: an int in JSON (2, never 2.0), as the worker writes it.
        assert [r["epoch"] for r in first["items"] + rest["items"]] == [1, 1, 2, 2, 2]
        assert all(type(r["epoch"]) is int for r in rest["items"])
        # Nothing new: same cursor back, no rows.
        empty = c.get(f"/jobs/{job_id}/metrics", params={"after": rest["next"]}).json()
        assert empty == {"items": [], "next": rest["next"]}
        # A rewritten row comes back once more, under a new seq.
        api.store.add_metrics(
            job_id,
            attempt=attempt,
            rows=[{"step": 5, "epoch": 2.0, "split": "train", "values": {"loss": 0.1}}],
        )
        again = c.get(f"/jobs/{job_id}/metrics", params={"after": rest["next"]}).json()
        assert [(r["step"], r["values"]["loss"]) for r in again["items"]] == [(5, 0.1)]
        assert again["next"] > rest["next"]
        detail = c.get(f"/jobs/{job_id}").json()
        assert detail["status"] == "running" and detail["attempt"] == 1
        assert detail["last_metrics"]["train"]["values"] == {"loss": 0.1}
        assert type(detail["last_metrics"]["train"]["epoch"]) is int
        with pytest.raises(ValueError, match="whole"):  # a fractional epoch is refused
            api.store.add_metrics(
                job_id,
                attempt=attempt,
                rows=[{"step": 6, "epoch": 0.5, "split": "train", "values": {}}],
            )
        assert c.get(f"/jobs/{job_id}/metrics", params={"after": -1}).status_code == 422
        assert c.get(f"/jobs/{job_id}/metrics", params={"limit": 0}).status_code == 422


def test_logs(api: Api) -> None:
    job_id, attempt = running_job(api)
    api.store.add_logs(
        job_id, attempt=attempt, lines=[("info", "epoch 1 started"), ("warning", "slow")]
    )
    with api.client() as c:
        page = c.get(f"/jobs/{job_id}/logs").json()
        assert [(x["level"], x["message"]) for x in page["items"]] == [
            ("info", "epoch 1 started"),
            ("warning", "slow"),
        ]
        assert page["next"] == page["items"][-1]["seq"]
        after = c.get(f"/jobs/{job_id}/logs", params={"after": page["items"][0]["seq"]}).json()
        assert [x["message"] for x in after["items"]] == ["slow"]


def test_cancel_queued_and_running(api: Api) -> None:
    with api.client() as c:
        queued = submit(c)
        r = c.post(f"/jobs/{queued['id']}/cancel")
        assert r.status_code == 202
        assert r.json()["status"] == "cancelled"
        job_id, _ = running_job(api)
        r = c.post(f"/jobs/{job_id}/cancel")
        assert r.status_code == 202
        assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True


# --------------------------------------------------------------------------- checkpoints


def write_checkpoint(
    api: Api, job_id: str, attempt: int, name: str = "epoch-0001", tensors: dict | None = None
) -> dict:
    """A model.safetensors with BN buffers (or ``tensors``) in the job's folder, recorded in
    the store."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = tensors or {
        "features.0.weight": torch.randn(4, 1, 3, 3, generator=gen),
        "features.1.weight": torch.rand(4, generator=gen),
        "features.1.bias": torch.randn(4, generator=gen),
        "features.1.running_mean": torch.randn(4, generator=gen),
        "features.1.running_var": torch.rand(4, generator=gen) + 0.5,
        "features.1.num_batches_tracked": torch.tensor(12),
        "head.weight": torch.randn(10, 4, generator=gen),
    }
    folder = api.env.artifact_dir / "jobs" / job_id / "checkpoints" / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    api.store.add_checkpoint(
        job_id,
        attempt=attempt,
        name=name,
        epoch=1,
        step=8,
        bytes=len(data),
        sha256=sha,
        files={"model.safetensors": sha},
        metrics={"val_accuracy": 0.5},
        path=str(folder),
    )
    return {"data": data, "sha256": sha, "tensors": tensors}


def test_checkpoint_list_download_etag_range_and_stats(api: Api) -> None:
    job_id, attempt = running_job(api)
    ckpt = write_checkpoint(api, job_id, attempt)
    data, sha = ckpt["data"], ckpt["sha256"]
    url = f"/jobs/{job_id}/checkpoints/epoch-0001"
    with api.client() as c:
        listed = c.get(f"/jobs/{job_id}/checkpoints").json()
        assert [(x["name"], x["epoch"], x["step"], x["bytes"], x["sha256"]) for x in listed] == [
            ("epoch-0001", 1, 8, len(data), sha)
        ]
        assert listed[0]["metrics"] == {"val_accuracy": 0.5}
        assert c.get(f"/jobs/{job_id}").json()["checkpoints"][0]["sha256"] == sha

        full = c.get(url)
        assert full.status_code == 200
        assert full.content == data
        assert full.headers["etag"] == f'"{sha}"'
        assert full.headers["accept-ranges"] == "bytes"

        cached = c.get(url, headers={"If-None-Match": f'"{sha}"'})
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == f'"{sha}"'
        assert c.get(url, headers={"If-None-Match": '"other"'}).status_code == 200

        part = c.get(url, headers={"Range": "bytes=10-109"})
        assert part.status_code == 206
        assert part.content == data[10:110]
        assert part.headers["content-range"] == f"bytes 10-109/{len(data)}"

        assert c.get(f"/jobs/{job_id}/checkpoints/epoch-0042").status_code == 404

        stats = c.get(f"{url}/stats")
        assert stats.status_code == 200
        body = stats.json()
        assert body["checkpoint"] == "epoch-0001"
        (layer,) = [x for x in body["layers"] if x["name"] == "features.1"]
        tensors = ckpt["tensors"]
        assert layer["num_channels"] == 4
        assert layer["running_mean"] == pytest.approx(tensors["features.1.running_mean"].tolist())
        assert layer["running_var"] == pytest.approx(tensors["features.1.running_var"].tolist())
        assert layer["summary"]["num_batches_tracked"] == 12
        assert c.get(f"/jobs/{job_id}/checkpoints/nope/stats").status_code == 404


def test_stats_class_names_the_torch_class_as_norms_does(api: Api) -> None:
    """/stats rows carry "class" (BatchNorm2d), the name /norms and norm_stats give as "kind";
    its own "kind" stays the state family ("batchnorm") for older clients."""
    import torch

    from normcore.models import build_model
    from normcore.spec import ModelSpec

    job_id, attempt = running_job(api)
    model = build_model(ModelSpec.model_validate(SPEC["model"]), in_channels=1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_checkpoint(api, job_id, attempt, tensors=state)
    with api.client() as c:
        layers = c.get(f"/jobs/{job_id}/checkpoints/epoch-0001/stats").json()["layers"]
    by_name = {row["name"]: (row["kind"], row["class"]) for row in layers}
    assert by_name == {
        name: ("batchnorm", type(m).__name__)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert {c for _, c in by_name.values()} == {"BatchNorm1d", "BatchNorm2d"}


def test_checkpoint_path_outside_job_folder_is_refused(api: Api, tmp_path: Path) -> None:
    job_id, attempt = running_job(api)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.safetensors").write_bytes(b"secret")
    api.store.add_checkpoint(
        job_id,
        attempt=attempt,
        name="epoch-0002",
        epoch=2,
        step=16,
        bytes=6,
        sha256=hashlib.sha256(b"secret").hexdigest(),
        files={},
        metrics={},
        path=str(elsewhere),
    )
    # A symlink inside the job folder that points out is refused as well.
    job_dir = api.env.artifact_dir / "jobs" / job_id / "checkpoints"
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "epoch-0003").symlink_to(elsewhere)
    api.store.add_checkpoint(
        job_id,
        attempt=attempt,
        name="epoch-0003",
        epoch=3,
        step=24,
        bytes=6,
        sha256=hashlib.sha256(b"secret").hexdigest(),
        files={},
        metrics={},
        path=str(job_dir / "epoch-0003"),
    )
    with api.client() as c:
        for name in ("epoch-0002", "epoch-0003"):
            r = c.get(f"/jobs/{job_id}/checkpoints/{name}")
            assert r.status_code == 404
            assert b"secret" not in r.content
            assert c.get(f"/jobs/{job_id}/checkpoints/{name}/stats").status_code == 404


# ---------------------------------------------------------------------------------- events


def read_events(response: httpx.Response, limit: int = 1000) -> Iterator[dict[str, str]]:
    """Parse a text/event-stream into dicts of its fields (comments skipped)."""
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if event:
                yield event
                event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        event[key] = event[key] + "\n" + value if key in event else value


def test_events_stream_metrics_and_status_until_finished(api: Api) -> None:
    job_id, attempt = running_job(api)
    api.store.add_metrics(
        job_id,
        attempt=attempt,
        rows=[{"step": 1, "epoch": 1, "split": "train", "values": {"loss": 2.0}}],
    )

    def later() -> None:
        time.sleep(1.0)
        api.store.add_metrics(
            job_id,
            attempt=attempt,
            rows=[{"step": 2, "epoch": 1, "split": "val", "values": {"accuracy": 0.5}}],
        )
        time.sleep(0.6)
        api.store.finish_job(job_id, attempt=attempt, status="succeeded")

    writer = threading.Thread(target=later)
    writer.start()
    start = time.monotonic()
    with api.client() as c, c.stream("GET", f"/jobs/{job_id}/events", timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(r))
    writer.join()
    assert time.monotonic() - start < 20
    kinds = [e.get("event") for e in events]
    assert kinds[0] == "status"
    metrics = [json.loads(e["data"]) for e in events if e.get("event") == "metric"]
    assert [(m["step"], m["split"]) for m in metrics] == [(1, "train"), (2, "val")]
    assert [int(e["id"]) for e in events if e.get("event") == "metric"] == [
        m["seq"] for m in metrics
    ]
    statuses = [json.loads(e["data"])["status"] for e in events if e.get("event") == "status"]
    assert statuses[0] == "running" and statuses[-1] == "succeeded"

    # A reconnect with Last-Event-ID gets only what came after.
    with (
        api.client() as c,
        c.stream(
            "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(metrics[0]["seq"])}
        ) as r,
    ):
        replay = list(read_events(r))
    steps = [json.loads(e["data"])["step"] for e in replay if e.get("event") == "metric"]
    assert steps == [2]
    with (
        api.client() as c,
        c.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "9" * 40}) as r,
    ):
        assert r.status_code == 200
        assert [e.get("event") for e in read_events(r)] == ["status"]


# ------------------------------------------------------------------ health and Prometheus


def test_healthz_readyz_public(api: Api) -> None:
    assert httpx.get(f"{api.url}/healthz").json() == {"status": "ok"}
    r = httpx.get(f"{api.url}/readyz", timeout=30)
    assert r.status_code == 200
    assert r.json()["store"] is True and r.json()["broker"] is True


def test_prometheus_metrics(api: Api) -> None:
    with api.client("metrics-user") as c:
        submit(c)
        c.get("/jobs/" + "f" * 32)
    text = httpx.get(f"{api.url}/metrics").text
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    counts = api.store.count_by_status()
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert samples[f'normcore_jobs{{status="{state}"}}'] == counts[state]
    assert counts["queued"] >= 1
    assert "normcore_queue_depth" in samples
    assert samples['normcore_http_requests_total{method="POST",route="/jobs",status="201"}'] >= 1
    assert (
        samples['normcore_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"}']
        >= 1
    )
    assert samples['normcore_http_request_duration_seconds_count{method="POST",route="/jobs"}'] >= 1
    # Route templates, never raw ids, so label cardinality stays bounded.
    assert "f" * 32 not in text


def test_readyz_503_names_the_dead_broker_and_jobs_are_still_accepted(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc", NORMCORE_BROKER_URL="redis://127.0.0.1:1/0")
    env.store().dispose()
    proc, url = start_api(env)
    try:
        r = httpx.get(f"{url}/readyz", timeout=30)
        assert r.status_code == 503
        body = r.json()
        assert body["store"] is True and body["broker"] is False
        assert "broker" in body["detail"]
        # A submission is stored even though it cannot be enqueued (the store is the source of
        # truth): 201 with the reason on the job, marked for the reapers to publish. A retry
        # with the same Idempotency-Key answers the same job and tries the broker again.
        store = env.store()
        token = store.create_token("eve", "eve-tok")
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "k"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
            r = c.post("/jobs", json=SPEC)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            assert r.json()["status"] == "queued"
            assert r.json()["status_reason"].startswith("enqueue failed: ")
            job = store.get_job(job_id)
            assert job.enqueued_at is None  # due for a republish on the next reaper round
            again = c.post("/jobs", json=SPEC)
            assert again.status_code == 200 and again.json()["id"] == job_id
            assert again.json()["status_reason"].startswith("enqueue failed: ")
            assert [j["id"] for j in c.get("/jobs").json()["items"]] == [job_id]
        store.dispose()
    finally:
        proc.stop()


def test_quota_and_auth_off_on_loopback(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc", NORMCORE_AUTH="false", NORMCORE_MAX_ACTIVE_JOBS_PER_USER="2")
    env.store().dispose()
    proc, url = start_api(env)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:  # no token: the local admin
            ids = [c.post("/jobs", json=SPEC, headers={"Idempotency-Key": f"q{i}"}) for i in (0, 1)]
            assert [r.status_code for r in ids] == [201, 201]
            r = c.post("/jobs", json=SPEC)
            assert r.status_code == 429
            assert r.json()["detail"]["active"] == 2 and r.json()["detail"]["limit"] == 2
            # A retry of an accepted submission still answers with its job.
            again = c.post("/jobs", json=SPEC, headers={"Idempotency-Key": "q1"})
            assert again.status_code == 200 and again.json()["id"] == ids[1].json()["id"]
            c.post(f"/jobs/{ids[0].json()['id']}/cancel")
            assert c.post("/jobs", json=SPEC).status_code == 201
            assert len(c.get("/jobs").json()["items"]) == 3
    finally:
        proc.stop()


def test_app_refuses_auth_off_beyond_loopback(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc", NORMCORE_AUTH="false", NORMCORE_HOST="0.0.0.0")
    proc = Proc(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "service.api.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        env,
        "api-insecure",
    )
    try:
        proc.popen.wait(60)
        assert proc.popen.returncode != 0
        assert "loopback" in proc.log()
    finally:
        proc.stop()
