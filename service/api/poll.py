"""The follower's poll without the framework: ``GET /jobs/{id}/metrics?after=N[&limit=M]``.

Followers (the CLI, ``Client.iter_metrics``, the dashboard) send this request many times a
second, and most answers are an empty page. Through FastAPI each one paid for routing over every
route, dependency solving, parameter validation and a second validation of the response model:
about as much CPU as the two SQL statements it runs. :class:`PollFastPath` answers the common
form of the request itself and hands everything else, unchanged, to the app:

- a GET of ``/jobs/{job_id}/metrics`` whose query holds only ``after`` and ``limit``, each at
  most once, as plain decimal numbers within the route's bounds (``limit`` up to
  ``INLINE_READ_ROWS``); anything else (``final``, ``max_points``, a malformed or unknown
  parameter: the route's 422s) goes to the route;
- a caller known without the store: auth off (the local admin), or a bearer token the API's
  token cache holds (the first request of a token goes to the route, which fills the cache);
- a job the caller may see (a missing or foreign job goes to the route, which answers 404).

The page it sends is the route's: the same rows (``service.store.poll`` reads what
``has_job`` and ``get_metrics`` read), the same JSON (NaN and infinities as null), the same
headers, and the request is counted under the route's template by the metrics middleware.
Any error before the answer starts falls back to the route too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import anyio.to_thread
import pydantic_core
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service import auth
from service.api.headers import is_plain_name
from service.store.poll import PollRow, PollStatements

log = logging.getLogger(__name__)

ROUTE_PATH = "/jobs/{job_id}/metrics"
# The route's bounds (routes_jobs.get_metrics); a larger page goes to the route.
MAX_AFTER = 2**62
INLINE_READ_ROWS = 1000
DEFAULT_LIMIT = 1000

_PATH = re.compile(r"/jobs/([^/]+)/metrics")
_NUMBER = re.compile(rb"[0-9]{1,19}")


def parse_poll_query(query: bytes) -> tuple[int, int] | None:
    """``(after, limit)`` from a query string holding only those two, each at most once, as
    plain decimals within the route's bounds; None for anything else (the route decides)."""
    after, limit = 0, DEFAULT_LIMIT
    if not query:
        return after, limit
    seen: set[bytes] = set()
    for part in query.split(b"&"):
        name, eq, value = part.partition(b"=")
        if not eq or name in seen or not _NUMBER.fullmatch(value):
            return None
        seen.add(name)
        number = int(value)
        if name == b"after" and number <= MAX_AFTER:
            after = number
        elif name == b"limit" and 1 <= number <= INLINE_READ_ROWS:
            limit = number
        else:
            return None
    return after, limit


def page_body(rows: list[PollRow], after: int) -> bytes:
    """The JSON of ``MetricPage`` for ``rows``: ``{"items": [...], "next": last seq or after}``.

    Key order and compact separators as the route's answer; NaN and infinities are null.
    """
    if not rows:
        return b'{"items":[],"next":%d}' % after
    page = {"items": [r._asdict() for r in rows], "next": rows[-1].seq}
    return pydantic_core.to_json(page, inf_nan_mode="null")


def find_route(routes: Iterable[Any]) -> APIRoute:
    """The ``GET /jobs/{job_id}/metrics`` route among ``routes``; LookupError if missing."""
    for route in routes:
        if isinstance(route, APIRoute) and route.path == ROUTE_PATH and "GET" in route.methods:
            return route
    raise LookupError(f"no GET {ROUTE_PATH} route")


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value.decode("latin-1")
    return None


class PollFastPath:
    """Pure ASGI middleware: answers the common poll itself, passes everything else on.

    ``state`` is the FastAPI app's state (settings, store, local_user, token_cache); ``route``
    the ``GET /jobs/{job_id}/metrics`` route (see :func:`find_route`).
    """

    def __init__(self, app: ASGIApp, state: Any, route: APIRoute) -> None:
        self.app = app
        self.state = state
        self.route = route
        self.settings = state.settings
        self.store = state.store
        self.statements = PollStatements(self.store.engine)
        self.inline = self.store.dialect == "sqlite"

    def _user(self, scope: Scope) -> Any | None:
        if not self.settings.auth:
            return self.state.local_user
        try:
            token = auth.parse_bearer(_bearer(scope))
        except auth.AuthError:
            return None
        return self.state.token_cache.get(token)

    def _read(self, job_id: str, owner_id: int | None, after: int, limit: int) -> bytes | None:
        rows = self.statements.read(job_id, owner_id=owner_id, after=after, limit=limit)
        return None if rows is None else page_body(rows, after)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a plain poll here; anything else (or any failure) goes to the app."""
        body = await self._try(scope) if scope["type"] == "http" else None
        if body is None:
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", b"%d" % len(body)),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _try(self, scope: Scope) -> bytes | None:
        if scope.get("method") != "GET" or scope.get("root_path"):
            return None
        match = _PATH.fullmatch(scope.get("path", ""))
        if match is None or not is_plain_name(match.group(1)):
            return None
        query = parse_poll_query(scope.get("query_string", b""))
        if query is None:
            return None
        user = self._user(scope)
        if user is None:
            return None
        job_id = match.group(1)
        owner_id = None if user.admin else user.id
        try:
            if self.inline:
                # As the route: a small local SQLite read costs less than a thread hop.
                body = self._read(job_id, owner_id, *query)
            else:
                body = await anyio.to_thread.run_sync(self._read, job_id, owner_id, *query)
        except Exception:
            log.debug("poll fast path failed; the route answers", exc_info=True)
            return None
        if body is not None:
            # The route object, so the metrics middleware labels this answer with its template.
            scope["route"] = self.route
            scope["path_params"] = {"job_id": job_id}
        return body
