/* Small SVG charts of the live dashboard: a throughput line and a duration histogram.
 * Dependency-free; dashboard.js feeds them from the WebSocket events it already receives (no
 * polling). Colours come from CSS (dashboard.css), so they follow the admin's dark mode. */
(function () {
  "use strict";

  const SVG = "http://www.w3.org/2000/svg";
  const PAD = { left: 40, right: 12, top: 20, bottom: 22 };

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const step = Math.pow(10, Math.floor(Math.log10(value)));
    for (const m of [1, 2, 2.5, 5, 10]) if (value <= m * step) return m * step;
    return 10 * step;
  }

  function fmtNumber(n) {
    if (n === 0) return "0";
    if (n >= 100) return n.toFixed(0);
    if (n >= 10) return n.toFixed(1).replace(/\.0$/, "");
    return n.toFixed(2).replace(/\.?0+$/, "");
  }

  function fmtSeconds(s) {
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 60) return fmtNumber(s) + " s";
    return fmtNumber(s / 60) + " min";
  }

  /* Items finished per time bucket, from the counters of batch.updated (no sampling loss:
   * each update adds what finished since the previous one). */
  class RateSeries {
    constructor({ bucketMs = 2000, windowMs = 5 * 60 * 1000 } = {}) {
      this.bucketMs = bucketMs;
      this.windowMs = windowMs;
      this.buckets = new Map(); // bucket start (ms) -> items finished in it
      this.since = null; // first moment observed: before it there is no data, not zero
    }

    start(now) {
      if (this.since === null) this.since = Math.floor(now / this.bucketMs) * this.bucketMs;
    }

    add(count, now) {
      this.start(now);
      if (!(count > 0)) return;
      const key = Math.floor(now / this.bucketMs) * this.bucketMs;
      this.buckets.set(key, (this.buckets.get(key) || 0) + count);
    }

    /* The time the x axis spans: what was observed, at least a minute, at most the window. */
    span(now) {
      if (this.since === null) return 60000;
      return Math.min(this.windowMs, Math.max(60000, now - this.since));
    }

    /* [time, items/s] of every completed bucket in the window, oldest first. */
    points(now) {
      if (this.since === null) return [];
      const current = Math.floor(now / this.bucketMs) * this.bucketMs;
      const first = Math.max(this.since, current - this.windowMs);
      for (const key of this.buckets.keys()) if (key < first) this.buckets.delete(key);
      const out = [];
      for (let key = first; key < current; key += this.bucketMs) {
        out.push([key + this.bucketMs, ((this.buckets.get(key) || 0) * 1000) / this.bucketMs]);
      }
      return out;
    }
  }

  function frame(container, height) {
    const style = getComputedStyle(container);
    const inner = container.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    const width = Math.max(240, Math.floor(inner || 480));
    const svg = svgEl("svg", {
      class: "bd-chart-svg", width: width, height: height, viewBox: `0 0 ${width} ${height}`, role: "img",
    });
    return { svg, width, height, plotW: width - PAD.left - PAD.right, plotH: height - PAD.top - PAD.bottom };
  }

  function yAxis(f, max, unit) {
    for (const fraction of [0, 0.5, 1]) {
      const y = PAD.top + f.plotH * (1 - fraction);
      f.svg.append(svgEl("line", { class: "bd-grid", x1: PAD.left, x2: PAD.left + f.plotW, y1: y, y2: y }));
      f.svg.append(svgEl("text", { class: "bd-axis", x: PAD.left - 6, y: y + 4, "text-anchor": "end" },
        fmtNumber(max * fraction)));
    }
    f.svg.append(svgEl("text", { class: "bd-axis bd-unit", x: PAD.left, y: 11 }, unit));
  }

  /* Items/s over the window: one circle per completed bucket, joined by a line. */
  function drawRate(container, series, now, { label = "items/s" } = {}) {
    const f = frame(container, 170);
    const points = series.points(now);
    const max = niceMax(Math.max(0, ...points.map((p) => p[1])));
    yAxis(f, max, label);
    const span = series.span(now);
    const x = (t) => PAD.left + f.plotW * (1 - (now - t) / span);
    const y = (v) => PAD.top + f.plotH * (1 - v / max);
    const ago = span < 120000 ? `${Math.round(span / 1000)} s` : `${Math.round(span / 60000)} min`;
    f.svg.append(svgEl("text", { class: "bd-axis", x: PAD.left, y: f.height - 6 }, `−${ago}`));
    f.svg.append(svgEl("text", { class: "bd-axis", x: PAD.left + f.plotW, y: f.height - 6, "text-anchor": "end" }, "now"));
    if (points.length > 1) {
      const d = points.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
      f.svg.append(svgEl("path", { class: "bd-line", d: d }));
    }
    for (const [t, v] of points) {
      const dot = svgEl("circle", { class: "bd-pt", cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 2.2 });
      dot.append(svgEl("title", {}, `${fmtNumber(v)} items/s at ${new Date(t).toLocaleTimeString([], { hour12: false })}`));
      f.svg.append(dot);
    }
    f.svg.setAttribute("aria-label", points.length
      ? `Throughput over the last ${ago}, now ${fmtNumber(points[points.length - 1][1])} items/s`
      : "Throughput: waiting for the first items to finish");
    container.replaceChildren(f.svg);
    return points;
  }

  /* Nearest-rank quantile of sorted values. */
  function quantile(sorted, q) {
    if (!sorted.length) return null;
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
  }

  /* Item durations (seconds) in up to 24 equal bins from 0, with p50 and p95 marked. */
  function drawHistogram(container, durations, { bins = 24 } = {}) {
    const f = frame(container, 170);
    const sorted = [...durations].sort((a, b) => a - b);
    const stats = { n: sorted.length, p50: quantile(sorted, 0.5), p95: quantile(sorted, 0.95) };
    const top = niceMax(sorted.length ? sorted[sorted.length - 1] : 1);
    const counts = new Array(bins).fill(0);
    for (const d of sorted) counts[Math.min(bins - 1, Math.floor((d / top) * bins))] += 1;
    const max = niceMax(Math.max(1, ...counts));
    yAxis(f, max, "items");
    const x = (s) => PAD.left + (f.plotW * s) / top;
    const barW = f.plotW / bins;
    counts.forEach((count, i) => {
      if (!count) return;
      const h = (f.plotH * count) / max;
      const bar = svgEl("rect", {
        class: "bd-hbar", x: (PAD.left + i * barW + 1).toFixed(1), y: (PAD.top + f.plotH - h).toFixed(1),
        width: Math.max(1, barW - 2).toFixed(1), height: h.toFixed(1),
      });
      bar.append(svgEl("title", {}, `${count} items of ${fmtSeconds((i * top) / bins)}–${fmtSeconds(((i + 1) * top) / bins)}`));
      f.svg.append(bar);
    });
    f.svg.append(svgEl("text", { class: "bd-axis", x: PAD.left, y: f.height - 6 }, "0"));
    f.svg.append(svgEl("text", { class: "bd-axis", x: PAD.left + f.plotW, y: f.height - 6, "text-anchor": "end" }, fmtSeconds(top)));
    for (const [name, value] of [["p50", stats.p50], ["p95", stats.p95]]) {
      if (value === null) continue;
      const px = x(value).toFixed(1);
      f.svg.append(svgEl("line", { class: "bd-q bd-q-" + name, x1: px, x2: px, y1: PAD.top, y2: PAD.top + f.plotH }));
      f.svg.append(svgEl("text", {
        class: "bd-axis bd-q-label", x: px, y: PAD.top + 10, "text-anchor": name === "p50" ? "end" : "start",
        dx: name === "p50" ? -3 : 3,
      }, name));
    }
    f.svg.setAttribute("aria-label", stats.n
      ? `Durations of ${stats.n} items: p50 ${fmtSeconds(stats.p50)}, p95 ${fmtSeconds(stats.p95)}`
      : "Durations: no item has finished yet");
    container.replaceChildren(f.svg);
    return stats;
  }

  window.BatchCharts = { RateSeries, drawRate, drawHistogram, quantile, fmtSeconds };
})();
