// SyncTalk 2D web page: idle stream, Text and Upload (a WebRTC session when the browser and server allow it:
// audio and video in one peer connection, Stop interrupts; else multipart MJPEG over fetch with the audio played
// by the page, Stop cancels with DELETE /generate/{request_id}), Live mic (the microphone as the audio track of a
// WebRTC session in mode "mic"; else AudioWorklet -> 16 kHz PCM16 -> WS /ws/live -> JPEG frames), debug panel,
// avatar picker, the avatar's attribution. `?transport=mjpeg` forces the fallbacks (MJPEG and the WebSocket).
// No external resources; works offline. `window.synctalk` exposes the page state (for tests and
// for debugging in the console).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const TOKEN = params.get("access_token");

const state = {
  mode: "idle",            // idle | speaking | live
  avatar: params.get("avatar") || null,
  framesDrawn: 0,          // frames drawn on the canvas since the page loaded
  streamFrames: 0,         // frames of the last text/upload stream
  liveFrames: 0,           // frames received on the live socket
  audioStartedAt: null,    // performance.now() when speech audio started
  lastEvent: null,         // last live event (from /ws/live or the mic session's data channel)
  lastError: null,
  ready: null,             // the live `ready` event
  liveEvents: [],          // live events with their arrival time t (performance.now()), the last 500
  // transport: "webrtc" (POST /webrtc/offer sessions) or "mjpeg" (MJPEG for text and upload, WebSocket for the
  // microphone); ?transport=mjpeg forces the fallback, and so does a WebRTC session that cannot be opened
  transport: params.get("transport") === "mjpeg" || !window.RTCPeerConnection ? "mjpeg" : "webrtc",
  liveTransport: null,     // "webrtc" or "websocket" while the live mic runs
  rtcEvent: null,          // last data-channel event of the text/upload WebRTC session
  requestId: null,         // request_id of the last MJPEG stream (what Stop cancels)
  health: null,            // the last GET /health
};
window.synctalk = state;

// ---------------------------------------------------------------------------------------------
// Helpers

function withToken(url) {
  const u = new URL(url, location.href);
  if (TOKEN) u.searchParams.set("access_token", TOKEN);
  return u.pathname + u.search;
}

function apiUrl(path, query = {}) {
  const u = new URL(path, location.href);
  for (const [k, v] of Object.entries(query)) if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, v);
  if (state.avatar && !u.searchParams.has("avatar") && path !== "/debug/config" && path !== "/debug/status") {
    u.searchParams.set("avatar", state.avatar);
  }
  return withToken(u.pathname + u.search);
}

function fetchOpts(extra = {}) {
  const headers = Object.assign({}, extra.headers || {});
  if (TOKEN) headers["Authorization"] = "Bearer " + TOKEN;
  return Object.assign({}, extra, { headers });
}

function showError(message) {
  state.lastError = message;
  const box = $("error");
  box.textContent = message;
  box.classList.remove("hidden");
}

function clearError() {
  $("error").classList.add("hidden");
  $("error").textContent = "";
}

async function describeError(resp) {
  let text = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.detail) text = `${body.detail} (${body.error || resp.status})`;
  } catch (_) { /* not JSON */ }
  return text;
}

function setMode(mode) {
  state.mode = mode;
  const badge = $("badge");
  badge.textContent = mode;
  badge.className = mode === "idle" ? "" : mode;
}

// ---------------------------------------------------------------------------------------------
// Avatar view: idle <img> (MJPEG /idle) or the canvas with frames we draw ourselves

const canvas = $("frame-view");
const ctx2d = canvas.getContext("2d");

function showIdle() {
  canvas.classList.add("hidden");
  const img = $("idle-view");
  img.src = apiUrl("/idle", { t: Date.now() });
  img.classList.remove("hidden");
  setMode("idle");
}

function showCanvas() {
  const img = $("idle-view");
  img.classList.add("hidden");
  img.removeAttribute("src"); // closes the idle stream while frames come from elsewhere
  canvas.classList.remove("hidden");
}

