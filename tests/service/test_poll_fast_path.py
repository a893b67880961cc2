"""The follower's poll fast path (service/api/poll.py, issue 12): it answers
``GET /jobs/{id}/metrics?after=N[&limit=M]`` with the route's exact page, and hands every other
request (other parameters, malformed numbers, unknown or revoked tokens, foreign or missing
jobs) to the route unchanged; on SQLite and PostgreSQL. A page longer than ``INLINE_PAGE_ROWS``
is read on a thread and is the same page."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service import auth
from service.api import poll, routes_jobs
from service.api.app import create_app
from service.api.poll import PollFastPath, find_route, parse_poll_query
from service.db import metadata
from service.db import metrics as metrics_t
from service.store import Store
from tests.harness import make_env
from tests.service.store_backends import BACKENDS, pg_database

pytestmark = pytest.mark.xdist_group("service-poll-fast-path")

PASSED_ON = 599  # the status of the stand-in app behind the fast path


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


class Api:
    """The real app on one backend, alice's token and job, and bob's token."""

    def __init__(self, app: Any, store: Store, alice: str, bob: str, job_id: str) -> None:
        self.app, self.store, self.alice, self.bob, self.job_id = app, store, alice, bob, job_id
        self.client = TestClient(app)

    def route(self, query: str, token: str) -> tuple[int, bytes]:
        """Through the full app (the fast path included)."""
        r = self.client.get(
            f"/jobs/{self.job_id}/metrics?{query}", headers={"Authorization": f"Bearer {token}"}
        )
        return r.status_code, r.content

    def fast(
        self, path: str, query: str, token: str | None, method: str = "GET"
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """The fast path alone, in front of an app that answers PASSED_ON."""

        async def passed_on(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": PASSED_ON, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "root_path": "",
            "query_string": query.encode(),
            "headers": headers,
            "app": self.app,
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        fast = PollFastPath(passed_on, self.app.state, find_route(routes_jobs.router.routes))
        asyncio.run(fast(scope, receive, send))
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


@pytest.fixture(params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Api]:
    if request.param == "sqlite":
        env = make_env(tmp_path / "nc")
    else:
        env = make_env(
            tmp_path / "nc",
            mode="cluster",
            postgres_url=request.getfixturevalue("pg_url"),
            redis_url="redis://127.0.0.1:6379/15",
        )
    app = create_app(env.settings())
    store: Store = app.state.store
    if request.param == "postgresql":
        names = ", ".join(t.name for t in metadata.sorted_tables if t.name != "alembic_version")
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    alice = store.create_token("alice", "alice-token")
    bob = store.create_token("bob", "bob-token")
    user = store.get_user("alice")
    assert user is not None
    job, _ = store.create_job(owner_id=user.id, spec={}, name="poll", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    # JSON on PostgreSQL refuses NaN and infinities; SQLite keeps them (the route sends null).
    odd = {"nan": math.nan, "inf": -math.inf} if request.param == "sqlite" else {}
    rows = [
        {"step": 1, "epoch": 1.0, "split": "train", "values": {"loss": 2.5, **odd}, "time": 1.5},
        {"step": 2, "epoch": 1.0, "split": "train", "values": {"é": "ü\u2028", "n": None}},
        {"step": 2, "epoch": 2.0, "split": "val", "values": {"acc": 0.1, "big": 10**18}},
        {"step": 3, "epoch": 2.0, "split": "train", "values": {"loss": 1e-300}},
        {"step": 4, "epoch": 2.0, "split": "train", "values": {"loss": 1.0}},
    ]
    store.add_metrics(job.id, attempt=attempt, rows=rows)
    with store.engine.begin() as conn:  # as a resume leaves them: one row hidden, one replacing
        conn.execute(sa.update(metrics_t).where(metrics_t.c.step == 3).values(discarded=True))
        conn.execute(sa.update(metrics_t).where(metrics_t.c.step == 4).values(replaces=4))
    api = Api(app, store, alice, bob, job.id)
    for token in (alice, bob):  # the route looks each token up once and caches it
        assert api.client.get("/jobs", headers={"Authorization": f"Bearer {token}"}).is_success
    try:
        yield api
    finally:
        api.client.close()
        store.dispose()


@pytest.mark.parametrize("inline_rows", [64, 2, 1])
def test_the_fast_page_is_the_route_page(
    api: Api, inline_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 2 and 1: most of these pages are longer than the inline part and read on a thread.
    monkeypatch.setattr(poll, "INLINE_PAGE_ROWS", inline_rows)
    path = f"/jobs/{api.job_id}/metrics"
    for query in ("", "after=0", "after=1&limit=2", "limit=1&after=2", "after=99", "limit=3"):
        status, headers, body = api.fast(path, query, api.alice)
        assert status == 200, query
        # final=false reads the same rows through the route (the fast path passes it on).
        route_status, route_body = api.route(f"{query}&final=false", api.alice)
        assert route_status == 200 and body == route_body, query
        assert headers == {
            b"content-type": b"application/json",
            b"content-length": b"%d" % len(body),
        }
    page = api.client.get(path, headers={"Authorization": f"Bearer {api.alice}"}).json()
    assert [(r["step"], r["split"]) for r in page["items"]] == [
        (1, "train"),
        (2, "train"),
        (2, "val"),
        (4, "train"),
    ]  # the discarded row is hidden
    assert page["items"][-1]["replaces"] == 4 and page["items"][2]["values"]["big"] == 10**18
    assert page["items"][1]["values"] == {"é": "ü\u2028", "n": None}
    if "nan" in page["items"][0]["values"]:
        assert (
            page["items"][0]["values"]["nan"] is None and page["items"][0]["values"]["inf"] is None
        )
    assert page["next"] == page["items"][-1]["seq"]
    assert api.fast(path, f"after={page['next']}", api.alice)[2] == (
        b'{"items":[],"next":%d}' % page["next"]
    )


def test_everything_else_goes_to_the_route(api: Api) -> None:
    path = f"/jobs/{api.job_id}/metrics"
    for query in (
        "final=true",
        "max_points=10",
        "aftr=1",
        "after=-1",
        "after=1e3",
        "after=",
        "after",
        "after=1&after=2",
        "limit=0",
        "limit=5000",
        "after=%31",
        f"after={2**62 + 1}",
    ):
        assert api.fast(path, query, api.alice)[0] == PASSED_ON, query
    assert api.fast(path, "", api.bob)[0] == PASSED_ON  # someone else's job: the route's 404
    assert api.fast(path, "", "nc_unknown")[0] == PASSED_ON  # no such token: the route's 401
    assert api.fast(path, "", None)[0] == PASSED_ON  # no token: the route's 401
    assert api.fast(path, "", api.alice, method="POST")[0] == PASSED_ON
    assert api.fast(path + "/", "", api.alice)[0] == PASSED_ON
    assert api.fast("/jobs/no-such-job/metrics", "", api.alice)[0] == PASSED_ON
    assert api.fast("/jobs/a%00b/metrics", "", api.alice)[0] == PASSED_ON
    # And the route answers them as before.
    assert api.route("", api.bob)[0] == 404
    assert api.route("after=1e3", api.alice)[0] == 422


def test_fast_answers_are_counted_under_the_route_template(api: Api) -> None:
    def served() -> float:
        text = api.client.get("/metrics").text
        line = (
            'normcore_http_requests_total{method="GET",route="/jobs/{job_id}/metrics",status="200"}'
        )
        return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

    before = served()
    for _ in range(3):
        assert api.route("after=0", api.alice)[0] == 200
    assert served() == before + 3


def test_an_uncached_token_is_looked_up_once_and_revocation_holds(api: Api) -> None:
    path = f"/jobs/{api.job_id}/metrics"
    now = [0.0]
    cache = api.app.state.token_cache = auth.TokenCache(clock=lambda: now[0])
    second = api.store.create_token("alice", "alice-second-token")
    status, _, body = api.fast(path, "after=0", second)
    assert status == 200 and body == api.route("after=0", api.alice)[1]
    cached = cache.get(second)
    assert cached is not None and cached.name == "alice"
    # Revoked: still answered from the cache within its TTL, then passed on (the route's 401).
    assert api.store.revoke_token("alice-second-token")
    assert api.fast(path, "after=0", second)[0] == 200
    now[0] += auth.TOKEN_CACHE_TTL_S + 0.1
    assert api.fast(path, "after=0", second)[0] == PASSED_ON
    assert api.route("after=0", second)[0] == 401


def _scope(app: Any, path: str, query: str, token: str) -> dict[str, Any]:
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"authorization", f"Bearer {token}".encode())],
        "app": app,
    }


def test_a_long_page_lets_other_polls_in_and_is_read_once_for_all(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 1-row chunks, the 4-row page takes 4 chunks: a poll arriving with it is answered
    first, and 3 followers asking for the same long page at once share one read."""
    monkeypatch.setattr(poll, "INLINE_PAGE_ROWS", 1)
    path = f"/jobs/{api.job_id}/metrics"
    expected = api.route("after=0", api.alice)[1]
    last = json.loads(expected)["next"]

    async def passed_on(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("every poll here is the fast path's")

    fast = PollFastPath(passed_on, api.app.state, find_route(routes_jobs.router.routes))
    fast.inline = True  # reads on the loop on PostgreSQL too: the interleaving is deterministic
    reads: list[int] = []
    real_read = fast.statements.read

    def counted(job_id: str, **kw: Any) -> Any:
        reads.append(kw["after"])
        return real_read(job_id, **kw)

    monkeypatch.setattr(fast.statements, "read", counted)
    done: list[str] = []

    async def ask(name: str, query: str) -> bytes:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await fast(_scope(api.app, path, query, api.alice), receive, send)
        done.append(name)
        return sent[1]["body"]

    async def main() -> list[bytes]:
        return await asyncio.gather(
            ask("long-1", "after=0"),
            ask("long-2", "after=0"),
            ask("long-3", "after=0"),
            ask("tail", f"after={last}"),
        )

    bodies = asyncio.run(main())
    assert bodies[:3] == [expected] * 3
    assert bodies[3] == b'{"items":[],"next":%d}' % last
    assert done[0] == "tail"  # answered while the long page was still being read
    # Each caller reads its first chunk; the rest of the page is read once (3 more chunks
    # and the empty one that ends it), not once per caller.
    assert len(reads) == 4 + 4, reads


def test_parse_poll_query() -> None:
    assert parse_poll_query(b"") == (0, 1000)
    assert parse_poll_query(b"after=7") == (7, 1000)
    assert parse_poll_query(b"limit=3&after=7") == (7, 3)
    for bad in (b"after=+7", b"after=7&", b"&after=7", b"after=07x", b"final=false", b"limit=1001"):
        assert parse_poll_query(bad) is None, bad


def test_auth_off_polls_as_the_local_admin(tmp_path: Path) -> None:
    env = make_env(tmp_path / "nc")
    app = create_app(env.settings().model_copy(update={"auth": False}))
    store: Store = app.state.store
    try:
        owner = store.create_user("carol")
        job, _ = store.create_job(owner_id=owner.id, spec={}, name="j", queue="cpu")
        api = Api(app, store, "", "", job.id)
        status, _, body = api.fast(f"/jobs/{job.id}/metrics", "after=0", None)
        assert status == 200 and body == b'{"items":[],"next":0}'  # the admin sees every job
        api.client.close()
    finally:
        store.dispose()
