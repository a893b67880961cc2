// The job page's deploy panel: per checkpoint, ONNX export buttons and their equivalence
// certificates, recalibration (precise BN over K training batches), and each recalibrated
// checkpoint beside its original with both validation metrics. Exports and recalibrations are
// built by a worker: a request answers 202 until it is done (the panel waits and retries).
// job.js calls Exports.refresh(job) whenever it shows the job.
"use strict";
const Exports = (() => {
  const $ = (s) => document.querySelector(s);
  const WAIT = 20; // seconds the server waits for the worker per request
  let jobId = null;
  let busy = false;

  const metricText = (m) => ["val_accuracy", "val_psnr", "val_loss"]
    .filter((k) => m && typeof m[k] === "number").map((k) => `${k}=${NC.fmt(m[k])}`).join(", ");
  const certBadge = (c) => (c && c.within_tolerance
    ? `<span class="status status-succeeded">&#10003; ${NC.fmt(c.max_abs_diff)}</span>`
    : `<span class="status status-failed">&#10007; ${NC.fmt(c && c.max_abs_diff)}</span>`);
  const label = (o) => `ONNX${o.fold_bn ? ", BN folded" : ""}${o.preprocessing ? ", raw input" : ""}`;

  function showCertificate(name, options, cert) {
    const box = $("#certificate");
    box.hidden = false;
    const folded = cert.folded_layers || [], kept = cert.kept_norm_layers || [];
    box.innerHTML = `<h3>Certificate: ${NC.esc(name)} (${NC.esc(label(options))})</h3>
      <dl class="cert">
        <dt>Largest |onnxruntime - eager| logit difference</dt><dd data-field="max_abs_diff">${NC.fmt(cert.max_abs_diff)}
          ${certBadge(cert)} (tolerance ${NC.fmt(cert.tolerance)})</dd>
        <dt>Probe</dt><dd>${NC.fmt(cert.probe && cert.probe.size)} ${NC.esc(cert.probe && cert.probe.split)} images of ${NC.esc(cert.probe && cert.probe.dataset)}</dd>
        <dt>onnxruntime / opset</dt><dd>${NC.esc(cert.onnxruntime)} / ${NC.fmt(cert.opset)}</dd>
        <dt>Folded BN layers (${folded.length})</dt><dd data-field="folded">${NC.esc(folded.join(", ") || "none")}</dd>
        <dt>Norm layers kept (${kept.length})</dt><dd>${NC.esc(kept.join(", ") || "none")}; BatchNormalization nodes: ${NC.fmt(cert.batch_norm_nodes)}</dd>
        <dt>Input</dt><dd>${NC.esc(JSON.stringify((cert.input || {}).shape))}, ${cert.input && cert.input.preprocessing_in_graph
          ? "raw image in [0, 1] (normalized in the graph)" : "normalized: (x - mean) / std"}, mean ${NC.esc(JSON.stringify((cert.input || {}).mean))}, std ${NC.esc(JSON.stringify((cert.input || {}).std))}</dd>
      </dl>`;
  }

  // Ask until the worker is done (each request waits up to WAIT s on the server).
  async function untilReady(path, init) {
    for (;;) {
      const headers = Object.assign({ Authorization: "Bearer " + sessionStorage.getItem("normcore.token") }, init.headers || {});
      const r = await fetch(path, Object.assign({}, init, { headers }));
      if (r.status !== 202) return r;
      $("#exports-note").textContent = `${init.what}: the worker is building it...`;
    }
  }

  async function exportFile(name, options) {
    const q = `format=onnx&fold_bn=${options.fold_bn}&preprocessing=${options.preprocessing}&wait=${WAIT}`;
    const r = await untilReady(`/jobs/${encodeURIComponent(jobId)}/checkpoints/${encodeURIComponent(name)}/export?${q}`,
      { what: `export of ${name}` });
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error(`export failed (${r.status}): ${body && body.detail ? JSON.stringify(body.detail) : r.statusText}`);
    }
    const cert = JSON.parse(r.headers.get("X-Normcore-Certificate") || "{}");
    showCertificate(name, options, cert);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = `${jobId}-${name}${options.fold_bn ? "-folded" : ""}.onnx`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
    $("#exports-note").textContent = `${name}: ${label(options)} saved (${r.headers.get("X-Normcore-Cache") === "hit" ? "from the cache" : "built now"})`;
  }

  async function recalibrate(name, batches) {
    const r = await untilReady(`/jobs/${encodeURIComponent(jobId)}/checkpoints/${encodeURIComponent(name)}/recalibrate?wait=${WAIT}`,
      { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ batches }), what: `recalibration of ${name}` });
    const body = await r.json().catch(() => null);
    if (!r.ok) throw new Error(`recalibration failed (${r.status}): ${body && body.detail ? JSON.stringify(body.detail) : r.statusText}`);
    $("#exports-note").textContent = `${name}: recalibrated over ${batches} batches as ${body.result.name}`;
  }

  function row(c, certs, child) {
    const mine = certs.filter((a) => a.checkpoint === c.name);
    const before = c.recalibration && c.recalibration.original_metrics;
    return `<tr data-name="${NC.esc(c.name)}" class="${child ? "recal" : ""}">
      <td>${child ? "&#8627; " : ""}${NC.esc(c.name)}${child ? `<br><span class="muted">precise BN over ${NC.fmt(c.recalibration && c.recalibration.batches_used)} batches</span>` : ""}</td>
      <td class="metrics">${NC.esc(metricText(c.metrics))}${before ? `<br><span class="muted">original ${NC.esc(c.recalibrated_from)}: ${NC.esc(metricText(before))}</span>` : ""}</td>
      <td class="certs">${mine.map((a) => a.status === "succeeded"
        ? `<button type="button" class="cert" data-artifact="${NC.esc(a.id)}" title="Show the certificate">${NC.esc(label(a.options))} ${certBadge(a.result)}</button>`
        : `<span class="muted">${NC.esc(label(a.options))}: ${NC.esc(a.status)}${a.error ? " - " + NC.esc(a.error) : ""}</span>`).join(" ")}</td>
      <td><button type="button" class="export" data-fold="true">Export ONNX (fold BN)</button>
        <button type="button" class="export" data-fold="false">Export ONNX</button>
        ${child ? "" : `<label class="sr-only" for="batches-${NC.esc(c.name)}">Batches</label>
        <input type="number" min="1" max="10000" value="50" class="batches" id="batches-${NC.esc(c.name)}" aria-label="batches for ${NC.esc(c.name)}">
        <button type="button" class="recalibrate">Recalibrate</button>`}</td></tr>`;
  }

  async function refresh(job) {
    if (job) jobId = job.id;
    if (!jobId || busy) return;
    const [points, arts] = await Promise.all([
      NC.api(`/jobs/${encodeURIComponent(jobId)}/checkpoints`),
      NC.api(`/jobs/${encodeURIComponent(jobId)}/artifacts`),
    ]);
    const certs = arts.filter((a) => a.kind === "export");
    const byId = Object.fromEntries(certs.map((a) => [a.id, a]));
    const rows = [];
    for (const c of points.filter((p) => !p.recalibrated_from)) {
      rows.push(row(c, certs, false));
      for (const r of points.filter((p) => p.recalibrated_from === c.name)) rows.push(row(r, certs, true));
    }
    $("#exports tbody").innerHTML = rows.join("") || `<tr><td colspan="4" class="muted">No checkpoint yet.</td></tr>`;
    $("#exports").dataset.artifacts = JSON.stringify(Object.keys(byId));
    $("#exports").onclick = async (e) => {
      const tr = e.target.closest("tr"); const button = e.target.closest("button");
      if (!tr || !button) return;
      const name = tr.dataset.name;
      try {
        if (button.classList.contains("cert")) {
          const a = byId[button.dataset.artifact];
          showCertificate(a.checkpoint, a.options, a.result);
          return;
        }
        busy = true; button.disabled = true;
        if (button.classList.contains("export")) {
          await exportFile(name, { fold_bn: button.dataset.fold === "true", preprocessing: false });
        } else if (button.classList.contains("recalibrate")) {
          await recalibrate(name, parseInt(tr.querySelector(".batches").value, 10) || 50);
        }
      } catch (err) { $("#error").textContent = err.message; }
      finally { busy = false; button.disabled = false; }
      refresh().catch((err) => { $("#error").textContent = err.message; });
    };
  }
  return { refresh };
})();
