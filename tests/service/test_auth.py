"""Bearer-token auth against a real API process: 401s, revocation, public routes, and one
user never seeing another's jobs (404, not 403) while an admin sees all."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from service.auth import (
    TOKEN_CACHE_TTL_S,
    AuthError,
    check_auth_allowed,
    is_loopback,
    parse_bearer,
)
from tests.harness import Proc, ServiceEnv, make_env, start_api

SPEC: dict[str, Any] = {
    "name": "auth-test",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8},
    "epochs": 1,
}

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-auth")


@dataclass
class Deployment:
    env: ServiceEnv
    proc: Proc
    url: str
    store: Any
    alice: str
    bob: str
    admin: str

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    env = make_env(tmp_path_factory.mktemp("auth") / "nc")
    store = env.store()
    alice = store.create_token("alice", "alice-laptop")
    bob = store.create_token("bob", "bob-laptop")
    admin = store.create_token("root", "root-token", admin=True)
    proc, url = start_api(env)
    try:
        yield Deployment(env, proc, url, store, alice, bob, admin)
    finally:
        proc.stop()
        store.dispose()


@pytest.fixture(scope="module")
def alice_job(dep: Deployment) -> str:
    """A running job of alice's with a metric row, a log line and a checkpoint file."""
    import torch
    from safetensors.torch import save_file

    with dep.client(dep.alice) as c:
        job_id = c.post("/jobs", json=SPEC).json()["id"]
    attempt = dep.store.claim_job(job_id, worker_id="w", lease_seconds=600)
    dep.store.add_metrics(
        job_id, attempt=attempt, rows=[{"step": 1, "split": "train", "values": {"loss": 1.0}}]
    )
    dep.store.add_logs(job_id, attempt=attempt, lines=[("info", "hello")])
    folder = dep.env.artifact_dir / "jobs" / job_id / "checkpoints" / "epoch-0001"
    folder.mkdir(parents=True)
    save_file(
        {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)},
        str(folder / "model.safetensors"),
    )
    data = (folder / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    dep.store.add_checkpoint(
        job_id,
        attempt=attempt,
        name="epoch-0001",
        epoch=1,
        step=1,
        bytes=len(data),
        sha256=sha,
        files={"model.safetensors": sha},
        metrics={},
        path=str(folder),
    )
    return job_id


def job_routes(job_id: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/metrics"),
        ("GET", f"/jobs/{job_id}/logs"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/checkpoints"),
        ("GET", f"/jobs/{job_id}/checkpoints/epoch-0001"),
        ("GET", f"/jobs/{job_id}/checkpoints/epoch-0001/stats"),
        ("GET", f"/jobs/{job_id}/norms"),
        ("POST", f"/jobs/{job_id}/cancel"),  # last: it changes the job
    ]


def all_token_routes(job_id: str) -> list[tuple[str, str]]:
    """Every route that needs a token, with a real job in the job routes (DELETE last)."""
    return [
        ("GET", "/jobs"),
        ("POST", "/jobs"),
        ("GET", "/workers"),
        *job_routes(job_id),
        # exports (a 202 or 422 for the owner here; their 404s: tests/e2e/test_exports_e2e.py)
        ("GET", f"/jobs/{job_id}/checkpoints/epoch-0001/export"),
        ("GET", f"/jobs/{job_id}/checkpoints/epoch-0001/export/certificate"),
        ("POST", f"/jobs/{job_id}/checkpoints/epoch-0001/recalibrate"),
        ("GET", f"/jobs/{job_id}/artifacts"),
        ("GET", f"/jobs/{job_id}/artifacts/ARTIFACT"),
        ("GET", f"/jobs/{job_id}/checkpoints/epoch-0001/diff?against={job_id}/epoch-0001"),
        ("PATCH", f"/jobs/{job_id}"),
        ("POST", "/jobs/validate"),
        # sweeps (their owner and other-user behaviour: tests/service/test_sweeps.py)
        ("GET", "/sweeps"),
        ("POST", "/sweeps"),
        ("GET", "/sweeps/SWEEP"),
        ("GET", "/sweeps/SWEEP/report"),
        ("POST", "/sweeps/SWEEP/cancel"),
        ("DELETE", "/sweeps/SWEEP"),
        ("DELETE", f"/jobs/{job_id}"),
    ]


def test_missing_malformed_and_bad_tokens_are_401(dep: Deployment, alice_job: str) -> None:
    for headers in (
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer nc_not-a-real-token"},
    ):
        for method, path in all_token_routes(alice_job):
            r = httpx.request(method, dep.url + path, headers=headers, json=SPEC, timeout=30)
            assert r.status_code == 401, (headers, method, path)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["detail"]
    assert dep.store.get_job(alice_job).cancel_requested is False


def test_revoked_token_is_401(dep: Deployment, alice_job: str) -> None:
    token = dep.store.create_token("alice", "alice-old")
    with dep.client(token) as c:
        assert c.get("/jobs").status_code == 200
        assert c.get(f"/jobs/{alice_job}").status_code == 200
        assert dep.store.revoke_token("alice-old") is True
        # The API trusts a token lookup for TOKEN_CACHE_TTL_S (tests/service/test_read_path.py
        # checks the revocation lands within it).
        time.sleep(TOKEN_CACHE_TTL_S)
        for method, path in all_token_routes(alice_job):
            r = c.request(method, path, json=SPEC)
            assert r.status_code == 401, (method, path)
            assert "revoked" in r.json()["detail"]
    assert dep.store.get_job(alice_job).cancel_requested is False


def test_public_routes_need_no_token(dep: Deployment) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/schema/jobspec"):
        assert httpx.get(dep.url + path, timeout=30).status_code == 200, path


def test_job_routes_cover_every_route_of_a_job(dep: Deployment) -> None:
    """The lists above test every operation the API documents, so a new route gets tested."""
    paths = httpx.get(f"{dep.url}/openapi.json", timeout=30).json()["paths"]
    documented = {
        (method.upper(), path)
        for path, item in paths.items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
        and path != "/schema/jobspec"
        and path not in ("/healthz", "/readyz", "/metrics")
    }
    tested = {
        (
            method,
            path.split("?")[0]
            .replace("JOB", "{job_id}")
            .replace("epoch-0001", "{name}")
            .replace("ARTIFACT", "{artifact_id}")
            .replace("SWEEP", "{sweep_id}"),
        )
        for method, path in all_token_routes("JOB")
    }
    assert documented == tested


def test_other_users_job_is_404_everywhere(dep: Deployment, alice_job: str) -> None:
    with dep.client(dep.bob) as bob:
        for method, path in job_routes(alice_job):
            r = bob.request(method, path)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["detail"] == f"job {alice_job!r} not found"
        assert bob.delete(f"/jobs/{alice_job}").status_code == 404
        assert alice_job not in {j["id"] for j in bob.get("/jobs").json()["items"]}
    assert dep.store.get_job(alice_job).cancel_requested is False


def test_owner_and_admin_reach_every_route(dep: Deployment, alice_job: str) -> None:
    with dep.client(dep.bob) as bob:
        bobs_job = bob.post("/jobs", json=SPEC).json()["id"]
    with dep.client(dep.alice) as alice:
        for method, path in job_routes(alice_job)[:-1]:
            if path.endswith("/events"):
                continue  # the stream of a running job does not end; covered in test_api
            assert alice.request(method, path).status_code == 200, path
        mine = {j["id"] for j in alice.get("/jobs").json()["items"]}
        assert alice_job in mine and bobs_job not in mine
    with dep.client(dep.admin) as admin:
        everyone = {j["id"] for j in admin.get("/jobs").json()["items"]}
        assert {alice_job, bobs_job} <= everyone
        for method, path in job_routes(alice_job):
            if path.endswith("/events"):
                continue
            assert admin.request(method, path).status_code in (200, 202), path
    assert dep.store.get_job(alice_job).cancel_requested is True


def test_norms_layer_filter_names_the_real_layers(dep: Deployment) -> None:
    with dep.client(dep.alice) as alice:
        job_id = alice.post("/jobs", json=SPEC).json()["id"]
        path = f"/jobs/{job_id}/norms"
        # no telemetry yet: any layer reads as an empty page
        assert alice.get(path, params={"layer": "nope"}).json()["items"] == []
        attempt = dep.store.claim_job(job_id, worker_id="w", lease_seconds=600)
        names = ("conv1.norm", "conv2.norm")
        layers = [{"layer": n, "kind": "BatchNorm2d", "var_mean": 1.0} for n in names]
        record = {"step": 0, "epoch": 0, "trigger": "start", "time": 1.0, "layers": layers}
        dep.store.add_norms(job_id, attempt=attempt, records=[record])
        for extra in ({}, {"max_points": 10}):
            r = alice.get(path, params={"layer": "nope", **extra})
            assert r.status_code == 422, r.text
            assert "'nope'" in r.text and "conv1.norm, conv2.norm" in r.text
        page = alice.get(path, params={"layer": "conv2.norm"}).json()
        assert [row["layer"] for row in page["items"]] == ["conv2.norm"]
        assert page["items"][0]["values"]["class"] == "BatchNorm2d"  # the name /stats uses
        # a later empty page of a real layer is no error
        after = {"layer": "conv2.norm", "after": page["next"]}
        assert alice.get(path, params=after).json()["items"] == []


def test_loopback_rules() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.com", "", None):
        assert not is_loopback(host), host
    check_auth_allowed(True, "0.0.0.0")
    check_auth_allowed(False, "127.0.0.1")
    with pytest.raises(RuntimeError, match="loopback"):
        check_auth_allowed(False, "0.0.0.0")


def test_parse_bearer() -> None:
    assert parse_bearer("Bearer abc") == "abc"
    assert parse_bearer("bearer  abc ") == "abc"
    for bad in (None, "", "Bearer", "Token abc", "Bearer "):
        with pytest.raises(AuthError):
            parse_bearer(bad)
