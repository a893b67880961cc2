"""The dashboard in a real headless Chromium against a real API and worker, network cut off."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
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
        # 2,000 steps: a few seconds on a quiet machine (800 samples trained between two looks
        # of the loop below, and the chart went from 0 to every point at once).
        job_id = submit(stack, job_spec("ui-live", "bn", samples=4000, epochs=2))
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
        # Readable plots: each one's plotting area (inside the axes) at least 120 px tall and
        # inside its card, so the right axis's labels are not clipped.
        boxes = page.locator("#layers figure").evaluate_all(
            """figs => figs.map(f => {
              const over = f.querySelector(".u-over"), plot = f.querySelector(".uplot");
              return { h: over.getBoundingClientRect().height,
                       right: plot.getBoundingClientRect().right, card: f.getBoundingClientRect().right };
            })"""
        )
        assert all(b["h"] >= 120 and b["right"] <= b["card"] for b in boxes), boxes
        # The legend names the marks that are drawn (dots, not squares).
        assert "squares" not in page.inner_text("#stats-section")
        assert "running_var" in page.inner_text("#layers figure .key >> nth=0")
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
        # Final metrics are the meaningful ones; lr and throughput are folded away.
        heads = page.locator("#finals thead th").all_inner_texts()
        assert "val loss" in heads and "val accuracy" in heads and "best val accuracy" in heads
        assert not any("lr" in h.split() or "samples_per_s" in h for h in heads), heads
        assert not page.locator("#finals-more").evaluate("d => d.open")
        assert "train lr" in (page.locator("#finals-other thead").text_content() or "")
        # The best val accuracy is the largest val_accuracy the job reported.
        with stack.client() as c:
            rows = c.get(f"/jobs/{finished_jobs['bn']}/metrics", params={"limit": 10_000}).json()
        accs = [r["values"]["val_accuracy"] for r in rows["items"] if "val_accuracy" in r["values"]]
        col = heads.index("best val accuracy")
        cell = page.locator(f"#finals tr[data-id='{finished_jobs['bn']}'] td").nth(col)
        assert float(cell.inner_text()) == pytest.approx(max(accs), rel=1e-3)
        name = page.locator("#finals tbody a.truncate").first
        assert "ui-bn" in (name.get_attribute("title") or "")
        screenshot(page, "compare")
        # On the epoch axis: the legend names it, and the hint names the styles drawn there.
        assert page.inner_text("#styles-hint").startswith("Solid: train")
        page.select_option("#xaxis", "epoch")
        page.wait_for_selector("#chart-loss .u-legend")
        assert page.inner_text("#chart-loss .u-legend tr.u-series >> nth=0").startswith("epoch")
        assert page.inner_text("#styles-hint").startswith("Dotted: train (epoch average)")
        screenshot(page, "compare-epoch")
        assert refused == []
    finally:
        context.close()


def _overflows(page: Any) -> tuple[int, int]:
    """(document width, viewport width) in CSS pixels."""
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")


def test_compare_fits_at_1400_px_and_survives_a_deleted_job(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        page.set_viewport_size({"width": 1400, "height": 900})
        sign_in(page, stack.token)
        page.goto("/ui/compare#ids=" + ",".join(finished_jobs.values()))
        page.wait_for_selector("#finals tbody tr")
        page.wait_for_selector("#chart-loss .u-legend")
        width, viewport = _overflows(page)
        assert width <= viewport, (width, viewport)
        # A job name is one line, whatever its length (truncated, full name in the title).
        name = page.locator("#finals tbody a.truncate").first
        assert name.evaluate("a => a.getClientRects().length") == 1

        gone = "0" * 32  # the API answers 404 alike for a deleted and a never-created id
        page.goto("/ui/compare#ids=" + ",".join([finished_jobs["bn"], gone]))
        page.reload()  # a hash change alone does not rerun the page's script
        page.wait_for_selector(f"#error:has-text('{gone}')")
        assert "not found" in page.inner_text("#error")
        page.wait_for_selector("#chart-loss .u-legend")
        assert "ui-bn" in page.inner_text("#chart-loss .u-legend")
        assert int(page.get_attribute("#chart-loss", "data-points") or 0) > 0
        assert page.locator("#finals tbody tr").count() == 1
        screenshot(page, "compare-missing")
        assert refused == []
    finally:
        context.close()


def test_top_navigation_on_every_page_and_jobs_fit_a_phone(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        for path in (
            "/ui/",
            f"/ui/jobs/{finished_jobs['bn']}",
            "/ui/compare#ids=" + ",".join(finished_jobs.values()),
            "/ui/sweeps",
            "/ui/validate",
            "/ui/workers",
        ):
            page.goto(path)
            page.wait_for_selector("header nav #nav-sweeps")
            for link, href in (("#nav-sweeps", "/ui/sweeps"), ("#nav-validate", "/ui/validate")):
                assert page.locator(f"header nav {link}").is_visible(), (path, link)
                assert page.get_attribute(f"header nav {link}", "href") == href
        # Only the current page's link is marked as current.
        assert page.locator("header nav [aria-current=page]").count() <= 1

        page.set_viewport_size({"width": 420, "height": 800})
        page.goto("/ui/")
        page.wait_for_selector(f"tr[data-id='{finished_jobs['bn']}']")
        width, viewport = _overflows(page)
        assert width <= viewport, (width, viewport)
        # The table keeps every column and scrolls inside its own box instead.
        box = page.locator("#jobs-scroll")
        assert box.evaluate("b => b.scrollWidth > b.clientWidth")
        screenshot(page, "jobs-narrow")
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


def _npz(n: int = 64) -> bytes:
    """A small grey .npz set (8x8 images, 4 classes)."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buf, x=rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), y=np.arange(n) % 4)
    return buf.getvalue()


