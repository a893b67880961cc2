"""PATCH /jobs/{id}: a job's tags and note, on a real API process over SQLite and PostgreSQL;
the client's ``label`` and the ``normcore tag`` command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from normcore.client import ApiError, Client
from service.cli import app as cli_app
from tests.harness import Proc, ServiceEnv, make_env, start_api
from tests.service.store_backends import BACKENDS, pg_database

SPEC: dict[str, Any] = {
    "name": "patch-me",
    "tags": ["first", "shared"],
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "synthetic", "batch_size": 8},
    "epochs": 1,
}

pytestmark = pytest.mark.xdist_group("service-patch-job")


@dataclass
class Api:
    env: ServiceEnv
    proc: Proc
    url: str
    alice: str
    bob: str
    store: Any

    def new_job(self) -> dict[str, Any]:
        """A queued job of alice's with SPEC's tags, written to the store directly (a submit
        through the API builds the model to check it: seconds on a busy machine)."""
        owner = self.store.get_user("alice")
        job, _ = self.store.create_job(
            owner_id=owner.id, spec=SPEC, name=SPEC["name"], queue="cpu", tags=SPEC["tags"]
        )
        with self.client() as c:
            return c.get(f"/jobs/{job.id}").json()

    def client(self, token: str | None = None) -> httpx.Client:
        token = token or self.alice
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One API process per backend (no worker: the jobs stay queued, which PATCH allows)."""
    data_dir = tmp_path_factory.mktemp(f"patch-{request.param}") / "nc"
    if request.param == "sqlite":
        env = make_env(data_dir)
    else:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
        db = 1 + (int(worker[2:]) if worker[2:].isdigit() else 0) % 15
        env = make_env(
            data_dir,
            mode="cluster",
            postgres_url=request.getfixturevalue("pg_url"),
            redis_url=f"redis://127.0.0.1:6379/{db}",
        )
    store = env.store()
    alice = store.create_token("alice", "alice-token")
    bob = store.create_token("bob", "bob-token")
    proc, url = start_api(env)
    try:
        yield Api(env, proc, url, alice, bob, store)
    finally:
        proc.stop()
        store.dispose()


def test_patch_replaces_tags_and_sets_the_note(api: Api) -> None:
    job = api.new_job()
    assert job["note"] is None and job["spec"]["tags"] == ["first", "shared"]
    with api.client() as c:
        r = c.patch(f"/jobs/{job['id']}", json={"tags": ["bn-run", "lr:0.1", "bn-run"]})
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["tags"] == ["bn-run", "lr:0.1"]  # duplicates dropped
        assert r.json()["note"] is None  # left out: unchanged

        note = "warmup too short?\n\tsee run 12 (ü, 日本)"
        r = c.patch(f"/jobs/{job['id']}", json={"note": note})
        assert r.status_code == 200, r.text
        got = c.get(f"/jobs/{job['id']}").json()
        assert got["note"] == note and got["spec"]["tags"] == ["bn-run", "lr:0.1"]
        # The list route filters by the new tags, not the old ones, and carries the note.
        by_tag = c.get("/jobs", params={"tag": "lr:0.1"}).json()["items"]
        assert [j["id"] for j in by_tag] == [job["id"]] and by_tag[0]["note"] == note
        assert job["id"] not in [
            j["id"] for j in c.get("/jobs", params={"tag": "first"}).json()["items"]
        ]

        r = c.patch(f"/jobs/{job['id']}", json={"tags": [], "note": ""})
        assert r.status_code == 200, r.text
        assert r.json()["spec"]["tags"] == [] and r.json()["note"] is None
        assert c.get("/jobs", params={"tag": "bn-run"}).json()["items"] == []
        # The rest of the spec is untouched.
        assert {k: v for k, v in r.json()["spec"].items() if k != "tags"} == {
            k: v for k, v in job["spec"].items() if k != "tags"
        }


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({}, None, "nothing to change"),
        ({"tags": None}, None, "not null"),
        ({"tags": ["has space"]}, "tags", "pattern"),
        ({"tags": [""]}, "tags", "at least 1"),
        ({"tags": ["x" * 65]}, "tags", "at most 64"),
        ({"tags": [f"t{i}" for i in range(17)]}, "tags", "at most 16"),
        ({"tags": "single"}, "tags", "list"),
        ({"note": "x" * 2001}, "note", "at most 2000"),
        ({"note": "nul\x00byte"}, "note", "control characters"),
        ({"note": "bell\x07"}, "note", "control characters"),
        ({"note": 5}, "note", "string"),
        ({"name": "renamed"}, "name", "extra"),
    ],
)
def test_patch_refuses_what_submit_would_refuse(
    api: Api, body: dict[str, Any], field: str | None, words: str
) -> None:
    job = api.new_job()
    with api.client() as c:
        r = c.patch(f"/jobs/{job['id']}", json=body)
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        text = str(detail).lower()
        assert words.lower() in text, detail
        if field is not None:
            assert any(field in e["loc"] for e in detail), detail
        after = c.get(f"/jobs/{job['id']}").json()
    assert after["spec"]["tags"] == SPEC["tags"] and after["note"] is None


