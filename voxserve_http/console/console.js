// The catalog (live from /api/events), pulls and their controls, the inference cache, file
// transcription (segments as they are decoded), the token and the services' readiness.
"use strict";

const models = new Map(); // model_id -> the model's JSON, with .progress from PROGRESS events
const ACTIVE = new Set(["WAITING", "DOWNLOADING", "VERIFYING"]);
let lastEventId = null;

// ------------------------------------------------------------------ the catalog

async function loadModels() {
  const { models: list } = await api.json("api/models");
  for (const model of list) models.set(model.model_id, { ...models.get(model.model_id), ...model });
  renderModels();
}

function renderModels() {
  const body = document.getElementById("models");
  body.replaceChildren();
  for (const model of [...models.values()].sort((a, b) => a.model_id.localeCompare(b.model_id))) {
    body.append(modelRow(model));
  }
  if (!models.size) body.append(messageRow("no models", 6));
  fillModelSelects();
}

function modelRow(model) {
  const row = el("tr");
  row.dataset.model = model.model_id;
  row.dataset.state = model.state;
  const name = el("td");
  name.append(el("strong", model.model_id), el("div", model.description || model.repo_id, { className: "muted small" }));
  const stateCell = el("td");
  stateCell.append(el("span", model.state.toLowerCase().replace("_", " "), { className: `state ${model.state}` }));
  if (model.error_message) stateCell.append(el("div", model.error_message, { className: "error small" }));
  row.append(name, el("td", model.kind.toLowerCase()), stateCell, el("td", fmt.bytes(model.size_bytes), { className: "num" }));
  row.append(progressCell(model), actionsCell(model));
  return row;
}

function progressCell(model) {
  const cell = el("td", null, { className: "progress-cell" });
  const p = model.progress || {};
  let fraction = null;
  let text = "";
  if (model.state === "READY") {
    fraction = 1;
    text = "100 %";
  } else if (ACTIVE.has(model.state) || model.state === "PAUSED" || p.bytes_total) {
    const verifying = model.state === "VERIFYING" && p.verify_bytes_total > 0;
    const done = verifying ? p.verify_bytes_done : p.bytes_done || model.bytes_on_disk || 0;
    const total = verifying ? p.verify_bytes_total : p.bytes_total || model.size_bytes || 0;
    fraction = total ? Math.min(1, done / total) : 0;
    const parts = [`${Math.floor(fraction * 100)} %`, `${fmt.bytes(done)} of ${fmt.bytes(total)}`];
    if (model.state === "DOWNLOADING" && p.bytes_per_second) parts.push(`${fmt.bytes(p.bytes_per_second)}/s`);
    if (model.state === "DOWNLOADING" && p.eta_seconds) parts.push(`${fmt.seconds(p.eta_seconds)} left`);
    if (verifying) parts.push("verifying");
    if (model.state === "WAITING" && model.queue_position) parts.push(`queue #${model.queue_position}`);
    text = parts.join(" · ");
  }
  if (fraction !== null) {
    const bar = el("div", null, { className: "bar" });
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    bar.setAttribute("aria-valuenow", String(Math.floor(fraction * 100)));
    bar.append(el("div", null, { className: "fill", style: `width: ${fraction * 100}%` }));
    cell.append(bar, el("div", text, { className: "small progress-text" }));
  }
  return cell;
}

function actionsCell(model) {
  const cell = el("td", null, { className: "actions" });
  const state = model.state;
  const add = (label, action, title) => {
    const button = el("button", label, { type: "button", className: "small", title });
    button.dataset.action = action;
    button.addEventListener("click", () => runAction(model.model_id, action, button));
    cell.append(button);
  };
  if (["NOT_DOWNLOADED", "INCOMPLETE", "ERROR"].includes(state)) add("Pull", "pull", "download and verify");
  if (ACTIVE.has(state)) add("Pause", "pause", "stop, keeping the bytes (admin)");
  if (state === "PAUSED") add("Resume", "resume", "continue from the bytes on disk (admin)");
  if (ACTIVE.has(state) || state === "PAUSED") add("Cancel", "cancel", "stop the download");
  if (["READY", "INCOMPLETE", "ERROR"].includes(state)) add("Delete", "delete", "remove its files");
  return cell;
}

async function runAction(modelId, action, button) {
  button.disabled = true;
  notice("");
  try {
    if (action === "pull") {
      // The pull's own stream is read to its end; the bars follow /api/events.
      await api.ndjson(`api/models/${encodeURIComponent(modelId)}/pull`, (line) => {
        if (line.error) notice(`${modelId}: ${line.error.message}`);
      }, { method: "POST" });
    } else if (action === "delete") {
      if (!confirm(`Delete the files of ${modelId}?`)) return;
      await api.json(`api/models/${encodeURIComponent(modelId)}`, { method: "DELETE" });
    } else {
      await api.json(`api/models/${encodeURIComponent(modelId)}/${action}`, { method: "POST" });
    }
  } catch (error) {
    notice(`${action} ${modelId}: ${error.message}`);
  } finally {
    button.disabled = false;
    await loadModels().catch(() => {});
  }
}