def test_job_page_before_the_first_evaluation_failed_before_step_1_and_missing(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    # split BN (a BatchNorm kind whose aux_bn.* are BatchNorm2d parts of it), long enough to
    # be watched between its start record and its first evaluation, then cancelled
    split = job_spec("ui-split-running", "split_bn:4", samples=40_000, epochs=1)
    split["data"]["batch_size"] = 8
    running = submit(stack, split)
    # queued behind it: a set that reads at submit and is cut in half before the worker reads
    # it, so the job fails before its first step
    npz = stack.env.data_root / "sets" / "ui-bad.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    npz.write_bytes(_npz())
    bad_spec = job_spec("ui-fail-early", "gn:2", epochs=1)
    bad_spec["data"] = {"dataset": "npz", "path": "sets/ui-bad.npz", "batch_size": 16}
    failed = submit(stack, bad_spec)
    npz.write_bytes(_npz()[:200])
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.goto(f"/ui/jobs/{running}")
        # a BatchNorm kind without a gap row yet: not measured, not "no batch statistics"
        page.wait_for_selector("#norms-note:has-text('No gap measured yet')", timeout=60_000)
        note = page.inner_text("#norms-note")
        assert "no layer uses batch statistics" not in note
        assert note.startswith("4 norm layers."), note  # not 16: aux_bn.* are parts
        page.wait_for_selector("#chart-dead .u-legend")
        assert "conv1.norm > aux_bn.0" in page.inner_text("#chart-dead .u-legend")
        assert "No gap measured yet" in page.inner_text("#chart-gap .chart-empty")
        page.locator("#norms-section").scroll_into_view_if_needed()
        screenshot(page, "norm-panel-before-eval")
        with stack.client() as c:
            assert c.post(f"/jobs/{running}/cancel").status_code in (200, 202)
        assert wait_finished(stack, failed)["status"] == "failed"

        page.goto(f"/ui/jobs/{failed}")
        page.wait_for_selector("#chart-loss .chart-empty:has-text('failed before its first step')")
        assert "failed before" in page.inner_text("#chart-acc .chart-empty")
        screenshot(page, "job-failed-before-step-1")

        page.goto(f"/ui/jobs/{finished_jobs['gn']}")  # GroupNorm: truly no batch statistics
        page.wait_for_selector("#norms-note:has-text('no layer uses batch statistics')")

        page.goto("/ui/jobs/deadbeef")
        page.wait_for_selector("#error:has-text('not found')")
        page.wait_for_selector("#back-to-jobs", state="visible")
        for hidden in ("#labels-section", "#labels-save", "#chart-loss", "#norms-section", "#log"):
            assert page.locator(hidden).is_hidden(), hidden
        screenshot(page, "job-missing")
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


def test_jobs_page_cancels_and_deletes(browser: Any, stack: Stack) -> None:
    job_id = submit(stack, job_spec("ui-doomed", "bn", samples=4000, epochs=5))
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        row = page.locator(f"tr[data-id='{job_id}']")
        row.locator("button.cancel").click()

        def cancelled() -> bool:
            with stack.client() as c:
                job = c.get(f"/jobs/{job_id}").json()
            return job["status"] == "cancelled" or job["cancel_requested"]

        wait_for(cancelled, timeout=30, what="the cancel to reach the job")
        page.once("dialog", lambda d: d.accept())
        page.locator(f"tr[data-id='{job_id}'] button.delete").click()
        page.wait_for_selector(f"tr[data-id='{job_id}']", state="detached")
        with stack.client() as c:
            assert c.get(f"/jobs/{job_id}").status_code == 404
        assert refused == []
    finally:
        context.close()


def test_job_page_edits_tags_and_note_and_shows_history(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    job_id = finished_jobs["gn"]
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        page.goto(f"/ui/jobs/{job_id}")
        page.wait_for_selector("#history li")
        assert page.input_value("#tags-input") == "ui-test"
        # Status history from the stored record: submitted, the attempt's start and end.
        history = page.inner_text("#history")
        assert "submitted" in history and "attempt 1 started" in history
        assert "attempt 1 ended" in history and "succeeded" in history
        assert page.locator("#attempts tbody tr").count() == 1
        assert page.locator("#attempts tbody time").count() == 2  # started and ended

        page.fill("#tags-input", "ui-test, gn-run lr:0.1")
        page.fill("#note-input", "GroupNorm baseline\nsee the BN run")
        page.focus("#note-input")
        page.keyboard.press("Tab")  # to the save button, pressed by keyboard
        page.keyboard.press("Enter")
        page.wait_for_selector("#labels-status:has-text('Saved')")
        with stack.client() as c:
            job = c.get(f"/jobs/{job_id}").json()
            assert job["spec"]["tags"] == ["ui-test", "gn-run", "lr:0.1"]
            assert job["note"] == "GroupNorm baseline\nsee the BN run"
            assert [j["id"] for j in c.get("/jobs", params={"tag": "gn-run"}).json()["items"]] == [
                job_id
            ]
        assert "GroupNorm baseline" in page.inner_text("#job-note")
        assert page.locator("#job-meta .tag").count() == 3

        # A checkpoint downloads through the page (a Bearer fetch handed over as a file).
        with stack.client() as c:
            ckpt = c.get(f"/jobs/{job_id}").json()["checkpoints"][-1]
        with page.expect_download() as download:
            page.locator(f"#checkpoints tr[data-name='{ckpt['name']}'] button.download").click()
        data = Path(download.value.path()).read_bytes()
        assert hashlib.sha256(data).hexdigest() == ckpt["sha256"]
        # The norm-statistics marks: non-finite values (null in JSON) and tiny variances.
        marks = page.evaluate(
            "NormStats.marks({running_mean: [0.5, null], running_var: [1, 1e-9, null]})"
        )
        assert marks == ["mean[1] not finite", "var[1] = 1.0e-9", "var[2] not finite"], marks

        page.fill("#tags-input", "ok no/slash")
        page.click("#labels-save")
        page.wait_for_selector("#labels-error:not(:empty)")
        error = page.inner_text("#labels-error")
        assert "tags.1" in error and "pattern" in error, error
        with stack.client() as c:
            assert c.get(f"/jobs/{job_id}").json()["spec"]["tags"] == [
                "ui-test",
                "gn-run",
                "lr:0.1",
            ]
        screenshot(page, "job-labels")
        page.goto("/ui/")  # the list shows the note's first line under the name
        page.wait_for_selector(f"tr[data-id='{job_id}'] .list-note")
        assert page.inner_text(f"tr[data-id='{job_id}'] .list-note") == "GroupNorm baseline"
        assert refused == []
    finally:
        context.close()


OKABE_ITO = {"#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442"}


def _rgb(css: str) -> tuple[float, float, float]:
    parts = css[css.index("(") + 1 : css.index(")")].replace(",", " ").split()
    return (float(parts[0]), float(parts[1]), float(parts[2]))


def _luminance(css: str) -> float:
    """WCAG 2 relative luminance of an rgb()/rgba() colour."""

    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = _rgb(css)
    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def _contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def _hex(css: str) -> str:
    return "#" + "".join(f"{int(v):02x}" for v in _rgb(css))


THEME_JS = """() => {
  const cs = (sel, prop) => getComputedStyle(document.querySelector(sel))[prop];
  return {
    bg: cs("body", "backgroundColor"), fg: cs("body", "color"), muted: cs("#job-meta", "color"),
    link: cs("header nav a", "color"), error: cs("#error", "color"),
    series: [...document.querySelectorAll("#chart-loss .u-legend tr.u-series .u-marker")]
      .slice(1).map((m) => getComputedStyle(m).borderColor),
  };
}"""


def test_light_and_dark_colours_follow_the_system(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    themes: dict[str, dict[str, Any]] = {}
    for scheme in ("light", "dark"):
        context, page, refused = offline_page(browser, stack.url, color_scheme=scheme)
        try:
            sign_in(page, stack.token)
            if scheme == "dark":
                page.wait_for_selector(f"tr[data-id='{finished_jobs['bn']}']")
                screenshot(page, "jobs-dark")
            page.goto(f"/ui/jobs/{finished_jobs['bn']}")
            page.wait_for_selector("#chart-loss .u-legend tr.u-series .u-marker")
            page.wait_for_load_state("networkidle")
            themes[scheme] = page.evaluate(THEME_JS)
            if scheme == "dark":
                screenshot(page, "job-dark")
                page.goto("/ui/compare#ids=" + ",".join(finished_jobs.values()))
                page.wait_for_selector("#chart-loss .u-legend")
                screenshot(page, "compare-dark")
            assert refused == []
        finally:
            context.close()
    light, dark = themes["light"], themes["dark"]
    assert _luminance(light["bg"]) > 0.8 and _luminance(dark["bg"]) < 0.05
    assert light["fg"] != dark["fg"] and light["series"] != dark["series"]
    for theme in (light, dark):
        assert _contrast(theme["fg"], theme["bg"]) >= 7  # WCAG AAA body text
        for key in ("muted", "link", "error"):
            assert _contrast(theme[key], theme["bg"]) >= 4.5, (key, theme)  # WCAG AA
        # Curves in Okabe-Ito colours, each told apart from the page background.
        assert theme["series"] and {_hex(c) for c in theme["series"]} <= OKABE_ITO, theme
        assert all(_contrast(c, theme["bg"]) >= 2.5 for c in theme["series"]), theme


INTERACTIVE_JS = """() => {
  const els = [...document.querySelectorAll(
    'a[href], button, input, select, textarea, summary, [tabindex]:not([tabindex="-1"])')]
    .filter((e) => !e.disabled && e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden");
  els.forEach((e, i) => (e.dataset.kb = String(i)));
  return els.length;
}"""

FOCUS_JS = """() => {
  const e = document.activeElement;
  const s = getComputedStyle(e);
  return { kb: e.dataset ? e.dataset.kb || null : null, style: s.outlineStyle,
           width: parseFloat(s.outlineWidth) || 0, visible: e.matches(":focus-visible") };
}"""


def test_every_control_is_reachable_by_tab_with_a_visible_focus(
    browser: Any, stack: Stack, finished_jobs: dict[str, str]
) -> None:
    context, page, refused = offline_page(browser, stack.url)
    try:
        sign_in(page, stack.token)
        for path, ready in (
            ("/ui/", f"tr[data-id='{finished_jobs['bn']}']"),
            (
                "/ui/compare#ids=" + ",".join(finished_jobs.values()),
                "#chart-loss .u-legend tr.u-series[tabindex]",
            ),
            (f"/ui/jobs/{finished_jobs['bn']}", "#chart-loss .u-legend tr.u-series[tabindex]"),
        ):
            page.goto(path)
            page.wait_for_selector(ready)
            page.wait_for_load_state("networkidle")
            count = page.evaluate(INTERACTIVE_JS)
            assert count >= 10, (path, count)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            reached: set[str] = set()
            for _ in range(count + 5):
                page.keyboard.press("Tab")
                focus = page.evaluate(FOCUS_JS)
                if focus["kb"] is None:
                    continue
                reached.add(focus["kb"])
                assert focus["visible"] and focus["style"] != "none" and focus["width"] >= 2, (
                    path,
                    focus,
                    page.evaluate("document.activeElement.outerHTML.slice(0, 200)"),
                )
            missing = set(map(str, range(count))) - reached
            assert not missing, (
                path,
                page.evaluate(
                    "(ids) => ids.map((i) => document.querySelector(`[data-kb='${i}']`)"
                    ".outerHTML.slice(0, 120))",
                    sorted(missing),
                ),
            )
        # A legend entry is a button: Enter hides its curve, and says so.
        entry = page.locator("#chart-loss .u-legend tr.u-series[tabindex]").first
        entry.focus()
        page.keyboard.press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#chart-loss .u-legend tr.u-series[tabindex]')"
            ".getAttribute('aria-pressed') === 'false'"
        )
        assert refused == []
    finally:
        context.close()
