"""Routes of the dashboard (``/ui``) and of the offline ``/docs`` and ``/redoc``.

The pages are static HTML with vendored scripts (service/ui/static, no CDN, no build step). They
hold no data: the browser keeps the user's token in ``sessionStorage`` and calls the same JSON
routes a script uses with ``Authorization: Bearer``. No cookie carries the credential, so a
cross-site request cannot act as the user and CSRF protection does not apply; the token never
appears in a URL (so not in access logs) and is gone when the tab closes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
PAGES_DIR = Path(__file__).parent / "pages"
STATIC_URL = "/ui/static"

router = APIRouter(include_in_schema=False)


def _page(name: str) -> FileResponse:
    # no-cache: a new release's pages are fetched again (they are tiny); assets are versioned
    # by their folder and may be cached.
    return FileResponse(
        PAGES_DIR / name, media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


@router.get("/")
def root() -> RedirectResponse:
    """Redirect ``/`` to the dashboard."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_slash() -> RedirectResponse:
    """Redirect ``/ui`` to ``/ui/`` so relative asset paths resolve."""
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
def jobs_page() -> FileResponse:
    """The jobs list (sign-in form when no token is held)."""
    return _page("jobs.html")


@router.get("/ui/jobs/{job_id}")
def job_page(job_id: str) -> FileResponse:
    """One job: live curves, logs, spec, history, checkpoints and norm statistics."""
    return _page("job.html")


@router.get("/ui/compare")
def compare_page() -> FileResponse:
    """Two to twenty jobs side by side; the ids come in the URL fragment (``#ids=a,b``)."""
    return _page("compare.html")


@router.get("/ui/validate")
def validate_page() -> FileResponse:
    """Validate a spec before submitting it: effective batch per norm layer, half-life, warnings."""
    return _page("validate.html")


@router.get("/ui/sweeps")
@router.get("/ui/sweeps/{sweep_id}")
def sweep_page(sweep_id: str | None = None) -> FileResponse:
    """The sweeps (list), or one sweep: its heatmap over the grid, its figure, its jobs."""
    return _page("sweep.html")


@router.get("/ui/workers")
def workers_page() -> FileResponse:
    """The workers (admins)."""
    return _page("workers.html")


@router.get("/docs")
def swagger_docs() -> HTMLResponse:
    """Swagger UI from the vendored swagger-ui-dist (works with no internet)."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="normcore training service - Swagger UI",
        swagger_js_url=f"{STATIC_URL}/vendor/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{STATIC_URL}/vendor/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{STATIC_URL}/favicon.svg",
        # No validator badge: it would send the spec to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/redoc")
def redoc_docs() -> HTMLResponse:
    """ReDoc from the vendored redoc bundle, without Google Fonts (works with no internet)."""
    return get_redoc_html(
        openapi_url="/openapi.json",
        title="normcore training service - ReDoc",
        redoc_js_url=f"{STATIC_URL}/vendor/redoc/redoc.standalone.js",
        redoc_favicon_url=f"{STATIC_URL}/favicon.svg",
        with_google_fonts=False,
    )


def mount(app: FastAPI) -> None:
    """Add the dashboard, its static files and the offline docs to ``app``.

    ``app`` must be built with ``docs_url=None, redoc_url=None`` (these routes replace them).
    """
    app.include_router(router)
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="ui-static")
