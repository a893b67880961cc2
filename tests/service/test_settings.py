"""Settings: defaults derived from data_dir, NORMCORE_* environment, the auth/loopback rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, get_settings

ENV_NAMES = (
    "DATA_DIR",
    "DATABASE_URL",
    "BROKER_URL",
    "ARTIFACT_DIR",
    "DATA_ROOT",
    "HOST",
    "PORT",
    "AUTH",
    "LEASE_SECONDS",
    "MAX_ATTEMPTS",
    "WORKER_QUEUES",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES:
        monkeypatch.delenv(f"NORMCORE_{name}", raising=False)
    get_settings.cache_clear()


def test_defaults_derive_from_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings()
    data = tmp_path / "normcore-data"
    assert s.data_dir == data
    assert s.database_url == f"sqlite:///{data}/normcore.db"
    assert s.broker_url == f"sqla+sqlite:///{data}/broker.db"
    assert s.artifact_dir == data / "artifacts"
    assert s.data_root == data / "datasets"
    assert (s.host, s.port, s.auth) == ("127.0.0.1", 8000, True)
    assert (s.lease_seconds, s.heartbeat_seconds, s.max_attempts) == (6.0, 1.0, 3)
    assert (s.reaper_interval_seconds, s.cancel_grace_seconds) == (1.0, 10.0)
    assert (s.republish_after_seconds, s.api_reaper) == (10.0, True)
    assert (s.train_threads, s.train_memory_limit_bytes) == (0, None)
    assert s.max_model_parameters == 50_000_000
    assert s.max_body_bytes == 1_000_000 and s.max_active_jobs_per_user == 20
    assert s.queues == ["cpu", "gpu"]
    assert s.job_dir("ab" * 16) == data / "artifacts" / "jobs" / ("ab" * 16)


def test_environment_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMCORE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("NORMCORE_BROKER_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("NORMCORE_PORT", "9123")
    monkeypatch.setenv("NORMCORE_LEASE_SECONDS", "2.5")
    monkeypatch.setenv("NORMCORE_WORKER_QUEUES", " cpu ")
    s = Settings()
    assert s.data_dir == tmp_path / "d"
    assert s.database_url == f"sqlite:///{tmp_path / 'd'}/normcore.db"  # still derived
    assert s.broker_url == "redis://127.0.0.1:6379/0"
    assert s.port == 9123 and s.lease_seconds == 2.5 and s.queues == ["cpu"]
    # Explicit arguments win over the environment.
    assert Settings(port=8001).port == 8001


def test_relative_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings(data_dir="rel", artifact_dir="arts")
    assert s.data_dir == tmp_path / "rel" and s.artifact_dir == tmp_path / "arts"
    assert s.data_dir.is_absolute() and s.data_root.is_absolute()


def test_auth_off_only_on_loopback() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert Settings(auth=False, host=host).auth is False
    for host in ("0.0.0.0", "10.1.2.3", "example.org", "::"):
        with pytest.raises(ValidationError, match="loopback"):
            Settings(auth=False, host=host)
    assert Settings(auth=True, host="0.0.0.0").host == "0.0.0.0"


def test_auth_env_false_refused_on_public_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMCORE_AUTH", "false")
    monkeypatch.setenv("NORMCORE_HOST", "0.0.0.0")
    with pytest.raises(ValidationError):
        Settings()


def test_invalid_values_refused() -> None:
    with pytest.raises(ValidationError):
        Settings(port=70000)
    with pytest.raises(ValidationError):
        Settings(lease_seconds=0)
    with pytest.raises(ValidationError):
        Settings(worker_queues=" , ")


def test_get_settings_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMCORE_DATA_DIR", str(tmp_path))
    first = get_settings()
    monkeypatch.setenv("NORMCORE_DATA_DIR", str(tmp_path / "other"))
    assert get_settings() is first and first.data_dir == tmp_path
    get_settings.cache_clear()
    assert get_settings().data_dir == tmp_path / "other"