function drawBitmap(bitmap) {
  if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  ctx2d.drawImage(bitmap, 0, 0);
  bitmap.close();
  state.framesDrawn++;
}

// ---------------------------------------------------------------------------------------------
// Multipart MJPEG over fetch: each part has Content-Length, so parsing is exact

const CRLF2 = [13, 10, 13, 10];

function indexOfSeq(buf, seq, from) {
  outer: for (let i = from; i <= buf.length - seq.length; i++) {
    for (let j = 0; j < seq.length; j++) if (buf[i + j] !== seq[j]) continue outer;
    return i;
  }
  return -1;
}

async function* mjpegParts(body) {
  const reader = body.getReader();
  let buf = new Uint8Array(0);
  const decoder = new TextDecoder();
  while (true) {
    const headEnd = indexOfSeq(buf, CRLF2, 0);
    if (headEnd >= 0) {
      const head = decoder.decode(buf.subarray(0, headEnd));
      if (head.includes("--frame--")) return;
      const m = /content-length:\s*(\d+)/i.exec(head);
      if (!m) throw new Error("malformed MJPEG part (no Content-Length)");
      const len = parseInt(m[1], 10), start = headEnd + 4;
      if (buf.length >= start + len + 2) {
        yield buf.slice(start, start + len);
        buf = buf.subarray(start + len + 2);
        continue;
      }
    } else if (buf.length >= 11 && decoder.decode(buf.subarray(0, 11)).startsWith("--frame--")) {
      return;
    }
    const { value, done } = await reader.read();
    if (done) return;
    const grown = new Uint8Array(buf.length + value.length);
    grown.set(buf);
    grown.set(value, buf.length);
    buf = grown;
  }
}

let playback = null; // the running MJPEG text/upload playback {abort, audio, url, timer, requestId}

// A fresh request id for an MJPEG stream (`?request_id=`), so that Stop can cancel it by name.
function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// Ask the server to cancel MJPEG stream `id` (DELETE /generate/{id}); the page aborts its fetch as well, so a
// server that does not know the route (404/405) changes nothing.
function cancelStream(id) {
  fetch(withToken(`/generate/${encodeURIComponent(id)}`), fetchOpts({ method: "DELETE" })).catch(() => {});
}

function stopPlayback() {
  if (!playback) return;
  playback.abort.abort();
  playback.audio.pause();
  if (playback.timer) clearTimeout(playback.timer);
  URL.revokeObjectURL(playback.url);
  playback = null;
}

// Fetch the MJPEG stream of `path` (with `query` and a new request_id) and draw it; start `audioBlob` when the
// first frame arrives; return to idle once the stream has ended and X-Audio-Duration seconds of audio have played.
async function playStream(path, query, init, audioBlob, headerDuration) {
  stopPlayback();
  stopLive();
  haltRtc();
  const abort = new AbortController();
  const audioUrl = URL.createObjectURL(audioBlob);
  const audio = new Audio(audioUrl);
  const requestId = newRequestId();
  const pb = { abort, audio, url: audioUrl, timer: null, requestId };
  playback = pb;
  state.requestId = requestId;
  const url = apiUrl(path, Object.assign({}, query, { request_id: requestId }));
  setButtons(true);
  state.streamFrames = 0;
  state.audioStartedAt = null;
  try {
    const resp = await fetch(url, fetchOpts(Object.assign({ signal: abort.signal }, init)));
    if (!resp.ok) throw new Error(await describeError(resp));
    pb.requestId = resp.headers.get("X-Request-Id") || requestId;
    const duration = parseFloat(resp.headers.get("X-Audio-Duration") || headerDuration || "0");
    $("stage-info").textContent = `${resp.headers.get("X-Frame-Count") || "?"} frames, ${duration.toFixed(2)} s` +
      (resp.headers.get("X-TTS-Engine") ? `, voice engine ${resp.headers.get("X-TTS-Engine")}` : "");
    let audioDone = null;
    for await (const jpeg of mjpegParts(resp.body)) {
      if (playback !== pb) return;
      const bitmap = await createImageBitmap(new Blob([jpeg], { type: "image/jpeg" }));
      if (playback !== pb) { bitmap.close(); return; }
      if (state.streamFrames === 0) {
        showCanvas();
        setMode("speaking");
        state.audioStartedAt = performance.now();
        audio.play().catch((e) => console.warn("audio playback blocked:", e.message));
        audioDone = new Promise((resolve) => { pb.timer = setTimeout(resolve, duration * 1000); });
      }
      drawBitmap(bitmap);
      state.streamFrames++;
    }
    if (audioDone) await audioDone;
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    if (playback === pb) {
      stopPlayback();
      showIdle();
      setButtons(false);
    }
  }
}

