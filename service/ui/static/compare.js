// 2 to 20 jobs: overlaid curves on shared axes, final metrics, differing spec fields.
"use strict";
(async () => {
  const me = await NC.init("jobs");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const ids = (new URLSearchParams(location.hash.slice(1)).get("ids") || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (ids.length < 2 || ids.length > 20) { $("#error").textContent = "Pick 2 to 20 jobs on the jobs page."; return; }
  let jobs;
  try {
    jobs = await Promise.all(ids.map(async (id) => {
      const b = `/jobs/${encodeURIComponent(id)}`;
      const [job, page] = await Promise.all([NC.api(b), NC.api(`${b}/metrics?max_points=1000`)]);
      return { job, rows: page.items };
    }));
  } catch (e) { $("#error").textContent = e.message; return; }
  const label = (j, i) => `${j.job.name} (${i + 1})`;

  function draw() {
    const x = $("#xaxis").value;
    for (const el of [$("#chart-loss"), $("#chart-acc")]) el.innerHTML = "";
    const loss = new Charts.Curves($("#chart-loss"), "loss");
    const acc = new Charts.Curves($("#chart-acc"), "accuracy");
    loss.xLabel = acc.xLabel = x;
    jobs.forEach((j, i) => {
      const color = NC.PALETTE[i % NC.PALETTE.length];
      for (const r of j.rows) {
        const xv = x === "epoch" ? r.epoch : r.step;
        // Per-step rows share an epoch number: on the epoch axis only the epoch (val) rows.
        if (xv === null || xv === undefined || (x === "epoch" && r.split !== "val")) continue;
        for (const [k, v] of Object.entries(r.values || {})) {
          const s = Charts.seriesOf(r.split, k);
          if (!s.chart) continue;
          (s.chart === "loss" ? loss : acc).add(`${label(j, i)} ${s.label}`, xv, v, color, s.dash);
        }
      }
    });
    for (const c of [loss, acc]) c.redraw();
  }
  $("#xaxis").onchange = draw;
  draw();

  // Final metrics: the last value of each (split, name); val rows name their split already.
  const finals = jobs.map((j) => {
    const out = {};
    for (const r of j.rows) for (const [k, v] of Object.entries(r.values || {})) {
      const key = r.split === "val" ? k : `${r.split} ${k}`;
      if (!out[key] || out[key].step <= r.step) out[key] = { step: r.step, v };
    }
    return out;
  });
  const mkeys = [...new Set(finals.flatMap((f) => Object.keys(f)))].sort();
  const head = `<tr><th>Job</th><th>Status</th>${mkeys.map((k) => `<th class="num">${NC.esc(k)}</th>`).join("")}</tr>`;
  $("#finals thead").innerHTML = head;
  $("#finals tbody").innerHTML = jobs.map((j, i) => `<tr><td><span style="color:${NC.PALETTE[i % 8]}">&#9632;</span>
    <a href="/ui/jobs/${encodeURIComponent(j.job.id)}">${NC.esc(label(j, i))}</a></td><td>${NC.statusBadge(j.job.status)}</td>
    ${mkeys.map((k) => `<td class="num">${NC.fmt(finals[i][k] && finals[i][k].v)}</td>`).join("")}</tr>`).join("");

  function flat(o, prefix, out) {
    if (o && typeof o === "object" && !Array.isArray(o)) for (const [k, v] of Object.entries(o)) flat(v, prefix ? `${prefix}.${k}` : k, out);
    else out[prefix] = JSON.stringify(o);
    return out;
  }
  const specs = jobs.map((j) => flat(j.job.spec || {}, "", {}));
  const fields = [...new Set(specs.flatMap((s) => Object.keys(s)))].sort();
  $("#spec-diff thead").innerHTML = `<tr><th>Field</th>${jobs.map((j, i) => `<th>${NC.esc(label(j, i))}</th>`).join("")}</tr>`;
  function specTable() {
    const only = $("#only-diff").checked;
    $("#spec-diff tbody").innerHTML = fields.map((f) => {
      const vals = specs.map((s) => s[f] ?? "");
      const differs = new Set(vals).size > 1;
      if (only && !differs) return "";
      return `<tr class="${differs ? "diff" : ""}" data-field="${NC.esc(f)}"><td>${NC.esc(f)}${differs ? ' <span class="sr-only">(differs)</span>' : ""}</td>${vals.map((v) => `<td><code>${NC.esc(v)}</code></td>`).join("")}</tr>`;
    }).join("");
  }
  $("#only-diff").onchange = specTable;
  specTable();
})();
