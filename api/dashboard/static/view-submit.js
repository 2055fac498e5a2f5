// The submit form, built from GET /api/v1/catalog (and the key's ready uploads from GET
// /api/v1/datasets). The server validates: a 422's reasons appear next to the fields they name.

import {api, ApiError, listAll} from "./api.js";
import {h, notify, replace, shortId} from "./util.js";

// A problem's field (a dotted path of the spec) -> the control that sets it.
const FIELD_CONTROLS = {
  "dataset": "f-dataset", "dataset.name": "f-dataset", "dataset.id": "f-dataset", "dataset.path": "f-path",
  "architecture": "f-arch", "method": "f-method",
  "sparsity": "f-target", "sparsity.target": "f-target", "sparsity.tau": "f-tau",
  "sparsity.pruner": "f-pruner", "sparsity.scope": "f-scope",
  "stream": "f-megabatches", "stream.megabatches": "f-megabatches", "stream.replay": "f-replay",
  "training": "f-epochs", "training.epochs": "f-epochs", "training.seed": "f-seed",
};

const DEFAULTS = {arch: "cnn_small", method: "app", target: "0.634", tau: "4.5", megabatches: "4", epochs: "3",
  seed: "1"};

function field(id, label, control, help) {
  control.setAttribute("aria-describedby", `${id}-error${help ? ` ${id}-help` : ""}`);
  return h("div", {class: "field", "data-field": id},
    h("label", {for: id}, label), control,
    help ? h("p", {class: "help", id: `${id}-help`}, help) : null,
    h("p", {class: "field-error", id: `${id}-error`}));
}

function select(id, values, chosen) {
  return h("select", {id, name: id}, values.map((v) => h("option", {value: v, selected: v === chosen}, v)));
}

function numberInput(id, value, attrs = {}) {
  return h("input", {id, name: id, type: "number", inputmode: "decimal", value, ...attrs});
}

