// A job's event stream read with fetch(), which can send the Authorization header (EventSource
// cannot), parsed as Server-Sent Events (the WHATWG "event stream interpretation"), resumed with
// Last-Event-ID after a dropped connection.

import {api, ApiError, apiUrl, authHeaders, reportUnauthorized} from "./api.js";
import {sleep, TERMINAL} from "./util.js";

/**
 * The messages of a text/event-stream body, as {id, event, data}; comment lines (heartbeats) call
 * onComment. `state.retry` takes the server's "retry:" value and `state.lastId` the last "id:".
 */
export async function* sseMessages(body, state = {}, onComment = () => {}) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let event = "";
  let first = true;
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      if (first) {
        buffer = buffer.replace(/^\uFEFF/, "");
        first = false;
      }
      for (;;) {
        const end = buffer.search(/\r\n|\r|\n/);
        // A lone "\r" at the end may be the first half of "\r\n": wait for the next chunk.
        if (end < 0 || (buffer[end] === "\r" && end === buffer.length - 1)) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (data.length) yield {id: state.lastId ?? null, event: event || "message", data: data.join("\n")};
          data = [];
          event = "";
          continue;
        }
        if (line.startsWith(":")) {
          onComment(line.slice(1));
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "event") event = val;
        else if (field === "id" && !val.includes("\0")) state.lastId = val;
        else if (field === "retry" && /^\d+$/.test(val)) state.retry = Number(val);
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Follow a job's events until it is finished or `signal` aborts. Calls onEvent(event, id) for each
 * event (a parsed JSON object with "type"), onState("live" | "reconnecting" | "ended" | "error",
 * detail) as the connection changes. Reconnects with Last-Event-ID after a drop, waits on 429.
 * A 401 (the key was revoked: the server also ends an open stream then) signs the page out, as
 * every other call does, and stops following.
 */
export async function followJob(jobId, {signal, onEvent, onState = () => {}}) {
  const state = {lastId: null, retry: 3000};
  let finished = false;
  while (!signal.aborted && !finished) {
    let response;
    try {
      const headers = {Accept: "text/event-stream", ...authHeaders()};
      if (state.lastId) headers["Last-Event-ID"] = state.lastId;
      response = await fetch(apiUrl(`jobs/${encodeURIComponent(jobId)}/events`),
        {headers, signal, cache: "no-store", credentials: "omit"});
    } catch (error) {
      if (signal.aborted) return;
      onState("reconnecting", String(error));
      await sleep(state.retry, signal);
      continue;
    }
    if (response.status === 429 || response.status === 503) {
      const wait = Number(response.headers.get("Retry-After")) || 2;
      onState("reconnecting", `the server asked to wait ${wait} s`);
      await sleep(wait * 1000, signal);
      continue;
    }
    if (!response.ok) {
      let problem = null;
      try { problem = await response.json(); } catch { /* not a problem document */ }
      const error = new ApiError(response.status, problem);
      onState("error", error);
      if (response.status === 401) reportUnauthorized(error); // back to sign-in, with the reason
      return;
    }
    onState("live");
    let cutShort = null; // the detail of the server's "error" message, when it ended the stream
    try {
      for await (const message of sseMessages(response.body, state)) {
        if (message.event === "error") {
          // The store went away, or the key was revoked: reconnect after `retry`; the answer says which.
          try { cutShort = JSON.parse(message.data).detail || "the server ended the stream"; } catch {
            cutShort = "the server ended the stream";
          }
          break;
        }
        let event;
        try { event = JSON.parse(message.data); } catch { continue; }
        onEvent(event, message.id);
        if (event.type === "status_changed" && TERMINAL.has(event.status)) finished = true;
      }
    } catch (error) {
      if (signal.aborted) return;
      onState("reconnecting", String(error));
    }
    if (!finished && !signal.aborted) {
      // The server ends the stream when the job is done (its last status may have been trimmed
      // from a long stream): ask the job; anything else was a drop. (Not after an "error"
      // message: the job was not the reason.)
      if (cutShort === null) {
        try {
          const job = await api(`jobs/${encodeURIComponent(jobId)}`, {signal});
          if (TERMINAL.has(job.status)) { finished = true; break; }
        } catch (error) {
          if (signal.aborted) return;
          if (error instanceof ApiError && (error.status === 404 || error.status === 401)) {
            onState("error", error); // a 401 has signed the page out already (api())
            return;
          }
        }
      }
      onState("reconnecting", cutShort || "connection dropped");
      await sleep(state.retry, signal);
    }
  }
  if (finished) onState("ended");
}
