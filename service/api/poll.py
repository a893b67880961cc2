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
- a caller with a live token (auth off: the local admin): from the API's token cache, else looked
  up once here and cached (a missing, invalid or revoked token goes to the route: its 401);
- a job the caller may see (a missing or foreign job goes to the route, which answers 404).

Where it runs: on SQLite a small read costs less than a thread hop, so the token lookup and the
rows are read on the event loop (on PostgreSQL, on a thread). A page is read in chunks of
``INLINE_PAGE_ROWS`` rows, and the loop serves other requests between chunks: a follower catching
up on a long job (1,000 rows cost about 7 ms to read and encode on one core) no longer holds
every other poll behind it. Followers asking for the same long page at once (a lab opening one
job's dashboard, 16 followers starting together) share one read.

The page it sends is the route's: the same rows (``service.store.poll`` reads what
``has_job`` and ``get_metrics`` read), the same JSON (NaN and infinities as null), the same
headers, and the request is counted under the route's template by the metrics middleware.
Any error before the answer starts falls back to the route too.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

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
# Rows read and encoded between two turns of the event loop (about 0.5 ms on one core).
INLINE_PAGE_ROWS = 64

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


def items_json(rows: list[PollRow]) -> bytes:
    """The JSON of ``rows`` as items of a page, without the brackets (NaN and infinities null)."""
    return pydantic_core.to_json([r._asdict() for r in rows], inf_nan_mode="null")[1:-1]


def page_body(rows: list[PollRow], after: int) -> bytes:
    """The JSON of ``MetricPage`` for ``rows``: ``{"items": [...], "next": last seq or after}``.

    Key order and compact separators as the route's answer; NaN and infinities are null.
    """
    return joined_page([items_json(rows)] if rows else [], rows[-1].seq if rows else after)


def joined_page(parts: list[bytes], next_seq: int) -> bytes:
    """A page from the item JSON of its chunks (:func:`items_json`, oldest first)."""
    return b'{"items":[' + b",".join(parts) + b'],"next":%d}' % next_seq


class _Longer(NamedTuple):
    """A page longer than its first chunk: the caller's ``owner_id`` and that chunk."""

    owner_id: int | None
    rows: list[PollRow]


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
        # Long pages being read, by (job_id, owner_id, after, limit).
        self._long_pages: dict[tuple[str, int | None, int, int], asyncio.Future[bytes | None]] = {}

    def _user(self, scope: Scope) -> Any | None:
        """The caller, or None (the route answers: 401). May read the store (a cache miss)."""
        if not self.settings.auth:
            return self.state.local_user
        try:
            return auth.authenticate(self.store, _bearer(scope), self.state.token_cache)
        except auth.AuthError:
            return None

    def _first(self, scope: Scope, job_id: str, after: int, limit: int) -> bytes | _Longer | None:
        """The page when its first chunk holds it all; ``_Longer`` when it may hold more (see
        :meth:`_long_page`); None to pass the request on (unknown caller, job not visible)."""
        user = self._user(scope)
        if user is None:
            return None
        owner_id = None if user.admin else user.id
        first = min(limit, INLINE_PAGE_ROWS)
        rows = self.statements.read(job_id, owner_id=owner_id, after=after, limit=first)
        if rows is None:
            return None
        if len(rows) < first or first == limit:
            return page_body(rows, after)
        return _Longer(owner_id, rows)

    def _chunk(
        self, job_id: str, owner_id: int | None, after: int, limit: int
    ) -> list[PollRow] | None:
        return self.statements.read(job_id, owner_id=owner_id, after=after, limit=limit)

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self.inline:
            return fn(*args)
        return await anyio.to_thread.run_sync(fn, *args)

    async def _long_page(self, job_id: str, first: _Longer, limit: int) -> bytes | None:
        """The rest of a page after its first chunk, a chunk per turn of the event loop; each
        chunk continues after the last seq read (as a follower paging with a small limit)."""
        parts, count, last = [items_json(first.rows)], len(first.rows), first.rows[-1].seq
        while count < limit:
            await asyncio.sleep(0)  # let the requests waiting on the loop in
            size = min(INLINE_PAGE_ROWS, limit - count)
            rows = await self._run(self._chunk, job_id, first.owner_id, last, size)
            if rows is None:  # deleted meanwhile: the route answers
                return None
            if rows:
                parts.append(items_json(rows))
                count, last = count + len(rows), rows[-1].seq
            if len(rows) < size:
                break
        return joined_page(parts, last)

    async def _shared_long_page(
        self, job_id: str, first: _Longer, after: int, limit: int
    ) -> bytes | None:
        """:meth:`_long_page`, one read for callers asking for the same page at once."""
        key = (job_id, first.owner_id, after, limit)
        task = self._long_pages.get(key)
        if task is None:
            task = asyncio.ensure_future(self._long_page(job_id, first, limit))
            self._long_pages[key] = task
            task.add_done_callback(lambda _: self._long_pages.pop(key, None))
        # Shielded: a caller that goes away does not cancel the read the others wait on.
        return await asyncio.shield(task)

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
        job_id = match.group(1)
        try:
            if self.inline:
                body = self._first(scope, job_id, *query)
            else:
                body = await anyio.to_thread.run_sync(self._first, scope, job_id, *query)
            if isinstance(body, _Longer):
                body = await self._shared_long_page(job_id, body, *query)
        except Exception:
            log.debug("poll fast path failed; the route answers", exc_info=True)
            return None
        if body is not None:
            # The route object, so the metrics middleware labels this answer with its template.
            scope["route"] = self.route
            scope["path_params"] = {"job_id": job_id}
        return body
