"""Export and recalibration routes: ONNX files with their equivalence certificate, recalibrated
checkpoints, and the status of each artifact a worker builds (``service/artifacts.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, HTTPException, Query, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service import artifacts as artifact_service
from service.api.deps import OwnedJob, SettingsDep, StoreDep
from service.api.examples import NOT_FOUND, UNAUTHORIZED, error_response
from service.api.routes_checkpoints import CheckpointName, _checkpoint_or_404, _etag_matches
from service.api.schemas import ArtifactOut, RecalibrateIn
from service.errors import InvalidInput
from service.store.exports import ArtifactKind, ArtifactRecord, ArtifactStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["exports"])

CERTIFICATE_HEADER = "X-Normcore-Certificate"
CACHE_HEADER = "X-Normcore-Cache"
POLL_SECONDS = 0.25
MAX_WAIT_SECONDS = 30.0

Wait = Annotated[
    float,
    Query(
        ge=0,
        le=MAX_WAIT_SECONDS,
        description="Seconds to wait for the worker before answering 202 (0: answer at once)",
    ),
]
FoldBn = Annotated[bool, Query(description="Fold each BN into the conv or linear layer before it")]
Format = Annotated[Literal["onnx"], Query(description="The export format (onnx only)")]
Preprocessing = Annotated[
    bool,
    Query(
        description="Put the training data's normalization in the graph's first nodes: the "
        "input is then the raw image, float in [0, 1] (default: the normalized image)"
    ),
]

EXAMPLE_CERTIFICATE: dict[str, Any] = {
    "format": "onnx",
    "checkpoint": "epoch-0001",
    "fold_bn": True,
    "max_abs_diff": 1.4e-06,
    "tolerance": 0.0001,
    "within_tolerance": True,
    "probe": {"size": 64, "split": "val", "dataset": "digits"},
    "onnxruntime": "1.32.0",
    "onnx": "1.23.2",
    "torch": "2.13.0",
    "opset": 20,
    "folded_layers": ["conv1.norm", "conv2.norm", "norm1.norm", "norm2.norm"],
    "kept_norm_layers": [],
    "batch_norm_nodes": 0,
    "input": {
        "name": "x",
        "shape": [1, 1, 8, 8],
        "normalized": True,
        "preprocessing_in_graph": False,
        "value_range": None,
        "mean": [0.3047],
        "std": [0.3755],
    },
    "outputs": ["linear_2"],
}
EXAMPLE_ARTIFACT: dict[str, Any] = {
    "id": "5b0c2f7e9d8a4c1b8e7f6a5d4c3b2a19",
    "job_id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e",
    "kind": "export",
    "checkpoint": "epoch-0001",
    "checkpoint_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "options": {"format": "onnx", "fold_bn": True, "preprocessing": False},
    "status": "succeeded",
    "error": None,
    "result": EXAMPLE_CERTIFICATE,
    "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
    "bytes": 262144,
    "enqueues": 1,
    "runs": 1,
    "created_at": "2026-11-30T04:00:00Z",
    "finished_at": "2026-11-30T04:00:09Z",
    "status_url": "/jobs/3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e/artifacts/5b0c2f7e9d8a4c1b8e7f6a5d4c3b2a19",
}
EXAMPLE_RECALIBRATION: dict[str, Any] = {
    **EXAMPLE_ARTIFACT,
    "kind": "recalibrate",
    "options": {"batches": 50},
    "result": {
        "name": "epoch-0001-recal50",
        "epoch": 1,
        "step": 45,
        "bytes": 260384,
        "sha256": "ec7257faf4b78f811f84e23a787ff054ffe630150caa4ddef8623e58cc3e25de",
        "metrics": {"val_loss": 0.19, "val_accuracy": 0.955},
        "original_metrics": {"val_loss": 1.22, "val_accuracy": 0.540},
        "batches": 50,
        "batches_used": 44,
    },
    "sha256": None,
    "bytes": None,
}
_QUEUED = {**EXAMPLE_ARTIFACT, "status": "queued", "result": None, "sha256": None, "bytes": None}
_ACCEPTED = {
    202: {
        "model": ArtifactOut,
        "description": "Being built by a worker: poll the Location (or repeat the request)",
        "content": {"application/json": {"example": {**_QUEUED, "finished_at": None}}},
    }
}
_FAILED = {
    422: error_response(
        "Invalid option, or the worker could not build it (the detail says why)",
        "export of checkpoint 'epoch-0001' failed: ...",
    )
}


def _status_url(art: ArtifactRecord) -> str:
    return f"/jobs/{art.job_id}/artifacts/{art.id}"


def _out(art: ArtifactRecord) -> ArtifactOut:
    out = ArtifactOut.model_validate(art)
    out.status_url = _status_url(art)
    return out


def _accepted(art: ArtifactRecord, cached: bool) -> JSONResponse:
    return JSONResponse(
        _out(art).model_dump(mode="json"),
        status_code=status.HTTP_202_ACCEPTED,
        headers={
            "Location": _status_url(art),
            "Retry-After": "1",
            CACHE_HEADER: "hit" if cached else "miss",
        },
    )


def _failed(art: ArtifactRecord) -> HTTPException:
    """422 saying why and when the build failed, and when a request builds it again."""
    when = f" at {art.finished_at:%Y-%m-%dT%H:%M:%SZ}" if art.finished_at else ""
    due = artifact_service.retry_at(art)
    again = f"; a request from {due:%Y-%m-%dT%H:%M:%SZ} on builds it again" if due else ""
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        detail=f"{art.kind} of checkpoint {art.checkpoint!r} failed{when}: {art.error}{again}",
    )


def _cpu_worker_live(store: Any, settings: Any) -> bool:
    workers = store.list_workers(live_within_seconds=settings.worker_live_seconds)
    return any("cpu" in w.queues for w in workers)


async def _wait(store: Any, settings: Any, art: ArtifactRecord, wait: float) -> ArtifactRecord:
    """The artifact once it is finished, or as it is after ``wait`` seconds; at once when no
    cpu worker is live to build it (nothing would change while we wait)."""
    done = (ArtifactStatus.SUCCEEDED, ArtifactStatus.FAILED)
    if (
        wait > 0
        and art.status not in done
        and not await run_in_threadpool(_cpu_worker_live, store, settings)
    ):
        return art
    deadline = time.monotonic() + wait
    while art.status not in (ArtifactStatus.SUCCEEDED, ArtifactStatus.FAILED):
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_SECONDS)
        art = await run_in_threadpool(store.get_artifact, art.id) or art
    return art


async def _export(
    job: Any,
    name: str,
    options: dict[str, Any],
    wait: float,
    store: Any,
    settings: Any,
) -> tuple[ArtifactRecord, bool]:
    record = await run_in_threadpool(_checkpoint_or_404, store, job.id, name)
    art, cached = await run_in_threadpool(
        artifact_service.request_artifact,
        store,
        settings,
        job.id,
        record,
        ArtifactKind.EXPORT,
        options,
    )
    return await _wait(store, settings, art, wait), cached


def _export_file(settings: Any, art: ArtifactRecord) -> Path:
    """The export's file, confined to its job's folder (404 when gone)."""
    job_root = settings.job_dir(art.job_id).resolve()
    path = (Path(settings.artifact_dir) / str(art.path)).resolve()
    if not art.path or not path.is_relative_to(job_root) or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="the export's file is gone")
    return path


@router.get(
    "/jobs/{job_id}/checkpoints/{name}/export",
    summary="A checkpoint exported to ONNX (built by a worker, cached)",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The ONNX file; ETag is its quoted sha256; X-Normcore-Certificate "
            "holds the equivalence certificate as JSON",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        304: {"description": "If-None-Match matched the ETag"},
        **_ACCEPTED,
        **_FAILED,
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
async def export_checkpoint(
    job: OwnedJob,
    name: CheckpointName,
    store: StoreDep,
    settings: SettingsDep,
    format: Format = "onnx",
    fold_bn: FoldBn = True,
    preprocessing: Preprocessing = False,
    wait: Wait = 0.0,
    if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
) -> Response:
    """The first request starts a worker task and answers 202 with a Location to poll (or waits
    up to ``wait`` seconds for it); once built, the ONNX file (graph input: one image,
    normalized as in training) with its certificate. The same options again are served from
    the cache (``X-Normcore-Cache: hit``), without a new worker task."""
    options = artifact_service.export_options(format, fold_bn, preprocessing)
    art, cached = await _export(job, name, options, wait, store, settings)
    if art.status == ArtifactStatus.FAILED:
        raise _failed(art)
    if art.status != ArtifactStatus.SUCCEEDED:
        return _accepted(art, cached)
    etag = f'"{art.sha256}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "private, max-age=0, must-revalidate",
        CACHE_HEADER: "hit" if cached else "miss",
        CERTIFICATE_HEADER: json.dumps(art.result, separators=(",", ":")),
    }
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    path = await run_in_threadpool(_export_file, settings, art)
    suffix = ("-folded" if fold_bn else "") + ("-raw-input" if preprocessing else "")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job.id}-{art.checkpoint}{suffix}.onnx",
        headers=headers,
    )


@router.get(
    "/jobs/{job_id}/checkpoints/{name}/export/certificate",
    summary="The equivalence certificate of a checkpoint's ONNX export",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_CERTIFICATE}}},
        **_ACCEPTED,
        **_FAILED,
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
async def export_certificate(
    job: OwnedJob,
    name: CheckpointName,
    store: StoreDep,
    settings: SettingsDep,
    format: Format = "onnx",
    fold_bn: FoldBn = True,
    preprocessing: Preprocessing = False,
    wait: Wait = 0.0,
) -> Any:
    """Largest absolute logit difference of onnxruntime from eager on a probe batch of the
    job's validation images, the probe's size, onnxruntime's version, the opset and the folded
    layers. Requests the export (202) if it is not built yet."""
    options = artifact_service.export_options(format, fold_bn, preprocessing)
    art, cached = await _export(job, name, options, wait, store, settings)
    if art.status == ArtifactStatus.FAILED:
        raise _failed(art)
    if art.status != ArtifactStatus.SUCCEEDED:
        return _accepted(art, cached)
    return JSONResponse(art.result, headers={CACHE_HEADER: "hit" if cached else "miss"})


def _refuse_without_running_stats(spec: dict[str, Any], name: str) -> None:
    """Raise InvalidInput (a 422 at ["path", "name"]) when the job's model keeps no running
    statistics (GroupNorm, LayerNorm, ...): the worker would fail the recalibration with the
    same reason. A spec that cannot be read or built here is left to the worker to judge."""
    from normcore.spec import ModelSpec
    from normcore.validate import keeps_running_stats

    try:
        model = ModelSpec.model_validate(spec.get("model") or {})
        channels = model.in_channels or (spec.get("data") or {}).get("channels") or 3
        keeps = keeps_running_stats(model, in_channels=int(channels))
    except Exception as exc:  # a spec from an older release, or a meta-device gap
        log.info("recalibrate: running statistics of the job's model not checked: %s", exc)
        return
    if not keeps:
        norm = model.norm if isinstance(model.norm, str) else str(model.norm)
        raise InvalidInput(
            ["path", "name"],
            f"checkpoint {name!r}: model.norm {norm!r} keeps no running statistics: nothing "
            "to recalibrate (only batch-statistics norms such as BatchNorm keep them)",
        )


@router.post(
    "/jobs/{job_id}/checkpoints/{name}/recalibrate",
    summary="Recompute a checkpoint's BN statistics over K training batches (precise BN)",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=ArtifactOut,
    responses={
        200: {
            "model": ArtifactOut,
            "description": "Already done (the same batches before)",
            "content": {"application/json": {"example": EXAMPLE_RECALIBRATION}},
        },
        202: {
            "description": "Being built by a worker: poll the Location (or repeat the request)",
            "content": {"application/json": {"example": {**_QUEUED, "kind": "recalibrate"}}},
        },
        400: error_response(
            "Malformed JSON body", "malformed JSON body: invalid JSON; send a JSON object"
        ),
        422: error_response(
            "The job's model keeps no running statistics (GroupNorm, LayerNorm, ...)",
            [
                {
                    "loc": ["path", "name"],
                    "msg": "checkpoint 'epoch-0001': model.norm 'gn:4' keeps no running "
                    "statistics: nothing to recalibrate (only batch-statistics norms such as "
                    "BatchNorm keep them)",
                    "type": "value_error",
                }
            ],
        ),
        **_FAILED,
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
async def recalibrate_checkpoint(
    job: OwnedJob,
    name: CheckpointName,
    store: StoreDep,
    settings: SettingsDep,
    body: Annotated[RecalibrateIn, Body()],
    wait: Wait = 0.0,
) -> Any:
    """A worker recomputes every BN layer's running mean and variance as exact averages over
    ``batches`` training batches and writes ``<name>-recal<K>`` beside the checkpoint with its
    validation metrics (the list of checkpoints shows both). 202 with a Location to poll; 200
    with the result once it is built."""
    record = await run_in_threadpool(_checkpoint_or_404, store, job.id, name)
    await run_in_threadpool(_refuse_without_running_stats, job.spec, name)
    art, cached = await run_in_threadpool(
        artifact_service.request_artifact,
        store,
        settings,
        job.id,
        record,
        ArtifactKind.RECALIBRATE,
        artifact_service.recalibrate_options(body.batches),
    )
    art = await _wait(store, settings, art, wait)
    if art.status == ArtifactStatus.FAILED:
        raise _failed(art)
    if art.status != ArtifactStatus.SUCCEEDED:
        return _accepted(art, cached)
    return JSONResponse(
        _out(art).model_dump(mode="json"), headers={CACHE_HEADER: "hit" if cached else "miss"}
    )


@router.get(
    "/jobs/{job_id}/artifacts",
    response_model=list[ArtifactOut],
    summary="The job's exports and recalibrations",
    responses={
        200: {"content": {"application/json": {"example": [EXAMPLE_ARTIFACT]}}},
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def list_artifacts(
    job: OwnedJob,
    store: StoreDep,
    kind: Annotated[Literal["export", "recalibrate"] | None, Query()] = None,
) -> Any:
    """Every export and recalibration requested for the job, oldest first, with status and
    result (certificates included)."""
    return [_out(a) for a in store.list_artifacts(job.id, kind=kind)]


@router.get(
    "/jobs/{job_id}/artifacts/{artifact_id}",
    response_model=ArtifactOut,
    summary="One export or recalibration: its status and result",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_ARTIFACT}}},
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def get_artifact(
    job: OwnedJob,
    artifact_id: Annotated[str, PathParam(min_length=1, max_length=64)],
    store: StoreDep,
) -> Any:
    """Where the worker stands (queued, running, succeeded, failed), with the result."""
    art = store.get_artifact(artifact_id) if artifact_id.isalnum() else None
    if art is None or art.job_id != job.id:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"artifact {artifact_id[:80]!r} not found"
        )
    return _out(art)