export function submitView(root) {
  const controller = new AbortController();
  replace(root, h("h1", {}, "Submit a job"), h("p", {class: "help"}, "Loading the catalog…"));
  load().catch((err) => {
    if (!controller.signal.aborted) replace(root, h("h1", {}, "Submit a job"),
      h("p", {class: "error", role: "alert"}, `Could not load the catalog: ${err.message}`));
  });

  async function load() {
    const catalog = await api("catalog", {signal: controller.signal});
    let uploads = [];
    let uploadsNote = null;
    try {
      uploads = await listAll("datasets?status=ready", {signal: controller.signal});
    } catch (err) {
      if (controller.signal.aborted) return;
      if (!(err instanceof ApiError && err.status === 404)) uploadsNote = `Uploaded datasets unavailable: ${err.message}`;
    }
    if (controller.signal.aborted) return;
    build(catalog, uploads, uploadsNote);
  }

  function build(catalog, uploads, uploadsNote) {
    const withPath = new Set(catalog.datasets_with_path);
    const dataset = h("select", {id: "f-dataset", name: "f-dataset"},
      h("optgroup", {label: "Built in"},
        catalog.datasets.filter((d) => !withPath.has(d)).map((d) => h("option", {value: `name:${d}`}, d))),
      uploads.length ? h("optgroup", {label: "Your uploads"}, uploads.map((u) => h("option", {value: `id:${u.id}`},
        `${u.name} (${u.format}, ${shortId(u.id)})`))) : null,
      h("optgroup", {label: "A file on the server (give its path)"},
        catalog.datasets.filter((d) => withPath.has(d)).map((d) => h("option", {value: `path:${d}`}, d))));
    const path = h("input", {id: "f-path", name: "f-path", type: "text", autocomplete: "off"});
    const pathField = field("f-path", "Dataset path", path, "Relative to the server's data folder.");
    const target = numberInput("f-target", DEFAULTS.target, {step: "any", min: 0, max: 0.999});
    const tau = numberInput("f-tau", DEFAULTS.tau, {step: "any", min: 0});
    const byTarget = h("input", {type: "radio", name: "target-kind", id: "kind-target", value: "target", checked: true});
    const byTau = h("input", {type: "radio", name: "target-kind", id: "kind-tau", value: "tau"});
    const targetField = field("f-target", "Target sparsity (fraction of weights removed)", target);
    const tauField = field("f-tau", "Tau (density 0.8^tau at the end)", tau);
    const controls = {
      arch: select("f-arch", catalog.architectures, DEFAULTS.arch),
      method: select("f-method", catalog.methods, DEFAULTS.method),
      megabatches: numberInput("f-megabatches", DEFAULTS.megabatches,
        {step: 1, min: 1, max: catalog.limits.max_megabatches}),
      epochs: numberInput("f-epochs", DEFAULTS.epochs, {step: 1, min: 1, max: catalog.limits.max_epochs}),
      pruner: select("f-pruner", catalog.pruners, catalog.pruners[0]),
      scope: select("f-scope", catalog.scopes, catalog.scopes[0]),
      replay: select("f-replay", catalog.replays, catalog.replays[0]),
      seed: numberInput("f-seed", DEFAULTS.seed, {step: 1, min: 0}),
    };
    const formError = h("div", {class: "error", id: "form-error", role: "alert"});
    const button = h("button", {type: "submit", id: "submit-job"}, "Submit job");
    const form = h("form", {class: "card", id: "submit-form", novalidate: true},
      h("div", {class: "grid-2"},
        field("f-dataset", "Dataset", dataset, uploadsNote),
        pathField,
        field("f-arch", "Architecture", controls.arch),
        field("f-method", "Method", controls.method),
        h("fieldset", {class: "field target-kind"}, h("legend", {}, "Final sparsity given as"),
          h("label", {for: "kind-target"}, byTarget, " target sparsity"),
          h("label", {for: "kind-tau"}, byTau, " tau")),
        targetField, tauField,
        field("f-megabatches", "Megabatches", controls.megabatches,
          `1 to ${catalog.limits.max_megabatches} on this server.`),
        field("f-epochs", "Epochs per megabatch", controls.epochs, `1 to ${catalog.limits.max_epochs} on this server.`),
        field("f-pruner", "Pruner", controls.pruner),
        field("f-scope", "Scope", controls.scope),
        field("f-replay", "Replay", controls.replay),
        field("f-seed", "Seed", controls.seed)),
      formError, button);

    function sync() {
      pathField.hidden = !dataset.value.startsWith("path:");
      targetField.hidden = !byTarget.checked;
      tauField.hidden = !byTau.checked;
    }
    dataset.addEventListener("change", sync);
    byTarget.addEventListener("change", sync);
    byTau.addEventListener("change", sync);
    sync();

    function clearErrors() {
      formError.textContent = "";
      for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
      for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    }

    function showError(controlId, reason) {
      const control = document.getElementById(controlId);
      const slot = document.getElementById(`${controlId}-error`);
      if (!control || !slot || control.closest("[hidden]")) return false;
      slot.textContent = slot.textContent ? `${slot.textContent}; ${reason}` : reason;
      control.setAttribute("aria-invalid", "true");
      return true;
    }

    function readNumber(input, problems) {
      if (input.validity.badInput) {
        problems.push([input.id, "enter a number"]);
        return undefined;
      }
      return input.value.trim() === "" ? undefined : Number(input.value);
    }

    function body(problems) {
      const [kind, value] = [dataset.value.slice(0, dataset.value.indexOf(":")),
        dataset.value.slice(dataset.value.indexOf(":") + 1)];
      const ds = kind === "id" ? {id: value} : kind === "path" ? {name: value, path: path.value.trim()} : {name: value};
      const sparsity = {pruner: controls.pruner.value, scope: controls.scope.value};
      if (byTau.checked) sparsity.tau = readNumber(tau, problems);
      else sparsity.target = readNumber(target, problems);
      return {
        dataset: ds,
        architecture: controls.arch.value,
        method: controls.method.value,
        sparsity,
        stream: {megabatches: readNumber(controls.megabatches, problems), replay: controls.replay.value},
        training: {epochs: readNumber(controls.epochs, problems), seed: readNumber(controls.seed, problems)},
      };
    }

    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      clearErrors();
      const problems = [];
      const spec = body(problems);
      if (problems.length) {
        problems.forEach(([id, reason]) => showError(id, reason));
        document.getElementById(problems[0][0]).focus();
        return;
      }
      button.disabled = true;
      try {
        const job = await api("jobs", {method: "POST", body: spec, signal: controller.signal});
        notify(`Job ${shortId(job.id)} submitted.`);
        location.hash = `#/jobs/${job.id}`;
      } catch (err) {
        if (controller.signal.aborted) return;
        const unplaced = [];
        for (const fe of err.errors || []) {
          if (!showError(FIELD_CONTROLS[fe.field] || "", fe.reason)) unplaced.push(`${fe.field}: ${fe.reason}`);
        }
        replace(formError, err.errors?.length ? "The server refused the job; see the fields marked." : err.message,
          unplaced.length ? h("ul", {}, unplaced.map((u) => h("li", {}, u))) : null);
        const invalid = form.querySelector("[aria-invalid]");
        if (invalid) invalid.focus();
      } finally {
        button.disabled = false;
      }
    });
    replace(root, h("h1", {}, "Submit a job"), form);
    dataset.focus();
  }

  return {destroy() { controller.abort(); }};
}
