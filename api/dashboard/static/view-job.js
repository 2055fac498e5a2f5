// One job: live curves per megabatch and per epoch, per-layer density, the event log, cancel and
// the downloads. The history comes from GET .../metrics, then the event stream (fetch + SSE)
// adds points as they happen; points are keyed by megabatch (and epoch), so a replayed event
// never draws twice.

import {api, ApiError} from "./api.js";
import {barChart, lineChart} from "./charts.js";
import {followJob} from "./sse.js";
import {bytes, describeSpec, h, notify, num, pct, replace, shortId, statusBadge, summarize, targetDensity,
  TERMINAL} from "./util.js";

const LOG_MAX = 1000;

function eventText(e) {
  switch (e.type) {
    case "run_started":
      return `${e.megabatches} megabatches × ${e.epochs} epochs on ${e.device} (${e.precision})` +
        (e.resumed_after ? `, resumed after megabatch ${e.resumed_after}` : "");
    case "pruned":
      return `megabatch ${e.megabatch}: ${e.pruner} pruned to density ${pct(e.density)} ` +
        `(schedule ${pct(e.target_density)})`;
    case "epoch_ended":
      return `megabatch ${e.megabatch}, epoch ${e.epoch}/${e.epochs}: loss ${num(e.train_loss)}, ` +
        `train ${pct(e.train_accuracy)}, validation ${pct(e.val_accuracy)}`;
    case "megabatch_ended": {
      const m = e.metrics || {};
      return `megabatch ${e.megabatch}/${e.megabatches}: test accuracy ${pct(m.test_accuracy)}, ` +
        `density ${pct(m.density)}, gap ${num(m.generalization_gap, 1)} pp`;
    }
    case "checkpoint_written":
      return `checkpoint of megabatch ${e.megabatch}: ${e.path}`;
    case "run_ended":
      return `CER ${e.cer}, final accuracy ${pct(e.final_test_accuracy)}, final density ${pct(e.final_density)}` +
        (e.stopped ? " (stopped early)" : "");
    case "status_changed":
      return `status ${e.status}${e.reason ? `: ${e.reason}` : ""}`;
    case "warning":
      return `warning (${e.source}): ${e.message}`;
    case "model_written":
      return `model of megabatch ${e.megabatch} kept: ${e.name} (${bytes(e.bytes)}, density ${pct(e.density)}, ` +
        `test accuracy ${pct(e.test_accuracy)})`;
    default: // an event this page does not know: its plain fields
      return Object.entries(e).filter(([k, v]) => k !== "type" && (v === null || typeof v !== "object"))
        .map(([k, v]) => `${k} ${v}`).join(", ").slice(0, 300);
  }
}

function eventTime(id) {
  const ms = Number(String(id || "").split("-")[0]);
  return ms ? new Date(ms).toLocaleTimeString() : "";
}

const STREAM_TEXT = {connecting: "connecting to the event stream…", live: "live: following the event stream",
  reconnecting: "connection lost; reconnecting…", ended: "finished: every event received", error: "stream closed"};

