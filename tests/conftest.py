"""Shared fixtures: real PostgreSQL and Redis servers, and deployments of the real service."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ServiceEnv, Stack, make_env, running_stack

PG_ADMIN_URL = os.environ.get("NORMCORE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("NORMCORE_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("NORMCORE_TEST_REDIS_PORT", "6379"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(what: str, error: Exception) -> None:
    """Fail in CI (a missing server is a broken build), skip on a laptop."""
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _xdist_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of the real PostgreSQL server (fails in CI when it is down)."""
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        _missing("PostgreSQL at 127.0.0.1:5432", exc)
    return PG_ADMIN_URL


@contextlib.contextmanager
def _fresh_database(admin_url: str) -> Iterator[str]:
    """An empty PostgreSQL database's URL, dropped on exit."""
    import psycopg

    name = f"normcore_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def _own_redis_db() -> Iterator[str]:
    """This xdist worker's Redis database, flushed before and after."""
    try:
        import redis

        db = 1 + _xdist_index() % 15
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=3)
        client.ping()
    except Exception as exc:
        _missing("Redis at 127.0.0.1:6379", exc)
    client.flushdb()
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    with _fresh_database(postgres_server) as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of its own for this test (per xdist worker), flushed before and after."""
    with _own_redis_db() as url:
        yield url


@pytest.fixture
def sqlite_env(tmp_path: Path) -> ServiceEnv:
    """An embedded deployment's environment: SQLite store and SQLite broker in a temp dir."""
    return make_env(tmp_path / "nc", mode="sqlite")


@pytest.fixture
def cluster_env(tmp_path: Path, postgres_url: str, redis_url: str) -> ServiceEnv:
    """A cluster deployment's environment: fresh PostgreSQL database and Redis db."""
    return make_env(tmp_path / "nc", mode="cluster", postgres_url=postgres_url, redis_url=redis_url)


@pytest.fixture(params=["sqlite", "cluster"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> ServiceEnv:
    """Both modes, one after the other."""
    if request.param == "sqlite":
        return make_env(tmp_path / "nc", mode="sqlite")
    pg = request.getfixturevalue("postgres_url")
    rd = request.getfixturevalue("redis_url")
    return make_env(tmp_path / "nc", mode="cluster", postgres_url=pg, redis_url=rd)


@pytest.fixture
def stack(any_env: ServiceEnv) -> Iterator[Stack]:
    """A running API plus one CPU worker, in each mode."""
    with running_stack(any_env) as running:
        yield running


@pytest.fixture
def sqlite_stack(sqlite_env: ServiceEnv) -> Iterator[Stack]:
    """A running embedded-mode API plus one CPU worker."""
    with running_stack(sqlite_env) as running:
        yield running


@pytest.fixture(scope="module", params=["sqlite", "cluster"])
def module_stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """``stack`` shared by every test of a module: a running API plus one CPU worker in each
    mode, started once per mode instead of once per test; training at one torch thread.

    The module's tests must leave the deployment as they found it (no job left running) and
    the module should carry an ``xdist_group`` marker, so that its tests run one after the
    other on one xdist worker: the cluster mode holds that worker's Redis database throughout.
    """
    data_dir = tmp_path_factory.mktemp(f"stack-{request.param}") / "nc"
    one_thread = {"NORMCORE_TRAIN_THREADS": "1"}  # two xdist workers share two cores
    if request.param == "sqlite":
        with running_stack(make_env(data_dir, mode="sqlite", **one_thread)) as running:
            yield running
        return
    admin = request.getfixturevalue("postgres_server")
    with _fresh_database(admin) as pg, _own_redis_db() as rd:
        env = make_env(data_dir, mode="cluster", postgres_url=pg, redis_url=rd, **one_thread)
        with running_stack(env) as running:
            yield running


# What starts real servers, workers or training processes: tens of seconds a test.
_LONG_PATHS = (
    "tests/e2e/",
    "tests/ui/",
    "tests/worker/test_worker_process.py",
    "tests/normcore/test_distributed_engine.py",
)


def _run_first(item: pytest.Item) -> int:
    """0 for long tests, 1 for the other tests of an ``xdist_group``, 2 for the rest."""
    path = item.nodeid.split("::", 1)[0]
    if path.startswith(_LONG_PATHS) or item.get_closest_marker("slow") is not None:
        return 0
    return 1 if item.get_closest_marker("xdist_group") is not None else 2


def pytest_configure(config: pytest.Config) -> None:
    """Let ``--dist loadgroup`` hand out work in collection order (see below), not ordered by
    the number of tests per group, which put groups of a few long tests after the fast ones."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _join_xdist_group(item: pytest.Item) -> None:
    """Give ``item`` the ``@group`` suffix ``--dist loadgroup`` schedules by.

    pytest-xdist (3.8) appends it to ``item._nodeid``, which pytest 9 no longer reads (the node
    id is ``item._id``): every ``xdist_group`` marker was ignored, so a module's tests were
    spread over both workers and its module-scoped servers started on each, again after every
    other module's test in between. Here the suffix goes where pytest 9 reads it; nothing is done
    when the node id has it already (an xdist that does it itself, or pytest before 9).
    """
    names = sorted(
        {
            str(m.args[0] if m.args else m.kwargs.get("name", "default"))
            for m in item.iter_markers("xdist_group")
        }
    )
    if not names:
        return
    suffix = "@" + "_".join(names)
    node_id = getattr(item, "_id", None)
    if item.nodeid.endswith(suffix) or node_id is None or not hasattr(type(node_id), "parse"):
        return
    item._id = type(node_id).parse(item.nodeid + suffix)


@pytest.hookimpl(trylast=True)  # after pytest grouped the tests by parametrized fixtures
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long tests first, then the rest of the groups, then the many quick tests; under
    ``--dist loadgroup``, each test in its ``xdist_group`` (see ``_join_xdist_group``).

    Under ``-n 2 --dist loadgroup`` each xdist worker takes the next unit of work when it runs
    low, so long units handed out early balance the two workers, and the run ends on quick tests
    instead of one worker finishing a long module alone. The order within a module is kept
    (a stable sort), so module-scoped fixtures still start once.
    """
    items.sort(key=_run_first)
    if getattr(config.option, "loadgroup", False):
        for item in items:
            _join_xdist_group(item)
