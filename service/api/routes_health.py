"""Liveness, readiness and Prometheus routes (no token needed)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service import queue
from service.api.deps import SettingsDep, StoreDep
from service.api.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])

PING_TIMEOUT_SECONDS = 5.0


async def _probe(fn: Any, *args: Any) -> tuple[bool, str | None]:
    """Run a blocking ping in a thread with a deadline; (ok, why not)."""
    try:
        with anyio.fail_after(PING_TIMEOUT_SECONDS):
            ok = await anyio.to_thread.run_sync(lambda: fn(*args), abandon_on_cancel=True)
    except TimeoutError:
        return False, f"no answer within {PING_TIMEOUT_SECONDS:g}s"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return bool(ok), None if ok else "ping failed"


@router.get(
    "/healthz",
    response_model=HealthOut,
    summary="Liveness: 200 while the process serves",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
def healthz() -> HealthOut:
    """Always 200 while the process can answer."""
    return HealthOut()


@router.get(
    "/readyz",
    response_model=ReadyOut,
    summary="Readiness: the store and the broker answer",
    responses={
        200: {
            "content": {
                "application/json": {"example": {"status": "ready", "store": True, "broker": True}}
            }
        },
        503: {
            "model": ReadyOut,
            "description": "The store or the broker does not answer",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "store": True,
                        "broker": False,
                        "detail": "broker: no answer within 5s",
                    }
                }
            },
        },
    },
)
async def readyz(store: StoreDep, settings: SettingsDep) -> Any:
    """200 when the store and the broker answer a ping; 503 naming the one that failed."""
    store_ok, store_why = await _probe(store.ping)
    broker_ok, broker_why = await _probe(queue.broker_ping, settings)
    if store_ok and broker_ok:
        return ReadyOut(status="ready", store=True, broker=True)
    why = "; ".join(
        f"{name}: {reason}"
        for name, ok, reason in (("store", store_ok, store_why), ("broker", broker_ok, broker_why))
        if not ok
    )
    body = ReadyOut(status="unavailable", store=store_ok, broker=broker_ok, detail=why)
    return JSONResponse(body.model_dump(), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {
                    "example": 'normcore_jobs{status="running"} 2.0\nnormcore_queue_depth 5.0\n'
                }
            }
        }
    },
)
def prometheus_metrics(request: Request) -> Response:
    """Jobs by status, queue depth, request latency and counts, in Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
