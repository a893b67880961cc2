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
      p.textContent = `${layer.kind}: no running statistics; affine weight mean ${NC.fmt(w.mean)}, bias mean ${NC.fmt(b.mean)}`;
      el.append(p);
      return;
    }
    new uPlot({
      width: 290, height: 150, legend: { show: false },
      scales: { x: { time: false }, v: {} },
      axes: [Object.assign({ label: "channel" }, axis), axis, Object.assign({ scale: "v", side: 1, grid: { show: false } }, axis)],
      series: [{}, { label: "mean", stroke: NC.PALETTE[0], width: 0, points: { show: true, size: 5, fill: NC.PALETTE[0] } },
        { label: "var", scale: "v", stroke: NC.PALETTE[1], width: 0, points: { show: true, size: 5, fill: NC.PALETTE[1], stroke: NC.PALETTE[1] } }],
    }, [xs, mean, v], el);
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
      card.innerHTML = `<h3>${NC.esc(layer.name || "(model)")} <span class="muted">${NC.esc(layer.kind)} x${NC.fmt(layer.num_channels)}</span></h3>`;
      plot(card, layer);
      const cap = document.createElement("figcaption");
      cap.innerHTML = m.length ? `<span class="mark">&#9650;</span> ${m.slice(0, 8).map(NC.esc).join(", ")}${m.length > 8 ? ` and ${m.length - 8} more` : ""}` : "";
      card.append(cap);
      box.append(card);
    }
    sec.scrollIntoView({ behavior: "smooth" });
  }
  return { show, marks };
})();
