// Calls to /api/v1 with the API key of this browser tab: kept in sessionStorage (gone when the tab
// closes), sent as "Authorization: Bearer", never put in a URL.

const STORAGE_KEY = "anytime-prune.api-key";

export function signedIn() {
  return sessionStorage.getItem(STORAGE_KEY) !== null;
}

export function setKey(key) {
  sessionStorage.setItem(STORAGE_KEY, key);
}

export function signOut() {
  sessionStorage.removeItem(STORAGE_KEY);
}

export function authHeaders(key = sessionStorage.getItem(STORAGE_KEY)) {
  return key ? {Authorization: `Bearer ${key}`} : {};
}

/** An address under /api/v1, relative to the page (so a server mounted under a prefix works). */
export function apiUrl(path) {
  return new URL(`api/v1/${path.replace(/^\/+/, "")}`, document.baseURI).toString();
}

/** A problem document (application/problem+json) the API answered with. */
export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && problem.detail) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.errors = Array.isArray(this.problem.errors) ? this.problem.errors : [];
    this.type = this.problem.type || "about:blank";
  }
}

const unauthorizedHandlers = new Set();

/** Called with the error when any call answers 401 (the key was revoked, or is wrong). */
export function onUnauthorized(handler) {
  unauthorizedHandlers.add(handler);
}

/** Tell the page its key was refused (a 401 read outside api(), such as the event stream's). */
export function reportUnauthorized(error) {
  unauthorizedHandlers.forEach((f) => f(error));
}

async function readProblem(response) {
  try {
    return await response.json();
  } catch {
    return {detail: `${response.status} ${response.statusText}`};
  }
}

/**
 * fetch() a JSON route. Resolves to the parsed body (null for 204); rejects with ApiError for an
 * error status. `key` checks a key without keeping it (sign-in).
 */
export async function api(path, {method = "GET", body, signal, key} = {}) {
  const headers = {Accept: "application/json", ...authHeaders(key)};
  const init = {method, headers, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer"};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(apiUrl(path), init);
  if (!response.ok) {
    const error = new ApiError(response.status, await readProblem(response));
    if (response.status === 401 && key === undefined) reportUnauthorized(error);
    throw error;
  }
  return response.status === 204 ? null : response.json();
}

/** Every item of a paginated list route (follows next_cursor), up to `max`. */
export async function listAll(path, {signal, max = 500} = {}) {
  const items = [];
  let cursor = null;
  do {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`,
      {signal});
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}
