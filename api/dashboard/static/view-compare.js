// Compare two or more jobs: their curves per megabatch overlaid (each job its own marker, dash and
// label) and a table of final accuracy, CER, generalisation gap and density. Polls while a job
// is still running.

import {api} from "./api.js";
import {lineChart} from "./charts.js";
import {describeSpec, h, num, pct, replace, shortId, statusBadge, summarize, TERMINAL} from "./util.js";
import {loadSelection} from "./view-jobs.js";

const POLL_MS = 4000;

function picker(root, chosen, signal) {
  const selected = new Set(chosen.length ? chosen : loadSelection());
  const go = h("button", {type: "submit", id: "compare-go"}, "Compare");
  const list = h("fieldset", {class: "picker"}, h("legend", {}, "Pick two or more jobs"),
    h("p", {class: "help"}, "Loading your jobs…"));
  const form = h("form", {class: "card", id: "compare-picker"}, list, go);
  const update = () => { go.disabled = selected.size < 2; };
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    location.hash = `#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`;
  });
  replace(root, h("h1", {}, "Compare jobs"), form);
  update();
  api("jobs?limit=50", {signal}).then((page) => {
    replace(list, h("legend", {}, "Pick two or more jobs"), page.items.length ? page.items.map((job) => {
      const box = h("input", {type: "checkbox", id: `cmp-${job.id}`, value: job.id, checked: selected.has(job.id)});
      box.addEventListener("change", () => {
        if (box.checked) selected.add(job.id); else selected.delete(job.id);
        update();
      });
      return h("div", {class: "check"}, box, h("label", {for: `cmp-${job.id}`},
        h("span", {class: "mono"}, shortId(job.id)), " ", statusBadge(job.status), " ", describeSpec(job.spec)));
    }) : h("p", {}, "No jobs yet."));
  }).catch((err) => {
    if (!signal.aborted) replace(list, h("p", {class: "error"}, `Could not list the jobs: ${err.message}`));
  });
}

export function compareView(root, ids) {
  const controller = new AbortController();
  const signal = controller.signal;
  let timer = null;
  if (ids.length < 2) {
    picker(root, ids, signal);
    return {destroy() { controller.abort(); }};
  }
  const charts = h("div", {class: "charts", id: "compare-charts"});
  const tableBody = h("tbody");
  const error = h("p", {class: "error", role: "alert"});
  replace(root,
    h("div", {class: "title-row"}, h("h1", {}, `Compare ${ids.length} jobs`),
      h("a", {class: "button quiet", href: "#/compare"}, "Change jobs")),
    error,
    h("div", {class: "table-wrap"}, h("table", {class: "compare", id: "compare-table"},
      h("caption", {}, "Final numbers (so far, for a job still running)"),
      h("thead", {}, h("tr", {}, ["Job", "Method", "Status", "Final accuracy", "CER", "Gap (pp)", "Density"].map(
        (c) => h("th", {scope: "col"}, c)))),
      tableBody)),
    charts);

  async function load() {
    clearTimeout(timer);
    const loaded = await Promise.all(ids.map(async (id) => {
      try {
        const [job, metrics] = await Promise.all([api(`jobs/${encodeURIComponent(id)}`, {signal}),
          api(`jobs/${encodeURIComponent(id)}/metrics`, {signal})]);
        return {id, job, mbs: metrics.megabatches};
      } catch (err) {
        return {id, err};
      }
    }));
    if (signal.aborted) return;
    const failed = loaded.filter((x) => x.err);
    error.textContent = failed.map((x) => `Job ${shortId(x.id)}: ${x.err.message}`).join(" ");
    const ok = loaded.filter((x) => !x.err);
    replace(tableBody, ok.map(({id, job, mbs}) => {
      const sum = summarize(job, mbs);
      return h("tr", {"data-job": id},
        h("td", {"data-label": "Job"}, h("a", {href: `#/jobs/${id}`, class: "mono"}, shortId(id))),
        h("td", {"data-label": "Method"}, `${job.spec?.method} · ${job.spec?.architecture}`),
        h("td", {"data-label": "Status"}, statusBadge(job.status)),
        h("td", {"data-label": "Final accuracy", "data-value": "accuracy"}, pct(sum.accuracy)),
        h("td", {"data-label": "CER", "data-value": "cer"}, sum.cer ?? "–"),
        h("td", {"data-label": "Gap (pp)", "data-value": "gap"}, num(sum.gap, 1)),
        h("td", {"data-label": "Density", "data-value": "density"}, pct(sum.density)));
    }));
    const maxMb = Math.max(1, ...ok.map(({job}) => job.spec?.stream?.megabatches || 1));
    const series = (field) => ok.map(({id, job, mbs}) => ({key: id, label: `${shortId(id).slice(0, 6)} ${job.spec?.method}`,
      points: mbs.map((m) => ({x: m.index ?? m.megabatch, y: m[field]}))}));
    const withDash = (list) => list.map((sr, i) => ({...sr, dashed: i % 2 === 1}));
    replace(charts,
      lineChart({id: "compare-accuracy", title: "Test accuracy after each megabatch", xLabel: "megabatch",
        yLabel: "test accuracy", xDomain: [1, maxMb], yDomain: [0, 1], yFormat: (v) => pct(v, 0),
        series: withDash(series("test_accuracy"))}),
      lineChart({id: "compare-density", title: "Measured density", xLabel: "megabatch", yLabel: "density",
        xDomain: [1, maxMb], yDomain: [0, 1], yFormat: (v) => pct(v, 0), series: withDash(series("density"))}),
      lineChart({id: "compare-gap", title: "Generalization gap", xLabel: "megabatch", yLabel: "gap (pp)",
        xDomain: [1, maxMb], yFormat: (v) => num(v, 1), series: withDash(series("generalization_gap"))}));
    if (ok.some(({job}) => !TERMINAL.has(job.status))) timer = setTimeout(load, POLL_MS);
  }

  load().catch((err) => { if (!signal.aborted) error.textContent = err.message; });
  return {destroy() { controller.abort(); clearTimeout(timer); }};
}
