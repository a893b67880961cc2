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
  const gap = new Charts.Curves($("#chart-gap"), "gap (eval vs batch)");
  const drift = new Charts.Curves($("#chart-drift"), "variance drift (relative L2)");
  const dead = new Charts.Curves($("#chart-dead"), "dead channels");
  drift.setEmpty("No drift yet (it needs two records of a layer).");
  dead.setEmpty("No telemetry yet.");
  // Torch classes that normalize with batch statistics in training (normcore's registry: the
  // kinds with batch_stats); with running statistics (source "running") the gap probe runs.
  const BATCH_KINDS = new Set(["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "GhostBatchNorm2d",
    "BatchRenorm2d", "SplitBatchNorm2d", "EvoNorm2dB0"]);
  const layers = new Map(); // top-level layer -> colour index, in order of first appearance
  const parentOf = new Map(); // every layer seen -> the layer it is part of (itself when top-level)
  let batchStats = false, normsAfter = 0, gapAfter = 0, active = true, timer = null, started = false;

  // A norm layer inside another (SplitBatchNorm2d's aux_bn.0, ...) is a part of that layer:
  // drawn in its colour, dotted, and labelled "parent > part"; only top-level layers count.
  function learn(names) {
    const all = [...new Set([...parentOf.keys(), ...names])].sort();
    for (const n of all) {
      const outer = all.filter((p) => n.startsWith(p + ".")).sort((a, b) => a.length - b.length)[0];
      parentOf.set(n, outer || n);
    }
  }
  function style(layer) {
    const top = parentOf.get(layer) || layer;
    if (!layers.has(top)) layers.set(top, layers.size);
    const i = layers.get(top);
    const c = NC.PALETTE[i % NC.PALETTE.length];
    if (top !== layer) return [`${top} > ${layer.slice(top.length + 1)}`, c, [2, 3]];
    return [layer, c, i >= NC.PALETTE.length ? [6, 3] : []];
  }
  function addNorm(row) {
    const v = row.values || {};
    const [label, c, dash] = style(row.layer);
    if (BATCH_KINDS.has(v.kind) && (v.source === undefined || v.source === "running")) batchStats = true;
    if (typeof v.var_drift === "number") drift.add(label, row.step, v.var_drift, c, dash);
    if (typeof v.dead_channels === "number") dead.add(label, row.step, v.dead_channels, c, dash);
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
    learn(norms.items.map((r) => r.layer));
    norms.items.forEach(addNorm);
    normsAfter = norms.next;
    const rows = await NC.api(`${base}/metrics?after=${gapAfter}${first}`);
    rows.items.filter((r) => r.split === "gap").forEach(addGap);
    gapAfter = rows.next;
    $("#norms-note").textContent = note();
    gap.setEmpty(gapWhy());
    if (!layers.size) dead.setEmpty(noTelemetry());
    drift.setEmpty(layers.size ? "No drift yet (it needs two records of a layer)." : noTelemetry());
    for (const c of [gap, drift, dead]) if (!c.points()) c.redraw(); // its empty text
  }
  // Why the gap chart is empty: no batch-statistics layer, or no evaluation (yet).
  function noTelemetry() {
    return active ? "No telemetry yet." : "No telemetry (the job ended before its first record).";
  }
  function gapWhy() {
    if (!layers.size) return noTelemetry();
    if (!batchStats) return "No gap probe: no layer uses batch statistics.";
    return active ? "No gap measured yet (the probe runs at each evaluation)."
      : "No gap measured (the probe runs at each evaluation; the job ended before its first).";
  }
  function note() {
    if (!layers.size) return noTelemetry();
    const parts = [...parentOf.entries()].filter(([n, p]) => n !== p);
    const eg = parts.length ? parts[0][0].slice(parts[0][1].length + 1) : "";
    return `${layers.size} norm layers.` + (parts.length ? ` Their ${parts.length} inner norm modules (${eg}, ...) are parts of them,`
      + " drawn dotted in their layer's colour." : "")
      + (gap.points() ? "" : ` ${gapWhy()}`);
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
