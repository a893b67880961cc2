"""The job page's deploy panel in a real headless Chromium (issue 16 item 5): per checkpoint,
an export button that gets the ONNX file from the worker and shows its certificate, and a
recalibration whose new checkpoint appears beside the original with both metrics.
Screenshot: test-artifacts/screenshots/exports.png."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.harness import Stack, wait_for
from tests.ui.conftest import offline_page, screenshot, sign_in

pytest.importorskip("onnxruntime")

SPEC = {
    "name": "ui-export",
    "model": {"arch": "lenet", "norm": "bn(momentum=0.01)"},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 128, "image_size": 16},
    "epochs": 1,
    "seed": 2,
    "resources": {"device": "cpu"},
}


def test_export_buttons_certificate_and_recalibrated_checkpoint(browser: Any, stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            job = c.get(f"/jobs/{job_id}").json()
            return job if job["status"] in ("succeeded", "failed", "cancelled") else None

        assert wait_for(finished, timeout=240, interval=0.5)["status"] == "succeeded"

    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.goto(f"/ui/jobs/{job_id}")
        row = page.locator("#exports tbody tr[data-name='epoch-0001']")
        row.wait_for()
        with page.expect_download(timeout=240_000) as download:
            row.locator("button.export[data-fold='true']").click()
        assert download.value.suggested_filename == f"{job_id}-epoch-0001-folded.onnx"
        page.wait_for_selector("#certificate:not([hidden]) [data-field='max_abs_diff']")
        with stack.client() as c:
            cert = c.get(f"/jobs/{job_id}/checkpoints/epoch-0001/export/certificate").json()
        shown = page.locator("#certificate [data-field='folded']").inner_text()
        assert shown == ", ".join(cert["folded_layers"]) and cert["folded_layers"]
        shown_diff = page.locator("#certificate [data-field='max_abs_diff']").inner_text()
        assert float(shown_diff.split()[0]) == pytest.approx(cert["max_abs_diff"], rel=1e-3)
        assert cert["max_abs_diff"] < 1e-4
        # the row now lists the certificate (a badge with a check mark: within 1e-4)
        page.wait_for_selector("#exports tr[data-name='epoch-0001'] button.cert")

        row.locator("input.batches").fill("4")
        row.locator("button.recalibrate").click()
        recal = page.locator("#exports tbody tr.recal[data-name='epoch-0001-recal4']")
        recal.wait_for(timeout=240_000)
        text = recal.inner_text()
        assert "original epoch-0001" in text
        with stack.client() as c:
            listed = {ck["name"]: ck for ck in c.get(f"/jobs/{job_id}/checkpoints").json()}
        new = listed["epoch-0001-recal4"]
        accuracies = [float(v) for v in re.findall(r"val_accuracy=([-0-9.e+]+)", text)]
        assert accuracies == pytest.approx(
            [
                new["metrics"]["val_accuracy"],
                new["recalibration"]["original_metrics"]["val_accuracy"],
            ],
            rel=1e-3,
        )
        screenshot(page, "exports")
        assert refused == []
        assert json.loads(page.locator("#exports").get_attribute("data-artifacts"))
    finally:
        context.close()
