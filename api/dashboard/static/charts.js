// The dashboard's own SVG charts: line charts (every series has its own marker shape, dash pattern
// and an end label, so nothing depends on colour alone) and horizontal bar charts.

import {h, s} from "./util.js";

// Drawn in a smaller box on a narrow screen, so the text keeps a readable size when scaled.
const narrow = () => window.matchMedia("(max-width: 600px)").matches;
const M = {top: 12, right: 84, bottom: 42, left: 50};
export const MARKERS = ["circle", "square", "triangle", "diamond", "cross", "down"];

let uid = 0;

const finite = (v) => typeof v === "number" && Number.isFinite(v);

function markerPath(shape, x, y, r) {
  switch (shape) {
    case "square":
      return `M${x - r},${y - r}h${2 * r}v${2 * r}h${-2 * r}z`;
    case "triangle":
      return `M${x},${y - 1.2 * r}L${x + 1.1 * r},${y + 0.8 * r}L${x - 1.1 * r},${y + 0.8 * r}z`;
    case "down":
      return `M${x},${y + 1.2 * r}L${x + 1.1 * r},${y - 0.8 * r}L${x - 1.1 * r},${y - 0.8 * r}z`;
    case "diamond":
      return `M${x},${y - 1.3 * r}L${x + 1.3 * r},${y}L${x},${y + 1.3 * r}L${x - 1.3 * r},${y}z`;
    case "cross":
      return `M${x - r},${y - r}L${x + r},${y + r}M${x + r},${y - r}L${x - r},${y + r}`;
    default: // circle
      return `M${x - r},${y}a${r},${r} 0 1,0 ${2 * r},0a${r},${r} 0 1,0 ${-2 * r},0`;
  }
}

/** Round tick values covering [lo, hi], about `count` of them. */
export function niceTicks(lo, hi, count = 5) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  let step = 10 ** Math.floor(Math.log10(span / count));
  const err = (count / span) * step;
  if (err <= 0.15) step *= 10;
  else if (err <= 0.35) step *= 5;
  else if (err <= 0.75) step *= 2;
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Math.abs(v) < step * 1e-9 ? 0 : Number(v.toPrecision(12)));
  }
  return ticks;
}

function domain(values, fixed, pad) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (fixed) {
    lo = Math.min(lo, fixed[0]);
    hi = Math.max(hi, fixed[1]);
  } else if (values.length) {
    const extra = (hi - lo) * pad || Math.abs(hi) * 0.1 || 0.5;
    lo -= extra;
    hi += extra;
  }
  if (!values.length && !fixed) return [0, 1];
  if (lo === hi) return [lo - 0.5, hi + 0.5];
  return [lo, hi];
}

function legendSwatch(shape, index, dashed) {
  return s("svg", {class: `swatch series s${index % 6}${dashed ? " dashed" : ""}`, viewBox: "0 0 28 12",
    width: 28, height: 12, "aria-hidden": "true"},
  s("path", {class: "line", d: "M1,6H27"}),
  s("path", {class: `pt marker-${shape}`, d: markerPath(shape, 14, 6, 3.5)}));
}

/**
 * A line chart. series: [{key, label, points: [{x, y}], marker?, dashed?}]; refs: [{y, label}]
 * horizontal reference lines. Returns a <figure data-chart=id>; each series is a
 * <g data-series=key> whose markers have class "pt" (one per point).
 */
