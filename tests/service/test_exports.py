"""Exports and recalibrations, worker side and store side (issue 16 items 2 and 3).

The worker-side builders (``worker/builds.py``) run here in-process on checkpoints written by
``save_checkpoint`` from freshly built models (no training: the norms' affine parameters and
running statistics are randomized, so folding has something to fold); the API and the worker
task are exercised once, end to end, in tests/e2e/test_exports_e2e.py.

``NORMCORE_TEST_ONNX_ALL=1`` exports every pair of {lenet, resnet20} x {bn, gn, ln, in}; the
default runs a subset that covers folding on and off and both models (each export takes
seconds: torch's exporter traces the model and onnxscript optimizes the graph).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from normcore.checkpoint import load_model, save_checkpoint, verify_checkpoint
from normcore.models import build_model
from normcore.spec import JobSpec
from service.db import utcnow
from service.settings import Settings
from service.store import Store
from service.store.exports import ArtifactStatus, options_key
from tests.service.store_backends import BACKENDS, open_store, pg_database

F64 = torch.float64
ALL = os.environ.get("NORMCORE_TEST_ONNX_ALL") == "1"


def _spec(arch: str, norm: str, batch_size: int = 16) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": f"{arch}-{norm.split('(')[0]}",
            "model": {"arch": arch, "norm": norm, "num_classes": 10},
            "data": {"dataset": "digits", "batch_size": batch_size, "val_fraction": 0.2},
            "epochs": 1,
            "seed": 3,
        }
    )


def _checkpoint(root: Path, spec: JobSpec, seed: int = 0) -> Path:
    """A checkpoint folder of a freshly built model whose norm parameters and statistics are
    randomized (a running variance far from the data's: stale statistics)."""
    torch.manual_seed(seed)
    model = build_model(spec.model, in_channels=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
            if isinstance(getattr(m, "bias", None), torch.Tensor) and m.bias.dim() == 1:
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(getattr(m, "running_var", None), torch.Tensor):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    info = save_checkpoint(
        root / "checkpoints",
        epoch=1,
        step=10,
        model=model,
        spec=spec,
        metrics={"val_accuracy": 0.1},
        meta={
            "in_channels": 1,
            "num_classes": 10,
            "task": "classification",
            "data": {"image_size": [8, 8], "mean": [0.3], "std": [0.4]},
        },
    )
    return info.path


PAIRS = [
    ("lenet", "bn", True, True),
    ("lenet", "bn", False, False),
    ("resnet20", "bn", True, False),
]
if ALL:
    PAIRS += [
        ("lenet", "in", True, False),
        ("lenet", "gn:2", True, False),
        ("lenet", "ln", True, False),
        ("resnet20", "gn:2", True, False),
        ("resnet20", "ln", True, False),
        ("resnet20", "in", True, False),
    ]


@pytest.mark.parametrize(("arch", "norm", "fold_bn", "preprocessing"), PAIRS, ids=str)
def test_export_certificate_matches_onnxruntime(
    tmp_path: Path, arch: str, norm: str, fold_bn: bool, preprocessing: bool
) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime as ort

    from normcore import registry
    from normcore.data import build_data
    from worker.builds import export_checkpoint, onnx_op_counts

    spec = _spec(arch, norm)
    folder = _checkpoint(tmp_path, spec)
    out = tmp_path / "model.onnx"
    cert = export_checkpoint(
        folder,
        out,
        fold_bn=fold_bn,
        data_root=tmp_path,
        probe_size=16,
        include_preprocessing=preprocessing,
    )

    # The probe: the first 16 validation images of the job's own data, as the engine splits it
    # (normalized), or as the reader gave them (raw, in [0, 1]) when the graph normalizes.
    bundle = build_data(spec.data, seed=spec.seed, task=spec.task)
    probe = bundle.val_x[:16].double()
    mean = torch.tensor(bundle.mean, dtype=F64).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std, dtype=F64).view(1, -1, 1, 1)
    feed = probe * std + mean if preprocessing else probe
    assert cert["probe"]["size"] == 16 and cert["probe"]["split"] == "val"
    assert cert["input"]["preprocessing_in_graph"] is preprocessing
    model = load_model(folder)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    rows = [feed[i : i + 1].float().numpy() for i in range(16)]
    got = np.concatenate([session.run(None, {session.get_inputs()[0].name: r})[0] for r in rows])
    with torch.no_grad():
        want = model.double()(probe).numpy()
    own = float(np.abs(got.astype(np.float64) - want).max())
    assert own < 1e-4
    assert cert["max_abs_diff"] < 1e-4 and cert["within_tolerance"] is True
    assert cert["onnxruntime"] == ort.__version__
    assert isinstance(cert["opset"], int) and cert["opset"] >= 17
    assert cert["input"]["shape"] == [1, 1, 8, 8]

    bn_layers = [
        n
        for n, m in model.named_modules()
        if registry.kind_of(m) is not None and registry.kind_of(m).foldable
    ]
    counts = onnx_op_counts(out)
    assert cert["batch_norm_nodes"] == counts.get("BatchNormalization", 0)
    if fold_bn:
        assert sorted(cert["folded_layers"]) == sorted(bn_layers)
        assert counts.get("BatchNormalization", 0) == 0
    else:
        assert cert["folded_layers"] == []
        assert sorted(cert["kept_norm_layers"]) == sorted(bn_layers)
    if norm != "bn":
        assert cert["folded_layers"] == [] and cert["kept_norm_layers"]


def _exact_bn_averages(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, Any]:
    """Per BN layer, in float64: the mean over the batches of its batch mean and of its
    unbiased batch variance, over (N, H, W) (Ioffe & Szegedy 2015, Algorithm 2), with every
    BN using batch statistics as in training."""
    net = load_model_copy(model).double().train()
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
        name: (torch.stack([m for m, _ in v]).mean(0), torch.stack([s for _, s in v]).mean(0))
        for name, v in seen.items()
    }