export function jobView(root, jobId) {
  const controller = new AbortController();
  const signal = controller.signal;
  const st = {job: null, mb: new Map(), ep: new Map(), pruned: new Map(), runEnded: null, stream: "connecting",
    streamDetail: ""};
  let frame = 0;
  let linkTimer = null;
  let modelsTimer = null;

  const title = h("h1", {}, `Job ${shortId(jobId)}`);
  const badge = h("span", {id: "job-status"});
  const specLine = h("p", {class: "spec"});
  const progress = h("progress", {id: "job-progress", max: 1, value: 0, "aria-label": "progress"});
  const progressText = h("span", {class: "progress-text"});
  const streamLine = h("p", {class: "help", id: "stream-state"});
  const cancel = h("button", {type: "button", id: "cancel-job", class: "danger"}, "Cancel job");
  const summary = h("dl", {class: "summary", id: "job-summary"});
  const mbCharts = h("div", {class: "charts", id: "megabatch-charts"});
  const epCharts = h("div", {class: "charts", id: "epoch-charts"});
  const layers = h("div", {id: "layer-density"});
  const downloads = h("div", {id: "downloads"}, h("p", {class: "help"}, "Files appear once the job has succeeded."));
  const models = h("div", {id: "models"});
  const log = h("ol", {class: "log", id: "event-log", tabindex: "0", "aria-label": "event log"});
  const error = h("p", {class: "error", role: "alert"});

  cancel.addEventListener("click", onCancel);
  replace(root,
    h("div", {class: "title-row"}, title, badge),
    h("p", {class: "mono small"}, jobId), specLine,
    h("div", {class: "progress-row"}, progress, progressText), streamLine,
    h("div", {class: "actions"}, cancel, h("a", {href: "#/jobs", class: "button quiet"}, "All jobs")),
    error,
    h("section", {"aria-labelledby": "h-summary"}, h("h2", {id: "h-summary"}, "Summary"), summary),
    h("section", {"aria-labelledby": "h-mb"}, h("h2", {id: "h-mb"}, "Per megabatch"), mbCharts),
    h("section", {"aria-labelledby": "h-ep"}, h("h2", {id: "h-ep"}, "Per epoch"), epCharts),
    h("section", {"aria-labelledby": "h-layers"}, h("h2", {id: "h-layers"}, "Density per layer"), layers),
    h("section", {"aria-labelledby": "h-dl"}, h("h2", {id: "h-dl"}, "Downloads"), downloads, models),
    h("section", {"aria-labelledby": "h-log"}, h("h2", {id: "h-log"}, "Event log"), log));

  start().catch((err) => {
    if (signal.aborted) return;
    error.textContent = err instanceof ApiError && err.status === 404 ? `No job ${jobId}.` : `Could not load the job: ${err.message}`;
  });

  async function start() {
    st.job = await api(`jobs/${encodeURIComponent(jobId)}`, {signal});
    const history = await api(`jobs/${encodeURIComponent(jobId)}/metrics`, {signal});
    for (const m of history.megabatches) st.mb.set(m.index ?? m.megabatch, m);
    for (const e of history.epochs) st.ep.set(`${e.megabatch}:${e.epoch}`, e);
    render();
    if (st.job.status === "succeeded") loadDownloads();
    loadModels();
    followJob(jobId, {signal, onEvent, onState(state, detail) {
      st.stream = state;
      st.streamDetail = detail instanceof Error ? detail.message : detail || "";
      schedule();
    }});
  }

  function onEvent(e, id) {
    addLog(e, id);
    const job = st.job;
    if (e.type === "pruned") st.pruned.set(e.megabatch, e);
    else if (e.type === "epoch_ended") {
      st.ep.set(`${e.megabatch}:${e.epoch}`, e);
      const total = job.progress?.megabatches || job.spec?.stream?.megabatches || e.megabatch;
      job.progress = {...job.progress, megabatch: e.megabatch, epoch: e.epoch,
        fraction: Math.min(1, (e.megabatch - 1 + e.epoch / e.epochs) / total)};
    } else if (e.type === "megabatch_ended") {
      st.mb.set(e.megabatch, {...e.metrics, megabatch: e.megabatch});
      job.progress = {...job.progress, megabatch: e.megabatch, megabatches: e.megabatches,
        fraction: Math.min(1, e.megabatch / e.megabatches)};
    } else if (e.type === "run_ended") st.runEnded = e;
    else if (e.type === "model_written") loadModelsSoon();
    else if (e.type === "status_changed") {
      job.status = e.status;
      if (e.reason && e.status === "failed") job.error = e.reason;
      if (TERMINAL.has(e.status)) refreshJob();
    }
    schedule();
  }

  async function refreshJob() {
    try {
      st.job = await api(`jobs/${encodeURIComponent(jobId)}`, {signal});
      schedule();
      if (st.job.status === "succeeded") loadDownloads();
      else loadModels();
    } catch (err) {
      if (!signal.aborted) error.textContent = `Could not refresh the job: ${err.message}`;
    }
  }

  function addLog(e, id) {
    const nearBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(h("li", {"data-type": e.type}, h("time", {}, eventTime(id)), " ", h("strong", {}, e.type), " ",
      eventText(e)));
    while (log.children.length > LOG_MAX) log.firstChild.remove();
    if (nearBottom) log.scrollTop = log.scrollHeight;
  }

  function schedule() {
    if (!frame) frame = requestAnimationFrame(() => { frame = 0; if (!signal.aborted) render(); });
  }

  function render() {
    const job = st.job;
    if (!job) return;
    const spec = job.spec || {};
    const total = spec.stream?.megabatches || 1;
    const epochs = spec.training?.epochs || 1;
    replace(badge, statusBadge(job.status), job.stale ? h("span", {class: "badge stale"}, "stale") : null);
    specLine.textContent = describeSpec(spec);
    const p = job.progress || {};
    progress.value = p.fraction || 0;
    progressText.textContent = ` ${Math.round((p.fraction || 0) * 100)} % · megabatch ${p.megabatch || 0}/${total}` +
      (p.epoch ? `, epoch ${p.epoch}/${epochs}` : "");
    streamLine.textContent = STREAM_TEXT[st.stream] + (st.streamDetail ? ` (${st.streamDetail})` : "");
    cancel.hidden = TERMINAL.has(job.status);
    cancel.disabled = job.status === "cancelling";
    cancel.textContent = job.status === "cancelling" ? "Cancelling…" : "Cancel job";

    const mbs = [...st.mb.values()].sort((a, b) => (a.index ?? a.megabatch) - (b.index ?? b.megabatch));
    const at = (m) => m.index ?? m.megabatch;
    const sum = summarize(job, mbs);
    replace(summary,
      h("div", {}, h("dt", {}, "Test accuracy"), h("dd", {"data-value": "accuracy"}, pct(sum.accuracy))),
      h("div", {}, h("dt", {}, sum.partial ? "CER so far" : "CER"), h("dd", {"data-value": "cer"}, sum.cer ?? "–")),
      h("div", {}, h("dt", {}, "Density"), h("dd", {"data-value": "density"}, pct(sum.density))),
      h("div", {}, h("dt", {}, "Generalization gap"), h("dd", {"data-value": "gap"},
        sum.gap === undefined ? "–" : `${num(sum.gap, 1)} pp`)),
      job.mlflow ? h("div", {class: "wide"}, h("dt", {}, "MLflow run"), h("dd", {"data-value": "mlflow"},
        job.mlflow.url ? h("a", {href: job.mlflow.url, rel: "noopener noreferrer"}, job.mlflow.run_id)
          : job.mlflow.run_id)) : null,
      job.error ? h("div", {class: "wide"}, h("dt", {}, "Error"), h("dd", {}, job.error)) : null);

    const xDomain = [1, Math.max(total, 1)];
    const measured = new Map();
    const schedulePts = new Map();
    for (const [m, e] of st.pruned) { measured.set(m, e.density); schedulePts.set(m, e.target_density); }
    for (const m of mbs) { measured.set(at(m), m.density); schedulePts.set(at(m), m.target_density); }
    const points = (map) => [...map].map(([x, y]) => ({x, y}));
    const target = targetDensity(spec);
    replace(mbCharts,
      lineChart({id: "accuracy", title: "Test accuracy after each megabatch", xLabel: "megabatch",
        yLabel: "test accuracy", xDomain, yDomain: [0, 1], yFormat: (v) => pct(v, 0), xFormat: String,
        series: [{key: "test_accuracy", label: "test acc", points: mbs.map((m) => ({x: at(m), y: m.test_accuracy}))}]}),
      lineChart({id: "density", title: "Density: measured against the schedule", xLabel: "megabatch",
        yLabel: "density (weights kept)", xDomain, yDomain: [0, 1], yFormat: (v) => pct(v, 0),
        refs: target === null ? [] : [{y: target, label: "target"}],
        series: [{key: "density", label: "measured", points: points(measured)},
          {key: "target_density", label: "schedule", dashed: true, marker: "diamond", points: points(schedulePts)}]}),
      lineChart({id: "gap", title: "Generalization gap (train − validation accuracy)", xLabel: "megabatch",
        yLabel: "gap (percentage points)", xDomain, yFormat: (v) => num(v, 1),
        series: [{key: "generalization_gap", label: "gap", points: mbs.map((m) => ({x: at(m), y: m.generalization_gap}))},
          ...(mbs.some((m) => typeof m.generalization_gap_clean === "number") ? [{key: "generalization_gap_clean",
            label: "clean gap", dashed: true, marker: "square",
            points: mbs.map((m) => ({x: at(m), y: m.generalization_gap_clean}))}] : [])]}));

    const eps = [...st.ep.values()].map((e) => ({...e, x: (e.megabatch - 1) * (e.epochs || epochs) + e.epoch}))
      .sort((a, b) => a.x - b.x);
    const epochDomain = [1, Math.max(2, total * epochs)];
    const xFormat = (v) => String(v);
    replace(epCharts,
      lineChart({id: "loss", title: "Training loss per epoch (epochs of all megabatches in a row)", xLabel: "epoch",
        yLabel: "loss", xDomain: epochDomain, xFormat, yFormat: (v) => num(v, 2),
        series: [{key: "train_loss", label: "loss", points: eps.map((e) => ({x: e.x, y: e.train_loss}))}]}),
      lineChart({id: "epoch-accuracy", title: "Accuracy per epoch", xLabel: "epoch", yLabel: "accuracy",
        xDomain: epochDomain, yDomain: [0, 1], xFormat, yFormat: (v) => pct(v, 0),
        series: [{key: "train_accuracy", label: "train", points: eps.map((e) => ({x: e.x, y: e.train_accuracy}))},
          {key: "val_accuracy", label: "validation", dashed: true, marker: "square",
            points: eps.map((e) => ({x: e.x, y: e.val_accuracy}))}]}));

    const lastMb = mbs.length ? mbs[mbs.length - 1] : job.latest_metrics;
    const layerDensity = (lastMb && lastMb.layer_density) || {};
    replace(layers, barChart({id: "layers", title: lastMb ? `After megabatch ${at(lastMb)}` : "No megabatch yet",
      items: Object.entries(layerDensity).map(([label, value]) => ({label, value})), format: (v) => pct(v)}));
  }

  async function onCancel() {
    cancel.disabled = true;
    try {
      const job = await api(`jobs/${encodeURIComponent(jobId)}/cancel`, {method: "POST", signal});
      st.job = {...st.job, status: job.status};
      notify(job.status === "cancelled" ? "Job cancelled." : "Cancelling: the worker stops within an epoch.");
      schedule();
    } catch (err) {
      if (!signal.aborted) notify(`Could not cancel: ${err.message}`);
      cancel.disabled = false;
    }
  }

  async function loadDownloads() {
    clearTimeout(linkTimer);
    try {
      const files = await api(`jobs/${encodeURIComponent(jobId)}/artifacts`, {signal});
      replace(downloads, h("table", {class: "files", id: "artifacts"},
        h("caption", {}, "Every file of the job (signed links that expire)"),
        h("thead", {}, h("tr", {}, ["File", "Format", "Size", "sha256"].map((c) => h("th", {scope: "col"}, c)))),
        h("tbody", {}, files.map((f) => h("tr", {"data-artifact": f.name},
          h("td", {"data-label": "File"}, h("a", {href: f.download_url, download: f.name, "data-artifact": f.name,
            rel: "noreferrer"}, f.name)),
          h("td", {"data-label": "Format"}, f.format),
          h("td", {"data-label": "Size"}, bytes(f.bytes)),
          h("td", {"data-label": "sha256"}, h("code", {class: "hash", title: f.sha256}, f.sha256)))))));
      // New links shortly before these expire.
      const expires = Math.min(...files.map((f) => Date.parse(f.expires_at)).filter(Number.isFinite));
      if (Number.isFinite(expires)) {
        linkTimer = setTimeout(loadDownloads, Math.max(10_000, expires - Date.now() - 60_000));
      }
    } catch (err) {
      if (!signal.aborted) replace(downloads, h("p", {class: "error"}, `Could not list the files: ${err.message}`));
    }
    loadModels();
  }

  // A stream replaying a finished job's events sends every model_written at once: one listing.
  function loadModelsSoon() {
    clearTimeout(modelsTimer);
    modelsTimer = setTimeout(loadModels, 300);
  }

  async function loadModels() {
    let listing;
    try {
      listing = await api(`jobs/${encodeURIComponent(jobId)}/models`, {signal});
    } catch (err) {
      if (signal.aborted) return;
      // 404 without a job problem: this server has no per-megabatch models route.
      if (err instanceof ApiError && err.status === 404) { replace(models); return; }
      replace(models, h("p", {class: "help"}, `Models per megabatch: ${err.message}`));
      return;
    }
    const items = Array.isArray(listing) ? listing : listing?.items || [];
    if (!items.length) { replace(models); return; }
    replace(models, h("table", {class: "files", id: "models-table"},
      h("caption", {}, "The model after every megabatch"),
      h("thead", {}, h("tr", {}, ["Megabatch", "Density", "Test accuracy", "Size", "Download"].map(
        (c) => h("th", {scope: "col"}, c)))),
      h("tbody", {}, items.map((m) => {
        const index = m.index ?? m.megabatch;
        const url = m.download_url || m.url || m.urls?.download;
        return h("tr", {"data-megabatch": index},
          h("td", {"data-label": "Megabatch"}, index),
          h("td", {"data-label": "Density"}, pct(m.density)),
          h("td", {"data-label": "Test accuracy"}, pct(m.test_accuracy)),
          h("td", {"data-label": "Size"}, bytes(m.bytes)),
          h("td", {"data-label": "Download"}, h("span", {class: "links"},
            url ? h("a", {href: url, download: "", rel: "noreferrer", "data-model": index},
              m.name || `megabatch ${index}`) : "–",
            (m.files || []).filter((f) => f.name !== m.name).map((f) => [" · ", h("a", {href: f.download_url,
              download: "", rel: "noreferrer"}, f.name.split("/").pop())]))));
      }))));
  }

  return {
    destroy() {
      controller.abort();
      clearTimeout(linkTimer);
      clearTimeout(modelsTimer);
      if (frame) cancelAnimationFrame(frame);
    },
  };
}