export function lineChart({id, title, xLabel, yLabel, series, refs = [], xDomain, yDomain,
  xFormat = (v) => String(v), yFormat = (v) => String(v), xInteger = true}) {
  const captionId = `chart-${id}-${++uid}`;
  const [W, H] = narrow() ? [350, 240] : [480, 250];
  const all = series.flatMap((sr) => sr.points.filter((p) => finite(p.x) && finite(p.y)));
  const [x0, x1] = domain(all.map((p) => p.x), xDomain, 0);
  const [y0, y1] = domain([...all.map((p) => p.y), ...refs.map((r) => r.y).filter(finite)], yDomain, 0.08);
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => M.top + (1 - (y - y0) / (y1 - y0)) * ph;

  const svg = s("svg", {class: "plot", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": captionId,
    preserveAspectRatio: "xMidYMid meet"});
  const grid = s("g", {class: "grid", "aria-hidden": "true"});
  for (const t of niceTicks(y0, y1, 5)) {
    grid.append(s("line", {x1: M.left, x2: M.left + pw, y1: sy(t), y2: sy(t)}),
      s("text", {x: M.left - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}, yFormat(t)));
  }
  let xt = niceTicks(x0, x1, Math.min(8, Math.max(2, Math.round(x1 - x0))));
  if (xInteger) xt = xt.filter((t) => Number.isInteger(t));
  for (const t of xt) {
    grid.append(s("line", {class: "xgrid", x1: sx(t), x2: sx(t), y1: M.top, y2: M.top + ph}),
      s("text", {x: sx(t), y: M.top + ph + 15, class: "tick", "text-anchor": "middle"}, xFormat(t)));
  }
  grid.append(
    s("rect", {class: "frame", x: M.left, y: M.top, width: pw, height: ph}),
    s("text", {class: "axis-label", x: M.left + pw / 2, y: H - 6, "text-anchor": "middle"}, xLabel),
    s("text", {class: "axis-label", x: 12, y: M.top + ph / 2, "text-anchor": "middle",
      transform: `rotate(-90 12 ${M.top + ph / 2})`}, yLabel));
  svg.append(grid);

  const labels = [];
  for (const ref of refs) {
    if (!finite(ref.y)) continue;
    svg.append(s("g", {class: "ref", "data-ref": ref.label},
      s("line", {x1: M.left, x2: M.left + pw, y1: sy(ref.y), y2: sy(ref.y)}),
      s("title", {}, `${ref.label}: ${yFormat(ref.y)}`)));
    labels.push({y: sy(ref.y), x: M.left + pw + 4, text: ref.label, cls: "ref-label"});
  }
  series.forEach((sr, i) => {
    const shape = sr.marker || MARKERS[i % MARKERS.length];
    const pts = sr.points.filter((p) => finite(p.x) && finite(p.y)).sort((a, b) => a.x - b.x);
    const g = s("g", {class: `series s${i % 6}${sr.dashed ? " dashed" : ""}`, "data-series": sr.key,
      "data-points": pts.length});
    if (pts.length > 1) {
      g.append(s("path", {class: "line", d: pts.map((p, j) => `${j ? "L" : "M"}${sx(p.x)},${sy(p.y)}`).join("")}));
    }
    for (const p of pts) {
      g.append(s("path", {class: `pt marker-${shape}`, d: markerPath(shape, sx(p.x), sy(p.y), 3.5),
        "data-x": p.x, "data-y": p.y}, s("title", {}, `${sr.label}, ${xLabel} ${xFormat(p.x)}: ${yFormat(p.y)}`)));
    }
    if (pts.length) {
      const last = pts[pts.length - 1];
      labels.push({y: sy(last.y), x: sx(last.x) + 7, text: sr.label, cls: `end-label s${i % 6}`});
    }
    svg.append(g);
  });
  // End labels, nudged apart vertically so none overlaps another.
  labels.sort((a, b) => a.y - b.y);
  for (let j = 1; j < labels.length; j += 1) {
    if (labels[j].y - labels[j - 1].y < 11) labels[j].y = labels[j - 1].y + 11;
  }
  for (const l of labels) {
    svg.append(s("text", {class: l.cls, x: Math.min(l.x, W - M.right + 4), y: l.y + 4, "aria-hidden": "true"},
      l.text));
  }
  if (!all.length) {
    svg.append(s("text", {class: "empty", x: M.left + pw / 2, y: M.top + ph / 2, "text-anchor": "middle"},
      "no points yet"));
  }
  const legend = h("ul", {class: "legend"},
    series.map((sr, i) => h("li", {}, legendSwatch(sr.marker || MARKERS[i % MARKERS.length], i, sr.dashed),
      ` ${sr.label}`)));
  return h("figure", {class: "chart", "data-chart": id},
    h("figcaption", {id: captionId}, title), svg, series.length > 1 ? legend : null);
}

/** Horizontal bars: items [{label, value}] on [0, max]; each bar has its label and value as text. */
export function barChart({id, title, items, max = 1, format = (v) => String(v)}) {
  const captionId = `chart-${id}-${++uid}`;
  const W = narrow() ? 350 : 480;
  const row = 20;
  const labelW = narrow() ? 130 : 170;
  const valueW = 56;
  const height = Math.max(1, items.length) * row + 8;
  const svg = s("svg", {class: "bars", viewBox: `0 0 ${W} ${height}`, role: "img", "aria-labelledby": captionId});
  const bw = W - labelW - valueW - 8;
  items.forEach((item, i) => {
    const y = 4 + i * row;
    const fits = Math.floor(labelW / 6.5);
    const label = item.label.length > fits ? `…${item.label.slice(-(fits - 1))}` : item.label;
    const width = finite(item.value) ? Math.max(0, Math.min(1, item.value / max)) * bw : 0;
    svg.append(s("g", {class: "bar", "data-label": item.label},
      s("title", {}, `${item.label}: ${format(item.value)}`),
      s("text", {class: "bar-label", x: labelW - 6, y: y + 14, "text-anchor": "end"}, label),
      s("rect", {class: "track", x: labelW, y: y + 3, width: bw, height: row - 6}),
      s("rect", {class: "fill", x: labelW, y: y + 3, width, height: row - 6}),
      s("text", {class: "bar-value", x: labelW + bw + 6, y: y + 14}, format(item.value))));
  });
  if (!items.length) svg.append(s("text", {class: "empty", x: W / 2, y: 16, "text-anchor": "middle"}, "no data yet"));
  return h("figure", {class: "chart", "data-chart": id}, h("figcaption", {id: captionId}, title), svg);
}
