"""``GET /jobs/{a}/checkpoints/{n}/diff?against={b}/{m}``: per-layer change between checkpoints.

The answer's ``a`` is the path's checkpoint ``{a}/{n}``, its ``b`` the ``against`` one ``{b}/{m}``
(the reference): every change is ``a`` relative to ``b``, ``||a - b|| / ||b||``.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status

from service.api.deps import CurrentUser, SettingsDep, StoreDep, owned_job
from service.api.examples import UNAUTHORIZED, error_response
from service.api.routes_checkpoints import CheckpointName, _checkpoint_or_404, model_file
from service.api.schemas_validate import CheckpointDiffOut, CheckpointRef

log = logging.getLogger(__name__)
router = APIRouter(tags=["checkpoints"])

EXAMPLE_DIFF = {
    "a": {"job_id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e", "checkpoint": "epoch-0002"},
    "b": {"job_id": "3f2c1e0d9b8a47c6a5e4d3c2b1a09f8e", "checkpoint": "epoch-0001"},
    "modules": {
        "conv1.norm": {
            "weight": {"rel_l2": 0.031, "max_abs": 0.012, "mean_abs": 0.004},
            "running_var": {"rel_l2": 0.21, "max_abs": 0.9, "mean_abs": 0.3},
            "num_batches_tracked": {"a": 88, "b": 44, "change": 44},
        }
    },
    "summary": {"largest_running_var_change": {"module": "conv1.norm", "rel_l2": 0.21}},
}


def _split_against(against: str) -> tuple[str, str]:
    """``"<job id>/<checkpoint>"`` as its two parts; a 422 when it is not of that form."""
    job_id, sep, name = against.partition("/")
    if not sep or not job_id or not name or "/" in name:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_ENTITY,
            detail=[
                {
                    "loc": ["query", "against"],
                    "msg": f"against must be '<job id>/<checkpoint name>', e.g. "
                    f"'3f2c.../epoch-0001'; got {against[:80]!r}",
                    "type": "value_error",
                }
            ],
        )
    return job_id, name


def _load(path: Any, label: str) -> dict[str, Any]:
    """A model.safetensors read as tensors (never a pickle); a 500 naming it if it is corrupt."""
    # torch is imported here, not with the module: the API answers before it has loaded torch.
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # a corrupt file on disk is the server's fault: say so plainly
        log.error("cannot read %s: %s", path, exc)
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR,
            detail=f"checkpoint {label} is stored but cannot be read: {exc}",
        ) from None


@router.get(
    "/jobs/{job_id}/checkpoints/{name}/diff",
    response_model=CheckpointDiffOut,
    summary="Per-layer change of weights and running statistics against another checkpoint",
    responses={
        200: {"content": {"application/json": {"example": EXAMPLE_DIFF}}},
        **UNAUTHORIZED,
        404: error_response(
            "Either job or checkpoint does not exist or belongs to another user",
            "checkpoint 'epoch-0009' of job 'abc' not found",
        ),
        422: error_response(
            "The checkpoints are of different architectures (the keys named), or a bad against",
            "the checkpoints are of different architectures: 1 tensor(s) only in "
            "3f2c.../epoch-0002: fc.bias",
        ),
    },
)
def checkpoint_diff(
    job_id: str,
    name: CheckpointName,
    against: Annotated[
        str,
        Query(
            min_length=3,
            max_length=300,
            description="The reference checkpoint as '<job id>/<checkpoint name>'.",
        ),
    ],
    store: StoreDep,
    settings: SettingsDep,
    user: CurrentUser,
) -> Any:
    """Per module name, per tensor: the change of this checkpoint (``a``, the path's) relative
    to the ``against`` one (``b``, the reference), in float64: ``rel_l2`` = ||a - b|| / ||b||,
    the largest and mean absolute change, and ``num_batches_tracked`` (``change`` = a - b).

    Both jobs must be visible to the caller (404 otherwise, as for any job of another user);
    checkpoints whose tensors differ in names or shapes are refused with 422 naming them.
    """
    from normcore.checkpoint_diff import ArchitectureMismatch, diff_state_dicts, summarize

    other_id, other_name = _split_against(against)
    with store.read_transaction():
        job = owned_job(store, user, job_id)
        other = owned_job(store, user, other_id)
        record_a = _checkpoint_or_404(store, job.id, name)
        record_b = _checkpoint_or_404(store, other.id, other_name)
    label_a, label_b = f"{job.id}/{record_a.name}", f"{other.id}/{record_b.name}"
    state_a = _load(model_file(settings.artifact_dir, job.id, record_a), label_a)
    state_b = _load(model_file(settings.artifact_dir, other.id, record_b), label_b)
    try:
        modules = diff_state_dicts(state_a, state_b, names=(label_a, label_b))
    except ArchitectureMismatch as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, detail=str(exc)) from None
    return CheckpointDiffOut(
        a=CheckpointRef(job_id=job.id, checkpoint=record_a.name),
        b=CheckpointRef(job_id=other.id, checkpoint=record_b.name),
        modules=modules,
        summary=summarize(modules),
    )