function setButtons(busy) {
  $("speak").disabled = busy;
  $("play").disabled = busy;
  $("stop").disabled = !busy;
  $("upload-stop").disabled = !busy;
}

// ---------------------------------------------------------------------------------------------
// WebRTC sessions. Text and Upload share one session (recvonly video + audio, data channel "events"), opened on
// the first Speak or Play and kept; speech frames are drawn on the canvas from the <video> element, which plays
// the audio in sync with them. The live mic opens its own session in mode "mic" (the microphone as its audio
// track, video back). A session that cannot be opened switches the page to the fallbacks.

let rtc = null; // the text/upload session {pc, channel, video, media, id, avatar, mode, utterance, drawing, closed}

// Resolve when check() holds (re-checked whenever subscribe's callback fires), reject when failed() does or
// after ms milliseconds.
function waitFor(check, subscribe, ms, what, failed = () => false) {
  return new Promise((resolve, reject) => {
    if (check()) { resolve(); return; }
    const timer = setTimeout(() => reject(new Error(`${what} timed out`)), ms);
    subscribe(() => {
      if (check()) { clearTimeout(timer); resolve(); }
      else if (failed()) { clearTimeout(timer); reject(new Error(`${what} failed`)); }
    });
  });
}

// Open a session: mode "speech" (recvonly audio) or "mic" (sends `micStream`'s audio track); data-channel
// events go to onEvent(session, event).
async function openRtc(mode, onEvent, micStream = null) {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  if (micStream) pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendonly", streams: [micStream] });
  else pc.addTransceiver("audio", { direction: "recvonly" });
  const channel = pc.createDataChannel("events");
  const video = $("rtc-view");
  const media = new MediaStream();
  const session = { pc, channel, video, media, id: null, avatar: state.avatar, mode, utterance: null,
    drawing: false, closed: false };
  pc.ontrack = (ev) => { media.addTrack(ev.track); video.srcObject = media; };
  channel.onmessage = (m) => onEvent(session, JSON.parse(m.data));
  try {
    await pc.setLocalDescription(await pc.createOffer());
    await waitFor(() => pc.iceGatheringState === "complete", (f) => pc.addEventListener("icegatheringstatechange", f),
      3000, "ICE gathering").catch(() => {}); // send what was gathered
    const resp = await fetch(apiUrl("/webrtc/offer"), fetchOpts({
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", avatar: state.avatar, mode }),
    }));
    if (!resp.ok) throw new Error(await describeError(resp));
    const answer = await resp.json();
    session.id = answer.session_id;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    await waitFor(() => pc.connectionState === "connected" && channel.readyState === "open",
      (f) => { pc.addEventListener("connectionstatechange", f); channel.addEventListener("open", f); }, 8000,
      "WebRTC connection", () => ["failed", "closed"].includes(pc.connectionState));
  } catch (e) {
    endSession(session);
    throw e;
  }
  return session;
}

function sessionUrl(session, action = "") {
  return withToken(`/sessions/${session.id}${action}`);
}

// Close a session: its picture at once if it is the one shown, then DELETE on the server and, once that is
// answered, the peer connection (closing it first would let the server close the session before the DELETE).
function endSession(session) {
  if (session.closed) return;
  session.closed = true;
  session.drawing = false;
  if (session.video.srcObject === session.media) session.video.srcObject = null;
  if (!session.id) { session.pc.close(); return; }
  fetch(sessionUrl(session), fetchOpts({ method: "DELETE", keepalive: true })).catch(() => {})
    .finally(() => session.pc.close());
}

