// The job page's norm panel: the job's warnings, the train/eval gap per evaluation (metric rows of
// split "gap"), and per norm layer the drift of its running (or probe) variance and its dead
// channels over time (GET /jobs/{id}/norms). Polls every 2 s while the job is active.
"use strict";
(() => {
  const $ = (s) => document.querySelector(s);
  const section = $("#norms-section");
  if (!section || typeof NCJob === "undefined") return;
  const POLL_MS = 2000;
  const FINISHED = ["succeeded", "failed", "cancelled", "timed_out"];
  const gap = new Charts.Curves($("#chart-gap"), "gap (running vs batch statistics)");
  const drift = new Charts.Curves($("#chart-drift"), "variance drift (relative L2)");
  const dead = new Charts.Curves($("#chart-dead"), "dead channels");
  const layers = new Map(); // layer -> colour index, in order of first appearance
  let normsAfter = 0, gapAfter = 0, active = true, timer = null, started = false;

  function colour(layer) {
    if (!layers.has(layer)) layers.set(layer, layers.size);
    const i = layers.get(layer);
    return [NC.PALETTE[i % NC.PALETTE.length], i >= NC.PALETTE.length ? [6, 3] : []];
  }
  function addNorm(row) {
    const v = row.values || {};
    const [c, dash] = colour(row.layer);
    if (typeof v.var_drift === "number") drift.add(row.layer, row.step, v.var_drift, c, dash);
    if (typeof v.dead_channels === "number") dead.add(row.layer, row.step, v.dead_channels, c, dash);
  }
  function addGap(row) {
    const v = row.values || {};
    if (typeof v.gap_accuracy === "number") gap.add("accuracy gap (batch - eval)", row.step, v.gap_accuracy, NC.PALETTE[0], []);
    if (typeof v.gap_loss === "number") gap.add("loss gap (eval - batch)", row.step, v.gap_loss, NC.PALETTE[1], [6, 4]);
  }
  function showWarnings(job) {
    const list = job.warnings || [];
    $("#norm-warnings").innerHTML = list.length
      ? list.map((w) => `<li class="warning" data-code="${NC.esc(w.code)}"><strong>${NC.esc(w.code)}</strong> `
        + `<span class="muted">(${NC.esc(w.source)})</span>: ${NC.esc(w.message)}</li>`).join("")
      : '<li class="muted">No warnings.</li>';
  }
  async function poll() {
    const base = NCJob.base;
    // the first read downsampled (a long run's history stays light; the few gap rows and
    // per-layer series under the budget come whole), then only what is new
    const first = normsAfter === 0 && gapAfter === 0 ? "&max_points=1000" : "&limit=10000";
    const norms = await NC.api(`${base}/norms?after=${normsAfter}${first}`);
    norms.items.forEach(addNorm);
    normsAfter = norms.next;
    const rows = await NC.api(`${base}/metrics?after=${gapAfter}${first}`);
    rows.items.filter((r) => r.split === "gap").forEach(addGap);
    gapAfter = rows.next;
    $("#norms-note").textContent = !layers.size ? "No telemetry yet."
      : `${layers.size} norm layers.` + (gap.points() ? "" : " No gap probe: no layer uses batch statistics.");
  }
  function loop() {
    poll().catch((e) => { $("#norms-note").textContent = e.message; })
      .finally(() => { if (active) timer = setTimeout(loop, POLL_MS); });
  }
  NCJob.onJob((job) => {
    showWarnings(job);
    if (FINISHED.includes(job.status) && active) {
      active = false; // one last read after the end
      if (timer) clearTimeout(timer);
      if (started) poll().catch(() => {});
    }
    if (!started) { started = true; if (active) loop(); else poll().catch(() => {}); }
  });
})();
