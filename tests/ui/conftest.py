"""A real headless Chromium (Debian's package, driven by Playwright) and one real service per
module for the dashboard tests. Without the browser these skip, and fail under ``CI=true``."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.harness import REPO, Stack, make_env, running_stack

CHROMIUM = "/usr/bin/chromium"
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} is missing: CI needs it (scripts/browser.sh installs it)")
    pytest.skip(f"{what} is missing (run scripts/browser.sh)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per module (``--no-sandbox``: sessions and CI run as root)."""
    if not Path(CHROMIUM).exists():
        # Try once to install it (quick when present; apt on a fresh machine).
        subprocess.run(["bash", str(REPO / "scripts" / "browser.sh")], check=False, timeout=900)
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        _missing("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package (pip install normcore[test])")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API and one worker on SQLite for the whole module."""
    env = make_env(tmp_path_factory.mktemp("ui"))
    with running_stack(env, workers=1) as s:
        yield s


def screenshot(page: Any, name: str) -> Path:
    """Save a full-page PNG under test-artifacts/screenshots/ (kept by CI) and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def offline_page(
    browser: Any, base_url: str, color_scheme: str = "light"
) -> tuple[Any, Any, list[str]]:
    """A new context and page whose requests to any host but the server are aborted and listed;
    ``color_scheme`` ("light" or "dark") is what ``prefers-color-scheme`` reports.

    Returns (context, page, the list of refused URLs, filled as the page runs).
    """
    context = browser.new_context(
        base_url=base_url, viewport={"width": 1280, "height": 900}, color_scheme=color_scheme
    )
    refused: list[str] = []
    server = base_url.rstrip("/")

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(server + "/") or url == server or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            refused.append(url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    return context, page, refused


def sign_in(page: Any, token: str) -> None:
    """Sign in through the form on /ui/ and wait for the jobs table."""
    page.goto("/ui/")
    page.fill("#token", token)
    page.click("#signin button[type=submit]")
    page.wait_for_selector("#jobs", state="visible")


os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
