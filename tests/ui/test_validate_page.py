"""The validate page in a real headless Chromium: reached from the jobs page, it shows a batch-4
BatchNorm spec's warning, each layer's statistics batch and the 6.58-step half-life, refuses
bad JSON and a spec the server refuses with the field named, and submits the spec."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Stack, make_env, running_stack
from tests.ui.conftest import offline_page, screenshot, sign_in

pytestmark = pytest.mark.xdist_group("ui-validate")

SPEC = {
    "name": "lenet-bn-b4",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "digits", "batch_size": 4},
    "epochs": 1,
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API alone: nothing here trains (a submitted job stays queued)."""
    env = make_env(tmp_path_factory.mktemp("ui-validate"))
    with running_stack(env, workers=0) as s:
        yield s


def test_validate_then_submit(browser: Any, stack: Stack) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.click("#validate-link")
        page.wait_for_url("**/ui/validate")
        page.wait_for_selector("body[data-ready]", state="attached")
        page.fill("#spec", json.dumps(SPEC, indent=2))
        page.click("#validate")
        # the API's first spec check imports torch and the models: allow for a busy machine
        page.wait_for_selector("#result", state="visible", timeout=90_000)
        warning = page.locator('#warnings li[data-code="bn_small_batch"]')
        assert warning.count() == 1 and "conv1.norm" in warning.inner_text()
        rows = page.locator("#layers tbody tr")
        assert rows.count() == 4  # lenet: two conv norms, two fc norms
        assert all(rows.nth(i).locator("td").nth(4).inner_text() == "4" for i in range(4))
        assert "6.58 steps" in page.inner_text("#summary")
        screenshot(page, "validate")

        page.fill("#spec", "{not json")
        page.click("#validate")
        page.wait_for_function("document.querySelector('#error').textContent.includes('JSON')")
        assert page.locator("#submit").is_disabled()
        page.fill("#spec", json.dumps({**SPEC, "model": {"arch": "lenet", "norm": "gn:3"}}))
        page.click("#validate")
        page.wait_for_function("document.querySelector('#error').textContent.includes('model')")

        page.fill("#spec", json.dumps(SPEC))
        page.click("#validate")
        page.wait_for_function("!document.querySelector('#submit').disabled")
        page.click("#submit")
        page.wait_for_url("**/ui/jobs/*")
        job_id = page.url.rsplit("/", 1)[1]
        with stack.client() as c:
            assert c.get(f"/jobs/{job_id}").json()["name"] == "lenet-bn-b4"
        assert refused == []
    finally:
        context.close()
