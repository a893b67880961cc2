"""Norm telemetry through a real API and worker (issue 15 items 1-3).

One embedded stack (SQLite store and broker, one worker, 1 training thread, so runs are
bit-reproducible) and four tiny jobs, submitted at once and run in order:

- lenet + BatchNorm at batch 2 on digits (70% held out, so an epoch is 269 steps), 2 epochs:
  the gap between running and batch statistics is large and ``GET /jobs/{id}`` carries the
  warning, naming layers, while the job still runs;
- the same at batch 32, 1 epoch: gap rows but no warning; its telemetry rows equal float64
  summaries of the downloaded checkpoint's buffers;
- GroupNorm at batch 2: no warning, no gap (nothing uses batch statistics), probe rows;
- a data file with one huge (finite) pixel per image: the first BatchNorm's running_var
  overflows at step 1 and the job fails then, with the layer named.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.torch import load as load_safetensors

from normcore.client import Client
from tests.harness import Stack, make_env, running_stack, wait_for

BASE: dict[str, Any] = {
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 2, "val_fraction": 0.7},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "epochs": 1,
    "seed": 0,
    "resources": {"device": "cpu"},
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
}
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")


def _spec(name: str, **changes: Any) -> dict[str, Any]:
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    spec["name"] = name
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section][field] = value
        else:
            spec[section] = value
    return spec


def _npz_bytes() -> bytes:
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1)).astype(np.float32)
    x[:, 0, 0, 0] = 1e30  # a corrupt pixel in every image
    buf = io.BytesIO()
    np.savez(buf, x=x, y=(np.arange(64) % 10).astype(np.int64))
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API and one worker on SQLite for the whole module."""
    env = make_env(tmp_path_factory.mktemp("telemetry"), NORMCORE_TRAIN_THREADS="1")
    (env.data_root / "corrupt.npz").write_bytes(_npz_bytes())
    with running_stack(env, workers=1) as s:
        yield s


@pytest.fixture(scope="module")
def jobs(stack: Stack) -> dict[str, Any]:
    """Submit the four jobs; follow the first until it ends, noting when its warning showed."""
    specs = {
        "bn2": _spec("bn-b2", epochs=2),
        "bn32": _spec("bn-b32", data__batch_size=32),
        "gn2": _spec("gn-b2", model__norm="gn:2"),
        "corrupt": _spec(
            "corrupt",
            data={"dataset": "npz", "path": "corrupt.npz", "batch_size": 8, "normalize": False},
        ),
    }
    out: dict[str, Any] = {}
    with stack.client() as c:
        for key, spec in specs.items():
            r = c.post("/jobs", json=spec)
            assert r.status_code == 201, r.text
            out[key] = r.json()["id"]
        seen: dict[str, Any] = {}

        def warned_or_done() -> dict[str, Any] | None:
            body = c.get(f"/jobs/{out['bn2']}").json()
            mine = [w for w in body["warnings"] if w["source"] == "telemetry"]
            if mine and "status" not in seen:
                seen.update(status=body["status"], warnings=body["warnings"])
            return body if body["status"] in FINISHED else None

        wait_for(warned_or_done, timeout=400, interval=0.2, what="the batch-2 BN job")
        out["bn2_seen"] = seen
        for key in ("bn32", "gn2", "corrupt"):

            def done(job_id: str = out[key]) -> dict[str, Any] | None:
                body = c.get(f"/jobs/{job_id}").json()
                return body if body["status"] in FINISHED else None

            out[key + "_body"] = wait_for(done, timeout=300, interval=0.3, what=key)
        out["bn2_body"] = c.get(f"/jobs/{out['bn2']}").json()
    return out


