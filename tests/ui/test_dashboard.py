"""The dashboard in a real headless Chromium against a real API and worker, network cut off."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.harness import Stack, wait_for
from tests.ui.conftest import offline_page, screenshot, sign_in

# One xdist worker per module, so the module-scoped server and browser start once.
pytestmark = pytest.mark.xdist_group("ui-dashboard")

FINISHED = ("succeeded", "failed", "cancelled", "timed_out")


def job_spec(name: str, norm: str, *, samples: int = 512, epochs: int = 2) -> dict[str, Any]:
    """A small synthetic-data lenet job: a few hundred steps, one checkpoint per epoch."""
    return {
        "name": name,
        "tags": ["ui-test"],
        "model": {"arch": "lenet", "norm": norm},
        "data": {"dataset": "synthetic", "batch_size": 4, "num_samples": samples, "image_size": 16},
        "epochs": epochs,
        "seed": 1,
        "resources": {"device": "cpu"},
    }


def submit(stack: Stack, spec: dict[str, Any], token: str | None = None) -> str:
    with stack.client(token) as c:
        r = c.post("/jobs", json=spec)
        assert r.status_code in (200, 201), r.text
        return r.json()["id"]


def wait_finished(stack: Stack, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        with stack.client() as c:
            job = c.get(f"/jobs/{job_id}").json()
        return job if job["status"] in FINISHED else None

    return wait_for(done, timeout=timeout, interval=0.5, what=f"job {job_id} to finish")


@pytest.fixture(scope="module")
def finished_jobs(stack: Stack) -> dict[str, str]:
    """Two finished jobs that differ in their norm (BatchNorm and GroupNorm)."""
    ids = {
        "bn": submit(stack, job_spec("ui-bn", "bn", samples=96, epochs=1)),
        "gn": submit(stack, job_spec("ui-gn", "gn:2", samples=96, epochs=1)),
    }
    for job_id in ids.values():
        assert wait_finished(stack, job_id)["status"] == "succeeded"
    return ids


def test_sign_in_and_live_chart_grows_without_reload(browser: Any, stack: Stack) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        page.goto("/ui/")
        page.wait_for_selector("#signin")
        screenshot(page, "signin")
        page.fill("#token", "not-a-token")
        page.click("#signin button[type=submit]")
        page.wait_for_selector("#signin-error:has-text('refused')")

        sign_in(page, stack.token)
        job_id = submit(stack, job_spec("ui-live", "bn", samples=800, epochs=2))
        page.goto(f"/ui/jobs/{job_id}")
        page.wait_for_selector("#job-name:has-text('ui-live')")
        page.evaluate("window.__same_document = true")
        counts: list[int] = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            counts.append(int(page.get_attribute("#chart-loss", "data-points") or 0))
            status = page.inner_text("#job-status")
            if status in FINISHED:
                break
            time.sleep(0.3)
        screenshot(page, "job")
        assert page.evaluate("window.__same_document === true")  # no reload happened
        growth = sorted(set(counts))
        assert len(growth) >= 3 and growth[0] < growth[-1], counts  # grew in several steps
        assert counts == sorted(counts)
        with stack.client() as c:
            rows = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        # Every loss value is a point: each step's train loss, each epoch's train and val loss.
        want = sum(1 for r in rows for k in r["values"] if k in ("loss", "train_loss", "val_loss"))
        wait_for(
            lambda: int(page.get_attribute("#chart-loss", "data-points") or 0) == want,
            timeout=10,
            what="every loss row on the chart",
        )
        assert "val loss" in page.inner_text("#chart-loss .u-legend")
        assert int(page.get_attribute("#chart-acc", "data-points") or 0) >= 2  # per epoch
        page.wait_for_selector("#log:not(:empty)")
        assert refused == []
    finally:
        context.close()


def test_jobs_list_filters_and_checkpoint_norm_stats(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.wait_for_selector(f"tr[data-id='{finished_jobs['bn']}']")
        screenshot(page, "jobs")
        page.fill("#f-norm", "gn")
        assert page.locator("#jobs tbody tr").count() == 1
        assert page.locator(f"tr[data-id='{finished_jobs['gn']}']").count() == 1
        page.fill("#f-norm", "")

        page.goto(f"/ui/jobs/{finished_jobs['bn']}")
        page.wait_for_selector("#checkpoints tbody tr")
        page.wait_for_load_state("networkidle")
        # Page weight: the document and every resource it loaded (assets and API answers).
        weight = page.evaluate(
            """() => performance.getEntriesByType("navigation")[0].decodedBodySize +
            performance.getEntriesByType("resource").reduce((a, e) => a + e.decodedBodySize, 0)"""
        )
        assert 50_000 < weight < 500_000, weight
        page.locator("#checkpoints tbody tr").last.locator("button.stats").click()
        page.wait_for_selector("#layers figure")
        with stack.client() as c:
            name = c.get(f"/jobs/{finished_jobs['bn']}").json()["checkpoints"][-1]["name"]
            layers = c.get(f"/jobs/{finished_jobs['bn']}/checkpoints/{name}/stats").json()["layers"]
        assert len(layers) >= 2
        assert page.locator("#layers figure").count() == len(layers)
        assert page.locator("#layers figure canvas").count() == len(layers)  # one plot each
        for layer in layers:
            assert page.locator(f"#layers figure h3:has-text('{layer['name']}')").count() >= 1
        screenshot(page, "norm-stats")
        assert refused == []
    finally:
        context.close()


def test_compare_two_jobs(browser: Any, stack: Stack, finished_jobs: dict[str, str]) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        for job_id in finished_jobs.values():
            page.check(f"tr[data-id='{job_id}'] input.pick")
        page.click("#compare")
        page.wait_for_url("**/ui/compare#ids=*")
        page.wait_for_selector("#chart-loss .u-legend")
        legend = page.inner_text("#chart-loss .u-legend")
        assert "ui-bn" in legend and "ui-gn" in legend
        assert int(page.get_attribute("#chart-loss", "data-points") or 0) > 0
        assert page.locator("#finals tbody tr").count() == 2
        differing = page.locator("#spec-diff tr.diff").evaluate_all(
            "rows => rows.map(r => r.dataset.field)"
        )
        assert "model.norm" in differing and "name" in differing
        assert "epochs" not in differing and "data.dataset" not in differing
        screenshot(page, "compare")
        assert refused == []
    finally:
        context.close()


def test_second_user_sees_none_of_the_first_users_jobs(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    bob = stack.token_for("bob")
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, bob)
        page.wait_for_selector("#count:has-text('job(s)')")
        assert page.locator("#jobs tbody tr").count() == 0
        assert page.locator("#nav-workers").is_hidden()  # not an admin
        page.goto(f"/ui/jobs/{finished_jobs['bn']}")
        page.wait_for_selector("#error:has-text('not found')")
        assert page.locator("#chart-loss canvas").count() == 0
        assert refused == []
    finally:
        context.close()


def test_workers_page_for_admins(browser: Any, stack: Stack) -> None:
    admin = stack.token_for("root", admin=True)
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, admin)
        page.click("#nav-workers")
        page.wait_for_selector("#workers tbody tr")
        assert "live" in page.inner_text("#workers tbody")
        screenshot(page, "workers")
        assert refused == []
    finally:
        context.close()
