"""The FastAPI application factory: ``uvicorn service.api.app:create_app --factory``."""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import normcore
from service import auth, queue
from service.api import (
    routes_checkpoints,
    routes_exports,
    routes_health,
    routes_jobs,
    routes_workers,
)
from service.api.content_type import NOT_JSON_HINT, FormAsJsonMiddleware, is_json_type
from service.api.deps import NoUnknownQuery
from service.api.examples import UNKNOWN_PARAMETER
from service.api.metrics import Metrics, MetricsMiddleware, ServiceCollector
from service.api.poll import PollFastPath, find_route
from service.api.routes_diff import router as diff_router
from service.api.routes_norms import router as norms_router
from service.api.routes_sweeps import router as sweeps_router
from service.api.routes_validate import router as validate_router
from service.errors import Conflict, InvalidInput, LimitExceeded, ServiceError
from service.reaper import Reaper
from service.settings import Settings, get_settings
from service.store import Store
from service.sweeps.releaser import Releaser
from service.ui import routes as ui_routes

log = logging.getLogger(__name__)

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}

DESCRIPTION = """
Send a CNN training job as JSON, watch its loss and accuracy while it runs, and download
checkpoints whose normalization layers carry their running statistics.

Authenticate with `Authorization: Bearer <token>` (create one with `normcore token create NAME`).
`/healthz`, `/readyz`, `/metrics`, `/docs` and `/openapi.json` need no token.

Request bodies are JSON. A body sent without `Content-Type: application/json` (none, or
`application/x-www-form-urlencoded` as `curl -d @spec.json` sends) is read as JSON too; any
other Content-Type gets a 422 saying to send `Content-Type: application/json`.
"""


def _json_response(status_code: int, detail: Any) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail}).encode()
    start = {
        "type": "http.response.start",
        "status": status_code,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body}


class BodyLimitMiddleware:
    """Answer 413 for a body over ``max_bytes``, by Content-Length and by the bytes received.

    The body (at most ``max_bytes``) is buffered before the app runs, so an oversized chunked
    upload is refused before any handler sees it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send) -> None:
        for message in _json_response(
            status.HTTP_413_CONTENT_TOO_LARGE, f"request body over {self.max_bytes} bytes"
        ):
            await send(message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the declared and the streamed size, then replay the body to the app."""
        if scope["type"] != "http" or scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    for message in _json_response(400, "invalid Content-Length header"):
                        await send(message)
                    return
                if declared > self.max_bytes:
                    await self._reject(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class LoopbackOnlyMiddleware:
    """With auth off, answer 403 to any client that is not on this machine (defence in depth)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse non-loopback clients; pass everything else through."""
        if scope["type"] == "http":
            client = scope.get("client")
            if client and not auth.is_loopback(client[0]):
                for message in _json_response(
                    status.HTTP_403_FORBIDDEN,
                    "this server runs without auth and only answers loopback clients",
                ):
                    await send(message)
                return
        await self.app(scope, receive, send)


def _human_msg(error: dict[str, Any]) -> str:
    """A validation message a user can act on: no pydantic prefixes, the bad value shown."""
    msg = str(error.get("msg", "invalid value"))
    kind = error.get("type", "")
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "missing":
        return f"{where} is required"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}: remove it or check its spelling"
    value = error.get("input")
    if kind != "value_error" and isinstance(value, str | int | float | bool):
        return f"{msg} (got {_echo(value)})"
    return msg


ECHO_MAX = 80  # characters of a user's value an error message repeats


def _echo(value: str | int | float | bool) -> str:
    """``repr(value)``, a long string cut to its first ECHO_MAX characters and its length."""
    if isinstance(value, str) and len(value) > ECHO_MAX:
        return f"{value[:ECHO_MAX]!r}... ({len(value)} characters)"
    return repr(value)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """422 with ``detail`` a list of ``{loc, msg, type}``; malformed JSON is a 400."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse(
                {"detail": f"malformed JSON body: {reason}; send a JSON object"},
                status_code=status.HTTP_400_BAD_REQUEST,
            )
    content_type = request.headers.get("content-type")
    if not is_json_type(content_type) and any(
        tuple(error.get("loc", ())) == ("body",) for error in errors
    ):
        # The body reached the model as bytes: its type, not its fields, is what is wrong.
        detail_msg = f"{NOT_JSON_HINT} (got Content-Type: {content_type})"
        return JSONResponse(
            {"detail": [{"loc": ["body"], "msg": detail_msg, "type": "content_type"}]},
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
    detail = [
        {
            "loc": [p for p in error.get("loc", ()) if p != "body"] or ["body"],
            "msg": _human_msg(error),
            "type": str(error.get("type", "value_error")),
        }
        for error in errors
    ]
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


# The status code of each domain error kind (service.errors); the first match wins.
DOMAIN_STATUS: tuple[tuple[type[ServiceError], int], ...] = (
    (InvalidInput, status.HTTP_422_UNPROCESSABLE_CONTENT),
    (LimitExceeded, status.HTTP_429_TOO_MANY_REQUESTS),
    (Conflict, status.HTTP_409_CONFLICT),
)


# FastAPI's answer when the body's bytes could not be decoded as JSON at all (not UTF-8, nested
# past the recursion limit, an integer past int's digit limit): it names no reason.
_BODY_PARSE_DETAIL = "There was an error parsing the body"


def _body_parse_reason(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and str(cause):
        return str(cause).split(";")[0][:200]
    return "unreadable"


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's own HTTP errors, with a reason where it gives none for a body it could not
    parse (400 ``malformed JSON body: <reason>; send a JSON object``, as for invalid JSON)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == status.HTTP_400_BAD_REQUEST and exc.detail == _BODY_PARSE_DETAIL:
        reason = _body_parse_reason(exc.__cause__)
        return JSONResponse(
            {"detail": f"malformed JSON body: {reason}; send a JSON object"},
            status_code=status.HTTP_400_BAD_REQUEST,
        )
    return await http_exception_handler(request, exc)


async def domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A domain error as ``{"detail": exc.detail}`` with the status of its kind (DOMAIN_STATUS);
    an unmapped kind is a 400, never a 500."""
    assert isinstance(exc, ServiceError)
    code = next(
        (c for kind, c in DOMAIN_STATUS if isinstance(exc, kind)), status.HTTP_400_BAD_REQUEST
    )
    return JSONResponse({"detail": exc.detail}, status_code=code)


