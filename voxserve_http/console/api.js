// The console's calls to the gateway: the token, JSON, server-sent events over fetch (an
// EventSource cannot send an Authorization header), NDJSON, and small formatting helpers.
"use strict";

const TOKEN_KEY = "voxserve.token";
const api = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  asked: false, // the token dialog opens by itself once, at the first 401

  headers(extra) {
    const headers = new Headers(extra || {});
    if (api.token) headers.set("Authorization", `Bearer ${api.token}`);
    return headers;
  },

  setToken(token) {
    api.token = token.trim();
    if (api.token) sessionStorage.setItem(TOKEN_KEY, api.token);
    else sessionStorage.removeItem(TOKEN_KEY);
    document.dispatchEvent(new CustomEvent("token-changed"));
  },

  // fetch with the token; an error answer becomes an Error carrying OpenAI's error fields.
  async fetch(url, options = {}) {
    const response = await fetch(url, { ...options, headers: api.headers(options.headers) });
    if (response.ok) return response;
    let error = { message: `${response.status} ${response.statusText}` };
    try {
      error = (await response.json()).error || error;
    } catch (_) { /* not JSON */ }
    if (response.status === 401 && !api.asked) {
      api.asked = true;
      document.dispatchEvent(new CustomEvent("token-needed"));
    }
    throw Object.assign(new Error(error.message), { status: response.status, code: error.code });
  },

  async json(url, options) {
    return (await api.fetch(url, options)).json();
  },

  // Server-sent events: calls onEvent({event, id, data}) until the stream ends or `signal` aborts.
  async sse(url, onEvent, { headers, ...options } = {}) {
    const response = await api.fetch(url, { ...options, headers: { Accept: "text/event-stream", ...headers } });
    await readBlocks(response, "\n\n", (block) => {
      const event = { event: "message", id: null, data: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const name = line.slice(0, colon);
        const value = line.slice(colon + 1).replace(/^ /, "");
        if (name === "data") event.data = JSON.parse(value);
        else if (name === "event") event.event = value;
        else if (name === "id") event.id = value;
      }
      if (event.data !== null) onEvent(event);
    });
  },

  // Newline-delimited JSON (a pull's events).
  async ndjson(url, onLine, options = {}) {
    const response = await api.fetch(url, options);
    await readBlocks(response, "\n", (line) => { if (line.trim()) onLine(JSON.parse(line)); });
  },
};

async function readBlocks(response, separator, onBlock) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf(separator)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + separator.length);
      onBlock(block);
    }
  }
  if (buffer.trim()) onBlock(buffer);
}

const fmt = {
  bytes(n) {
    if (!n) return "0 B";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
    return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
  },
  seconds(s) {
    if (!isFinite(s) || s <= 0) return "";
    if (s < 60) return `${Math.ceil(s)} s`;
    return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  },
  time(s) {
    const m = Math.floor(s / 60);
    return `${m}:${(s % 60).toFixed(1).padStart(4, "0")}`;
  },
};

// A child element with text: el("td", "READY", {className: "state"}).
function el(tag, text, props = {}) {
  const node = Object.assign(document.createElement(tag), props);
  if (text !== undefined && text !== null) node.textContent = text;
  return node;
}

// A table row of one cell across the table: a placeholder or an error.
function messageRow(text, columns, className = "muted") {
  const row = el("tr");
  row.append(el("td", text, { colSpan: columns, className }));
  return row;
}

function notice(message) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.hidden = !message;
}
