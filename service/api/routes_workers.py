"""Worker routes: the workers that registered themselves, for admins."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, HTTPException, status

from service.api.deps import CurrentUser, SettingsDep, StoreDep
from service.api.schemas import ErrorOut, WorkerList, WorkerOut
from service.db import utcnow

router = APIRouter(tags=["workers"])

_EXAMPLE_WORKER = {
    "name": "normcore-4242@gpu-box-1",
    "host": "gpu-box-1",
    "pid": 4242,
    "gpus": 2,
    "gpu_names": ["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"],
    "memory_bytes": 540_000_000_000,
    "queues": ["cpu", "gpu"],
    "started_at": "2026-01-01T12:00:00Z",
    "heartbeat_at": "2026-01-01T12:05:00Z",
    "version": "0.1.0",
    "live": True,
}


@router.get(
    "/workers",
    response_model=WorkerList,
    summary="Registered workers and whether each is live (admins only)",
    responses={
        200: {"content": {"application/json": {"example": {"items": [_EXAMPLE_WORKER]}}}},
        401: {"model": ErrorOut, "description": "Missing, invalid or revoked token"},
        403: {"model": ErrorOut, "description": "The caller is not an admin"},
    },
)
def list_workers(store: StoreDep, settings: SettingsDep, user: CurrentUser) -> Any:
    """Every worker that registered, with ``live`` = a heartbeat within the liveness window."""
    if not user.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="listing workers needs an admin token"
        )
    now = utcnow()
    items = [
        WorkerOut(**asdict(w), live=w.is_live(settings.worker_live_seconds, now))
        for w in store.list_workers()
    ]
    return WorkerList(items=items)
