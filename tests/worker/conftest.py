"""Fixtures of the worker tests: a data folder with short leases and its migrated store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from service.store import Store


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings under tmp_path: half-second heartbeats, a 10 s lease, 5 s cancel grace."""
    (tmp_path / "nc" / "datasets").mkdir(parents=True)
    return Settings(
        data_dir=tmp_path / "nc",
        heartbeat_seconds=0.5,
        lease_seconds=10.0,
        cancel_grace_seconds=5.0,
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    """The store of ``settings``, migrated, disposed after the test."""
    s = Store.from_settings(settings)
    s.upgrade()
    yield s
    s.dispose()