function closeRtc() {
  const session = rtc;
  rtc = null;
  if (!session) return;
  endSession(session);
  if (state.mode === "speaking") { showIdle(); setButtons(false); }
}

// Draw the session's video on the canvas, frame by frame, while session.drawing holds.
function drawVideoFrames(session) {
  const video = session.video;
  const draw = () => {
    if (!session.drawing || session.closed) return;
    if (video.videoWidth) {
      if (canvas.width !== video.videoWidth || canvas.height !== video.videoHeight) {
        canvas.width = video.videoWidth;
        canvas.height = video.videoHeight;
      }
      ctx2d.drawImage(video, 0, 0);
      state.framesDrawn++;
      if (session.mode === "mic") state.liveFrames++; else state.streamFrames++;
    }
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(draw); else requestAnimationFrame(draw);
  };
  draw();
}

function onRtcEvent(session, ev) {
  state.rtcEvent = ev;
  if (rtc !== session || !ev.utterance_id || ev.utterance_id !== session.utterance) {
    if (ev.type === "error" && rtc === session) showError(`${ev.detail} (${ev.error})`);
    return;
  }
  if (ev.type === "speech_started") {
    showCanvas();
    setMode("speaking");
    state.audioStartedAt = performance.now();
    session.drawing = true;
    drawVideoFrames(session);
  } else if (["speech_ended", "interrupted", "error"].includes(ev.type)) {
    if (ev.type === "error") showError(`${ev.detail} (${ev.error})`);
    session.drawing = false;
    session.utterance = null;
    showIdle();
    setButtons(false);
  }
}

// Make the avatar speak over the WebRTC session: POST `action` (a speak command) with `init`; `label(body)`
// describes it under the stage. Throws {fallback: true} when no session can be opened (the caller uses MJPEG).
async function speakRtc(action, init, label) {
  stopPlayback();
  stopLive();
  if (rtc && rtc.avatar !== state.avatar) closeRtc();
  if (!rtc) {
    try {
      rtc = await openRtc("speech", onRtcEvent);
    } catch (e) {
      closeRtc();
      throw Object.assign(new Error(`WebRTC unavailable (${e.message}); using MJPEG`), { fallback: true });
    }
  }
  const session = rtc;
  session.video.srcObject = session.media;
  session.video.muted = false;
  session.video.play().catch((e) => console.warn("audio playback blocked:", e.message));
  const resp = await fetch(sessionUrl(session, action), fetchOpts(init));
  if (!resp.ok) throw new Error(await describeError(resp));
  const body = await resp.json();
  session.utterance = body.utterance_id;
  state.streamFrames = 0;
  state.audioStartedAt = null;
  $("stage-info").textContent = `WebRTC session, ${label(body)}`;
  setButtons(true);
}

// Speak over WebRTC when that is the transport. True when it was handled (or its error shown); false when the
// page must use MJPEG (then the transport has switched to the fallback).
async function tryRtc(action, init, label) {
  if (state.transport !== "webrtc") return false;
  try {
    await speakRtc(action, init, label);
    return true;
  } catch (e) {
    if (!e.fallback) { showError(e.message); setButtons(false); return true; }
    console.warn(e.message);
    state.transport = "mjpeg";
    return false;
  }
}

// Stop WebRTC speech without waiting (another kind of playback takes the stage).
function haltRtc() {
  if (!rtc || !rtc.utterance) return;
  fetch(sessionUrl(rtc, "/interrupt"), fetchOpts({ method: "POST" })).catch(() => {});
  rtc.utterance = null;
  rtc.drawing = false;
}

// Stop: interrupt WebRTC speech (the session's `interrupted` event brings the idle loop back), or cancel the
// MJPEG stream (DELETE /generate/{request_id}, and abort the fetch).
async function stopSpeech() {
  if (rtc && rtc.utterance) {
    const resp = await fetch(sessionUrl(rtc, "/interrupt"), fetchOpts({ method: "POST" }));
    if (!resp.ok && resp.status !== 409) showError(await describeError(resp));
    return;
  }
  if (playback) {
    cancelStream(playback.requestId);
    stopPlayback();
    showIdle();
    setButtons(false);
  }
}

