// SyncTalk 2D web page: idle stream, Text (a WebRTC session when the browser and server allow it: audio and
// video in one peer connection, Stop interrupts; else multipart MJPEG), Upload (MJPEG over fetch, audio in sync),
// Live mic (AudioWorklet -> 16 kHz PCM16 -> WS /ws/live -> JPEG frames), debug panel, avatar picker.
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
  lastEvent: null,         // last JSON event from /ws/live
  lastError: null,
  ready: null,             // the live `ready` event
  // text transport: "webrtc" (POST /webrtc/offer session) or "mjpeg"; ?transport=mjpeg forces the fallback
  transport: params.get("transport") === "mjpeg" || !window.RTCPeerConnection ? "mjpeg" : "webrtc",
  rtcEvent: null,          // last data-channel event of the WebRTC session
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

let playback = null; // the running text/upload playback {abort, audio, url}

function stopPlayback() {
  if (!playback) return;
  playback.abort.abort();
  playback.audio.pause();
  if (playback.timer) clearTimeout(playback.timer);
  URL.revokeObjectURL(playback.url);
  playback = null;
}

// Fetch an MJPEG stream and draw it; start `audioBlob` when the first frame arrives; return to idle
// once the stream has ended and X-Audio-Duration seconds of audio have played.
async function playStream(url, init, audioBlob, headerDuration) {
  stopPlayback();
  stopLive();
  haltRtc();
  const abort = new AbortController();
  const audioUrl = URL.createObjectURL(audioBlob);
  const audio = new Audio(audioUrl);
  const pb = { abort, audio, url: audioUrl, timer: null };
  playback = pb;
  setButtons(true);
  state.streamFrames = 0;
  state.audioStartedAt = null;
  try {
    const resp = await fetch(url, fetchOpts(Object.assign({ signal: abort.signal }, init)));
    if (!resp.ok) throw new Error(await describeError(resp));
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
}

// ---------------------------------------------------------------------------------------------
// WebRTC session for the Text tab: one peer connection (recvonly video + audio, data channel "events"),
// opened on the first Speak and kept; speech frames are drawn on the canvas from the <video> element,
// which plays the audio in sync with them. Any failure to connect falls back to MJPEG for the page.

let rtc = null; // {pc, channel, video, id, avatar, utterance, drawing}

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

async function openRtc() {
  const pc = new RTCPeerConnection();
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const channel = pc.createDataChannel("events");
  const video = $("rtc-view");
  const media = new MediaStream();
  const session = { pc, channel, video, id: null, avatar: state.avatar, utterance: null, drawing: false };
  pc.ontrack = (ev) => { media.addTrack(ev.track); video.srcObject = media; };
  channel.onmessage = (m) => onRtcEvent(session, JSON.parse(m.data));
  await pc.setLocalDescription(await pc.createOffer());
  await waitFor(() => pc.iceGatheringState === "complete", (f) => pc.addEventListener("icegatheringstatechange", f),
    3000, "ICE gathering").catch(() => {}); // send what was gathered
  const resp = await fetch(apiUrl("/webrtc/offer"), fetchOpts({
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer", avatar: state.avatar }),
  }));
  if (!resp.ok) throw new Error(await describeError(resp));
  const answer = await resp.json();
  session.id = answer.session_id;
  await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  await waitFor(() => pc.connectionState === "connected" && channel.readyState === "open",
    (f) => { pc.addEventListener("connectionstatechange", f); channel.addEventListener("open", f); }, 8000,
    "WebRTC connection", () => ["failed", "closed"].includes(pc.connectionState));
  pc.addEventListener("connectionstatechange", () => {
    if (["failed", "closed"].includes(pc.connectionState) && rtc === session) closeRtc();
  });
  return session;
}

function sessionUrl(session, action = "") {
  return withToken(`/sessions/${session.id}${action}`);
}

function closeRtc() {
  const session = rtc;
  rtc = null;
  if (!session) return;
  session.drawing = false;
  if (session.id) fetch(sessionUrl(session), fetchOpts({ method: "DELETE", keepalive: true })).catch(() => {});
  session.pc.close();
  session.video.srcObject = null;
  if (state.mode === "speaking") { showIdle(); setButtons(false); }
}

function drawVideoFrames(session) {
  const video = session.video;
  const draw = () => {
    if (!session.drawing || rtc !== session) return;
    if (video.videoWidth) {
      if (canvas.width !== video.videoWidth || canvas.height !== video.videoHeight) {
        canvas.width = video.videoWidth;
        canvas.height = video.videoHeight;
      }
      ctx2d.drawImage(video, 0, 0);
      state.framesDrawn++;
      state.streamFrames++;
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

// Speak over WebRTC; throws {fallback: true} when no session can be opened (the caller uses MJPEG).
async function speakRtc(text, voice) {
  stopPlayback();
  stopLive();
  if (rtc && rtc.avatar !== state.avatar) closeRtc();
  if (!rtc) {
    try {
      rtc = await openRtc();
    } catch (e) {
      closeRtc();
      throw Object.assign(new Error(`WebRTC unavailable (${e.message}); using MJPEG`), { fallback: true });
    }
  }
  const session = rtc;
  session.video.muted = false;
  session.video.play().catch((e) => console.warn("audio playback blocked:", e.message));
  const resp = await fetch(sessionUrl(session, "/speak"), fetchOpts({
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ text, voice, interrupt: true }),
  }));
  if (!resp.ok) throw new Error(await describeError(resp));
  const body = await resp.json();
  session.utterance = body.utterance_id;
  state.streamFrames = 0;
  state.audioStartedAt = null;
  $("stage-info").textContent = `WebRTC session, ${body.sentences} sentence(s)`;
  setButtons(true);
}

// Stop WebRTC speech without waiting (another kind of playback takes the stage).
function haltRtc() {
  if (!rtc || !rtc.utterance) return;
  fetch(sessionUrl(rtc, "/interrupt"), fetchOpts({ method: "POST" })).catch(() => {});
  rtc.utterance = null;
  rtc.drawing = false;
}

async function stopSpeech() {
  if (rtc && rtc.utterance) {
    const resp = await fetch(sessionUrl(rtc, "/interrupt"), fetchOpts({ method: "POST" }));
    if (!resp.ok && resp.status !== 409) showError(await describeError(resp));
    return;
  }
  if (playback) {
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
  if (state.transport === "webrtc") {
    try {
      await speakRtc(text, voice);
      return;
    } catch (e) {
      if (!e.fallback) { showError(e.message); setButtons(false); return; }
      console.warn(e.message);
      state.transport = "mjpeg";
    }
  }
  setButtons(true);
  try {
    const resp = await fetch(apiUrl("/get-tts-audio", { text, voice }), fetchOpts());
    if (!resp.ok) throw new Error(await describeError(resp));
    const wav = await resp.blob();
    const duration = resp.headers.get("X-Audio-Duration");
    await playStream(apiUrl("/generate", { text, voice }), { method: "GET" }, wav, duration);
  } catch (e) {
    showError(e.message);
  } finally {
    if (!playback) setButtons(false);
  }
}

// ---------------------------------------------------------------------------------------------
// Upload tab

async function playUpload() {
  clearError();
  const file = $("file").files[0];
  if (!file) { showError("Choose an audio file first."); return; }
  const form = new FormData();
  form.append("audio_file", file, file.name);
  await playStream(apiUrl("/generate-from-audio"), { method: "POST", body: form }, file, null);
}

// ---------------------------------------------------------------------------------------------
// Live mic tab

let live = null; // {ws, ctx, stream, node}

async function startLive() {
  clearError();
  stopPlayback();
  haltRtc();
  if (live) return;
  $("mic-start").disabled = true;
  const session = { ws: null, ctx: null, stream: null, node: null, ready: false, closing: false };
  live = session;
  state.liveFrames = 0;
  try {
    session.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
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
  } catch (e) {
    showError(`Live mic: ${e.message}`);
    stopLive();
  }
}

function onLiveEvent(session, ev) {
  state.lastEvent = ev;
  if (ev.type === "ready") {
    state.ready = ev;
    session.ready = true;
    showCanvas();
    setMode("live");
    $("mic-status").textContent = `Live: ${ev.avatar}, ${ev.fps} fps, latency ${ev.latency_ms} ms`;
  } else if (ev.type === "speaking") {
    $("badge").textContent = "live: speaking";
  } else if (ev.type === "idle") {
    $("badge").textContent = "live";
    if (session.closing) finishLive(session);
  } else if (ev.type === "error") {
    showError(`${ev.detail} (${ev.error})`);
  }
}

function stopLive() {
  const session = live;
  if (!session) return;
  session.closing = true;
  if (session.stream) session.stream.getTracks().forEach((t) => t.stop());
  if (session.ctx) session.ctx.close().catch(() => {});
  $("level-bar").style.width = "0";
  $("mic-stop").disabled = true;
  if (session.ws && session.ws.readyState === WebSocket.OPEN) {
    session.ws.send(JSON.stringify({ type: "stop" })); // let the last words play out, then close
    setTimeout(() => finishLive(session), 2500);
  } else {
    finishLive(session);
  }
}

function finishLive(session) {
  if (session.ws && session.ws.readyState <= WebSocket.OPEN) session.ws.close(1000);
  if (live === session) {
    live = null;
    $("mic-start").disabled = false;
    $("mic-status").textContent = "Stopped.";
    showIdle();
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
    const names = (health.avatars || []).map((a) => a.name);
    const current = state.avatar || (health.model && health.model.default) || names[0] || null;
    state.avatar = current;
    const select = $("avatar");
    select.replaceChildren(...names.map((n) => new Option(n, n, n === current, n === current)));
    $("avatar-picker").classList.toggle("hidden", names.length < 2);
    const voices = (health.tts && health.tts.voices) || [];
    $("voice").replaceChildren(new Option("default", ""), ...voices.map((v) => new Option(v, v)));
    if (!names.length) showError("No avatar is available on the server (train one or install the demo avatar).");
    else if (health.status !== "ok") $("stage-info").textContent = `server status: ${health.status}`;
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  }
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
  window.addEventListener("pagehide", closeRtc);
  $("play").addEventListener("click", playUpload);
  $("mic-start").addEventListener("click", startLive);
  $("mic-stop").addEventListener("click", stopLive);
  $("avatar").addEventListener("change", (ev) => {
    state.avatar = ev.target.value;
    closeRtc();
    stopPlayback();
    stopLive();
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
