// Sweeps: /ui/sweeps lists them; /ui/sweeps/{id} shows the grid as a heatmap of the metric
// (mean over seeds, colour from worst to best), the report's figure, and links to each cell's jobs.
"use strict";
(async () => {
  const me = await NC.init("sweeps");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const id = decodeURIComponent(location.pathname.replace(/^\/ui\/sweeps\/?/, "").split("/")[0] || "");
  const enc = encodeURIComponent;
  // A file from an authenticated route (an <img> or <a> cannot send the Bearer header).
  async function blobUrl(path) {
    const r = await fetch(path, { headers: { Authorization: "Bearer " + sessionStorage.getItem("normcore.token") } });
    if (!r.ok) throw new NC.ApiError(r.status, r.statusText);
    return URL.createObjectURL(await r.blob());
  }

  async function showList() {
    $("#list").hidden = false;
    try {
      const page = await NC.api("/sweeps");
      $("#sweeps tbody").innerHTML = page.items.map((s) => `<tr>
        <td>${NC.statusBadge(s.status)}</td>
        <td><a href="/ui/sweeps/${enc(s.id)}">${NC.esc(s.name)}</a></td>
        <td>${NC.esc(s.axes.join(" × "))}</td><td class="num">${s.runs}</td>
        <td class="num">${s.counts.succeeded || 0}</td>
        <td class="num" title="${NC.esc(s.created_at)}">${NC.age(s.created_at)}</td></tr>`).join("")
        || `<tr><td colspan="6" class="muted">No sweeps yet: <code>normcore sweep FILE --wait</code></td></tr>`;
    } catch (e) { $("#error").textContent = e.message; }
  }

  const key = (v) => (typeof v === "object" && v !== null ? JSON.stringify(v) : String(v));
  function colour(v, lo, hi, direction) {
    if (v === null || v === undefined || !(hi > lo)) return "";
    let t = (v - lo) / (hi - lo);
    if (direction === "min") t = 1 - t;
    return `background: hsl(${Math.round(120 * t)}, ${Math.round(70 - 15 * t)}%, ${Math.round(85 - 10 * t)}%)`;
  }
  // What a cell without a final mean shows: "running"/"queued" only while one of its runs is;
  // once its runs ended, why there is no value (their statuses, or no such metric recorded).
  function noValue(c, report) {
    const active = c.runs.filter((r) => r.status === "queued" || r.status === "running");
    if (active.length) return active.some((r) => r.status === "running") ? "running" : "queued";
    if (!c.runs.length) return report.complete ? "no runs" : "pending";
    if (c.runs.some((r) => r.status === "succeeded")) return `no ${report.metric} recorded`;
    return [...new Set(c.runs.map((r) => r.status))].join(", ");
  }
  function heatmap(report) {
    const axes = report.axes;
    const colAxis = axes.length > 1 ? axes[axes.length - 1] : null;
    const rowAxes = colAxis ? axes.slice(0, -1) : axes;
    const cols = colAxis ? report.grid[colAxis] : [null];
    const rows = new Map();
    for (const c of report.cells) {
      const rk = rowAxes.map((a) => key(c.values[a])).join(", ");
      if (!rows.has(rk)) rows.set(rk, new Map());
      rows.get(rk).set(colAxis ? key(c.values[colAxis]) : "", c);
    }
    const means = report.cells.map((c) => c.final_mean).filter((v) => typeof v === "number");
    const lo = Math.min(...means), hi = Math.max(...means);
    $("#heat-caption").textContent = `final ${report.metric} (${report.direction === "max" ? "higher" : "lower"} is better)`;
    $("#heatmap thead").innerHTML = `<tr><th scope="col">${NC.esc(rowAxes.join(", "))}${colAxis ? " \\ " + NC.esc(colAxis) : ""}</th>`
      + cols.map((v) => `<th scope="col" class="num">${colAxis ? NC.esc(key(v)) : NC.esc(report.metric)}</th>`).join("") + "</tr>";
    $("#heatmap tbody").innerHTML = [...rows].map(([rk, byCol]) => `<tr><th scope="row">${NC.esc(rk)}</th>` + cols.map((v) => {
      const c = byCol.get(colAxis ? key(v) : "");
      if (!c) return "<td></td>";
      const jobs = c.runs.map((r) => `<a href="/ui/jobs/${enc(r.job_id)}" title="seed ${r.seed}: ${NC.esc(r.status)}">s${r.seed}</a>`).join("");
      const value = c.final_mean === null ? `<span class="muted">${NC.esc(noValue(c, report))}</span>`
        : `<span class="v">${NC.fmt(c.final_mean)}</span>${c.final_std !== null ? " ± " + NC.fmt(c.final_std) : ""}`;
      return `<td class="cell" data-cell="${c.cell}" style="${colour(c.final_mean, lo, hi, report.direction)}">${value}
        <div class="muted">n=${c.n}</div><div class="jobs">${jobs}</div></td>`;
    }).join("") + "</tr>").join("");
  }

  let lastKey = "";
  async function refresh() {
    try {
      const [sweep, report] = await Promise.all([NC.api(`/sweeps/${enc(id)}`), NC.api(`/sweeps/${enc(id)}/report`)]);
      document.title = `${sweep.name} - sweeps - normcore`;
      $("#title").textContent = `Sweep ${sweep.name}`;
      $("#status").innerHTML = NC.statusBadge(sweep.status);
      const c = sweep.counts;
      $("#progress").textContent = `${c.succeeded} of ${sweep.runs} runs succeeded; ${c.running} running, ${c.queued} queued`
        + (c.failed ? `, ${c.failed} failed` : "") + (c.cancelled ? `, ${c.cancelled} cancelled` : "")
        + (c.timed_out ? `, ${c.timed_out} timed out` : "") + (c.deleted ? `, ${c.deleted} deleted` : "");
      $("#cancel").hidden = !["queued", "running"].includes(sweep.status);
      heatmap(report);
      const k = JSON.stringify(report.cells.map((x) => [x.n, x.final_mean]));
      if (k !== lastKey) {
        lastKey = k;
        $("#figure-img").src = await blobUrl(`/sweeps/${enc(id)}/report?format=svg`);
      }
      if (["queued", "running"].includes(sweep.status)) setTimeout(refresh, 3000);
    } catch (e) { $("#error").textContent = e.message; }
  }

  if (!id) { showList(); return; }
  $("#detail").hidden = false;
  $("#cancel").onclick = async () => {
    try { await NC.api(`/sweeps/${enc(id)}/cancel`, { method: "POST" }); refresh(); } catch (e) { $("#error").textContent = e.message; }
  };
  $("#csv").onclick = async (e) => {
    e.preventDefault();
    const a = document.createElement("a");
    a.href = await blobUrl(`/sweeps/${enc(id)}/report?format=csv`);
    a.download = `sweep-${id}.csv`; a.click();
  };
  refresh();
})();
