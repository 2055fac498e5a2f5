// Small DOM and formatting helpers. Text always goes in as text nodes (never as HTML).

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "text") {
      el.textContent = String(value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("p", {class: "x"}, "text", child...) */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element: s("circle", {cx: 1, cy: 2, r: 3}) */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

const isNum = (x) => typeof x === "number" && Number.isFinite(x);

/** 0.9123 -> "91.2 %" */
export function pct(x, digits = 1) {
  return isNum(x) ? `${(x * 100).toFixed(digits)} %` : "–";
}

export function num(x, digits = 3) {
  return isNum(x) ? x.toFixed(digits) : "–";
}

export function bytes(n) {
  if (!isNum(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
}

export function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function shortId(id) {
  return String(id).slice(0, 8);
}

/** The density a spec aims at, from sparsity.target or sparsity.tau (density 0.8 ** tau). */
export function targetDensity(spec) {
  const sp = (spec && spec.sparsity) || {};
  if (spec && spec.method === "dense") return 1;
  if (isNum(sp.target)) return 1 - sp.target;
  if (isNum(sp.tau)) return 0.8 ** sp.tau;
  return null;
}

export function describeSpec(spec) {
  if (!spec) return "";
  const ds = spec.dataset || {};
  const dataset = ds.id ? `${ds.name} upload ${shortId(ds.id)}` : ds.name;
  const stream = spec.stream || {};
  const training = spec.training || {};
  return `${spec.method} · ${spec.architecture} · ${dataset} · ${stream.megabatches} megabatches × ` +
    `${training.epochs} epochs · seed ${training.seed}`;
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];

export function statusBadge(status) {
  return h("span", {class: `badge status-${status}`, "data-status": status}, status);
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, {once: true});
  });
}

/** A short message in the page's status line (a polite live region). */
export function notify(text) {
  const notice = document.getElementById("notice");
  notice.textContent = text;
  notice.classList.toggle("shown", Boolean(text));
  if (text) setTimeout(() => { if (notice.textContent === text) notify(""); }, 6000);
}

const finite = (v) => typeof v === "number" && Number.isFinite(v);

/**
 * A job's headline numbers: final test accuracy, CER (the sum of test errors over the stream),
 * density and generalisation gap (percentage points) — from its result when finished, else from
 * the megabatches so far (`partial` is then true).
 */
export function summarize(job, megabatches) {
  const last = megabatches.length ? megabatches[megabatches.length - 1] : job.latest_metrics || null;
  const result = job.result || {};
  const errors = megabatches.map((m) => m.test_errors).filter(finite);
  return {
    accuracy: finite(result.final_test_accuracy) ? result.final_test_accuracy : last?.test_accuracy,
    cer: finite(result.cer) ? result.cer : errors.length ? errors.reduce((a, b) => a + b, 0) : undefined,
    density: finite(result.final_density) ? result.final_density : last?.density,
    gap: last?.generalization_gap,
    partial: !finite(result.cer),
  };
}
