"""The sweep page in a real headless Chromium: reached from the jobs page through the sweeps list,
it shows the grid as a heatmap whose cells hold the report's means and link to their jobs, and
the report's figure (SVG). The children's results are written through the store, the way a worker
writes them, so nothing trains here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import Stack, make_env, running_stack, wait_for
from tests.ui.conftest import offline_page, screenshot, sign_in

pytestmark = pytest.mark.xdist_group("ui-sweep")

BASE: dict[str, Any] = {
    "model": {"arch": "convblock", "norm": "bn", "width": 8, "depth": 1},
    "data": {"dataset": "synthetic", "batch_size": 8, "num_samples": 64, "image_size": 8},
    "epochs": 2,
    "resources": {"device": "cpu"},
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API alone (no worker): the test finishes the sweep's jobs through the store."""
    env = make_env(tmp_path_factory.mktemp("ui-sweep"), NORMCORE_REAPER_INTERVAL_SECONDS="0.3")
    with running_stack(env, workers=0) as s:
        yield s


def _finish_all(stack: Stack, sweep: dict[str, Any]) -> None:
    store = stack.env.store()
    try:
        for cell in sweep["cells"]:
            norm = cell["values"]["model.norm"]
            batch = cell["values"]["data.batch_size"]
            for job in cell["jobs"]:
                attempt = store.claim_job(job["job_id"], worker_id="w", lease_seconds=60)
                assert attempt is not None
                # a made-up curve: BN falls off at small batch, GN does not
                final = 0.9 - (0.4 / batch if norm == "bn" else 0.0) + 0.01 * job["seed"]
                rows = [
                    {"step": 10, "epoch": 1, "split": "val", "values": {"val_accuracy": final / 2}},
                    {"step": 20, "epoch": 2, "split": "val", "values": {"val_accuracy": final}},
                ]
                store.add_metrics(job["job_id"], attempt=attempt, rows=rows)
                store.finish_job(job["job_id"], attempt=attempt, status="succeeded")
    finally:
        store.dispose()


def test_sweep_page_heatmap_figure_and_job_links(browser: Any, stack: Stack) -> None:
    body = {
        "name": "norm-vs-batch",
        "base": BASE,
        "grid": {"model.norm": ["bn", "gn:4", "none"], "data.batch_size": [2, 8, 32]},
        "seeds": [0, 1],
        "concurrency": 18,
    }
    with stack.client() as c:
        r = c.post("/sweeps", json=body)
        assert r.status_code == 201, r.text
        sweep = r.json()
        _finish_all(stack, sweep)
        wait_for(
            lambda: c.get(f"/sweeps/{sweep['id']}").json()["status"] == "succeeded",
            timeout=30,
            what="the sweep to succeed",
        )
        report = c.get(f"/sweeps/{sweep['id']}/report").json()

    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.click("#nav-sweeps")  # in the top navigation of every page
        page.wait_for_url("**/ui/sweeps")
        page.click(f'#sweeps a[href="/ui/sweeps/{sweep["id"]}"]')
        page.wait_for_selector("#heatmap td.cell .v")
        page.wait_for_function(
            "document.querySelector('#figure-img').naturalWidth > 0", timeout=30_000
        )
        cells = page.locator("#heatmap td.cell")
        assert cells.count() == 9
        assert page.locator("#heatmap tbody tr").count() == 3  # one row per norm
        for cell in report["cells"]:
            td = page.locator(f'#heatmap td.cell[data-cell="{cell["cell"]}"]')
            shown = float(td.locator(".v").inner_text())
            assert shown == pytest.approx(cell["final_mean"], rel=1e-3)
            hrefs = sorted(a.get_attribute("href") for a in td.locator(".jobs a").all())
            assert hrefs == sorted(f"/ui/jobs/{r['job_id']}" for r in cell["runs"])
            assert "background" in (td.get_attribute("style") or "")
        assert "18 of 18 runs succeeded" in page.inner_text("#progress")
        screenshot(page, "sweep")
        page.locator('#heatmap td.cell[data-cell="0"] .jobs a').first.click()
        page.wait_for_url("**/ui/jobs/*")
        assert refused == []
    finally:
        context.close()


def test_a_finished_cell_without_a_value_is_not_labelled_running(
    browser: Any, stack: Stack
) -> None:
    body = {
        "name": "ended",
        "base": BASE,
        "grid": {"model.norm": ["bn", "gn:4", "none"]},
        "seeds": [0],
        "concurrency": 3,
    }
    with stack.client() as c:
        r = c.post("/sweeps", json=body)
        assert r.status_code == 201, r.text
        sweep = r.json()
        store = stack.env.store()
        try:  # cell 0 succeeds with a value, cell 1 fails, cell 2 succeeds with no val rows
            for cell in sweep["cells"]:
                job_id = cell["jobs"][0]["job_id"]
                attempt = store.claim_job(job_id, worker_id="w", lease_seconds=60)
                assert attempt is not None
                if cell["cell"] == 0:
                    row = {"step": 10, "epoch": 1, "split": "val", "values": {"val_accuracy": 0.8}}
                    store.add_metrics(job_id, attempt=attempt, rows=[row])
                status = "failed" if cell["cell"] == 1 else "succeeded"
                store.finish_job(job_id, attempt=attempt, status=status)
        finally:
            store.dispose()
        wait_for(
            lambda: c.get(f"/sweeps/{sweep['id']}").json()["status"] == "failed",
            timeout=30,
            what="the sweep to end",
        )

    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.goto(f"{stack.url}/ui/sweeps/{sweep['id']}")
        page.wait_for_selector("#heatmap td.cell .v")
        texts = [page.locator(f'#heatmap td.cell[data-cell="{i}"]').inner_text() for i in range(3)]
        assert "running" not in " ".join(texts), texts
        assert "failed" in texts[1] and "n=0" in texts[1], texts
        assert "no val_accuracy recorded" in texts[2], texts
        assert refused == []
    finally:
        context.close()
