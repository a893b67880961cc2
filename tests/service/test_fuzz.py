"""Issue 17 item 2, proved broadly: no input gives a 5xx.

Against a real uvicorn API (SQLite store) holding a finished job with rows, logs and a
checkpoint file:

- schemathesis's coverage phase (boundary and just-outside-the-boundary values of every
  parameter and body field, positive and negative) on every operation of the OpenAPI document,
  each case run as generated and, on routes with ``{job_id}``, again with the real job's id
  (and its checkpoint's name) so the handlers behind the 404 run too;
- schemathesis's negative fuzzing (hypothesis) on every operation, likewise;
- hypothesis strategies of our own for what the schema cannot describe: Last-Event-ID, Range
  and Idempotency-Key headers as raw bytes, cursors (base64url of hostile JSON), norm strings
  and norm dicts, data paths.

Every response must be below 500. Deterministic (``derandomize=True``, no example database) and
bounded (``max_examples``) so CI neither flakes nor slows: about a minute on 2 cores. Each test
prints how many cases it ran (``pytest -s``); the module's total is asserted against a floor.
"""

from __future__ import annotations

import base64
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.service.hostile_server import SMALL_SPEC, HostileServer, hostile_server_on

pytestmark = pytest.mark.xdist_group("service-fuzz")

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@dataclass
class Tally:
    """Cases sent and the 5xx answers seen (with what caused them)."""

    cases: int = 0
    errors: list[str] = field(default_factory=list)

    def check(self, response: httpx.Response | Any, what: str) -> None:
        self.cases += 1
        if response.status_code >= 500:
            self.errors.append(f"{response.status_code} for {what}: {response.text[:300]}")


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HostileServer]:
    """SQLite by default; NORMCORE_FUZZ_DB=postgresql runs the same fuzzing on PostgreSQL and
    Redis (a longer, deeper run; test_hostile_inputs.py covers PostgreSQL in every run)."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "nc"
    # A low quota: valid specs still pass every check, then most get 429 instead of a row and a
    # broker message each, which keeps the run short.
    extra = {"NORMCORE_MAX_ACTIVE_JOBS_PER_USER": "3"}
    backend = "cluster" if os.environ.get("NORMCORE_FUZZ_DB") == "postgresql" else "sqlite"
    with hostile_server_on(backend, data_dir, request, **extra) as running:
        yield running


@pytest.fixture(scope="module")
def schema(server: HostileServer) -> Any:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.fixture(scope="module")
def client(server: HostileServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def raw() -> Iterator[httpx.Client]:
    """A keep-alive client without default headers, for raw header bytes."""
    with httpx.Client(timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    """One keep-alive session for every schemathesis call."""
    with requests.Session() as s:
        yield s


def _with_real_ids(case: Any, server: HostileServer) -> Any:
    """The same case aimed at the existing job (and its checkpoint), or None if it has no id."""
    if "job_id" not in (case.path_parameters or {}) or case.method.upper() == "DELETE":
        return None  # DELETE on the real job would leave the later cases only 404s
    real = case.operation.Case(
        method=case.method,
        path_parameters={**case.path_parameters, "job_id": server.job_id},
        headers=case.headers,
        cookies=case.cookies,
        query=case.query,
        body=case.body,
        media_type=case.media_type,
    )
    if "name" in real.path_parameters:
        real.path_parameters["name"] = server.checkpoint
    return real


def _run(case: Any, server: HostileServer, session: requests.Session, tally: Tally) -> None:
    for each in (case, _with_real_ids(case, server)):
        if each is None:
            continue
        headers = {**server.headers, **(each.headers or {})}
        response = each.call(base_url=server.url, session=session, headers=headers, timeout=30)
        what = f"{each.operation.label} path={each.path_parameters} query={each.query} "
        what += f"headers={each.headers} body={str(each.body)[:200]}"
        tally.check(response, what)


def test_schemathesis_coverage_phase_every_route(
    server: HostileServer, schema: Any, session: requests.Session
) -> None:
    """Coverage phase, positive and negative, on every operation: no 5xx."""
    tally = Tally()
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        config = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(
            operation,
            generation_modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
            generation_config=config,
        ):
            _run(case, server, session, tally)
    print(f"coverage phase ({server.env.mode}): {tally.cases} cases on {operations} operations")
    assert operations >= 14
    assert tally.cases >= 500
    assert not tally.errors, "\n".join(tally.errors[:20])


def test_schemathesis_negative_fuzzing_every_route(
    server: HostileServer, schema: Any, session: requests.Session
) -> None:
    """Hypothesis-driven negative cases (invalid types, formats, bounds) on every operation."""
    tally = Tally()
    fuzzed = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            strategy = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
        except Exception:  # nothing to negate (no parameters, no body)
            continue

        @FUZZ
        @given(case=strategy)
        def run(case: Any) -> None:
            _run(case, server, session, tally)

        try:
            run()
            fuzzed += 1
        except Unsatisfiable:
            continue
    print(f"negative fuzzing: {tally.cases} cases on {fuzzed} operations")
    assert fuzzed >= 6
    assert not tally.errors, "\n".join(tally.errors[:20])


# --------------------------------------------------------------------------- our own strategies

# Header values as the wire carries them: any byte h11 lets through (no CR, LF, NUL, DEL; no
# leading or trailing whitespace), so the server sees latin-1 text of any shape.
_HEADER_BYTES = st.binary(min_size=0, max_size=300).map(
    lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F).strip(b" \t")
)
_DIGITISH = st.text(alphabet="0123456789²³¹٠١٢٣-+ ,.e", max_size=60).map(
    lambda s: s.encode("utf-8").strip(b" \t")
)
_HEADER_VALUES = st.one_of(_HEADER_BYTES, _DIGITISH)

_JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=40),
        st.sampled_from(
            [
                "0001-01-01T00:00:00+14:00",
                "9999-12-31T23:59:59-14:00",
                "2026-01-01T00:00:00",
                "2026-13-45T99:99:99",
                "x\u0000",
                "\ud800",
            ]
        ),
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


def _b64(raw: bytes, pad: bool) -> str:
    text = base64.urlsafe_b64encode(raw).decode()
    return text if pad else text.rstrip("=")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8", "surrogatepass")


_CURSORS = st.one_of(
    st.tuples(_JSONISH.map(_json_bytes), st.booleans()).map(lambda t: _b64(*t)),
    st.tuples(st.binary(max_size=60), st.booleans()).map(lambda t: _b64(*t)),
    st.text(alphabet=string.ascii_letters + string.digits + "-_=%+/", max_size=80),
)

_NORM_PIECES = st.sampled_from(
    [
        "bn",
        "gn",
        "ln",
        "in",
        "split_bn",
        "ghost_bn",
        "evo_s0",
        "lrn",
        "l2",
        "brn",
        "frn",
        "none",
        "batch",
        ":",
        "(",
        ")",
        "=",
        ",",
        " ",
        "momentum",
        "eps",
        "num_groups",
        "num_splits",
        "size",
        "device",
        "'cuda'",
        "1",
        "0",
        "-",
        "1e999",
        "-1",
        "100000",
        "9" * 30,
        "[",
        "]",
        "{",
        "}",
        "1+",
        "lambda",
        "__import__",
        "None",
        "True",
        "'x'",
        "\u00b2",
        "\x00",
        "\\",
        '"',
    ]
)
_NORM_STRINGS = st.one_of(
    st.lists(_NORM_PIECES, max_size=12).map("".join),
    st.text(max_size=300),
    st.tuples(_NORM_PIECES, st.integers(1, 5000)).map(lambda t: t[0] * t[1]),
)
_NORM_DICTS = st.fixed_dictionaries(
    {"type": st.sampled_from(["bn", "gn", "split_bn", "l2", "lrn", "nope", ""])},
    optional={
        "num_groups": _JSONISH,
        "num_splits": st.integers(-5, 10**6),
        "eps": _JSONISH,
        "momentum": _JSONISH,
        "device": st.text(max_size=10),
        "size": st.integers(-(2**70), 2**70),
    },
)

_PATH_PARTS = st.one_of(
    st.sampled_from(["..", ".", "", "mnist", "/", "\\", "~", "C:", "a" * 255, "a" * 256]),
    st.text(max_size=20),
    st.integers(1, 600).map(lambda n: "é" * n),
)
_PATHS = st.lists(_PATH_PARTS, max_size=8).map("/".join)


def _headers(server: HostileServer, name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"Authorization", server.headers["Authorization"].encode()), (name, value)]


def test_hostile_headers(server: HostileServer, raw: httpx.Client) -> None:
    """Last-Event-ID on the event stream, Range, If-Range and If-None-Match on a download,
    Idempotency-Key on submit, Authorization anywhere: raw bytes of every shape."""
    tally = Tally()
    events = f"{server.url}/jobs/{server.job_id}/events"
    download = f"{server.url}/jobs/{server.job_id}/checkpoints/{server.checkpoint}"

    @settings(FUZZ, max_examples=150)
    @example(value="\u00b2".encode("latin-1"), which="lei")  # str.isdigit() but not int()
    @example(value=b"bytes=" + b",".join([b"0-1"] * 150), which="range")
    @given(
        value=_HEADER_VALUES,
        which=st.sampled_from(["lei", "range", "ifrange", "inm", "idem", "auth"]),
    )
    def run(value: bytes, which: str) -> None:
        if which == "lei":
            with raw.stream("GET", events, headers=_headers(server, b"Last-Event-ID", value)) as r:
                r.read()
                tally.check(r, f"Last-Event-ID {value!r}")
        elif which in ("range", "ifrange"):
            headers = _headers(server, b"Range", value if which == "range" else b"bytes=0-3")
            if which == "ifrange":
                headers.append((b"If-Range", value))
            tally.check(raw.get(download, headers=headers), f"{which} {value!r}")
        elif which == "inm":
            headers = _headers(server, b"If-None-Match", value)
            tally.check(raw.get(download, headers=headers), f"If-None-Match {value!r}")
        elif which == "idem":
            r = raw.post(
                f"{server.url}/jobs",
                json=SMALL_SPEC,
                headers=_headers(server, b"Idempotency-Key", value),
            )
            tally.check(r, f"Idempotency-Key {value!r}")
        else:
            r = raw.get(f"{server.url}/jobs", headers=[(b"Authorization", value)])
            tally.check(r, f"Authorization {value!r}")
            assert r.status_code in (400, 401), (value, r.status_code)

    run()
    print(f"hostile headers: {tally.cases} cases")
    assert not tally.errors, "\n".join(tally.errors[:20])


def test_hostile_cursors_and_queries(server: HostileServer, client: httpx.Client) -> None:
    """Cursors (base64url of hostile JSON, random bytes, junk) and page bounds on every list."""
    tally = Tally()
    numbers = st.one_of(
        st.integers(-(2**80), 2**80).map(str), st.sampled_from(["NaN", "1e400", "-0", "", "0x10"])
    )

    @settings(FUZZ, max_examples=60)
    @given(cursor=_CURSORS, limit=numbers, after=numbers)
    def run(cursor: str, limit: str, after: str) -> None:
        r = client.get("/jobs", params={"cursor": cursor, "limit": limit})
        tally.check(r, f"cursor {cursor!r} limit {limit!r}")
        r = client.get("/jobs", params={"cursor": cursor})
        tally.check(r, f"cursor {cursor!r}")
        for route in ("metrics", "logs"):
            r = client.get(
                f"/jobs/{server.job_id}/{route}", params={"after": after, "limit": limit}
            )
            tally.check(r, f"{route} after={after!r} limit={limit!r}")

    run()
    print(f"hostile cursors and queries: {tally.cases} cases")
    assert not tally.errors, "\n".join(tally.errors[:20])


def test_hostile_norms_and_paths(client: httpx.Client) -> None:
    """Norm strings built from the grammar's pieces and from junk, norm dicts with hostile
    values, data paths with traversal, long and odd components: 201 or 4xx, never 5xx."""
    tally = Tally()

    @settings(FUZZ, max_examples=100)
    @example(norm="bn(momentum=" + "-" * 5000 + "1)", path="a" * 256, dataset="mnist")
    @example(norm="1+" * 100000, path="x/../../etc", dataset="npz")
    @example(norm="split_bn:100000", path="ok", dataset="imagefolder")
    @given(
        norm=st.one_of(_NORM_STRINGS, _NORM_DICTS),
        path=_PATHS,
        dataset=st.sampled_from(["mnist", "npz", "imagefolder", "synthetic"]),
    )
    def run(norm: Any, path: str, dataset: str) -> None:
        spec = {**SMALL_SPEC, "model": {"arch": "lenet", "norm": norm}}
        body = json.dumps(spec).encode("utf-8", "surrogatepass")
        r = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        tally.check(r, f"norm {str(norm)[:120]!r}")
        spec = {**SMALL_SPEC, "data": {"dataset": dataset, "path": path}}
        body = json.dumps(spec).encode("utf-8", "surrogatepass")
        r = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
        tally.check(r, f"path {path[:120]!r}")

    run()
    print(f"hostile norms and paths: {tally.cases} cases")
    assert not tally.errors, "\n".join(tally.errors[:20])


def test_server_survived(server: HostileServer) -> None:
    """The same API process answers after the whole run, with no traceback in its log."""
    assert server.proc.alive()
    assert httpx.get(f"{server.url}/healthz", timeout=10).status_code == 200
    assert "Traceback" not in server.proc.log_path.read_text()