def load_model_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_recalibration_writes_exact_averages_beside_the_original(tmp_path: Path) -> None:
    from normcore.checkpoint import read_meta
    from normcore.data import build_data
    from worker.builds import recalibrate_checkpoint, recalibration_batches

    spec = _spec("lenet", "bn(momentum=0.01)", batch_size=32)
    folder = _checkpoint(tmp_path, spec)
    original = load_model(folder)
    result = recalibrate_checkpoint(folder, batches=6, data_root=tmp_path)

    assert result["name"] == "epoch-0001-recal6" and result["batches_used"] == 6
    new_folder = folder.parent / result["name"]
    verify_checkpoint(new_folder)  # meta.json lists the model file with its sha256
    assert read_meta(new_folder)["recalibrated_from"]["checkpoint"] == "epoch-0001"
    recal = load_model(new_folder)

    bundle = build_data(spec.data, seed=spec.seed, task=spec.task)
    batches = list(recalibration_batches(bundle, spec, 6))
    assert len(batches) == 6 and all(len(b) == 32 for b in batches)
    expected = _exact_bn_averages(original, batches)
    modules = dict(recal.named_modules())
    assert expected, "lenet/bn has BN layers"
    for name, (mean, var) in expected.items():
        torch.testing.assert_close(modules[name].running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(modules[name].running_var.double(), var, rtol=1e-5, atol=1e-5)
        # The stale statistics are gone.
        assert not torch.allclose(
            modules[name].running_var, dict(original.named_modules())[name].running_var
        )
    # Weights are the original's: only the statistics moved.
    for (k, a), b in zip(original.state_dict().items(), recal.state_dict().values(), strict=True):
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(a, b), k

    # Both metrics are measured the same way, here and in the result.
    from worker.builds import evaluate

    assert result["original_metrics"] == pytest.approx(evaluate(original, bundle, 32))
    assert result["metrics"] == pytest.approx(evaluate(recal, bundle, 32))


def test_recalibrating_a_norm_without_statistics_is_a_clear_error(tmp_path: Path) -> None:
    from worker.builds import recalibrate_checkpoint

    folder = _checkpoint(tmp_path, _spec("lenet", "gn:2"))
    with pytest.raises(ValueError, match="no running statistics"):
        recalibrate_checkpoint(folder, batches=2, data_root=tmp_path)


# ----------------------------------------------------------------------------- the store


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """A migrated, empty store on SQLite and on PostgreSQL."""
    yield from open_store(request, tmp_path, "pg_url")


def _job(store: Store) -> str:
    store.create_token("alice", "alice-t")
    owner = store.get_user("alice")
    assert owner is not None
    spec = _spec("lenet", "bn").model_dump(mode="json")
    created = store.create_job(owner_id=owner.id, spec=spec, name=spec["name"], queue="cpu")
    return created[0].id if isinstance(created, tuple) else created.id


def test_artifacts_are_cached_by_checkpoint_hash_and_options(store: Store) -> None:
    job_id = _job(store)
    first, created = store.request_artifact(
        job_id,
        kind="export",
        checkpoint="epoch-0001",
        checkpoint_sha256="a" * 64,
        options={"format": "onnx", "fold_bn": True},
    )
    assert created and first.status == ArtifactStatus.QUEUED
    again, created = store.request_artifact(
        job_id,
        kind="export",
        checkpoint="epoch-0001",
        checkpoint_sha256="a" * 64,
        options={"fold_bn": True, "format": "onnx"},  # same options, another key order
    )
    assert not created and again.id == first.id
    other, created = store.request_artifact(
        job_id,
        kind="export",
        checkpoint="epoch-0001",
        checkpoint_sha256="a" * 64,
        options={"format": "onnx", "fold_bn": False},
    )
    assert created and other.id != first.id
    rewritten, created = store.request_artifact(
        job_id,
        kind="export",
        checkpoint="epoch-0001",
        checkpoint_sha256="b" * 64,  # the checkpoint was written again: a new export
        options={"format": "onnx", "fold_bn": True},
    )
    assert created and rewritten.id != first.id
    assert options_key({"b": 1, "a": 2}) == '{"a":2,"b":1}'


def test_claims_are_leased_and_only_the_holder_finishes(store: Store) -> None:
    job_id = _job(store)
    art, _ = store.request_artifact(
        job_id,
        kind="recalibrate",
        checkpoint="e",
        checkpoint_sha256="c" * 64,
        options={"batches": 2},
    )
    held = store.claim_artifact(art.id, worker_id="w1", lease_seconds=30)
    assert held is not None and held.runs == 1 and held.status == ArtifactStatus.RUNNING
    assert store.claim_artifact(art.id, worker_id="w2", lease_seconds=30) is None
    assert not store.finish_artifact(art.id, worker_id="w2", status=ArtifactStatus.SUCCEEDED)
    assert store.renew_artifact(art.id, worker_id="w1", lease_seconds=-1)  # expire it now
    taken = store.claim_artifact(art.id, worker_id="w2", lease_seconds=30)
    assert taken is not None and taken.runs == 2
    assert not store.finish_artifact(art.id, worker_id="w1", status=ArtifactStatus.FAILED)
    assert store.finish_artifact(
        art.id, worker_id="w2", status=ArtifactStatus.SUCCEEDED, result={"name": "e-recal2"}
    )
    done = store.get_artifact(art.id)
    assert done is not None and done.status == ArtifactStatus.SUCCEEDED
    assert done.finished_at is not None and utcnow() - done.finished_at < timedelta(minutes=1)
    assert store.claim_artifact(art.id, worker_id="w3", lease_seconds=30) is None


def test_deleting_a_job_deletes_its_artifacts(store: Store) -> None:
    job_id = _job(store)
    art, _ = store.request_artifact(
        job_id, kind="export", checkpoint="e", checkpoint_sha256="d" * 64, options={}
    )
    assert store.delete_job(job_id) is not None
    assert store.get_artifact(art.id) is None


def test_lost_messages_and_expired_leases_are_published_again(store: Store) -> None:
    from dataclasses import replace

    from service.artifacts import REPUBLISH_AFTER_S, _needs_publish

    job_id = _job(store)
    art, _ = store.request_artifact(
        job_id, kind="export", checkpoint="e", checkpoint_sha256="e" * 64, options={}
    )
    assert _needs_publish(art)  # never published (the broker was down)
    store.mark_artifact_enqueued(art.id)
    art = store.get_artifact(art.id)
    assert art is not None and art.enqueues == 1 and not _needs_publish(art)
    stale = replace(art, updated_at=utcnow() - timedelta(seconds=REPUBLISH_AFTER_S + 1))
    assert _needs_publish(stale)  # queued that long: its message may be lost
    held = store.claim_artifact(art.id, worker_id="w", lease_seconds=30)
    assert held is not None and not _needs_publish(held)
    assert _needs_publish(replace(held, lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_a_failure_is_tried_again_at_once_if_environmental_else_after_a_back_off(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.artifacts as artifact_service
    from service.api.routes_exports import _failed
    from service.artifacts import ENVIRONMENT, INTERRUPTED, request_artifact, retry_at
    from service.store import CheckpointRecord
    from service.store.exports import ArtifactKind
    from worker.artifacts import ENVIRONMENT as WORKER_ENVIRONMENT
    from worker.artifacts import INTERRUPTED as WORKER_INTERRUPTED

    assert INTERRUPTED == WORKER_INTERRUPTED and ENVIRONMENT == WORKER_ENVIRONMENT
    settings = Settings(data_dir=tmp_path / "nc")  # the store's, with its SQLite broker
    job_id = _job(store)
    ckpt = CheckpointRecord(
        job_id=job_id,
        name="epoch-0001",
        attempt=1,
        epoch=1,
        step=1,
        bytes=1,
        sha256="f" * 64,
        files={},
        metrics={},
        path="x",
        created_at=utcnow(),
    )
    for batches, error, retried in (
        (3, INTERRUPTED + "the artifact process died (exit -9)", True),
        (5, ENVIRONMENT + "ModuleNotFoundError: No module named 'onnx'; install ...", True),
        (4, "model.norm 'gn:2' keeps no running statistics", False),
    ):
        options = {"batches": batches}
        art, cached = request_artifact(
            store, settings, job_id, ckpt, ArtifactKind.RECALIBRATE, options
        )
        assert not cached and art.enqueues == 1
        assert store.claim_artifact(art.id, worker_id="w", lease_seconds=30) is not None
        store.finish_artifact(art.id, worker_id="w", status=ArtifactStatus.FAILED, error=error)
        again, cached = request_artifact(
            store, settings, job_id, ckpt, ArtifactKind.RECALIBRATE, options
        )
        assert cached and again.id == art.id
        if retried:
            assert again.status == ArtifactStatus.QUEUED and again.enqueues == 2
            assert again.error is None and again.finished_at is None
            continue
        # failed for a reason of its own: cached during the back-off, with when and why ...
        assert again.status == ArtifactStatus.FAILED and again.enqueues == 1
        assert again.error == error and again.finished_at is not None
        due = retry_at(again)
        assert due is not None
        assert due - again.finished_at == timedelta(seconds=artifact_service.FAILED_RETRY_AFTER_S)
        detail = _failed(again).detail
        assert f"failed at {again.finished_at:%Y-%m-%dT%H:%M:%S}Z: {error}" in detail
        assert f"a request from {due:%Y-%m-%dT%H:%M:%S}Z on builds it again" in detail
        # ... and built again by the first request after it, not cached for good
        monkeypatch.setattr(artifact_service, "FAILED_RETRY_AFTER_S", 0.0)
        later, cached = request_artifact(
            store, settings, job_id, ckpt, ArtifactKind.RECALIBRATE, options
        )
        assert cached and later.id == art.id
        assert later.status == ArtifactStatus.QUEUED and later.enqueues == 2


def _child_without_onnx(config: str, conn: Any) -> None:
    import sys

    from worker.artifacts import _child_main

    sys.modules["onnx"] = None  # type: ignore[assignment]  # `import onnx` raises ImportError
    _child_main(config, conn)


def test_an_export_on_a_worker_without_onnx_fails_as_environmental_naming_the_extra(
    tmp_path: Path,
) -> None:
    import json
    import multiprocessing

    from worker.artifacts import ENVIRONMENT

    config = {"kind": "export", "folder": str(tmp_path), "out_path": str(tmp_path / "x.onnx")}
    config |= {"options": {}, "data_root": str(tmp_path), "threads": 1}
    recv_end, send_end = multiprocessing.Pipe(duplex=False)
    proc = multiprocessing.get_context("fork").Process(
        target=_child_without_onnx, args=(json.dumps(config), send_end)
    )
    proc.start()
    send_end.close()
    assert recv_end.poll(60)
    outcome = json.loads(recv_end.recv_bytes())
    proc.join(10)
    assert proc.exitcode == 1 and outcome["status"] == "failed"
    assert outcome["error"].startswith(ENVIRONMENT)
    assert "ModuleNotFoundError" in outcome["error"]
    assert "install normcore[onnx] on the worker" in outcome["error"]


def test_a_deleted_jobs_folder_rewritten_by_its_artifact_is_removed(
    store: Store, tmp_path: Path
) -> None:
    from worker.artifacts import _remove_if_deleted

    settings = Settings(data_dir=tmp_path / "nc")
    job_id = _job(store)
    exports = settings.job_dir(job_id) / "exports"
    exports.mkdir(parents=True)
    _remove_if_deleted(store, settings, job_id)
    assert exports.is_dir()  # the job lives: its files stay
    store.delete_job(job_id)
    _remove_if_deleted(store, settings, job_id)
    assert not settings.job_dir(job_id).exists()


def test_normcore_recalibrate_says_how_many_batches_were_used() -> None:
    from service.cli import recalibrated_line

    short = {"name": "epoch-0001-recal50", "batches": 50, "batches_used": 44}
    line = recalibrated_line(short, 50)
    assert line.startswith("checkpoint epoch-0001-recal50: over 44 of the 50 batches asked for")
    full = {"name": "epoch-0001-recal8", "batches": 8, "batches_used": 8}
    assert recalibrated_line(full, 8) == "checkpoint epoch-0001-recal8 (over 8 batches)"