def _telemetry_warnings(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's warnings from norm telemetry (submit-time checks add their own, "validate")."""
    return [w for w in body["warnings"] if w["source"] == "telemetry"]


def _gap_rows(c: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    rows = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
    return [r for r in rows if r["split"] == "gap"]


def test_small_batch_bn_warns_while_running_and_names_layers(
    stack: Stack, jobs: dict[str, Any]
) -> None:
    assert jobs["bn2_body"]["status"] == "succeeded", jobs["bn2_body"]
    seen = jobs["bn2_seen"]
    assert seen, "no warning appeared on GET /jobs/{id}"
    assert seen["status"] == "running"  # shown live, not only at the end
    (warning,) = [w for w in seen["warnings"] if w["code"] == "train_eval_gap"]
    assert warning["source"] == "telemetry"
    assert "moved most in" in warning["message"] and "GroupNorm" in warning["message"]
    named = warning["message"].split("moved most in ")[1]
    layers = ("conv1.norm", "conv2.norm", "norm1.norm", "norm2.norm")
    assert any(named.startswith(layer) for layer in layers), named
    with stack.client() as c:
        gaps = _gap_rows(c, jobs["bn2"])
        logs = c.get(f"/jobs/{jobs['bn2']}/logs").json()["items"]
    assert len(gaps) == 2
    assert max(abs(g["values"]["gap_accuracy"]) for g in gaps) >= 0.05
    assert any("train/eval gap" in line["message"] for line in logs)


def test_large_batch_bn_has_no_warning_and_rows_equal_checkpoint_buffers(
    stack: Stack, jobs: dict[str, Any]
) -> None:
    body = jobs["bn32_body"]
    assert body["status"] == "succeeded", body
    assert _telemetry_warnings(body) == []
    job_id = jobs["bn32"]
    with stack.client() as c:
        assert len(_gap_rows(c, job_id)) == 1
        page = c.get(f"/jobs/{job_id}/norms").json()
        (ckpt,) = c.get(f"/jobs/{job_id}/checkpoints").json()
        blob = c.get(f"/jobs/{job_id}/checkpoints/{ckpt['name']}").content
        one = c.get(f"/jobs/{job_id}/norms", params={"layer": "conv2.norm"}).json()["items"]
        tail = c.get(f"/jobs/{job_id}/norms", params={"after": page["items"][3]["seq"]}).json()
        small = c.get(f"/jobs/{job_id}/norms", params={"max_points": 2}).json()
        bad = c.get(f"/jobs/{job_id}/norms", params={"max_points": 1})
        with stack.client(stack.token_for("mallory")) as m:
            other = m.get(f"/jobs/{job_id}/norms")
    assert bad.status_code == 422 and other.status_code == 404
    rows = page["items"]
    assert {r["trigger"] for r in rows} == {"start", "eval"}
    assert [r["layer"] for r in one] == ["conv2.norm", "conv2.norm"]
    with Client(stack.url, token=stack.token) as client:
        assert client.norms(job_id, layer="conv2.norm")["items"] == one
    assert [r["seq"] for r in tail["items"]] == [r["seq"] for r in rows[4:]]
    assert tail["next"] == page["next"] == rows[-1]["seq"]
    assert small["items"]
    state = load_safetensors(blob)
    final = [r for r in rows if r["step"] == ckpt["step"]]
    assert len(final) == 4
    for row in final:
        name, v = row["layer"], row["values"]
        var = state[f"{name}.running_var"].double().numpy()
        mean = state[f"{name}.running_mean"].double().numpy()
        gamma = state[f"{name}.weight"].double().numpy()
        assert v["var_mean"] == pytest.approx(var.mean(), rel=1e-12)
        assert v["var_std"] == pytest.approx(var.std(), rel=1e-12)
        assert v["var_min"] == var.min() and v["var_max"] == var.max()
        assert v["mean_mean"] == pytest.approx(mean.mean(), rel=1e-12, abs=1e-15)
        assert v["gamma_norm"] == pytest.approx(np.linalg.norm(gamma), rel=1e-12)
        assert v["num_batches_tracked"] == int(state[f"{name}.num_batches_tracked"])
        # drift since the start record: running_var began at ones
        ones = np.ones_like(var)
        want = np.linalg.norm(var - ones) / np.linalg.norm(ones)
        assert v["var_drift"] == pytest.approx(want, rel=1e-9)


def test_groupnorm_small_batch_has_no_warning(stack: Stack, jobs: dict[str, Any]) -> None:
    body = jobs["gn2_body"]
    assert body["status"] == "succeeded", body
    assert _telemetry_warnings(body) == []
    with stack.client() as c:
        assert _gap_rows(c, jobs["gn2"]) == []
        rows = c.get(f"/jobs/{jobs['gn2']}/norms").json()["items"]
    assert rows and {r["values"]["source"] for r in rows} == {"probe"}
    assert all(r["values"]["num_batches_tracked"] is None for r in rows)


def test_non_finite_running_var_fails_the_job_at_step_one(
    stack: Stack, jobs: dict[str, Any]
) -> None:
    body = jobs["corrupt_body"]
    assert body["status"] == "failed", body
    assert "non-finite norm statistics at step 1" in body["error"]
    assert "conv1.norm (running_var)" in body["error"]
    with stack.client() as c:
        rows = c.get(f"/jobs/{jobs['corrupt']}/metrics").json()["items"]
    assert not [r for r in rows if r["split"] == "train"]
