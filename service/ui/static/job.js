// One job: downsampled history (max_points), then live rows from the event stream.
// Other panels (their own <section> and <script>) may use window.NCJob: the id, the API base
// path, the latest job JSON and onJob(fn), called with the job at every refresh.
"use strict";
window.NCJob = { id: decodeURIComponent(location.pathname.split("/").pop()), job: null, listeners: [] };
NCJob.base = `/jobs/${encodeURIComponent(NCJob.id)}`;
NCJob.onJob = (fn) => { NCJob.listeners.push(fn); if (NCJob.job) fn(NCJob.job); };
(async () => {
  const me = await NC.init("jobs");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const { id, base } = NCJob;
  const MAX_POINTS = 2000;
  const loss = new Charts.Curves($("#chart-loss"), "loss");
  const acc = new Charts.Curves($("#chart-acc"), "accuracy");
  let finished = false;
  const FINISHED = ["succeeded", "failed", "cancelled", "timed_out"];

  function addRow(row) {
    for (const [k, y] of Object.entries(row.values || {})) {
      if (typeof y !== "number" && y !== null) continue;
      const s = Charts.seriesOf(row.split, k);
      if (s.chart) (s.chart === "loss" ? loss : acc).add(s.label, row.step, y, s.color, s.dash);
    }
    if (loaded && NCJob.job && !acc.points()) acc.setEmpty(emptyText(NCJob.job, acc));
  }
  function showJob(job) {
    document.title = `${job.name} - normcore`;
    $("#job-name").textContent = job.name;
    $("#job-status").innerHTML = NC.statusBadge(job.status);
    const s = job.spec || {}, m = s.model || {}, d = s.data || {};
    $("#job-meta").innerHTML = `${NC.esc(job.id)} - ${NC.esc(m.arch || "")} ${NC.esc(m.norm || "")} - batch ${NC.esc(d.batch_size ?? "")} - ${NC.esc(s.epochs ?? "")} epochs - created ${NC.age(job.created_at)} ago`
      + (s.tags && s.tags.length ? ` - ${s.tags.map((t) => `<span class="tag">${NC.esc(t)}</span>`).join("")}` : "")
      + (job.note ? `<span class="note" id="job-note">${NC.esc(job.note)}</span>` : "");
    showLabels(job);
    showHistory(job);
    $("#cancel").hidden = !["queued", "running"].includes(job.status) || job.cancel_requested;
    $("#spec").textContent = JSON.stringify(job.spec, null, 2);
    $("#attempts tbody").innerHTML = (job.attempts || []).map((a) => `<tr><td>${NC.fmt(a.attempt)}</td>
      <td>${NC.esc(a.worker ?? "")}</td><td>${when(a.started_at)}</td><td>${when(a.ended_at)}</td>
      <td>${NC.statusBadge(a.outcome ?? "")}</td></tr>`).join("");
    $("#checkpoints tbody").innerHTML = (job.checkpoints || []).map((c) => `<tr data-name="${NC.esc(c.name)}">
      <td>${NC.esc(c.name)}</td><td class="num">${NC.fmt(c.epoch)}</td><td class="num">${NC.fmt(c.step)}</td>
      <td>${Object.entries(c.metrics || {}).map(([k, v]) => `${NC.esc(k)}=${NC.fmt(v)}`).join(", ")}</td>
      <td class="num">${c.bytes ? (c.bytes / 1024).toFixed(0) + " KiB" : ""}</td>
      <td><button type="button" class="download">Download</button> <button type="button" class="stats">Norm statistics</button></td></tr>`).join("");
  }
  function when(iso) {
    return iso ? `<time datetime="${NC.esc(iso)}" title="${NC.esc(iso)}">${NC.esc(new Date(iso).toLocaleString())}</time>` : "";
  }
  // The status history from what the job records: submitted, each attempt's start and end
  // (worker, outcome), and the current status with its reason or error.
  function showHistory(job) {
    const items = [[job.created_at, "queued", "submitted"]];
    for (const a of job.attempts || []) {
      if (a.started_at) items.push([a.started_at, "running", `attempt ${a.attempt} started on ${a.worker || "?"}`]);
      if (a.ended_at) items.push([a.ended_at, a.outcome, `attempt ${a.attempt} ended`]);
    }
    const reason = [job.status_reason, job.error].filter(Boolean).join(" - ");
    if (items[items.length - 1][1] !== job.status || reason) items.push([job.finished_at || job.updated_at, job.status, "now"]);
    $("#history").innerHTML = items.map(([t, st, what], i) => `<li>${when(t)} ${NC.statusBadge(st)} ${NC.esc(what)}`
      + (i === items.length - 1 && reason ? ` - <span class="reason">${NC.esc(reason)}</span>` : "") + "</li>").join("");
  }
  // Tags and note: the form shows the stored values unless the user is editing it.
  let labelsDirty = false;
  function showLabels(job) {
    if (labelsDirty) return;
    $("#tags-input").value = ((job.spec || {}).tags || []).join(", ");
    $("#note-input").value = job.note || "";
  }
  async function refresh() {
    const job = await NC.api(base);
    NCJob.job = job;
    showJob(job);
    for (const fn of NCJob.listeners) { try { fn(job); } catch (e) { console.error(e); } }
    // the deploy panel (exports.js): checkpoints with their exports and recalibrations
    if (typeof Exports !== "undefined") Exports.refresh(job).catch((e) => { $("#error").textContent = e.message; });
    return job;
  }

  // No such job (or another user's): only the message and a way back, no panels or forms.
  function notFound(message) {
    for (const el of document.querySelectorAll("main > *")) el.hidden = true;
    const h1 = $("main > h1");
    h1.textContent = "Job not found";
    h1.hidden = false;
    const p = $("#error").parentElement;
    p.hidden = false;
    $("#error").textContent = message;
    const back = document.createElement("p");
    back.innerHTML = '<a href="/ui/" id="back-to-jobs">Back to the jobs list</a>';
    p.after(back);
    document.title = "Job not found - normcore";
  }
  // What an empty loss or accuracy chart says: why it has no point (once the history is read).
  let loaded = false;
  function emptyText(job, chart) {
    const over = FINISHED.includes(job.status);
    if (chart === acc && loss.points()) {
      return over ? "No accuracy rows (the job ended before its first evaluation)." : "No accuracy yet (measured at each evaluation).";
    }
    if (!over) return "No metric rows yet.";
    return job.status === "failed" ? "No metric rows (the job failed before its first step)."
      : `No metric rows (the job ended ${job.status} before its first step).`;
  }
  function showEmpty(j) {
    if (!loaded) return;
    for (const c of [loss, acc]) { c.setEmpty(emptyText(j, c)); if (!c.points()) c.redraw(); }
  }
  NCJob.onJob(showEmpty);

  let job;
  try { job = await refresh(); } catch (e) {
    if (e.status === 404) notFound(e.message); else $("#error").textContent = e.message;
    return;
  }
  const page = await NC.api(`${base}/metrics?max_points=${MAX_POINTS}`);
  page.items.forEach(addRow);
  loaded = true;
  showEmpty(job);
  loss.redraw(); acc.redraw();
  let after = page.next;

  async function follow() {
    try {
      await NC.events(`${base}/events?after=${after}`, (ev, data, eid) => {
        if (ev === "metric") { addRow(data); after = Math.max(after, data.seq); }
        else if (ev === "status") {
          finished = FINISHED.includes(data.status);
          refresh().catch(() => {});
        }
      });
    } catch (e) { /* dropped: reconnect below */ }
    if (!finished) setTimeout(follow, 2000);
  }
  follow();

  let logAfter = 0; const logLines = [];
  async function tail() {
    try {
      const p = await NC.api(`${base}/logs?after=${logAfter}&limit=1000`);
      for (const l of p.items) logLines.push(`${l.level} ${l.message}`);
      logLines.splice(0, Math.max(0, logLines.length - 200));
      logAfter = p.next;
      $("#log").textContent = logLines.join("\n");
    } catch (e) { /* keep the old tail */ }
    if (!finished) setTimeout(tail, 2000);
  }
  tail();

  $("#labels").addEventListener("input", () => { labelsDirty = true; $("#labels-status").textContent = ""; });
  $("#labels").onsubmit = async (e) => {
    e.preventDefault();
    $("#labels-error").textContent = "";
    const tags = $("#tags-input").value.split(/[\s,]+/).filter(Boolean);
    try {
      const job = await NC.api(base, { method: "PATCH", json: { tags, note: $("#note-input").value } });
      labelsDirty = false;
      NCJob.job = job;
      showJob(job);
      $("#labels-status").textContent = "Saved.";
    } catch (err) {
      // A 422 lists the fields that break a rule: name each with its message.
      let detail = null;
      try { detail = JSON.parse(err.message); } catch (x) { detail = null; }
      $("#labels-error").textContent = Array.isArray(detail)
        ? detail.map((d) => `${(d.loc || []).filter((x) => x !== "body").join(".")}: ${d.msg}`).join("; ")
        : err.message;
    }
  };
  $("#cancel").onclick = async () => {
    try { showJob(await NC.api(`${base}/cancel`, { method: "POST" })); } catch (e) { $("#error").textContent = e.message; }
  };
  $("#checkpoints tbody").addEventListener("click", async (e) => {
    const tr = e.target.closest("tr"); if (!tr) return;
    const name = tr.dataset.name;
    const url = `${base}/checkpoints/${encodeURIComponent(name)}`;
    try {
      if (e.target.classList.contains("download")) {
        // A link cannot carry the Bearer header: fetch the file and hand the browser a blob.
        const r = await fetch(url, { headers: { Authorization: "Bearer " + sessionStorage.getItem("normcore.token") } });
        if (!r.ok) throw new Error(`download failed: ${r.status}`);
        const a = document.createElement("a");
        a.href = URL.createObjectURL(await r.blob());
        a.download = `${id}-${name}.safetensors`;
        a.click();
        setTimeout(() => URL.revokeObjectURL(a.href), 10000);
      } else if (e.target.classList.contains("stats")) {
        NormStats.show(await NC.api(`${url}/stats`), name);
      }
    } catch (err) { $("#error").textContent = err.message; }
  });
})();
