"""Checkpoint routes: list, download (ETag, 304, Range) and running statistics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response

from service.api.deps import OwnedJob, SettingsDep, StoreDep
from service.api.headers import IfRangeHeader, RangeHeader, is_plain_name
from service.api.routes_jobs import NOT_FOUND, UNAUTHORIZED, _err
from service.api.schemas import CheckpointOut, StatsOut

log = logging.getLogger(__name__)
router = APIRouter(tags=["checkpoints"])

MODEL_FILE = "model.safetensors"
# No max_length: a name no checkpoint can have (over 200 characters, say) is a 404 from
# _checkpoint_or_404 before any query, as for job ids, not a 422 echoing the name.
CheckpointName = Annotated[str, PathParam(min_length=1)]

_CKPT_NOT_FOUND = {
    404: _err("No such job or checkpoint", "checkpoint 'epoch-0009' of job 'abc' not found")
}


def _checkpoint_or_404(store: Any, job_id: str, name: str) -> Any:
    # A name the worker never writes (NUL, '/', spaces...) cannot match: no query for it.
    record = store.get_checkpoint(job_id, name) if is_plain_name(name) else None
    if record is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"checkpoint {name[:80]!r} of job {job_id!r} not found",
        )
    return record


def model_file(artifact_dir: Path, job_id: str, record: Any) -> Path:
    """The checkpoint's model.safetensors, resolved and confined to the job's artifact folder.

    A recorded path that points elsewhere (absolute, ``..`` or a symlink out) is refused with 404:
    a request must never read outside the job's own files.
    """
    job_root = (Path(artifact_dir) / "jobs" / job_id).resolve()
    recorded = Path(record.path)
    folder = recorded if recorded.is_absolute() else Path(artifact_dir) / recorded
    candidate = folder if folder.name == MODEL_FILE else folder / MODEL_FILE
    resolved = candidate.resolve()
    if not resolved.is_relative_to(job_root):
        log.warning("checkpoint %s of job %s points outside its folder", record.name, job_id)
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="checkpoint file not available")
    if not resolved.is_file():
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail=f"checkpoint {record.name!r} is recorded but its file is gone "
            "(pruned by keep_last?)",
        )
    return resolved


def _etag_matches(if_none_match: str, etag: str) -> bool:
    tags = [t.strip() for t in if_none_match.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


@router.get(
    "/jobs/{job_id}/checkpoints",
    response_model=list[CheckpointOut],
    summary="The job's checkpoints",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": [
                        {
                            "name": "epoch-0001",
                            "epoch": 1,
                            "step": 45,
                            "bytes": 1102336,
                            "sha256": "9f86d081884c7d659a2feaa0c55ad015"
                            "a3bf4f1b2b0b822cd15d6c15b0f00a08",
                            "metrics": {"val_accuracy": 0.9},
                        }
                    ]
                }
            }
        },
        **UNAUTHORIZED,
        **NOT_FOUND,
    },
)
def list_checkpoints(job: OwnedJob, store: StoreDep) -> Any:
    """Name, epoch, step, size, sha256 and metrics of every recorded checkpoint; a recalibrated
    one also names its original and carries the original's metrics (``recalibration``)."""
    from service.artifacts import recalibrations_by_name

    recal = recalibrations_by_name(store, job.id)
    out = []
    for c in store.list_checkpoints(job.id):
        item = CheckpointOut.model_validate(c)
        art = recal.get(c.name)
        if art is not None and art.result is not None:
            item.recalibrated_from = art.checkpoint
            item.recalibration = {
                k: art.result.get(k) for k in ("batches", "batches_used", "original_metrics")
            }
        out.append(item)
    return out


