"""FastAPI dependencies: settings, the store, the current user and the caller's job."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import auth
from service.settings import Settings
from service.store import Store

# auto_error=False: we answer 401 ourselves, with WWW-Authenticate and a useful message.
bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A token from `normcore token create NAME` (or <data_dir>/admin.token).",
)


def get_settings(request: Request) -> Settings:
    """The Settings the app was created with."""
    return request.app.state.settings


def get_store(request: Request) -> Store:
    """The app's Store."""
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


def unauthorized(detail: str) -> HTTPException:
    """A 401 that tells the client to use a bearer token."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def get_current_user(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Any:
    """The user behind the bearer token, or the built-in local admin when auth is off."""
    if not settings.auth:
        return request.app.state.local_user
    try:
        return auth.authenticate(store, request.headers.get("authorization"))
    except auth.AuthError as exc:
        raise unauthorized(exc.detail) from None


CurrentUser = Annotated[Any, Depends(get_current_user)]


def owner_filter(user: Any) -> Any:
    """The owner_id to filter by: None (everyone) for admins, the user's id otherwise."""
    return None if user.admin else user.id


def job_not_found(job_id: str) -> HTTPException:
    """The 404 for a job that does not exist or belongs to someone else (never a 403)."""
    return HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail=f"job {job_id!r} not found")


def get_owned_job(job_id: str, store: StoreDep, user: CurrentUser) -> Any:
    """The job ``job_id`` if the caller may see it; 404 otherwise."""
    job = store.get_job(job_id, owner_id=owner_filter(user))
    if job is None:
        raise job_not_found(job_id)
    return job


OwnedJob = Annotated[Any, Depends(get_owned_job)]
