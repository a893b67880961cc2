"""Export and recalibration through a real API and a real worker (issue 16 items 2 and 3).

One embedded stack (SQLite store and broker, one worker) for the module and one tiny job:
lenet with a BatchNorm of momentum 0.01 on digits for one epoch, so its running statistics are
stale (about 36% of the way from their initial 0/1 after 45 steps). The export is built by the
worker's ``normcore.run_artifact`` task, never by the API; asked again, it comes from the cache
with no new task. The recalibration writes ``epoch-0001-recal20`` whose BN buffers are the exact
float64 averages over the same 20 training batches.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

from tests.harness import Stack, make_env, running_stack, wait_for

pytest.importorskip("onnxruntime")

SPEC = {
    "name": "export-e2e",
    "model": {"arch": "lenet", "norm": "bn(momentum=0.01)", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 32, "val_fraction": 0.2},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "epochs": 1,
    "seed": 0,
    "resources": {"device": "cpu"},
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}
BATCHES = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API and one worker on SQLite for the whole module."""
    env = make_env(tmp_path_factory.mktemp("exports"), NORMCORE_TRAIN_THREADS="1")
    with running_stack(env, workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def job(stack: Stack) -> dict[str, Any]:
    """The finished job and its one checkpoint."""
    with stack.client() as c:
        r = c.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            body = c.get(f"/jobs/{job_id}").json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        body = wait_for(finished, timeout=240, interval=0.5, what="the training job")
        assert body["status"] == "succeeded", body
        checkpoints = c.get(f"/jobs/{job_id}/checkpoints").json()
    assert [ck["name"] for ck in checkpoints] == ["epoch-0001"]
    return {"id": job_id, "checkpoint": checkpoints[0]}


def _until_ready(c: httpx.Client, method: str, url: str, **kw: Any) -> httpx.Response:
    """Repeat the request (each waits up to 20 s server-side) until it is not a 202."""
    deadline = time.monotonic() + 240
    while True:
        r = c.request(method, url, **kw)
        if r.status_code != 202 or time.monotonic() > deadline:
            return r
        assert r.headers["Location"] == r.json()["status_url"]


def test_export_is_built_by_a_worker_certified_and_then_cached(
    stack: Stack, job: dict[str, Any]
) -> None:
    import onnx

    base = f"/jobs/{job['id']}/checkpoints/epoch-0001/export"
    with stack.client() as c:
        first = c.get(base, params={"fold_bn": "true"})
        # built by the worker: the API answers at once with where to poll
        assert first.status_code in (200, 202), first.text
        if first.status_code == 202:
            status_url = first.headers["Location"]
            assert c.get(status_url).json()["kind"] == "export"
        r = _until_ready(c, "GET", base, params={"fold_bn": "true", "wait": 20})
        assert r.status_code == 200, r.text
        cert = json.loads(r.headers["X-Normcore-Certificate"])
        assert cert["max_abs_diff"] < 1e-4 and cert["within_tolerance"] is True
        assert cert["probe"] == {"size": 64, "split": "val", "dataset": "digits"}
        assert cert["folded_layers"] == ["conv1.norm", "conv2.norm", "norm1.norm", "norm2.norm"]
        assert cert["batch_norm_nodes"] == 0
        assert r.headers["ETag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
        graph = onnx.load_model_from_string(r.content)
        assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]

        # The same options again: from the cache, no new worker task.
        again = c.get(base, params={"fold_bn": "true"})
        assert again.status_code == 200 and again.headers["X-Normcore-Cache"] == "hit"
        assert again.content == r.content
        exports = c.get(f"/jobs/{job['id']}/artifacts", params={"kind": "export"}).json()
        assert len(exports) == 1
        assert exports[0]["enqueues"] == 1 and exports[0]["runs"] == 1
        assert c.get(base, headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
        certificate = c.get(base + "/certificate").json()
        assert certificate == cert

        # Another user sees nothing of it.
        other = stack.token_for("mallory")
        with stack.client(other) as m:
            assert m.get(base).status_code == 404
            assert m.get(exports[0]["status_url"]).status_code == 404
        assert c.get(base, params={"format": "tflite"}).status_code == 422
        assert c.get(f"/jobs/{job['id']}/checkpoints/epoch-9999/export").status_code == 404


def _exact_bn_averages(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Per BN layer, in float64 with every BN on batch statistics (as in training): the mean
    over the batches of its input's batch mean and unbiased batch variance over (N, H, W)."""
    import copy

    net = copy.deepcopy(model).double().train()
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):

            def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], name: str = name) -> None:
                x = args[0]
                dims = [0, *range(2, x.dim())]
                seen.setdefault(name, []).append((x.mean(dims), x.var(dims, correction=1)))

            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            net(b.double())
    for h in hooks:
        h.remove()
    return {
        name: (torch.stack([a for a, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
        for name, v in seen.items()
    }


def _download_model(c: httpx.Client, job_id: str, name: str, tmp: Path) -> nn.Module:
    from normcore.checkpoint import load_model

    r = c.get(f"/jobs/{job_id}/checkpoints/{name}")
    assert r.status_code == 200, r.text
    path = tmp / f"{name}.safetensors"
    path.write_bytes(r.content)
    return load_model(path)


def test_recalibration_reports_both_metrics_and_exact_statistics(
    stack: Stack, job: dict[str, Any], tmp_path: Path
) -> None:
    from normcore.data import build_data
    from normcore.spec import JobSpec
    from worker.builds import recalibration_batches

    url = f"/jobs/{job['id']}/checkpoints/epoch-0001/recalibrate"
    with stack.client() as c:
        assert c.post(url, json={"batches": 0}).status_code == 422
        r = _until_ready(c, "POST", url, json={"batches": BATCHES}, params={"wait": 20})
        assert r.status_code == 200, r.text
        result = r.json()["result"]
        assert result["name"] == f"epoch-0001-recal{BATCHES}"
        listed = {ck["name"]: ck for ck in c.get(f"/jobs/{job['id']}/checkpoints").json()}
        recal = listed[result["name"]]
        original = listed["epoch-0001"]
        assert recal["recalibrated_from"] == "epoch-0001"
        # Both metrics, side by side: the original's as the engine reported them at save time.
        before = recal["recalibration"]["original_metrics"]
        assert before["val_accuracy"] == pytest.approx(original["metrics"]["val_accuracy"])
        assert 0.0 <= recal["metrics"]["val_accuracy"] <= 1.0
        assert recal["recalibration"]["batches_used"] == BATCHES
        old_model = _download_model(c, job["id"], "epoch-0001", tmp_path)
        new_model = _download_model(c, job["id"], result["name"], tmp_path)
        stats = c.get(f"/jobs/{job['id']}/checkpoints/{result['name']}/stats")
        assert stats.status_code == 200
        # a second request is the cached result
        again = c.post(url, json={"batches": BATCHES})
        assert again.status_code == 200 and again.headers["X-Normcore-Cache"] == "hit"

    spec = JobSpec.model_validate(SPEC)
    bundle = build_data(spec.data, seed=spec.seed, task=spec.task)
    batches = list(recalibration_batches(bundle, spec, BATCHES))
    expected = _exact_bn_averages(old_model, batches)
    modules = dict(new_model.named_modules())
    assert len(expected) == 4
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(modules[name].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(modules[name].running_var.double(), var, rtol=1e-5, atol=1e-5)


def test_cli_and_client_export_and_recalibrate(
    stack: Stack, job: dict[str, Any], tmp_path: Path
) -> None:
    """``normcore export`` and ``normcore recalibrate`` (and the Client methods under them),
    with the options the tests above used: served from the cache, so no worker time."""
    from typer.testing import CliRunner

    from normcore.client import ApiError, Client
    from service.cli import app as cli_app

    env = {
        **stack.env.env,
        "NORMCORE_URL": stack.url,
        "NORMCORE_TOKEN": stack.token,
        "XDG_CONFIG_HOME": str(tmp_path / "config-home"),
    }
    runner = CliRunner()
    out = tmp_path / "model.onnx"
    done = runner.invoke(
        cli_app, ["export", job["id"], "--format", "onnx", "--fold-bn", "-o", str(out)], env=env
    )
    assert done.exit_code == 0, done.output
    assert out.is_file() and "folded BN layers (4)" in done.output
    assert "within 0.0001" in done.output
    done = runner.invoke(
        cli_app, ["recalibrate", job["id"], "epoch-0001", "--batches", str(BATCHES)], env=env
    )
    assert done.exit_code == 0, done.output
    assert f"epoch-0001-recal{BATCHES}" in done.output and "val_accuracy" in done.output

    with Client(stack.url, stack.token) as client:
        path, cert = client.export(job["id"], "epoch-0001", tmp_path)
        assert path.read_bytes() == out.read_bytes() and cert["batch_norm_nodes"] == 0
        assert client.export_certificate(job["id"], "epoch-0001") == cert
        assert [a["kind"] for a in client.artifacts(job["id"])] == ["export", "recalibrate"]
        with pytest.raises(ApiError) as err:
            client.recalibrate(job["id"], "epoch-0001", batches=0)
        assert err.value.status == 422
