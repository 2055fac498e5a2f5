// The job list: newest first, filtered by status, paginated with the API's cursor, polled (not
// streamed: the service caps event streams per key). Rows are updated in place, so focus and
// the compare selection survive each refresh.

import {api} from "./api.js";
import {h, pct, replace, shortId, STATUSES, statusBadge, when} from "./util.js";

const POLL_MS = 2500;
const PAGE_SIZE = 20;
const SELECTION_KEY = "anytime-prune.compare";

export function loadSelection() {
  try {
    return new Set(JSON.parse(sessionStorage.getItem(SELECTION_KEY) || "[]"));
  } catch {
    return new Set();
  }
}

function saveSelection(selected) {
  sessionStorage.setItem(SELECTION_KEY, JSON.stringify([...selected]));
}

function jobDataset(spec) {
  const ds = (spec && spec.dataset) || {};
  return ds.id ? `${ds.name} (upload ${shortId(ds.id)})` : ds.name || "–";
}

function progressCell(job) {
  const p = job.progress || {};
  const text = p.megabatches ? `${p.megabatch}/${p.megabatches}` : "–";
  return [h("progress", {max: 1, value: p.fraction || 0, "aria-label": `job ${shortId(job.id)} progress`}),
    h("span", {class: "progress-text"}, ` ${Math.round((p.fraction || 0) * 100)} % · megabatch ${text}`)];
}

function densityOf(job) {
  return job.result?.final_density ?? job.latest_metrics?.density;
}

function accuracyOf(job) {
  return job.result?.final_test_accuracy ?? job.latest_metrics?.test_accuracy;
}

const COLUMNS = ["Compare", "Job", "Status", "Progress", "Method", "Architecture", "Dataset", "Density",
  "Test accuracy", "Submitted"];

export function jobsView(root, {status, limit}) {
  const pageSize = Math.min(100, Math.max(1, Number.parseInt(limit, 10) || PAGE_SIZE));
  const controller = new AbortController();
  const selected = loadSelection();
  const cursors = [null];
  let pageIndex = 0;
  let nextCursor = null;
  let timer = null;
  let seq = 0;
  const rows = new Map();

  const filter = h("select", {id: "status-filter"},
    h("option", {value: ""}, "all"),
    STATUSES.map((st) => h("option", {value: st, selected: st === status}, st)));
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/jobs?status=${filter.value}` : "#/jobs";
  });
  const compareButton = h("button", {type: "button", id: "compare-selected"});
  compareButton.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].map(encodeURIComponent).join(",")}`;
  });
  const clearButton = h("button", {type: "button", class: "quiet", id: "clear-selection"}, "Clear selection");
  clearButton.addEventListener("click", () => {
    selected.clear();
    saveSelection(selected);
    for (const row of rows.values()) row.box.checked = false;
    updateCompare();
  });
  const tbody = h("tbody");
  const table = h("table", {class: "jobs", id: "jobs-table"},
    h("caption", {class: "visually-hidden"}, "Your jobs, newest first"),
    h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", {scope: "col"}, c)))), tbody);
  const empty = h("p", {class: "empty-note", hidden: true}, "No jobs here yet. ", h("a", {href: "#/submit"},
    "Submit one"), ".");
  const newer = h("button", {type: "button", id: "page-newer"}, "← Newer");
  const older = h("button", {type: "button", id: "page-older"}, "Older →");
  const pageLabel = h("span", {class: "page-label"});
  const updated = h("p", {class: "help", id: "jobs-updated"});
  const error = h("p", {class: "error", role: "alert"});
  newer.addEventListener("click", () => { if (pageIndex > 0) { pageIndex -= 1; refresh(); } });
  older.addEventListener("click", () => {
    if (nextCursor) {
      cursors[pageIndex + 1] = nextCursor;
      pageIndex += 1;
      refresh();
    }
  });

  replace(root,
    h("div", {class: "title-row"}, h("h1", {}, "Jobs"), h("a", {class: "button", href: "#/submit"}, "Submit a job")),
    h("div", {class: "toolbar"},
      h("label", {for: "status-filter"}, "Status "), filter, compareButton, clearButton),
    error, h("div", {class: "table-wrap"}, table), empty,
    h("div", {class: "pager"}, newer, pageLabel, older), updated);

  function updateCompare() {
    compareButton.textContent = `Compare selected (${selected.size})`;
    compareButton.disabled = selected.size < 2;
    clearButton.hidden = selected.size === 0;
  }

  function rowFor(job) {
    let row = rows.get(job.id);
    if (!row) {
      const box = h("input", {type: "checkbox", id: `pick-${job.id}`, "data-job": job.id,
        "aria-label": `compare job ${shortId(job.id)}`});
      box.checked = selected.has(job.id);
      box.addEventListener("change", () => {
        if (box.checked) selected.add(job.id); else selected.delete(job.id);
        saveSelection(selected);
        updateCompare();
      });
      const cells = COLUMNS.map((c) => h("td", {"data-label": c}));
      cells[0].append(box);
      row = {tr: h("tr", {"data-job": job.id}, cells), cells, box, last: ""};
      rows.set(job.id, row);
    }
    const signature = JSON.stringify([job.status, job.progress, densityOf(job), accuracyOf(job), job.stale]);
    if (signature !== row.last) {
      row.last = signature;
      const c = row.cells;
      replace(c[1], h("a", {href: `#/jobs/${job.id}`, class: "mono"}, shortId(job.id)));
      replace(c[2], statusBadge(job.status), job.stale ? h("span", {class: "badge stale"}, "stale") : null);
      replace(c[3], progressCell(job));
      replace(c[4], job.spec?.method ?? "–");
      replace(c[5], job.spec?.architecture ?? "–");
      replace(c[6], jobDataset(job.spec));
      replace(c[7], pct(densityOf(job)));
      replace(c[8], pct(accuracyOf(job)));
      replace(c[9], h("time", {datetime: job.created_at}, when(job.created_at)));
    }
    return row;
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++seq;
    const cursor = cursors[pageIndex];
    const query = new URLSearchParams({limit: String(pageSize)});
    if (status) query.set("status", status);
    if (cursor) query.set("cursor", cursor);
    try {
      const page = await api(`jobs?${query}`, {signal: controller.signal});
      if (mine !== seq) return; // a newer refresh (another page) is under way
      error.textContent = "";
      nextCursor = page.next_cursor;
      const shown = new Set();
      page.items.forEach((job, i) => {
        const row = rowFor(job);
        shown.add(job.id);
        if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
      });
      for (const [id, row] of rows) {
        if (!shown.has(id)) { row.tr.remove(); rows.delete(id); }
      }
      empty.hidden = page.items.length > 0;
      table.hidden = page.items.length === 0;
      newer.disabled = pageIndex === 0;
      older.disabled = !nextCursor;
      pageLabel.textContent = `page ${pageIndex + 1}`;
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${POLL_MS / 1000} s.`;
    } catch (err) {
      if (controller.signal.aborted || mine !== seq) return;
      error.textContent = `Could not load the jobs: ${err.message}`;
    }
    if (!controller.signal.aborted) timer = setTimeout(poll, POLL_MS);
  }

  function poll() {
    if (document.hidden) timer = setTimeout(poll, POLL_MS);
    else refresh();
  }

  updateCompare();
  refresh();
  return {
    destroy() {
      controller.abort();
      clearTimeout(timer);
    },
  };
}
