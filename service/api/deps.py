"""FastAPI dependencies: settings, the store, the current user, the caller's job, and the check
that refuses query parameters a route does not declare.

The cheap dependencies are ``async def``: FastAPI runs a sync dependency on the thread pool, a
hop that costs more than the dependency itself. Only store reads go to the pool: a token
lookup the cache cannot answer, and the route's own reads (one read transaction per request).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.api.headers import is_plain_name
from service.settings import Settings
from service.store import JobRecord, Store, UserRecord

# auto_error=False: we answer 401 ourselves, with WWW-Authenticate and a useful message.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token from `normcore token create NAME` (or <data_dir>/admin.token).",
)


async def get_settings(request: Request) -> Settings:
    """The Settings the app was created with."""
    return request.app.state.settings


async def get_store(request: Request) -> Store:
    """The app's Store."""
    return request.app.state.store


def token_cache(request: Request) -> auth.TokenCache:
    """The app's cache of token lookups (made on first use; TTL ``auth.TOKEN_CACHE_TTL_S``)."""
    cache = getattr(request.app.state, "token_cache", None)
    if cache is None:
        # Two requests racing here each make one; the loser's entries are simply dropped.
        cache = request.app.state.token_cache = auth.TokenCache()
    return cache


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


def unauthorized(detail: str) -> HTTPException:
    """A 401 that tells the client to use a bearer token."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def get_current_user(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> UserRecord:
    """The user behind the bearer token, or the built-in local admin when auth is off.

    A token seen live in the last ``auth.TOKEN_CACHE_TTL_S`` seconds is answered from the
    cache on the event loop; otherwise the store is asked on the thread pool (so a revocation
    takes effect within the TTL). Raises a 401 (with ``WWW-Authenticate: Bearer``) for a
    missing, invalid or revoked token.
    """
    if not settings.auth:
        return request.app.state.local_user
    header = request.headers.get("authorization")
    cache = token_cache(request)
    try:
        token = auth.parse_bearer(header)
        user = cache.get(token)
        if user is not None:
            return user
        return await run_in_threadpool(auth.authenticate, store, header, cache)
    except auth.AuthError as exc:
        raise unauthorized(exc.detail) from None


CurrentUser = Annotated[UserRecord, Depends(get_current_user)]


def owner_filter(user: UserRecord) -> int | None:
    """The owner_id to filter by: None (everyone) for admins, the user's id otherwise."""
    return None if user.admin else user.id


def job_not_found(job_id: str) -> HTTPException:
    """The 404 for a job that does not exist or belongs to someone else (never a 403)."""
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")


def owned_job(store: Store, user: UserRecord, job_id: str) -> JobRecord:
    """The job ``job_id`` if ``user`` may see it, read from the store; a 404 otherwise.

    Called inside a route's ``store.read_transaction()`` it joins that transaction.
    """
    if not is_plain_name(job_id):  # NUL, '/', non-ASCII: no such id, and PostgreSQL refuses NUL
        raise job_not_found(job_id[:80])
    job = store.get_job(job_id, owner_id=owner_filter(user))
    if job is None:
        raise job_not_found(job_id)
    return job


def check_owned_job(store: Store, user: UserRecord, job_id: str) -> None:
    """A 404 unless ``job_id`` exists and ``user`` may see it; reads the job's key only."""
    if not is_plain_name(job_id):
        raise job_not_found(job_id[:80])
    if not store.has_job(job_id, owner_id=owner_filter(user)):
        raise job_not_found(job_id)


def get_owned_job(job_id: str, store: StoreDep, user: CurrentUser) -> JobRecord:
    """The job ``job_id`` if the caller may see it; 404 otherwise."""
    return owned_job(store, user, job_id)


OwnedJob = Annotated[JobRecord, Depends(get_owned_job)]


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def declared_query_params(route: APIRoute) -> frozenset[str]:
    """The query parameter names (aliases) a route reads, its dependencies' included (cached)."""
    cached = getattr(route, "_normcore_query_names", None)
    if cached is None:
        cached = frozenset(_query_names(route.dependant))
        route._normcore_query_names = cached  # type: ignore[attr-defined]
    return cached


async def reject_unknown_query_params(request: Request) -> None:
    """Refuse (422) any query parameter the matched route does not declare.

    A misspelt filter (``?stauts=running``) would otherwise be ignored silently and the client
    would get every job. The error names each unknown parameter and lists the ones the route
    takes. Installed as an app-wide dependency, so it holds on every route.
    """
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = declared_query_params(route)
    unknown = sorted({k for k in request.query_params if k not in known})
    if not unknown:
        return
    takes = ", ".join(sorted(known)) or "none"
    raise RequestValidationError(
        [
            {
                "loc": ("query", name),
                "msg": f"unknown query parameter {name!r}; this route takes: {takes}",
                "type": "unknown_parameter",
                "input": request.query_params.get(name),
            }
            for name in unknown
        ]
    )


NoUnknownQuery = Depends(reject_unknown_query_params)