// Follow the store's events: snapshots, state changes and progress; resume after a drop.
let following = false;
async function followEvents() {
  if (following) return;
  following = true;
  try {
    for (;;) {
      try {
        const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
        await api.sse("api/events", onModelEvent, { headers });
      } catch (error) {
        if (error.status === 401 || error.status === 403) return; // until the token changes
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  } finally {
    following = false;
  }
}

let refresh = null;
function onModelEvent({ id, data }) {
  if (id) lastEventId = id;
  const model = models.get(data.model_id);
  if (data.model) models.set(data.model_id, { ...model, ...data.model });
  else if (model && data.type === "PROGRESS") {
    model.progress = data;
    model.state = data.state;
    const row = document.querySelector(`tr[data-model="${CSS.escape(data.model_id)}"]`);
    if (row && row.dataset.state === data.state) {
      row.querySelector(".progress-cell").replaceWith(progressCell(model));
      return;
    }
  } else if (model && data.type === "STATE_CHANGED") {
    model.state = data.state;
    model.error_message = data.message || "";
    clearTimeout(refresh);
    refresh = setTimeout(() => loadModels().catch(() => {}), 300); // sizes and files as the store has them now
  } else {
    return;
  }
  renderModels();
}

function fillModelSelects() {
  const whisper = [...models.values()].filter((m) => m.kind === "WHISPER");
  for (const select of document.querySelectorAll(".model-select")) {
    const chosen = select.value;
    select.replaceChildren(el("option", "the service's default", { value: "" }));
    for (const model of whisper) {
      const label = model.state === "READY" ? model.model_id : `${model.model_id} (${model.state.toLowerCase()})`;
      select.append(el("option", label, { value: model.model_id }));
    }
    select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  }
}

// ------------------------------------------------------------------ the inference cache

async function loadLoaded() {
  const body = document.getElementById("loaded");
  try {
    const { models: loaded } = await api.json("api/loaded");
    body.replaceChildren();
    for (const m of loaded) {
      const row = el("tr");
      row.dataset.model = m.model_id;
      row.append(el("td", m.model_id), el("td", m.kind), el("td", `${m.device} ${m.compute_type}`),
        el("td", fmt.bytes(m.memory_bytes), { className: "num" }), el("td", String(m.in_use), { className: "num" }),
        el("td", m.pinned ? "pinned" : ""), el("td", String(m.hits), { className: "num" }));
      body.append(row);
    }
    if (!loaded.length) body.append(messageRow("nothing loaded", 7));
  } catch (error) {
    body.replaceChildren(messageRow(error.message, 7, "error"));
  }
}

// ------------------------------------------------------------------ file transcription

let transcription = null; // the AbortController of the running one

async function transcribeFile(event) {
  event.preventDefault();
  const file = document.getElementById("file").files[0];
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  form.append("model", document.getElementById("file-model").value || "whisper-1");
  form.append("stream", "true");
  const language = document.getElementById("file-language").value.trim();
  if (language) form.append("language", language);
  const list = document.getElementById("segments");
  const status = document.getElementById("file-status");
  list.replaceChildren();
  status.textContent = `transcribing ${file.name}…`;
  transcription = new AbortController();
  setBusy(true);
  try {
    await api.sse("v1/audio/transcriptions", ({ data }) => {
      if (data.type === "transcript.text.delta") list.append(el("li", data.delta.trim(), { className: "segment" }));
      if (data.type === "transcript.text.done") {
        status.textContent = `done: ${data.usage.seconds.toFixed(1)} s of audio`;
        status.dataset.done = "true";
      }
      if (data.error) status.textContent = data.error.message;
    }, { signal: transcription.signal, method: "POST", body: form });
  } catch (error) {
    status.textContent = error.name === "AbortError" ? "stopped" : error.message;
  } finally {
    transcription = null;
    setBusy(false);
    loadLoaded();
  }
}

function setBusy(busy) {
  document.getElementById("transcribe-start").disabled = busy;
  document.getElementById("transcribe-stop").disabled = !busy;
}

// ------------------------------------------------------------------ token and readiness

function showToken() {
  document.getElementById("token-state").textContent = api.token ? "token set (this tab)" : "no token";
  document.getElementById("token-button").textContent = api.token ? "Change token" : "Set token";
}

function askToken() {
  const dialog = document.getElementById("token-dialog");
  document.getElementById("token-input").value = api.token;
  if (!dialog.open) dialog.showModal();
}

async function checkReady() {
  const box = document.getElementById("backends");
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    box.textContent = response.ok ? "services ready" : `not ready: ${JSON.stringify(body)}`;
    box.className = response.ok ? "ok" : "error";
  } catch (error) {
    box.textContent = `gateway unreachable: ${error.message}`;
    box.className = "error";
  }
}

async function start() {
  showToken();
  document.getElementById("token-button").addEventListener("click", askToken);
  document.addEventListener("token-needed", askToken);
  document.getElementById("token-dialog").addEventListener("close", () => {
    const dialog = document.getElementById("token-dialog");
    if (dialog.returnValue === "save") api.setToken(document.getElementById("token-input").value);
  });
  document.addEventListener("token-changed", () => { showToken(); reload().then(followEvents); });
  document.getElementById("loaded-refresh").addEventListener("click", loadLoaded);
  document.getElementById("transcribe-form").addEventListener("submit", transcribeFile);
  document.getElementById("transcribe-stop").addEventListener("click", () => transcription && transcription.abort());
  checkReady();
  setInterval(checkReady, 15000);
  setInterval(loadLoaded, 10000);
  await reload();
  followEvents();
}

async function reload() {
  notice("");
  try {
    await loadModels();
  } catch (error) {
    notice(`models: ${error.message}`);
  }
  await loadLoaded();
}

document.addEventListener("DOMContentLoaded", start);
