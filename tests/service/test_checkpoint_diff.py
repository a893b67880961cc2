"""GET /jobs/{a}/checkpoints/{n}/diff?against={b}/{m} through a real API and worker: the values
equal a float64 computation from the two downloaded safetensors files; another architecture is
a 422 naming the tensors; a job of another user is a 404, whichever side it is on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load as st_load

from tests.harness import Stack, make_env, running_stack, wait_for

pytestmark = pytest.mark.xdist_group("service-checkpoint-diff")


def _spec(norm: str, epochs: int) -> dict[str, Any]:
    return {
        "model": {"arch": "lenet", "norm": norm},
        "data": {"dataset": "synthetic", "batch_size": 16, "num_samples": 160, "image_size": 8},
        "epochs": epochs,
        "optim": {"lr": 0.05},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, str]]:
    """A stack with two finished jobs (8 steps an epoch): lenet/bn over 2 epochs, lenet/gn:4 over 1."""
    env = make_env(tmp_path_factory.mktemp("diff") / "nc")
    with running_stack(env) as stack, stack.client() as c:
        bn = c.post("/jobs", json=_spec("bn", 2)).json()["id"]
        gn = c.post("/jobs", json=_spec("gn:4", 1)).json()["id"]
        for job_id in (bn, gn):
            job = wait_for(
                lambda j=job_id: (
                    (d := c.get(f"/jobs/{j}").json())["status"]
                    in ("succeeded", "failed", "cancelled")
                    and d
                ),
                timeout=240,
                what=f"job {job_id}",
            )
            assert job["status"] == "succeeded", job
        yield stack, bn, gn


def _tensors(c: httpx.Client, job_id: str, name: str) -> dict[str, torch.Tensor]:
    r = c.get(f"/jobs/{job_id}/checkpoints/{name}")
    assert r.status_code == 200
    return st_load(io.BytesIO(r.content).getvalue())


def test_diff_equals_float64_from_the_two_checkpoints(trained: tuple[Stack, str, str]) -> None:
    stack, bn, _ = trained
    with stack.client() as c:
        r = c.get(f"/jobs/{bn}/checkpoints/epoch-0002/diff", params={"against": f"{bn}/epoch-0001"})
        assert r.status_code == 200, r.text
        body = r.json()
        a, b = _tensors(c, bn, "epoch-0001"), _tensors(c, bn, "epoch-0002")
    # ``a`` is the path's checkpoint, ``b`` the ``against`` one; the change is a relative to b
    assert body["a"] == {"job_id": bn, "checkpoint": "epoch-0002"}
    assert body["b"] == {"job_id": bn, "checkpoint": "epoch-0001"}
    modules = body["modules"]
    assert sum(len(m) for m in modules.values()) == len(a)
    for key, ta in a.items():
        module, _, leaf = key.rpartition(".")
        got = modules[module][leaf]
        tb = b[key]
        if not ta.is_floating_point():  # path (epoch 2) is "a", against (epoch 1) is "b"
            assert got == {"a": int(tb), "b": int(ta), "change": int(tb) - int(ta)}
            continue
        d = tb.double() - ta.double()
        assert got["rel_l2"] == pytest.approx((d.norm() / ta.double().norm()).item(), rel=1e-9)
        assert got["max_abs"] == pytest.approx(d.abs().max().item(), rel=1e-9)
        assert got["mean_abs"] == pytest.approx(d.abs().mean().item(), rel=1e-9)
        assert got["norm_a"] == pytest.approx(tb.double().norm().item(), rel=1e-9)
        assert got["norm_b"] == pytest.approx(ta.double().norm().item(), rel=1e-9)
    # one epoch of training moved the BN statistics; the counter grew by one epoch's steps
    bn1 = modules["conv1.norm"]
    assert bn1["running_var"]["rel_l2"] > 0
    assert bn1["num_batches_tracked"]["change"] == int(b["conv1.norm.num_batches_tracked"]) // 2
    assert bn1["num_batches_tracked"]["change"] > 0
    assert body["summary"]["largest_running_var_change"]["module"] in modules


def _only_in(detail: str) -> dict[str, str]:
    """{side: its tensors} from "N tensor(s) only in SIDE: a, b; ..." parts of a 422."""
    out = {}
    for part in detail.split("; "):
        _, found, rest = part.partition(" only in ")
        if found:
            side, _, names = rest.partition(": ")
            out[side] = names
    return out


def test_other_architecture_is_a_422_naming_the_tensors(trained: tuple[Stack, str, str]) -> None:
    stack, bn, gn = trained
    with stack.client() as c:
        r = c.get(f"/jobs/{bn}/checkpoints/epoch-0001/diff", params={"against": f"{gn}/epoch-0001"})
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert "running_mean" in detail and "different architectures" in detail
        # each side named by its job and checkpoint: BN's running statistics, GN's conv biases
        sides = _only_in(detail)
        assert "running_mean" in sides[f"{bn}/epoch-0001"], detail
        assert "conv1.conv.bias" in sides[f"{gn}/epoch-0001"], detail
        assert "first" not in detail and "second" not in detail
        swapped = c.get(
            f"/jobs/{gn}/checkpoints/epoch-0001/diff", params={"against": f"{bn}/epoch-0001"}
        )
        assert swapped.status_code == 422
        assert _only_in(swapped.json()["detail"]) == sides
        bad = c.get(f"/jobs/{bn}/checkpoints/epoch-0001/diff", params={"against": "no-slash"})
        assert bad.status_code == 422 and "against" in bad.text
        gone = c.get(
            f"/jobs/{bn}/checkpoints/epoch-0001/diff", params={"against": f"{bn}/epoch-0042"}
        )
        assert gone.status_code == 404 and "epoch-0042" in gone.text


def test_another_users_job_is_a_404_on_either_side(trained: tuple[Stack, str, str]) -> None:
    stack, bn, _ = trained
    with stack.client(stack.token_for("mallory")) as m:
        own = m.post("/jobs", json=_spec("bn", 1)).json()["id"]
        r = m.get(
            f"/jobs/{own}/checkpoints/epoch-0001/diff", params={"against": f"{bn}/epoch-0001"}
        )
        assert r.status_code == 404 and bn in r.text
        r = m.get(f"/jobs/{bn}/checkpoints/epoch-0002/diff", params={"against": f"{own}/x"})
        assert r.status_code == 404 and bn in r.text
        m.post(f"/jobs/{own}/cancel")
