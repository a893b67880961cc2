// 2 to 20 jobs: overlaid curves on shared axes, final metrics, differing spec fields.
"use strict";
(async () => {
  const me = await NC.init("jobs");
  if (!me) return;
  const $ = (s) => document.querySelector(s);
  const ids = (new URLSearchParams(location.hash.slice(1)).get("ids") || "").split(",").filter(Boolean).map(decodeURIComponent);
  if (ids.length < 2 || ids.length > 20) { $("#error").textContent = "Pick 2 to 20 jobs on the jobs page."; return; }
  // A deleted or unknown id must not blank the page: draw the jobs that load, name the rest.
  const settled = await Promise.allSettled(ids.map(async (id) => {
    const b = `/jobs/${encodeURIComponent(id)}`;
    const [job, page] = await Promise.all([NC.api(b), NC.api(`${b}/metrics?max_points=1000`)]);
    return { job, rows: page.items };
  }));
  const jobs = settled.filter((r) => r.status === "fulfilled").map((r) => r.value);
  const problems = settled.map((r, i) => (r.status === "rejected"
    ? (r.reason && r.reason.status === 404 ? `Job ${ids[i]} was not found (deleted?)` : `Job ${ids[i]}: ${r.reason && r.reason.message}`)
    : null)).filter(Boolean);
  $("#error").textContent = problems.join("; ");
  if (!jobs.length) return;
  const label = (j, i) => `${j.job.name} (${i + 1})`;

  function draw() {
    const x = $("#xaxis").value;
    for (const el of [$("#chart-loss"), $("#chart-acc")]) el.innerHTML = "";
    const loss = new Charts.Curves($("#chart-loss"), "loss");
    const acc = new Charts.Curves($("#chart-acc"), "accuracy");
    loss.xLabel = acc.xLabel = x;
    const drawn = new Set(); // the line styles (roles) on the charts, for the hint
    jobs.forEach((j, i) => {
      const color = NC.PALETTE[i % NC.PALETTE.length];
      for (const r of j.rows) {
        const xv = x === "epoch" ? r.epoch : r.step;
        // Per-step rows share an epoch number: on the epoch axis only the epoch (val) rows.
        if (xv === null || xv === undefined || (x === "epoch" && r.split !== "val")) continue;
        for (const [k, v] of Object.entries(r.values || {})) {
          const s = Charts.seriesOf(r.split, k);
          if (!s.chart) continue;
          drawn.add(s.role);
          (s.chart === "loss" ? loss : acc).add(`${label(j, i)} ${s.label}`, xv, v, color, s.dash);
        }
      }
    });
    for (const c of [loss, acc]) c.redraw();
    const styles = [["train", "solid: train (per step)"], ["train (epoch)", "dotted: train (epoch average)"], ["val", "dashed: val"]];
    const hint = styles.filter(([role]) => drawn.has(role)).map(([, text]) => text).join(", ");
    $("#styles-hint").textContent = (hint ? hint[0].toUpperCase() + hint.slice(1) + "; " : "") + "one colour per job.";
  }
  $("#xaxis").onchange = draw;
  draw();

  // Final metrics: the last value of each metric; a key already naming its split keeps its name.
  const finals = jobs.map((j) => {
    const out = {};
    for (const r of j.rows) for (const [k, v] of Object.entries(r.values || {})) {
      const key = r.split === "val" || k.startsWith(`${r.split}_`) ? k : `${r.split} ${k}`;
      if (!out[key] || out[key].step <= r.step) out[key] = { step: r.step, v };
    }
    return out;
  });
  // Best validation score over all val rows (accuracy and PSNR: higher is better).
  const best = (j, k) => {
    const vs = j.rows.filter((r) => r.values && typeof r.values[k] === "number").map((r) => r.values[k]);
    return vs.length ? Math.max(...vs) : undefined;
  };
  const last = (i, keys) => { for (const k of keys) if (finals[i][k]) return finals[i][k].v; return undefined; };
  const MAIN = [
    { label: "val loss", keys: ["val_loss"] },
    { label: "val accuracy", keys: ["val_accuracy"] },
    { label: "val PSNR (dB)", keys: ["val_psnr"] },
    { label: "best val accuracy", keys: ["val_accuracy"], best: true },
    { label: "best val PSNR (dB)", keys: ["val_psnr"], best: true },
    { label: "train loss", keys: ["train_loss", "train loss"] },
    { label: "train accuracy", keys: ["train_accuracy", "train accuracy"] },
    { label: "train PSNR (dB)", keys: ["train_psnr", "train psnr"] },
  ];
  const value = (c, i) => (c.best ? best(jobs[i], c.keys[0]) : last(i, c.keys));
  const cols = MAIN.filter((c) => jobs.some((_, i) => value(c, i) !== undefined));
  const used = new Set(cols.filter((c) => !c.best).flatMap((c) => c.keys));
  // The folded table names the job without a link (one link per job is enough for the keyboard).
  const jobCell = (j, i, link = true) => `<td><span style="color:${NC.PALETTE[i % NC.PALETTE.length]}" aria-hidden="true">&#9632;</span>
    <${link ? `a href="/ui/jobs/${encodeURIComponent(j.job.id)}"` : "span"} class="truncate" title="${NC.esc(`${j.job.name} (${j.job.id})`)}">${NC.esc(label(j, i))}</${link ? "a" : "span"}></td>`;
  $("#finals thead").innerHTML = `<tr><th>Job</th><th>Status</th>${cols.map((c) => `<th class="num">${NC.esc(c.label)}</th>`).join("")}</tr>`;
  $("#finals tbody").innerHTML = jobs.map((j, i) => `<tr data-id="${NC.esc(j.job.id)}">${jobCell(j, i)}<td>${NC.statusBadge(j.job.status)}</td>
    ${cols.map((c) => `<td class="num">${NC.fmt(value(c, i))}</td>`).join("")}</tr>`).join("");
  // Learning rate, throughput, gap rows...: kept, but folded away.
  const other = [...new Set(finals.flatMap((f) => Object.keys(f)))].filter((k) => !used.has(k)).sort();
  $("#finals-more").hidden = !other.length;
  $("#finals-other thead").innerHTML = `<tr><th>Job</th>${other.map((k) => `<th class="num">${NC.esc(k)}</th>`).join("")}</tr>`;
  $("#finals-other tbody").innerHTML = jobs.map((j, i) => `<tr>${jobCell(j, i, false)}
    ${other.map((k) => `<td class="num">${NC.fmt(finals[i][k] && finals[i][k].v)}</td>`).join("")}</tr>`).join("");

  function flat(o, prefix, out) {
    if (o && typeof o === "object" && !Array.isArray(o)) for (const [k, v] of Object.entries(o)) flat(v, prefix ? `${prefix}.${k}` : k, out);
    else out[prefix] = JSON.stringify(o);
    return out;
  }
  const specs = jobs.map((j) => flat(j.job.spec || {}, "", {}));
  const fields = [...new Set(specs.flatMap((s) => Object.keys(s)))].sort();
  $("#spec-diff thead").innerHTML = `<tr><th>Field</th>${jobs.map((j, i) => `<th><span class="truncate" title="${NC.esc(j.job.name)}">${NC.esc(label(j, i))}</span></th>`).join("")}</tr>`;
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
