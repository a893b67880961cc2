"""/docs and /redoc render from the package's own assets with every other host cut off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.harness import Proc, make_env, start_api
from tests.ui.conftest import offline_page, screenshot

pytestmark = pytest.mark.xdist_group("ui-docs")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real API (no worker) on a fresh SQLite file; yields its base URL."""
    env = make_env(tmp_path_factory.mktemp("ui-docs"))
    env.store().dispose()
    proc: Proc
    proc, url = start_api(env)
    try:
        yield url
    finally:
        proc.stop()


def test_docs_and_redoc_render_offline(browser: Any, api: str) -> None:
    context, page, refused = offline_page(browser, api)
    try:
        page.goto("/docs")
        page.wait_for_selector(".opblock-summary", timeout=30_000)
        assert page.locator(".opblock").count() >= 10  # every route of the API is listed
        assert page.get_by_text("/jobs/{job_id}/metrics").first.is_visible()
        screenshot(page, "docs")
        page.goto("/redoc")
        page.wait_for_selector("[data-section-id^='operation/']", state="attached", timeout=30_000)
        assert page.locator("[data-section-id^='operation/']").count() >= 10
        screenshot(page, "redoc")
        assert refused == []
    finally:
        context.close()


def test_root_redirects_to_dashboard(api: str) -> None:
    r = httpx.get(api + "/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
