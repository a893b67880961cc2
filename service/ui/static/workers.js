// Workers (admins): host, GPUs, queues, heartbeat and what each runs; refreshed every 5 s.
"use strict";
(async () => {
  const me = await NC.init("workers");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const list = (v) => (Array.isArray(v) ? v.join(", ") : NC.fmt(v));
  async function load() {
    try {
      const [w, running] = await Promise.all([NC.api("/workers"), NC.api("/jobs?status=running&limit=200")]);
      // What each runs: the worker of each running job's current attempt.
      const runs = {};
      for (const j of running.items) {
        const a = (j.attempts || [])[(j.attempts || []).length - 1];
        if (a && a.worker) (runs[a.worker] = runs[a.worker] || []).push(j);
      }
      $("#workers tbody").innerHTML = w.items.map((x) => `<tr>
        <td>${NC.esc(x.name)}</td><td>${NC.esc(x.host)}</td>
        <td>${x.live ? '<span class="status status-succeeded">live</span>' : '<span class="status status-failed">gone</span>'}</td>
        <td>${NC.esc(NC.fmt(x.gpus))}${x.gpu_names && x.gpu_names.length ? " (" + NC.esc(list(x.gpu_names)) + ")" : ""}</td><td>${NC.esc(list(x.queues))}</td>
        <td title="${NC.esc(x.heartbeat_at)}">${NC.age(x.heartbeat_at)} ago</td>
        <td>${(runs[x.name] || []).map((j) => `<a href="/ui/jobs/${encodeURIComponent(j.id)}">${NC.esc(j.name)}</a>`).join(" ")}</td>
        <td>${NC.esc(x.version ?? "")}</td></tr>`).join("");
    } catch (e) { $("#error").textContent = e.status === 403 ? "Only admins see workers." : e.message; }
    setTimeout(load, 5000);
  }
  load();
})();
