"""The job page's norm panel in a real browser: the train/eval gap curve, the per-layer drift and
dead-channel curves, and the gap warning of a BatchNorm job at batch 2 (screenshot
test-artifacts/screenshots/norm-panel.png)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Stack, make_env, running_stack, wait_for
from tests.ui.conftest import offline_page, screenshot, sign_in

# lenet + BatchNorm at batch 2, 70% of digits held out: two epochs of 269 steps with a record
# every 60 steps, and at 1 training thread a reproducible gap over 5 accuracy points
# (tests/e2e/test_telemetry.py).
SPEC: dict[str, Any] = {
    "name": "ui-norms",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 2, "val_fraction": 0.7},
    "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "epochs": 2,
    "telemetry": {"every_steps": 60},
    "seed": 0,
    "resources": {"device": "cpu"},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One API and one worker on SQLite, training at 1 thread (reproducible numbers)."""
    env = make_env(tmp_path_factory.mktemp("ui-norms"), NORMCORE_TRAIN_THREADS="1")
    with running_stack(env, workers=1) as s:
        yield s


def test_norm_panel_shows_drift_gap_and_warning(browser: Any, stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        norm_reads: list[int] = []
        page.on(
            "response",
            lambda r: norm_reads.append(r.status) if f"/jobs/{job_id}/norms" in r.url else None,
        )
        page.goto(f"/ui/jobs/{job_id}")
        page.wait_for_selector("#job-name:has-text('ui-norms')")
        page.evaluate("window.__same_document = true")
        with stack.client() as c:

            def finished() -> dict[str, Any] | None:
                body = c.get(f"/jobs/{job_id}").json()
                return body if body["status"] in ("succeeded", "failed") else None

            body = wait_for(finished, timeout=300, interval=0.5, what="the job")
            assert body["status"] == "succeeded", body
            # beside any submit-time ("validate") warning, the one telemetry gave while training
            telemetry = [w["code"] for w in body["warnings"] if w["source"] == "telemetry"]
            assert telemetry == ["train_eval_gap"], body["warnings"]
            norms = c.get(f"/jobs/{job_id}/norms").json()["items"]
            rows = c.get(f"/jobs/{job_id}/metrics", params={"limit": 10_000}).json()["items"]
        gaps = [r for r in rows if r["split"] == "gap"]
        drifts = [r for r in norms if isinstance(r["values"].get("var_drift"), float)]
        dead = [r for r in norms if isinstance(r["values"].get("dead_channels"), int)]

        def points(sel: str) -> int:
            return int(page.get_attribute(sel, "data-points") or 0)

        # the warning arrived while the page was open (polled, no reload)
        page.wait_for_selector("#norm-warnings li[data-code='train_eval_gap']", timeout=20_000)
        assert page.evaluate("window.__same_document === true")
        assert norm_reads and set(norm_reads) == {200}
        # every gap value and every layer's drift and dead count is a point on its chart
        wait_for(lambda: points("#chart-gap") == 2 * len(gaps), timeout=20, what="gap points")
        wait_for(lambda: points("#chart-drift") == len(drifts), timeout=20, what="drift")
        wait_for(lambda: points("#chart-dead") == len(dead), timeout=20, what="dead channels")
        # 4 layers x (2 evaluations + 8 records every 60 steps); a gap row per evaluation
        assert len(gaps) == 2 and len(drifts) == 40
        legend = page.inner_text("#chart-drift .u-legend")
        assert "conv1.norm" in legend and "norm2.norm" in legend
        assert "accuracy gap" in page.inner_text("#chart-gap .u-legend")
        text = page.inner_text("#norm-warnings")
        assert "moved most in" in text and "GroupNorm" in text
        page.locator("#norms-section").scroll_into_view_if_needed()
        screenshot(page, "norm-panel")
        assert refused == []
    finally:
        context.close()
