"""Hostile ``GET /jobs?cursor=`` values: every one is a 4xx (never a 5xx), on SQLite in-process
with hypothesis, and on PostgreSQL for the timestamps that overflow on conversion to UTC."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.app import create_app
from service.store import InvalidCursor, Store, decode_cursor, encode_cursor
from tests.harness import make_env

HEX32 = re.compile(r"[0-9a-f]{32}")
ID = "f" * 32
OVERFLOWING = [
    ["0001-01-01T00:00:00+14:00", "x"],  # the instance in issue 17
    ["0001-01-01T00:00:00+14:00", ID],
    ["9999-12-31T23:59:59-23:59", ID],
    ["0001-01-01T00:00:00.000001+23:59:59", ID],
]


def b64(raw: bytes) -> str:
    """base64url without padding, as the server hands cursors out."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def b64json(value: Any) -> str:
    """The cursor form of a JSON value."""
    return b64(json.dumps(value).encode())


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An in-process API on SQLite (no lifespan: no reaper thread) with a token and three jobs."""
    env = make_env(tmp_path_factory.mktemp("cursor") / "nc", mode="sqlite")
    app = create_app(env.settings())
    store: Store = app.state.store
    token = store.create_token("alice", "alice-token")
    owner = store.get_user("alice")
    assert owner is not None
    for i in range(3):
        store.create_job(owner_id=owner.id, spec={}, name=f"j{i}", queue="cpu")
    yield TestClient(app, headers={"Authorization": f"Bearer {token}"})
    store.dispose()


def _get(client: TestClient, cursor: str) -> int:
    r = client.get("/jobs", params={"cursor": cursor, "limit": 1})
    assert r.status_code < 500, (cursor, r.status_code, r.text)
    if r.status_code == 400:
        assert "invalid cursor" in r.json()["detail"]
    return r.status_code


@pytest.mark.parametrize("value", OVERFLOWING)
def test_overflowing_timestamps_are_400(client: TestClient, value: list[str]) -> None:
    assert _get(client, b64json(value)) == 400


@pytest.mark.parametrize(
    "cursor",
    [
        "",  # no cursor: the first page
        "!!!!",
        "=",
        "a",
        "\u00e9\u00e9\u00e9\u00e9",
        b64(b"\xff\xfe\x00"),
        b64json(None),
        b64json({"2026-01-01T00:00:00+00:00": ID}),  # a dict unpacks to its keys
        b64json(["2026-01-01T00:00:00+00:00"]),
        b64json(["2026-01-01T00:00:00", ID]),  # naive
        b64json(["2026-01-01T00:00:00+00:00", ID + "\x00"]),  # NUL: PostgreSQL would refuse it
        b64json(["2026-01-01T00:00:00+00:00", "\ud800" * 32]),
        b64json([1, ID]),
        b64json(["2026-01-01T00:00:00+00:00", 7]),
        b64(b"[" * 370),  # deep nesting within the 500-character limit
    ],
)
def test_malformed_cursors_are_400(client: TestClient, cursor: str) -> None:
    assert _get(client, cursor) in ((200,) if cursor == "" else (400,))


def test_a_cursor_the_server_handed_out_still_pages(client: TestClient) -> None:
    first = client.get("/jobs", params={"limit": 2}).json()
    assert len(first["items"]) == 2 and first["next"]
    rest = client.get("/jobs", params={"limit": 2, "cursor": first["next"]}).json()
    assert len(rest["items"]) == 1 and rest["next"] is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
offsets = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(timezone)
timestamps = st.one_of(
    st.datetimes(timezones=offsets).map(lambda d: d.isoformat()),
    st.datetimes().map(lambda d: d.isoformat()),  # naive
    st.text(max_size=40),
)
ids = st.one_of(st.just(ID), st.text(max_size=40), st.from_regex(HEX32, fullmatch=True))
cursors = st.one_of(
    st.text(max_size=500),
    st.binary(max_size=300).map(b64),
    json_values.map(b64json).filter(lambda c: len(c) <= 500),
    st.tuples(timestamps, ids).map(lambda p: b64json(list(p))),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cursor=cursors)
def test_decode_cursor_raises_only_invalid_cursor(cursor: str) -> None:
    try:
        when, job_id = decode_cursor(cursor)
    except InvalidCursor:
        return
    assert when.tzinfo is not None and when.utcoffset() == timedelta(0)
    assert HEX32.fullmatch(job_id)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(cursor=cursors)
def test_hostile_cursors_never_reach_a_5xx(client: TestClient, cursor: str) -> None:
    assert _get(client, cursor) in (200, 400, 422)


def test_encode_decode_round_trip() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    assert decode_cursor(encode_cursor(when, ID)) == (when, ID)


def test_overflowing_cursor_on_postgresql(postgres_url: str) -> None:
    store = Store(postgres_url)
    store.upgrade()
    try:
        owner = store.create_user("alice").id
        store.create_job(owner_id=owner, spec={}, name="j", queue="cpu")
        for value in OVERFLOWING:
            with pytest.raises(InvalidCursor):
                store.list_jobs(owner_id=owner, cursor=b64json(value))
        # Extreme but valid instants go through to the database and page normally.
        for when in (datetime(1, 1, 1, 12, tzinfo=UTC), datetime(9999, 12, 31, tzinfo=UTC)):
            items, _ = store.list_jobs(owner_id=owner, cursor=encode_cursor(when, ID))
            assert len(items) == (1 if when.year == 9999 else 0)
    finally:
        store.dispose()
