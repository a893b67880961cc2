"""The OpenAPI document: worked examples on every route, and schemathesis fuzzing of the live
server with a token (no 5xx, responses and status codes as documented), on random ids and on
the routes of a real job."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from normcore.spec import EXAMPLE_SPEC, JobSpec
from tests.harness import Proc, make_env, start_api

DESIGN_SPEC: dict[str, Any] = EXAMPLE_SPEC

# One xdist worker per module, so the module-scoped server starts once.
pytestmark = pytest.mark.xdist_group("service-openapi")


@dataclass
class Server:
    proc: Proc
    url: str
    token: str
    job_id: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = make_env(
        tmp_path_factory.mktemp("openapi") / "nc", NORMCORE_MAX_ACTIVE_JOBS_PER_USER="100000"
    )
    store = env.store()
    token = store.create_token("fuzzer", "fuzzer-token")
    job_id = _finished_job(store, env.artifact_dir, store.get_user("fuzzer").id)
    store.dispose()
    proc, url = start_api(env)
    try:
        yield Server(proc, url, token, job_id)
    finally:
        proc.stop()


def _finished_job(store: Any, artifact_dir: Path, owner_id: int) -> str:
    """A succeeded job of the fuzzer's with metric rows, log lines and a checkpoint file."""
    import torch
    from safetensors.torch import save_file

    job, _ = store.create_job(owner_id=owner_id, spec=DESIGN_SPEC, name="real", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w", lease_seconds=600)
    store.add_metrics(
        job.id,
        attempt=attempt,
        rows=[
            {"step": 1, "epoch": 1, "split": "train", "values": {"loss": 1.0, "lr": 0.1}},
            {"step": 1, "epoch": 1, "split": "val", "values": {"val_loss": 0.9, "val_acc": 0.5}},
        ],
    )
    store.add_logs(job.id, attempt=attempt, lines=[("info", "epoch 1/1"), ("warning", "w")])
    folder = artifact_dir / "jobs" / job.id / "checkpoints" / "epoch-0001"
    folder.mkdir(parents=True)
    save_file(
        {"bn.running_mean": torch.zeros(2), "bn.running_var": torch.ones(2)},
        str(folder / "model.safetensors"),
    )
    data = (folder / "model.safetensors").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store.add_checkpoint(
        job.id,
        attempt=attempt,
        name="epoch-0001",
        epoch=1,
        step=1,
        bytes=len(data),
        sha256=sha,
        files={"model.safetensors": sha},
        metrics={"val_acc": 0.5},
        path=str(folder.relative_to(artifact_dir)),
    )
    store.finish_job(job.id, attempt=attempt, status="succeeded")
    return job.id


@pytest.fixture(scope="module")
def openapi(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/openapi.json").json()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_every_operation(server: Server, mode: GenerationMode) -> None:
    """Schemathesis cases for every operation: no 5xx, status codes and bodies as documented.

    Uses schemathesis's Python API (``as_strategy`` + hypothesis) rather than its pytest plugin,
    whose lazy fixture loader does not work with the installed pytest 9.
    """
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {server.token}"}
    failures: list[str] = []
    tested = 0
    for result in loaded.get_all_operations():
        operation = result.ok()
        try:
            strategy = operation.as_strategy(generation_mode=mode)
        except Exception as exc:  # an operation with nothing to negate, for instance
            if mode is GenerationMode.NEGATIVE:
                continue
            raise AssertionError(f"{operation.label}: {exc}") from exc

        @given(case=strategy)
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.call_and_validate(base_url=server.url, headers=headers, timeout=30, checks=CHECKS)

        try:
            run()
            tested += 1
        except Unsatisfiable:
            # No parameters and no body: nothing to make invalid in negative mode.
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert tested >= (10 if mode is GenerationMode.POSITIVE else 6)
    assert not failures, "\n\n".join(failures)


def test_fuzz_the_routes_of_a_real_job(server: Server) -> None:
    """Positive cases for every job route with the id of an existing job (and its checkpoint's
    name half the time), so the 200 answers are checked against the schema too, not only 404s."""
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {server.token}"}
    failures: list[str] = []
    tested = 0
    for result in loaded.get_all_operations():
        operation = result.ok()
        if "{job_id}" not in operation.path or operation.method.upper() == "DELETE":
            continue  # a DELETE would take the job away from the operations after it
        strategy = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)

        @given(case=strategy)
        @settings(
            max_examples=10,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            case.path_parameters["job_id"] = server.job_id
            if "name" in case.path_parameters and len(case.path_parameters["name"]) % 2 == 0:
                case.path_parameters["name"] = "epoch-0001"
            response = case.call_and_validate(
                base_url=server.url, headers=headers, timeout=30, checks=CHECKS
            )
            # only an id other than the job's (a checkpoint name, an artifact id) may be unknown
            assert response.status_code != 404 or set(case.path_parameters) - {"job_id"}

        try:
            run()
            tested += 1
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert tested >= 7
    assert not failures, "\n\n".join(failures)


def _operations(openapi: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in openapi["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_every_route_has_a_worked_example(openapi: dict[str, Any]) -> None:
    for method, path, op in _operations(openapi):
        ok = next(str(code) for code in op["responses"] if str(code).startswith("2"))
        if ok == "204":
            continue  # no content to give an example of
        content = op["responses"][ok].get("content", {})
        examples = [c for c in content.values() if "example" in c or "examples" in c] or [
            c for c in content.values() if c.get("schema", {}).get("format") == "binary"
        ]
        assert examples, f"{method} {path}: no example for {ok}"


def test_post_jobs_example_is_the_design_spec(openapi: dict[str, Any]) -> None:
    body = openapi["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["examples"]
    assert examples["resnet20-gn-digits"]["value"] == DESIGN_SPEC
    for example in examples.values():
        JobSpec.model_validate(example["value"])  # every example is a valid spec
    codes = set(openapi["paths"]["/jobs"]["post"]["responses"])
    assert {"200", "201", "400", "401", "409", "413", "422", "429"} <= codes


def test_security_scheme_and_public_routes(openapi: dict[str, Any]) -> None:
    schemes = openapi["components"]["securitySchemes"]
    assert any(s.get("scheme") == "bearer" for s in schemes.values())
    public = {"/healthz", "/readyz", "/metrics", "/schema/jobspec"}
    for method, path, op in _operations(openapi):
        if path in public:
            assert not op.get("security"), f"{method} {path} should need no token"
        else:
            assert op.get("security"), f"{method} {path} should need a token"


def test_jobspec_schema_route(server: Server) -> None:
    r = httpx.get(f"{server.url}/schema/jobspec")
    assert r.status_code == 200
    assert r.json() == JobSpec.model_json_schema()
