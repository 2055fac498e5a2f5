// The dashboard's entry: sign-in, the routes (#/jobs?status=&limit=, #/jobs/<id>, #/submit,
// #/compare?ids=a,b) and the navigation. Each view is a function (root, ...) returning {destroy()}:
// leaving a view stops its timers and closes its event stream.

import {api, ApiError, onUnauthorized, setKey, signedIn, signOut} from "./api.js";
import {h, replace} from "./util.js";
import {compareView} from "./view-compare.js";
import {jobView} from "./view-job.js";
import {jobsView} from "./view-jobs.js";
import {submitView} from "./view-submit.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("sign-out");
let current = null;
let signInMessage = "";

function parseRoute() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = hash.split("?");
  return {parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query)};
}

function signInView(root) {
  const input = h("input", {id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", "aria-describedby": "api-key-help api-key-error"});
  const error = h("p", {id: "api-key-error", class: "field-error", "aria-live": "polite"}, signInMessage);
  signInMessage = "";
  const button = h("button", {type: "submit", id: "sign-in-button"}, "Sign in");
  const form = h("form", {class: "card narrow", id: "sign-in", novalidate: true},
    h("h1", {}, "Sign in"),
    h("div", {class: "field"},
      h("label", {for: "api-key"}, "API key"),
      input,
      h("p", {id: "api-key-help", class: "help"},
        "Kept in this browser tab only and sent as a Bearer header. ", h("code", {}, "anytime-prune serve"),
        " writes a development key to its credentials file (", h("code", {}, "scripts/demo.sh"), " prints it); ",
        h("code", {}, "anytime-prune keys create"), " makes one."),
      error),
    button);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = input.value.trim();
    button.disabled = true;
    error.textContent = "";
    try {
      await api("jobs?limit=1", {key});
      setKey(key);
      if (!location.hash || location.hash === "#/" || location.hash === "#") location.hash = "#/jobs";
      else render();
    } catch (err) {
      error.textContent = err instanceof ApiError && err.status === 401
        ? `The API refused this key: ${err.message}`
        : `Could not reach the API: ${err.message}`;
      input.setAttribute("aria-invalid", "true");
      input.focus();
    } finally {
      button.disabled = false;
    }
  });
  replace(root, form);
  input.focus();
  return {destroy() {}};
}

function render() {
  if (current) current.destroy();
  current = null;
  const authed = signedIn();
  nav.hidden = !authed;
  signOutButton.hidden = !authed;
  if (!authed) {
    document.title = "Sign in · anytime-prune";
    current = signInView(main);
    return;
  }
  const route = parseRoute();
  const [section, id] = route.parts;
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.nav === (section || "jobs")) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  replace(main);
  if (section === "jobs" && id) current = jobView(main, id);
  else if (section === "submit") current = submitView(main);
  else if (section === "compare") current = compareView(main, (route.params.get("ids") || "").split(",").filter(Boolean));
  else current = jobsView(main, {status: route.params.get("status") || "", limit: route.params.get("limit")});
  const heading = main.querySelector("h1");
  document.title = `${heading ? heading.textContent : "Jobs"} · anytime-prune`;
}

signOutButton.addEventListener("click", () => {
  signOut();
  location.hash = "#/jobs";
  render();
});

onUnauthorized((error) => {
  signOut();
  signInMessage = `Signed out: ${error.message}`;
  render();
});

window.addEventListener("hashchange", render);
render();