@router.get(
    "/jobs/{job_id}/checkpoints/{name}",
    summary="Download a checkpoint's model.safetensors",
    response_class=FileResponse,
    responses={
        200: {
            "description": "The safetensors file; ETag is its quoted sha256",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        },
        206: {"description": "The requested byte range"},
        304: {"description": "If-None-Match matched the ETag"},
        400: {
            "description": "Malformed Range (not bytes=..., no usable range, start after end)",
            "content": {"text/plain": {"example": "Malformed range header."}},
        },
        416: {
            "description": "Range starts past the end of the file (Content-Range: bytes */size)",
            "content": {"text/plain": {"example": ""}},
        },
        **UNAUTHORIZED,
        **_CKPT_NOT_FOUND,
    },
)
def download_checkpoint(
    request: Request,
    job: OwnedJob,
    name: CheckpointName,
    store: StoreDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
    byte_range: RangeHeader = None,
    if_range: IfRangeHeader = None,
) -> Response:
    """The model.safetensors of one checkpoint; supports If-None-Match, Range and If-Range.

    ``Range`` and ``If-Range`` are declared for the OpenAPI document and bounded in length;
    Starlette's FileResponse reads and answers them (206, 400 malformed, 416 past the end).
    """
    record = _checkpoint_or_404(store, job.id, name)
    path = model_file(settings.artifact_dir, job.id, record)
    etag = f'"{record.sha256}"'
    if if_none_match and _etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{job.id}-{record.name}.safetensors",
        headers={"ETag": etag, "Cache-Control": "private, max-age=0, must-revalidate"},
    )


@router.get(
    "/jobs/{job_id}/checkpoints/{name}/stats",
    response_model=StatsOut,
    summary="Running statistics of every norm layer of a checkpoint",
    responses={
        200: {
            "content": {
                "application/json": {
                    "example": {
                        "job_id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e",
                        "checkpoint": "epoch-0001",
                        "layers": [
                            {
                                "name": "layer1.0.bn1",
                                "kind": "batchnorm",
                                "class": "BatchNorm2d",
                                "num_channels": 2,
                                "running_mean": [0.01, -0.02],
                                "running_var": [0.98, 1.03],
                                "summary": {"mean_abs_mean": 0.015, "mean_var": 1.005},
                            }
                        ],
                    }
                }
            }
        },
        **UNAUTHORIZED,
        **_CKPT_NOT_FOUND,
    },
)
def checkpoint_stats(
    job: OwnedJob, name: CheckpointName, store: StoreDep, settings: SettingsDep
) -> Any:
    """Per norm layer: name, kind, class, channels, running mean and variance, a summary.

    ``class`` is the torch class name ("BatchNorm2d"), as ``kind`` is in ``/norms`` rows and
    in ``normcore.stats.norm_stats``: the name every route gives the layer's class. ``kind`` here
    is the family of state the file holds ("batchnorm": running statistics; "affine_norm":
    weight and bias only), kept for older clients. ``class`` is None for a layer the job's
    spec does not build.
    """
    from safetensors.torch import load_file

    from normcore.stats import norm_stats_from_state_dict

    record = _checkpoint_or_404(store, job.id, name)
    path = model_file(settings.artifact_dir, job.id, record)
    try:
        state = load_file(str(path))
    except Exception as exc:  # a corrupt file on disk is the server's fault: say so plainly
        log.error("cannot read %s: %s", path, exc)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            detail=f"checkpoint {name!r} is stored but cannot be read: {exc}",
        ) from None
    layers = norm_stats_from_state_dict(state, classes=_norm_classes(job.spec))
    return StatsOut(job_id=job.id, checkpoint=record.name, layers=layers)


def _norm_classes(spec: dict[str, Any]) -> dict[str, str]:
    """{module path: torch class name} of the norm layers of the job's model, built on the meta
    device (class names do not depend on the input channels); {} when it cannot be built."""
    import torch

    from normcore.models import build_model
    from normcore.spec import JobSpec
    from normcore.stats import norm_classes

    try:
        model_spec = JobSpec.model_validate(spec).model
        with torch.device("meta"):
            return norm_classes(build_model(model_spec, in_channels=3))
    except (ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        # a spec stored by an older release, or an arch that cannot build on meta: no classes
        log.info("no norm classes for the stats of this job: %s", exc)
        return {}
