"""Stores on both real backends for store-level tests: a SQLite file and a PostgreSQL database.

A test module defines its own fixtures from these helpers (a fixture imported into a module
would shadow its parameter name):

    @pytest.fixture(scope="module")
    def pg_url(postgres_server): yield from pg_database(postgres_server)

    @pytest.fixture(params=BACKENDS)
    def store(request, tmp_path): yield from open_store(request, tmp_path, "pg_url")
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from service.db import metadata
from service.store import Store

BACKENDS = ("sqlite", "postgresql")


def pg_database(postgres_server: str) -> Iterator[str]:
    """A PostgreSQL database migrated to head, dropped when the generator is closed."""
    import psycopg

    name = f"normcore_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    migrator = Store(url)
    migrator.upgrade()
    migrator.dispose()
    try:
        yield url
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def open_store(request: pytest.FixtureRequest, tmp_path: Path, pg_fixture: str) -> Iterator[Store]:
    """A migrated, empty store on ``request.param``'s backend (PostgreSQL: the database of the
    fixture named ``pg_fixture``, emptied first), disposed afterwards."""
    if request.param == "sqlite":
        store = Store(f"sqlite:///{tmp_path / 'store.db'}")
        store.upgrade()
    else:
        store = Store(request.getfixturevalue(pg_fixture))
        store.upgrade()
        names = ", ".join(t.name for t in metadata.sorted_tables if t.name != "alembic_version")
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    try:
        yield store
    finally:
        store.dispose()
