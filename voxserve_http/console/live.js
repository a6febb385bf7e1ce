// Live transcription from the microphone over /v1/realtime (OpenAI's Realtime transcription
// protocol): pcm16 at the AudioContext's rate, server_vad turns; each item's deltas in grey,
// replaced by its final transcript in black.
"use strict";

const live = { ws: null, context: null, stream: null, items: new Map() };

// Relative to the page, like every URL of the console; wss: when the page came over https
// (an https page may not open a ws: socket).
function realtimeUrl() {
  const url = new URL("v1/realtime?intent=transcription", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function liveStatus(text, className = "muted") {
  const status = document.getElementById("live-status");
  status.textContent = text;
  status.className = className;
}

function itemLine(itemId) {
  let line = live.items.get(itemId);
  if (!line) {
    line = el("p", null, { className: "item draft" });
    line.dataset.item = itemId;
    document.getElementById("live-transcript").append(line);
    live.items.set(itemId, line);
  }
  return line;
}

function onRealtimeEvent(event) {
  switch (event.type) {
    case "transcription_session.created":
      return;
    case "transcription_session.updated":
      liveStatus(`listening at ${live.context.sampleRate} Hz…`, "ok");
      return;
    case "input_audio_buffer.speech_started":
      itemLine(event.item_id).classList.add("speaking");
      return;
    case "input_audio_buffer.speech_stopped":
      itemLine(event.item_id).classList.remove("speaking");
      return;
    case "conversation.item.input_audio_transcription.delta":
      itemLine(event.item_id).textContent += event.delta;
      return;
    case "conversation.item.input_audio_transcription.completed": {
      const line = itemLine(event.item_id);
      line.textContent = event.transcript;
      line.className = "item final";
      if (!event.transcript) line.remove();
      return;
    }
    case "conversation.item.input_audio_transcription.failed":
      itemLine(event.item_id).className = "item error";
      itemLine(event.item_id).textContent = event.error.message;
      return;
    case "error":
      liveStatus(event.error.message, "error");
      return;
    default:
  }
}

async function startLive(event) {
  event.preventDefault();
  setLiveBusy(true);
  try {
    live.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (error) {
    liveStatus(`no microphone: ${error.message}`, "error");
    setLiveBusy(false);
    return;
  }
  live.context = new AudioContext();
  await live.context.audioWorklet.addModule("console/pcm-worklet.js");
  const protocols = ["realtime", "openai-beta.realtime-v1"];
  if (api.token) protocols.push(`openai-insecure-api-key.${api.token}`);
  const ws = new WebSocket(realtimeUrl(), protocols);
  live.ws = ws;
  let opened = false;
  ws.onopen = () => {
    opened = true;
    const language = document.getElementById("live-language").value.trim();
    ws.send(JSON.stringify({
      type: "transcription_session.update",
      session: {
        input_audio_format: { type: "audio/pcm", rate: live.context.sampleRate },
        input_audio_transcription: { model: document.getElementById("live-model").value, language },
        turn_detection: { type: "server_vad", threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
      },
    }));
    capture(ws);
  };
  ws.onmessage = (message) => onRealtimeEvent(JSON.parse(message.data));
  ws.onclose = (closed) => {
    if (!opened) {
      // A browser does not show why an upgrade was refused: ask for a token only when none was
      // given; with one, say what to check (a token without `transcribe`, a session limit, a backend down).
      if (api.token) {
        liveStatus("the gateway refused the session: check that the token may transcribe (Set token), or the services", "error");
      } else {
        liveStatus("the gateway refused the session: set a token that may transcribe, or check the services", "error");
        document.dispatchEvent(new CustomEvent("token-needed"));
      }
    } else if (live.ws === ws && closed.code !== 1000) {
      liveStatus(`the session ended (${closed.code} ${closed.reason})`, "error");
    }
    stopLive();
  };
}

function capture(ws) {
  const source = live.context.createMediaStreamSource(live.stream);
  const node = new AudioWorkletNode(live.context, "pcm16-capture");
  node.port.onmessage = ({ data }) => {
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(data) }));
    }
  };
  source.connect(node);
  node.connect(live.context.destination); // pulls the graph; the node's output is silence
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function stopLive() {
  const ws = live.ws;
  live.ws = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "stopped");
  if (live.stream) live.stream.getTracks().forEach((track) => track.stop());
  if (live.context) live.context.close();
  live.stream = live.context = null;
  setLiveBusy(false);
}

function setLiveBusy(busy) {
  document.getElementById("live-start").disabled = busy;
  document.getElementById("live-stop").disabled = !busy;
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("live-form").addEventListener("submit", startLive);
  document.getElementById("live-stop").addEventListener("click", () => {
    stopLive();
    liveStatus("stopped");
  });
});
