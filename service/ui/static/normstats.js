// A checkpoint's norm layers as pictures: one small per-channel plot per layer.
"use strict";
const NormStats = (() => {
  const TINY_VAR = 1e-6;
  function marks(layer) {
    const out = [];
    const mean = layer.running_mean || [], v = layer.running_var || [];
    mean.forEach((x, c) => { if (x === null) out.push(`mean[${c}] not finite`); });
    v.forEach((x, c) => {
      if (x === null) out.push(`var[${c}] not finite`);
      else if (Math.abs(x) < TINY_VAR) out.push(`var[${c}] = ${x.toExponential(1)}`);
    });
    return out;
  }
  function plot(el, layer) {
    const n = layer.num_channels || (layer.running_mean || []).length;
    const xs = Array.from({ length: n }, (_, i) => i);
    const mean = layer.running_mean, v = layer.running_var;
    const axis = { stroke: Charts.css("--fg"), grid: { stroke: Charts.css("--line") }, ticks: { stroke: Charts.css("--line") } };
    if (!mean || !v) {
      const p = document.createElement("p");
      p.className = "muted";
      const w = (layer.affine || {}).weight || {}, b = (layer.affine || {}).bias || {};
      p.textContent = `${layer.class || layer.kind}: no running statistics; affine weight mean ${NC.fmt(w.mean)}, bias mean ${NC.fmt(b.mean)}`;
      el.append(p);
      return;
    }
    // Tall enough for several ticks per axis; the side axes get room for labels like "1.5e-3".
    const fmtTicks = (u, vals) => vals.map((x) => (x === null ? "" : Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-2) ? x.toExponential(0) : String(+x.toPrecision(3))));
    const width = Math.max(300, el.clientWidth - 16);
    new uPlot({
      width, height: 240, legend: { show: false },
      scales: { x: { time: false }, v: {} },
      axes: [Object.assign({ label: "channel", space: 40 }, axis),
        Object.assign({ label: "running_mean", size: 56, space: 28, values: fmtTicks }, axis),
        Object.assign({ scale: "v", side: 1, label: "running_var", size: 64, space: 28, values: fmtTicks, grid: { show: false } }, axis)],
      series: [{}, { label: "running_mean", stroke: NC.PALETTE[0], width: 0, points: { show: true, size: 6, fill: NC.PALETTE[0] } },
        { label: "running_var", scale: "v", stroke: NC.PALETTE[1], width: 0, points: { show: true, size: 6, fill: NC.PALETTE[1], stroke: NC.PALETTE[1] } }],
    }, [xs, mean, v], el);
    const key = document.createElement("p");
    key.className = "key muted";
    key.innerHTML = `<span style="color:${NC.PALETTE[0]}" aria-hidden="true">&#9679;</span> running_mean (left axis)
      <span style="color:${NC.PALETTE[1]}" aria-hidden="true">&#9679;</span> running_var (right axis)`;
    el.append(key);
  }
  function show(stats, name) {
    const sec = document.querySelector("#stats-section");
    sec.hidden = false;
    document.querySelector("#stats-name").textContent = name;
    const box = document.querySelector("#layers");
    box.innerHTML = "";
    for (const layer of stats.layers) {
      const card = document.createElement("figure");
      card.className = "card layer";
      const m = marks(layer);
      card.innerHTML = `<h3>${NC.esc(layer.name || "(model)")} <span class="muted">${NC.esc(layer.class || layer.kind)} x${NC.fmt(layer.num_channels)}</span></h3>`;
      box.append(card); // in the page first, so the plot can take the card's width
      plot(card, layer);
      const cap = document.createElement("figcaption");
      cap.innerHTML = m.length ? `<span class="mark">&#9650;</span> ${m.slice(0, 8).map(NC.esc).join(", ")}${m.length > 8 ? ` and ${m.length - 8} more` : ""}` : "";
      card.append(cap);
    }
    sec.scrollIntoView({ behavior: "smooth" });
  }
  return { show, marks };
})();