// ---------------------------------------------------------------------------------------------
// Text tab

async function speak() {
  clearError();
  const text = $("text").value.trim();
  if (!text) { showError("Type some text first."); return; }
  const voice = $("voice").value || null;
  const init = { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, voice, interrupt: true }) };
  if (await tryRtc("/speak", init, (b) => `${b.sentences} sentence(s)`)) return;
  setButtons(true);
  try {
    const resp = await fetch(apiUrl("/get-tts-audio", { text, voice }), fetchOpts());
    if (!resp.ok) throw new Error(await describeError(resp));
    const wav = await resp.blob();
    const duration = resp.headers.get("X-Audio-Duration");
    await playStream("/generate", { text, voice }, { method: "GET" }, wav, duration);
  } catch (e) {
    showError(e.message);
  } finally {
    if (!playback) setButtons(false);
  }
}

// ---------------------------------------------------------------------------------------------
// Upload tab

function uploadForm(file) {
  const form = new FormData();
  form.append("audio_file", file, file.name);
  return form;
}

async function playUpload() {
  clearError();
  const file = $("file").files[0];
  if (!file) { showError("Choose an audio file first."); return; }
  if (await tryRtc("/speak?interrupt=true", { method: "POST", body: uploadForm(file) }, () => `${file.name}`)) return;
  await playStream("/generate-from-audio", {}, { method: "POST", body: uploadForm(file) }, file, null);
}

// ---------------------------------------------------------------------------------------------
// Live mic tab: the microphone goes to a WebRTC session in mode "mic" (video back on the <video>, drawn on the
// canvas), or, as the fallback, through an AudioWorklet as 16 kHz PCM16 to WS /ws/live (JPEG frames back).

let live = null; // {kind: "webrtc" | "websocket", stream, ctx, node, ws, rtc, meter, ready, closing}

const MIC_CONSTRAINTS = { audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
  autoGainControl: false } };

async function startLive() {
  clearError();
  stopPlayback();
  haltRtc();
  if (live) return;
  $("mic-start").disabled = true;
  const session = { kind: null, stream: null, ctx: null, node: null, ws: null, rtc: null, meter: null,
    ready: false, closing: false };
  live = session;
  state.liveFrames = 0;
  try {
    session.stream = await navigator.mediaDevices.getUserMedia(MIC_CONSTRAINTS);
    if (live !== session) return;
    if (state.transport === "webrtc") {
      try {
        await startLiveRtc(session);
        return;
      } catch (e) {
        if (live !== session) return;
        console.warn(`WebRTC unavailable for the microphone (${e.message}); using the WebSocket`);
        state.transport = "mjpeg";
      }
    }
    await startLiveWs(session);
  } catch (e) {
    showError(`Live mic: ${e.message}`);
    stopLive();
  }
}