def test_patch_bad_bodies_are_4xx(api: Api) -> None:
    job = api.new_job()
    with api.client() as c:
        for content in (b"not json", b"[1, 2]", b'"note"', b"{"):
            r = c.patch(
                f"/jobs/{job['id']}", content=content, headers={"Content-Type": "application/json"}
            )
            assert r.status_code in (400, 422), (content, r.status_code, r.text)
            assert r.json()["detail"], r.text


def test_other_users_and_unknown_ids_get_404(api: Api) -> None:
    job = api.new_job()
    with api.client(api.bob) as bob:
        r = bob.patch(f"/jobs/{job['id']}", json={"note": "mine now", "tags": ["bob"]})
        assert r.status_code == 404, r.text
        assert bob.get("/jobs", params={"tag": "bob"}).json()["items"] == []
    with api.client() as c:
        assert c.get(f"/jobs/{job['id']}").json()["note"] is None
        assert c.patch("/jobs/" + "0" * 32, json={"note": "x"}).status_code == 404
        assert c.patch("/jobs/a%00b", json={"note": "x"}).status_code == 404
    with httpx.Client(base_url=api.url) as anonymous:
        assert anonymous.patch(f"/jobs/{job['id']}", json={"note": "x"}).status_code == 401


def test_client_label_and_cli_tag(api: Api, tmp_path: Path) -> None:
    if api.env.mode != "sqlite":
        pytest.skip("the client and CLI are the same over either backend")
    job = api.new_job()
    with Client(api.url, token=api.alice) as client:
        out = client.label(job["id"], add=["added"], remove=["first"], note="from the client")
        assert out["spec"]["tags"] == ["shared", "added"] and out["note"] == "from the client"
        with pytest.raises(ApiError) as err:
            client.label(job["id"], add=["bad tag"])
        assert err.value.status == 422
    env = {
        **api.env.env,
        "NORMCORE_URL": api.url,
        "NORMCORE_TOKEN": api.alice,
        "XDG_CONFIG_HOME": str(tmp_path / "config-home"),
    }
    runner = CliRunner()
    result = runner.invoke(
        cli_app,
        ["tag", job["id"], "--add", "cli", "--remove", "shared", "--note", "via CLI"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "added, cli" in result.output and "via CLI" in result.output
    with api.client() as c:
        got = c.get(f"/jobs/{job['id']}").json()
    assert got["spec"]["tags"] == ["added", "cli"] and got["note"] == "via CLI"
    result = runner.invoke(cli_app, ["tag", job["id"]], env=env)
    assert result.exit_code != 0 and "nothing to change" in result.output
