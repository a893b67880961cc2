// Curves with uPlot: series keyed by "split metric", x = step; rows may arrive in any order.
"use strict";
const Charts = (() => {
  const css = (v) => getComputedStyle(document.documentElement).getPropertyValue(v).trim();
  const DASH = { train: [], val: [6, 4] };
  // A chart over several series that share the x axis (xLabel, "step" unless set). add(label, x,
  // y) then redraw(). Without a point it draws no plot but its empty text (setEmpty).
  class Curves {
    constructor(el, yLabel) {
      this.el = el; this.yLabel = yLabel; this.xLabel = "step"; this.series = new Map(); this.plot = null; this.pending = false;
      this.emptyText = "No data yet.";
    }
    // What the chart says while it has no point (why it is empty).
    setEmpty(text) {
      if (text === this.emptyText) return;
      this.emptyText = text;
      const msg = this.el.querySelector(":scope > .chart-empty");
      if (msg) msg.textContent = text;
    }
    add(label, x, y, color, dash) {
      if (!this.series.has(label)) this.series.set(label, { pts: new Map(), color, dash });
      this.series.get(label).pts.set(x, y);
      this.schedule();
    }
    schedule() {
      if (this.pending) return;
      this.pending = true;
      setTimeout(() => { this.pending = false; this.redraw(); }, 200);
    }
    points() { let n = 0; for (const s of this.series.values()) n += s.pts.size; return n; }
    redraw() {
      let msg = this.el.querySelector(":scope > .chart-empty");
      if (!this.points()) {
        if (this.plot) { this.plot.destroy(); this.plot = null; this.key = null; }
        if (!msg) { msg = document.createElement("p"); msg.className = "chart-empty muted"; this.el.prepend(msg); }
        msg.textContent = this.emptyText;
        this.el.dataset.points = "0";
        return;
      }
      if (msg) msg.remove();
      const labels = [...this.series.keys()];
      const xs = [...new Set(labels.flatMap((l) => [...this.series.get(l).pts.keys()]))].sort((a, b) => a - b);
      const data = [xs, ...labels.map((l) => { const p = this.series.get(l).pts; return xs.map((x) => (p.has(x) ? p.get(x) : null)); })];
      const key = labels.join("|");
      if (!this.plot || this.key !== key) {
        if (this.plot) this.plot.destroy();
        this.key = key;
        const axis = { stroke: css("--fg"), grid: { stroke: css("--line") }, ticks: { stroke: css("--line") } };
        this.plot = new uPlot({
          width: Math.max(320, this.el.clientWidth - 8), height: 260,
          scales: { x: { time: false } },
          axes: [Object.assign({ label: this.xLabel }, axis), Object.assign({ label: this.yLabel, size: ySize }, axis)],
          series: [{ label: this.xLabel }, ...labels.map((l) => {
            const s = this.series.get(l);
            return { label: l, stroke: s.color, width: 2, dash: s.dash, spanGaps: true, points: { show: (u) => u.data[0].length < 60 } };
          })],
        }, data, this.el);
        keyboardLegend(this.el);
      } else {
        this.plot.setData(data);
      }
      this.el.dataset.points = String(this.points());
    }
  }
  // The y axis's width: room for its longest tick label ("10,000"), so its title never
  // overlaps the numbers.
  function ySize(u, values) {
    const longest = Math.max(0, ...(values || []).map((v) => String(v ?? "").length));
    return Math.max(50, 16 + 7 * longest);
  }
  // uPlot's legend rows toggle their series on click: make each a button the keyboard reaches
  // (Tab) and presses (Enter or Space), with its state for screen readers.
  function keyboardLegend(el) {
    el.querySelectorAll(".u-legend tr.u-series").forEach((row, i) => {
      if (i === 0) return; // the x series
      row.tabIndex = 0;
      row.setAttribute("role", "button");
      const sync = () => row.setAttribute("aria-pressed", String(!row.classList.contains("u-off")));
      sync();
      row.addEventListener("click", () => setTimeout(sync));
      row.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); row.querySelector("th").click(); }
      });
    });
  }
  // Which chart a metric value goes on and its label: train rows carry each step's "loss"; val
  // rows (one per epoch) carry the epoch's train_loss/train_accuracy and val_loss/val_accuracy.
  const SCORES = ["accuracy", "acc", "psnr"];
  function seriesOf(split, key) {
    const base = key.replace(/^(train|val)_/, "");
    const who = key.startsWith("val_") ? "val" : key.startsWith("train_") ? "train (epoch)" : split === "val" ? "val" : "train";
    const chart = base === "loss" ? "loss" : SCORES.includes(base) ? "acc" : null;
    const style = { train: [0, []], "train (epoch)": [2, [2, 3]], val: [1, [6, 4]] }[who];
    return { chart, label: `${who} ${base}`, role: who, color: NC.PALETTE[style[0]], dash: style[1] };
  }
  return { Curves, DASH, css, seriesOf };
})();