// The microphone as the audio track of a mode "mic" session; the level meter reads it with an AnalyserNode.
async function startLiveRtc(session) {
  closeRtc(); // one <video> element: the text/upload session reopens on the next Speak
  session.kind = state.liveTransport = "webrtc";
  const rtcSession = await openRtc("mic", (s, ev) => onLiveEvent(session, ev), session.stream);
  if (live !== session) { endSession(rtcSession); return; }
  session.rtc = rtcSession;
  session.ctx = new AudioContext();
  const analyser = session.ctx.createAnalyser();
  analyser.fftSize = 1024;
  session.ctx.createMediaStreamSource(session.stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  session.meter = setInterval(() => {
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
    $("level-bar").style.width = `${Math.min(100, Math.round(rms * 300))}%`;
  }, 50);
  rtcSession.video.muted = true; // nothing comes back but video
  rtcSession.video.play().catch((e) => console.warn("video playback blocked:", e.message));
  rtcSession.drawing = true;
  showCanvas();
  setMode("live");
  drawVideoFrames(rtcSession);
  $("mic-stop").disabled = false;
  if (!session.ready) $("mic-status").textContent = "Live over WebRTC: connected.";
}

async function startLiveWs(session) {
  session.kind = state.liveTransport = "websocket";
  session.ctx = new AudioContext();
  await session.ctx.audioWorklet.addModule(withToken("/static/pcm-worklet.js"));
  if (live !== session) return;
  const source = session.ctx.createMediaStreamSource(session.stream);
  session.node = new AudioWorkletNode(session.ctx, "pcm16-downsampler",
    { processorOptions: { targetRate: 16000, chunkMs: 20 } });
  const mute = session.ctx.createGain();
  mute.gain.value = 0;
  source.connect(session.node).connect(mute).connect(session.ctx.destination);
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}${apiUrl("/ws/live")}`);
  ws.binaryType = "blob";
  session.ws = ws;
  let drawing = Promise.resolve();
  ws.onmessage = (msg) => {
    if (typeof msg.data === "string") { onLiveEvent(session, JSON.parse(msg.data)); return; }
    state.liveFrames++;
    const blob = msg.data;
    drawing = drawing.then(async () => {
      if (live !== session) return;
      const bitmap = await createImageBitmap(blob);
      if (live === session) drawBitmap(bitmap); else bitmap.close();
    }).catch((e) => console.warn("frame decode failed:", e.message));
  };
  ws.onclose = (ev) => {
    if (live === session && !session.closing) {
      showError(`live connection closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
      stopLive();
    }
  };
  session.node.port.onmessage = (ev) => {
    $("level-bar").style.width = `${Math.min(100, Math.round(ev.data.level * 300))}%`;
    if (session.ready && ws.readyState === WebSocket.OPEN) ws.send(ev.data.pcm);
  };
  $("mic-stop").disabled = false;
  $("mic-status").textContent = "Connecting...";
}

// Events of the live path (WebSocket messages or the mic session's data channel: the same ready / speaking /
// idle / stopped / error).
function onLiveEvent(session, ev) {
  state.lastEvent = ev;
  state.liveEvents.push(Object.assign({ t: performance.now() }, ev));
  if (state.liveEvents.length > 500) state.liveEvents.shift();
  if (ev.type === "ready") {
    state.ready = ev;
    session.ready = true;
    showCanvas();
    setMode("live");
    const via = session.kind === "webrtc" ? "WebRTC" : "WebSocket";
    $("mic-status").textContent = `Live over ${via}: ${ev.avatar}, ${ev.fps} fps, latency ${ev.latency_ms} ms`;
  } else if (ev.type === "speaking") {
    $("badge").textContent = "live: speaking";
  } else if (ev.type === "idle") {
    $("badge").textContent = "live";
  } else if (ev.type === "stopped") {
    if (session.closing) finishLive(session);
  } else if (ev.type === "error") {
    showError(`${ev.detail} (${ev.error})`);
  }
}

// Stop the microphone: `stop` drops the speech not shown yet and brings the idle loop back at once; its
// `stopped` answer (or 2.5 s) ends the session.
function stopLive() {
  const session = live;
  if (!session || session.closing) return;
  session.closing = true;
  if (session.stream) session.stream.getTracks().forEach((t) => t.stop());
  if (session.ctx) session.ctx.close().catch(() => {});
  if (session.meter) clearInterval(session.meter);
  $("level-bar").style.width = "0";
  $("mic-stop").disabled = true;
  const channel = session.rtc && session.rtc.channel;
  if (channel && channel.readyState === "open") {
    channel.send(JSON.stringify({ type: "stop" }));
    setTimeout(() => finishLive(session), 2500);
  } else if (session.ws && session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "stop" }));
    setTimeout(() => finishLive(session), 2500);
  } else {
    finishLive(session);
  }
}

function finishLive(session) {
  if (session.ws && session.ws.readyState <= WebSocket.OPEN) session.ws.close(1000);
  if (session.rtc) endSession(session.rtc);
  if (live === session) {
    live = null;
    state.liveTransport = null;
    $("mic-start").disabled = false;
    $("mic-status").textContent = "Stopped.";
    if (state.mode === "live") showIdle();
  }
}

