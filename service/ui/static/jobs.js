// The jobs list: server-side filters (status, name, tag), client-side norm filter and sort.
"use strict";
(async () => {
  const me = await NC.init("jobs");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  let rows = [], next = null, sortKey = "created_at", sortDir = -1;
  const selected = new Set();

  // Final and best validation metrics come from the checkpoints' metrics and last_metrics.
  function summarize(job) {
    const s = job.spec || {}, m = s.model || {}, d = s.data || {};
    return {
      job, id: job.id, status: job.status, name: job.name, tags: s.tags || [],
      arch: m.arch || "", norm: m.norm || "", batch_size: d.batch_size, epochs: s.epochs,
      created_at: job.created_at, val_loss: null, val_acc: null, best_acc: null,
    };
  }
  async function fillMetrics(r) {
    try {
      const d = await NC.api(`/jobs/${encodeURIComponent(r.id)}`);
      const v = ((d.last_metrics || {}).val || {}).values || {};
      r.val_loss = typeof v.val_loss === "number" ? v.val_loss : null;
      r.val_acc = typeof (v.val_accuracy ?? v.val_psnr) === "number" ? (v.val_accuracy ?? v.val_psnr) : null;
      const accs = (d.checkpoints || []).map((c) => (c.metrics || {}).val_accuracy ?? (c.metrics || {}).val_psnr).filter((x) => typeof x === "number");
      if (r.val_acc !== null) accs.push(r.val_acc);
      r.best_acc = accs.length ? Math.max(...accs) : null;
    } catch (e) { /* a job deleted meanwhile: leave blank */ }
  }
  function query() {
    const p = new URLSearchParams({ limit: "100" });
    if ($("#f-status").value) p.set("status", $("#f-status").value);
    if ($("#f-name").value.trim()) p.set("name", $("#f-name").value.trim());
    if ($("#f-tag").value.trim()) p.set("tag", $("#f-tag").value.trim());
    return p;
  }
  async function load(append) {
    $("#error").textContent = "";
    try {
      const p = query();
      if (append && next) p.set("cursor", next);
      const page = await NC.api("/jobs?" + p);
      const fresh = page.items.map(summarize);
      await Promise.all(fresh.map(fillMetrics));
      rows = append ? rows.concat(fresh) : fresh;
      next = page.next;
      $("#more").hidden = !next;
      render();
    } catch (e) { $("#error").textContent = e.message; }
  }
  function render() {
    const norm = $("#f-norm").value.trim().toLowerCase();
    const shown = rows.filter((r) => !norm || r.norm.toLowerCase().startsWith(norm));
    shown.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    $("#count").textContent = `${shown.length} job(s)`;
    $("#jobs tbody").innerHTML = shown.map((r) => `<tr data-id="${NC.esc(r.id)}">
      <td><input type="checkbox" class="pick" aria-label="Select ${NC.esc(r.name)}" ${selected.has(r.id) ? "checked" : ""}></td>
      <td>${NC.statusBadge(r.status)}</td>
      <td><a href="/ui/jobs/${encodeURIComponent(r.id)}">${NC.esc(r.name)}</a>${r.job.note ? `<div class="muted list-note" title="${NC.esc(r.job.note)}">${NC.esc(r.job.note.split("\n")[0].slice(0, 80))}</div>` : ""}</td>
      <td>${r.tags.map((t) => `<span class="tag">${NC.esc(t)}</span>`).join("")}</td>
      <td>${NC.esc(r.arch)}</td><td>${NC.esc(r.norm)}</td>
      <td class="num">${NC.fmt(r.batch_size)}</td><td class="num">${NC.fmt(r.epochs)}</td>
      <td class="num">${NC.fmt(r.val_loss)}</td><td class="num">${NC.fmt(r.val_acc)}</td><td class="num">${NC.fmt(r.best_acc)}</td>
      <td class="num" title="${NC.esc(r.created_at)}">${NC.age(r.created_at)}</td>
      <td>${["queued", "running"].includes(r.status) ? `<button type="button" class="cancel">Cancel</button>` : ""}
        <button type="button" class="danger delete">Delete</button></td></tr>`).join("");
    $("#compare").disabled = selected.size < 2 || selected.size > 20;
    document.querySelectorAll(".sort").forEach((b) => b.setAttribute("aria-sort", b.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none"));
  }
  $("#filters").onsubmit = (e) => { e.preventDefault(); load(false); };
  $("#f-norm").oninput = render;
  $("#more").onclick = () => load(true);
  $("#compare").onclick = () => { location.href = "/ui/compare#ids=" + [...selected].map(encodeURIComponent).join(","); };
  document.querySelectorAll(".sort").forEach((b) => (b.onclick = () => {
    if (sortKey === b.dataset.key) sortDir = -sortDir; else { sortKey = b.dataset.key; sortDir = 1; }
    render();
  }));
  $("#jobs tbody").addEventListener("click", async (e) => {
    const tr = e.target.closest("tr"); if (!tr) return;
    const id = tr.dataset.id;
    if (e.target.classList.contains("pick")) {
      if (e.target.checked) selected.add(id); else selected.delete(id);
      $("#compare").disabled = selected.size < 2 || selected.size > 20;
    } else if (e.target.classList.contains("cancel")) {
      try { await NC.api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); load(false); } catch (err) { $("#error").textContent = err.message; }
    } else if (e.target.classList.contains("delete")) {
      if (!confirm("Delete this job with its metrics, logs and checkpoints?")) return;
      try { await NC.api(`/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }); selected.delete(id); load(false); } catch (err) { $("#error").textContent = err.message; }
    }
  });
  load(false);
})();
