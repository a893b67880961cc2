// One job: downsampled history (max_points), then live rows from the event stream.
"use strict";
(async () => {
  const me = await NC.init("jobs");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const base = `/jobs/${encodeURIComponent(id)}`;
  const MAX_POINTS = 2000;
  const loss = new Charts.Curves($("#chart-loss"), "loss");
  const acc = new Charts.Curves($("#chart-acc"), "accuracy");
  const seen = [];
  let finished = false;

  function addRow(row) {
    for (const [k, y] of Object.entries(row.values || {})) {
      if (typeof y !== "number" && y !== null) continue;
      const s = Charts.seriesOf(row.split, k);
      if (s.chart) (s.chart === "loss" ? loss : acc).add(s.label, row.step, y, s.color, s.dash);
    }
  }
  function showJob(job) {
    document.title = `${job.name} - normcore`;
    $("#job-name").textContent = job.name;
    $("#job-status").innerHTML = NC.statusBadge(job.status);
    const s = job.spec || {}, m = s.model || {}, d = s.data || {};
    $("#job-meta").textContent = `${job.id} - ${m.arch || ""} ${m.norm || ""} - batch ${d.batch_size ?? ""} - ${s.epochs ?? ""} epochs - created ${NC.age(job.created_at)} ago`
      + (s.tags && s.tags.length ? ` - tags: ${s.tags.join(", ")}` : "") + (job.note ? ` - note: ${job.note}` : "");
    $("#cancel").hidden = !["queued", "running"].includes(job.status) || job.cancel_requested;
    $("#spec").textContent = JSON.stringify(job.spec, null, 2);
    $("#attempts tbody").innerHTML = (job.attempts || []).map((a) => `<tr><td>${NC.fmt(a.attempt ?? a.number)}</td>
      <td>${NC.esc(a.worker ?? a.worker_id ?? "")}</td><td>${NC.esc(a.started_at ?? "")}</td><td>${NC.esc(a.finished_at ?? "")}</td>
      <td>${NC.esc(a.outcome ?? a.status ?? "")}${a.reason || a.error ? " - " + NC.esc(a.reason || a.error) : ""}</td></tr>`).join("");
    $("#checkpoints tbody").innerHTML = (job.checkpoints || []).map((c) => `<tr data-name="${NC.esc(c.name)}">
      <td>${NC.esc(c.name)}</td><td class="num">${NC.fmt(c.epoch)}</td><td class="num">${NC.fmt(c.step)}</td>
      <td>${Object.entries(c.metrics || {}).map(([k, v]) => `${NC.esc(k)}=${NC.fmt(v)}`).join(", ")}</td>
      <td class="num">${c.bytes ? (c.bytes / 1024).toFixed(0) + " KiB" : ""}</td>
      <td><button type="button" class="download">Download</button> <button type="button" class="stats">Norm statistics</button></td></tr>`).join("");
  }
  function history(st) {
    const li = document.createElement("li");
    li.innerHTML = `${new Date().toLocaleTimeString()}: ${NC.statusBadge(st.status)} attempt ${NC.fmt(st.attempt)}`
      + (st.status_reason ? ` - ${NC.esc(st.status_reason)}` : "") + (st.error ? ` - <span class="error">${NC.esc(st.error)}</span>` : "");
    $("#history").append(li);
  }
  async function refresh() {
    const job = await NC.api(base);
    showJob(job);
    // the deploy panel (exports.js): checkpoints with their exports and recalibrations
    if (typeof Exports !== "undefined") Exports.refresh(job).catch((e) => { $("#error").textContent = e.message; });
    return job;
  }

  let job;
  try { job = await refresh(); } catch (e) { $("#error").textContent = e.message; return; }
  const page = await NC.api(`${base}/metrics?max_points=${MAX_POINTS}`);
  page.items.forEach(addRow);
  loss.redraw(); acc.redraw();
  let after = page.next;

  async function follow() {
    try {
      await NC.events(`${base}/events?after=${after}`, (ev, data, eid) => {
        if (ev === "metric") { addRow(data); after = Math.max(after, data.seq); }
        else if (ev === "status") {
          history(data);
          finished = ["succeeded", "failed", "cancelled", "timed_out"].includes(data.status);
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