// ---------------------------------------------------------------------------------------------
// Debug panel

const DEBUG_FLAGS = ["enabled", "save_frames", "save_audio"];

function renderDebug(status) {
  for (const flag of DEBUG_FLAGS) $(`dbg-${flag}`).checked = !!status[flag];
  $("dbg-status").textContent = JSON.stringify(status, null, 2);
}

async function loadDebug() {
  try {
    const resp = await fetch(apiUrl("/debug/status"), fetchOpts());
    if (!resp.ok) throw new Error(await describeError(resp));
    renderDebug(await resp.json());
  } catch (e) {
    showError(`Debug status: ${e.message}`);
  }
}

async function setDebug(flag, value) {
  try {
    const resp = await fetch(apiUrl("/debug/config"), fetchOpts({
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ [flag]: value }),
    }));
    if (!resp.ok) throw new Error(await describeError(resp));
    renderDebug(await resp.json());
  } catch (e) {
    showError(`Debug config: ${e.message}`);
    loadDebug();
  }
}

// ---------------------------------------------------------------------------------------------
// Start-up: health (avatars, voices), tabs, handlers

async function loadHealth() {
  try {
    const resp = await fetch(apiUrl("/health"), fetchOpts());
    if (!resp.ok) throw new Error(await describeError(resp));
    const health = await resp.json();
    state.health = health;
    const names = (health.avatars || []).map((a) => a.name);
    const current = state.avatar || (health.model && health.model.default) || names[0] || null;
    state.avatar = current;
    const select = $("avatar");
    select.replaceChildren(...names.map((n) => new Option(n, n, n === current, n === current)));
    $("avatar-picker").classList.toggle("hidden", names.length < 2);
    const voices = (health.tts && health.tts.voices) || [];
    $("voice").replaceChildren(new Option("default", ""), ...voices.map((v) => new Option(v, v)));
    showAttribution();
    if (!names.length) showError("No avatar is available on the server (train one or install the demo avatar).");
    else if (health.status !== "ok") $("stage-info").textContent = `server status: ${health.status}`;
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  }
}

// The credit line of the avatar's source material, when its /health entry has an `attribution` text.
function showAttribution() {
  const avatars = (state.health && state.health.avatars) || [];
  const info = Array.isArray(avatars) ? avatars.find((a) => a.name === state.avatar) : avatars[state.avatar];
  const text = info && typeof info.attribution === "string" ? info.attribution.trim() : "";
  $("attribution").textContent = text;
  $("attribution").classList.toggle("hidden", !text);
}

function selectTab(name) {
  for (const tab of ["text", "upload", "live"]) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`pane-${tab}`).classList.toggle("hidden", tab !== name);
  }
}

function init() {
  for (const tab of ["text", "upload", "live"]) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  $("speak").addEventListener("click", speak);
  $("stop").addEventListener("click", stopSpeech);
  $("upload-stop").addEventListener("click", stopSpeech);
  window.addEventListener("pagehide", closeRtc);
  $("play").addEventListener("click", playUpload);
  $("mic-start").addEventListener("click", startLive);
  $("mic-stop").addEventListener("click", stopLive);
  $("avatar").addEventListener("change", (ev) => {
    state.avatar = ev.target.value;
    closeRtc();
    stopPlayback();
    stopLive();
    showAttribution();
    showIdle();
  });
  $("debug").addEventListener("toggle", () => { if ($("debug").open) loadDebug(); });
  $("dbg-refresh").addEventListener("click", loadDebug);
  for (const flag of DEBUG_FLAGS) $(`dbg-${flag}`).addEventListener("change", (ev) => setDebug(flag, ev.target.checked));
  $("idle-view").addEventListener("error", () => {
    if (state.mode === "idle" && $("idle-view").getAttribute("src")) {
      showError("The idle stream is not available (is an avatar loaded?).");
    }
  });
  loadHealth().then(showIdle);
}

init();