def _document_unknown_parameter(app: FastAPI) -> None:
    # Every route may answer 422 for an unknown query parameter; say so where FastAPI did not.
    for route in app.routes:
        if isinstance(route, APIRoute) and not any(str(code) == "422" for code in route.responses):
            route.responses = {**route.responses, **UNKNOWN_PARAMETER}


# Spec validation needs the norm factory and the models (a parameter count), and so torch:
# seconds of imports on a busy machine. The app imports them on a thread once it runs, so it
# answers (/healthz, polls) without waiting for them, and the first POST rarely does.
SPEC_MODULES = ("normcore.factory", "normcore.models")


def import_spec_modules() -> None:
    """Import ``SPEC_MODULES`` (torch with them); a failure is logged, the first POST retries."""
    started = time.monotonic()
    for name in SPEC_MODULES:
        try:
            importlib.import_module(name)
        except Exception:
            log.exception("importing %s failed; the first submit will try again", name)
            return
    log.info("spec modules imported in %.1f s", time.monotonic() - started)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API: migrate the store, wire routes, auth, body limit and metrics.

    While the app runs (its lifespan) a reaper thread re-queues jobs of dead workers and
    republishes lost messages (``api_reaper``; see ``service.reaper``).
    """
    settings = settings or get_settings()
    auth.check_auth_allowed(settings.auth, settings.host)
    store = Store.from_settings(settings)
    store.upgrade()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The API reaps too: when the only worker dies, its job must still come back (re-queued
        # and published) for the next worker to start, without waiting for a worker's reaper.
        reaper = Reaper(settings, store) if settings.api_reaper else None
        if reaper is not None:
            reaper.start()
        # Sweeps: submits a sweep's next runs as its children finish (service.sweeps).
        releaser = Releaser(settings, store)
        releaser.start()
        threading.Thread(target=import_spec_modules, name="spec-imports", daemon=True).start()
        try:
            yield
        finally:
            releaser.stop()
            if reaper is not None:
                reaper.stop()
            store.dispose()

    app = FastAPI(
        title="normcore training service",
        version=normcore.__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # /docs and /redoc are served from vendored assets by service.ui (no CDN).
        docs_url=None,
        redoc_url=None,
        # A query parameter no route declares is a 422 naming it, never silently ignored.
        dependencies=[NoUnknownQuery],
    )
    app.state.settings = settings
    app.state.store = store
    app.state.local_user = None if settings.auth else auth.local_admin(store)
    app.state.token_cache = auth.TokenCache()
    metrics = Metrics()
    metrics.add_collector(
        ServiceCollector(store.count_by_status, lambda: queue.queue_depth(settings))
    )
    app.state.metrics = metrics

    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ServiceError, domain_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.include_router(routes_health.router)
    # before routes_jobs: /jobs/validate is a path of its own, never a job id
    app.include_router(validate_router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_checkpoints.router)
    app.include_router(routes_exports.router)
    app.include_router(diff_router)
    app.include_router(norms_router)
    app.include_router(routes_workers.router)
    app.include_router(sweeps_router)
    ui_routes.mount(app)
    _document_unknown_parameter(app)

    # The last added is the outermost: metrics see every answer, 413 and 403 included, and the
    # body limit runs before anything reads the body. The poll fast path is the innermost: a
    # poll it answers has passed the loopback rule and is counted like any other.
    metrics_route = find_route(routes_jobs.router.routes)
    app.add_middleware(PollFastPath, state=app.state, route=metrics_route)
    # curl -d's form Content-Type (or none) on a JSON body: read it as JSON (content_type.py)
    app.add_middleware(FormAsJsonMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if not settings.auth:
        app.add_middleware(LoopbackOnlyMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
