"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright's Python package; no
browser is ever downloaded), against a real server process with the fixture avatar under two names (the
second with an `avatar.json` attribution).

By default the page uses WebRTC sessions (text, upload, live mic); `?transport=mjpeg` forces the fallbacks
(MJPEG streams, the /ws/live WebSocket), and both are tested. Chromium's fake microphone plays a speech WAV
with long silences; the live tests check that the frames coming back show a generated mouth (the mouth
region leaves the idle loop's) while the WAV speaks and the still idle loop during its silences.
Screenshots go to test-artifacts/browser_*.png."""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from test_demo_avatar import default_server, mouth_openings  # noqa: F401
from test_live import IDLE_SECONDS, MouthMeter, ServerProcess, onsets

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.browser

if not CHROMIUM.exists() and shutil.which("chromium") is None:
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

ATTRIBUTION = "Synthetic talking head, made by data_utils/synth_talker.py (public domain)"
LONG_TEXT = ("Conversation grade streaming means the avatar starts talking almost as soon as it is asked to. The "
             "first sentence is synthesised on its own, so its audio can start the stream at once. While it plays, "
             "the next sentences are synthesised behind it, one after the other, and queued.")


def attributed_copy(avatar, root: Path, name: str) -> None:
    """`name`: the fixture avatar (its files linked one by one) with an avatar.json giving an attribution."""
    dataset, checkpoints = root / "dataset" / name, root / "checkpoint"
    dataset.mkdir(parents=True)
    for entry in Path(avatar.dataset_dir).iterdir():
        os.symlink(entry, dataset / entry.name)
    (dataset / "avatar.json").write_text(json.dumps({"attribution": ATTRIBUTION}))
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / name).symlink_to(avatar.save_dir, target_is_directory=True)


@pytest.fixture(scope="module")
def page_server(fixture_avatar, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser_server")
    attributed_copy(fixture_avatar, root, "synth2")
    with ServerProcess(fixture_avatar, root, names=("synth", "synth2")) as srv:
        yield srv


@pytest.fixture(scope="module")
def meter(fixture_avatar) -> MouthMeter:
    """Mouth-region distance of a frame from the idle loop's (`refs_shape`: the avatar's frame size)."""
    m = MouthMeter(fixture_avatar.dataset_dir, int(round(IDLE_SECONDS * 25)), 350)
    m.refs_shape = cv2.imread(str(Path(fixture_avatar.dataset_dir) / "full_body_img" / "0.jpg")).shape[:2]
    return m


@pytest.fixture(scope="module")
def browser(mic_wav):
    executable = str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium"))
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic", "--use-fake-device-for-media-stream",
            "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={mic_wav[0]}",
            "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, headless=True, args=args)
        yield b
        b.close()


class Page:
    """A fresh page on the server (`query`, e.g. "?transport=mjpeg"), recording console errors, uncaught
    exceptions and the requests it makes."""

    def __init__(self, browser, server, query: str = ""):
        self.context = browser.new_context(viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.requests: list[tuple[str, str, str]] = []  # (method, path?query, content-type)
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console.error: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("request", lambda r: self.requests.append(
            (r.method, r.url.removeprefix(server.url), r.headers.get("content-type", ""))))
        self.page.goto(server.url + "/" + query)
        self.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)

    def state(self, key: str):
        return self.page.evaluate(f"window.synctalk.{key}")

    def requested(self, method: str, prefix: str) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == method and r[1].startswith(prefix)]

    def mouth(self, meter: MouthMeter, element: str = "frame-view") -> tuple[float, np.ndarray | None]:
        """(performance.now() in s, the gray mouth region (`meter`'s box) of the picture an element shows now:
        the canvas, or an <img> drawn on a scratch canvas), None while it shows no frame of the avatar."""
        x1, y1, x2, y2 = meter.box
        t, w, h, data = self.page.evaluate("""([id, x, y, w, h]) => { const el = document.getElementById(id);
            const width = el.tagName === 'CANVAS' ? el.width : el.naturalWidth;
            const height = el.tagName === 'CANVAS' ? el.height : el.naturalHeight;
            if (width < x + w || height < y + h) return [performance.now(), width, height, null];
            let c = el;
            if (el.tagName !== 'CANVAS') { c = document.createElement('canvas'); c.width = width; c.height = height;
              c.getContext('2d').drawImage(el, 0, 0); }
            const d = c.getContext('2d').getImageData(x, y, w, h).data;
            let gray = '';
            for (let i = 0; i < d.length; i += 4) {
              gray += String.fromCharCode(Math.round(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]));
            }
            return [performance.now(), width, height, btoa(gray)]; }""", [element, x1, y1, x2 - x1, y2 - y1])
        if data is None or (h, w) != meter.refs_shape:
            return t / 1000, None
        gray = np.frombuffer(base64.b64decode(data), np.uint8).reshape(y2 - y1, x2 - x1)
        return t / 1000, gray.astype(np.float32)

    def video_playing(self) -> bool:
        """Whether the <video> of the WebRTC session plays (has data, not paused, its time advancing)."""
        before = self.page.evaluate("document.getElementById('rtc-view').currentTime")
        self.page.wait_for_timeout(300)
        return self.page.evaluate("""(t0) => { const v = document.getElementById('rtc-view');
            return !v.paused && v.readyState >= 2 && v.currentTime > t0 && !!v.srcObject; }""", before)

    def canvas_mouth_sum(self) -> float:
        return self.page.evaluate("""() => { const c = document.getElementById('frame-view');
            if (!c.width) return -1; const d = c.getContext('2d').getImageData(c.width * 0.38, c.height * 0.52,
            c.width * 0.24, c.height * 0.1).data; let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i];
            return s; }""")

    def shot(self, artifacts_dir: Path, name: str) -> None:
        self.page.screenshot(path=str(artifacts_dir / f"browser_{name}.png"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def page(browser, page_server):
    p = Page(browser, page_server)
    yield p
    p.close()


def mouth_distance(meter: MouthMeter, region: np.ndarray) -> float:
    """How far a gray mouth region is from the idle loop's (0 + codec noise when idle)."""
    return float(np.abs(meter.refs - region[None]).mean(axis=(1, 2)).min())


def test_page_loads_without_console_errors(page, page_server, artifacts_dir):
    assert page.page.title() == "SyncTalk 2D"
    page.page.wait_for_function("document.getElementById('voice').options.length > 1")
    assert page.state("transport") == "webrtc"  # Chromium has RTCPeerConnection
    # two avatars on the server: the picker is shown and switches the idle stream
    assert page.page.is_visible("#avatar-picker")
    assert page.page.eval_on_selector_all("#avatar option", "os => os.map(o => o.value)") == ["synth", "synth2"]
    assert page.page.is_hidden("#attribution")  # synth has no avatar.json
    page.page.select_option("#avatar", "synth2")
    page.page.wait_for_function("document.getElementById('idle-view').src.includes('avatar=synth2')")
    page.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
    assert page.page.is_visible("#attribution") and page.page.inner_text("#attribution") == ATTRIBUTION
    page.shot(artifacts_dir, "attribution")
    page.page.select_option("#avatar", "synth")
    page.page.wait_for_timeout(500)
    assert page.page.is_hidden("#attribution")
    page.shot(artifacts_dir, "loaded")
    assert page.state("mode") == "idle"
    assert page.errors == []


def test_text_speak_shows_changing_frames_then_idle(page, artifacts_dir):
    page.page.fill("#text", "Hello there, nice to meet you.")
    page.page.click("#speak")
    page.page.wait_for_function("window.synctalk.mode === 'speaking'", timeout=60000)
    sums, t0 = [], time.time()
    while page.state("mode") == "speaking" and time.time() - t0 < 30:
        sums.append(page.canvas_mouth_sum())
        if len(sums) == 8:
            page.shot(artifacts_dir, "text_speaking")
        page.page.wait_for_timeout(100)
    assert len(set(sums)) >= 4, sums  # the frames change while it speaks
    assert page.state("streamFrames") >= 25
    assert page.state("rtcEvent.type") == "speech_ended"  # spoken over the WebRTC session, to its end
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=30000)
    page.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
    assert page.page.is_hidden("#frame-view")
    assert not page.requested("GET", "/generate")
    page.shot(artifacts_dir, "text_done")
    assert page.errors == []


def test_text_over_webrtc_moves_the_mouth_and_stop_returns_to_idle(page, meter, artifacts_dir):
    """The <video> of the session plays, the mouth on the canvas is generated and moves while the text is
    spoken, and Stop interrupts it: the idle loop (the recorded mouth) is back within 2 s."""
    page.page.fill("#text", LONG_TEXT)
    page.page.click("#speak")
    page.page.wait_for_function("window.synctalk.mode === 'speaking'", timeout=60000)
    page.page.wait_for_function("window.synctalk.streamFrames >= 15", timeout=30000)
    assert page.video_playing()
    assert page.page.is_visible("#frame-view")
    frames = []
    for _ in range(20):
        frames.append(page.mouth(meter)[1])
        page.page.wait_for_timeout(80)
    page.shot(artifacts_dir, "webrtc_speaking")
    distances = [mouth_distance(meter, f) for f in frames]
    changes = [float(np.abs(a - b).mean()) for a, b in zip(frames, frames[1:], strict=False)]
    print(f"webrtc text: mouth distance from idle median {np.median(distances):.2f}, change {np.mean(changes):.2f}")
    assert np.median(distances) > 6.0, distances  # a generated mouth, not the recorded one
    assert np.mean(changes) > 1.5, changes  # that moves
    assert page.page.is_enabled("#stop")
    started = time.monotonic()
    page.page.click("#stop")
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=5000)
    assert time.monotonic() - started < 2.0
    assert page.state("rtcEvent.type") == "interrupted"
    assert page.page.is_enabled("#speak") and not page.page.is_enabled("#stop")
    page.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
    page.page.wait_for_timeout(300)
    idle = [mouth_distance(meter, page.mouth(meter, "idle-view")[1]) for _ in range(3)]
    assert max(idle) < 3.0, idle  # the idle loop: the recorded, still mouth
    assert page.state("transport") == "webrtc" and page.requested("POST", "/webrtc/offer")
    assert not page.requested("GET", "/generate")
    page.shot(artifacts_dir, "webrtc_stopped")
    assert page.errors == []


def test_api_errors_are_shown(page, artifacts_dir):
    page.page.fill("#text", "word " * 300)  # over tts.max_text_chars (1000)
    page.page.click("#speak")
    page.page.wait_for_selector("#error:not(.hidden)", timeout=15000)
    text = page.page.inner_text("#error")
    assert "text_too_long" in text and "1000" in text, text
    page.shot(artifacts_dir, "api_error")
    assert page.state("mode") == "idle" and page.page.is_enabled("#speak")
    # the only console errors are the browser's own report of the 400 response
    assert all("status of 400" in e for e in page.errors), page.errors


def test_upload_plays_over_webrtc(page, mic_wav, artifacts_dir):
    """The uploaded file goes to the session's speak (multipart), not to /generate-from-audio, and is spoken
    whole."""
    page.page.click("#tab-upload")
    page.page.set_input_files("#file", str(mic_wav[0]))
    page.page.click("#play")
    page.page.wait_for_function("window.synctalk.mode === 'speaking'", timeout=60000)
    page.page.wait_for_function("window.synctalk.streamFrames >= 25", timeout=60000)
    assert page.video_playing() and page.page.is_enabled("#upload-stop")
    page.shot(artifacts_dir, "upload_playing")
    duration = len(mic_wav[1]) / 16000
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=int((duration + 30) * 1000))
    ended = page.state("rtcEvent")
    assert ended["type"] == "speech_ended" and ended["duration"] == pytest.approx(duration, abs=0.04)
    assert page.state("streamFrames") >= 0.5 * duration * 25  # (frames the server could not make in time drop)
    speaks = page.requested("POST", "/sessions/")
    assert len(speaks) == 1 and speaks[0][1].endswith("/speak?interrupt=true"), page.requests
    assert speaks[0][2].startswith("multipart/form-data")
    assert not page.requested("POST", "/generate-from-audio")
    assert page.errors == []


def test_mjpeg_fallback_text_stop_cancels_and_upload_plays(browser, page_server, mic_wav, artifacts_dir):
    """`?transport=mjpeg`: text and upload stream MJPEG with a request_id the page made; Stop cancels the
    stream (DELETE /generate/{request_id}, and the fetch is aborted) and the idle loop returns."""
    page = Page(browser, page_server, "?transport=mjpeg")
    try:
        assert page.state("transport") == "mjpeg"
        page.page.fill("#text", LONG_TEXT)
        page.page.click("#speak")
        page.page.wait_for_function("window.synctalk.streamFrames >= 10", timeout=60000)
        request_id = page.state("requestId")
        generate = page.requested("GET", "/generate?")
        assert len(generate) == 1 and f"request_id={request_id}" in generate[0][1]
        started = time.monotonic()
        page.page.click("#stop")
        page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=5000)
        assert time.monotonic() - started < 2.0 and page.page.is_hidden("#frame-view")
        page.page.wait_for_timeout(500)
        assert [r[1] for r in page.requested("DELETE", "/generate/")] == [f"/generate/{request_id}"]
        frames = page.state("streamFrames")
        page.page.wait_for_timeout(1000)
        assert page.state("streamFrames") == frames  # nothing more is drawn
        page.page.click("#tab-upload")
        page.page.set_input_files("#file", str(mic_wav[0]))
        page.page.click("#play")
        page.page.wait_for_function("window.synctalk.streamFrames >= 25", timeout=60000)
        page.shot(artifacts_dir, "mjpeg_upload_playing")
        uploads = page.requested("POST", "/generate-from-audio?")
        assert len(uploads) == 1 and f"request_id={page.state('requestId')}" in uploads[0][1]
        duration = len(mic_wav[1]) / 16000
        page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=int((duration + 30) * 1000))
        assert page.state("streamFrames") >= int(duration * 25) - 2
        assert not page.requested("POST", "/webrtc/offer")
        # (a server without DELETE /generate/{id} answers 404/405: the page ignores it)
        assert all("status of 404" in e or "status of 405" in e for e in page.errors), page.errors
    finally:
        page.close()


def test_debug_panel_toggles_server_settings(page, page_server, artifacts_dir):
    def server_flag(name: str) -> bool:
        return httpx.get(page_server.url + "/debug/status", timeout=5).json()[name]

    assert server_flag("save_frames") is False
    page.page.click("#debug summary")
    page.page.wait_for_function("document.getElementById('dbg-status').textContent.includes('save_frames')")
    page.page.check("#dbg-save_frames")
    page.page.wait_for_function("JSON.parse(document.getElementById('dbg-status').textContent).save_frames === true")
    assert server_flag("save_frames") is True
    page.shot(artifacts_dir, "debug_panel")
    page.page.uncheck("#dbg-save_frames")
    page.page.wait_for_function("JSON.parse(document.getElementById('dbg-status').textContent).save_frames === false")
    assert server_flag("save_frames") is False
    assert page.errors == []


@pytest.fixture
def ws_page(browser, page_server):
    """The page with the fallbacks forced: the live mic goes over /ws/live."""
    p = Page(browser, page_server, "?transport=mjpeg")
    yield p
    p.close()


def test_live_mic_mouth_moves_with_speech_and_rests_in_silence(ws_page, fixture_avatar, mic_wav, artifacts_dir):
    """The WebSocket fallback. Fake microphone = the speech WAV (looped). Frames are matched to the audio the
    page sent: a frame received at t shows the audio captured at t - latency. A frame is judged "silence" when
    no 20 ms chunk within 0.4 s of its audio is above -45 dBFS, "speech" when at least half of those within
    0.25 s are; frames in between (boundaries) are not judged."""
    page = ws_page
    sent: list[tuple[float, bytes]] = []
    received: list[tuple[float, bytes]] = []
    texts: list[str] = []

    def on_socket(ws):
        def on_sent(payload):
            if isinstance(payload, bytes):
                sent.append((time.monotonic(), payload))

        def on_received(payload):
            if isinstance(payload, bytes):
                received.append((time.monotonic(), payload))
            else:
                texts.append(payload)
        ws.on("framesent", on_sent)
        ws.on("framereceived", on_received)

    page.page.on("websocket", on_socket)
    page.page.click("#tab-live")
    page.page.click("#mic-start")
    page.page.wait_for_function("window.synctalk.ready !== null", timeout=30000)
    duration = len(mic_wav[1]) / 16000
    page.page.wait_for_timeout(2500)
    page.shot(artifacts_dir, "live_mic")
    page.page.wait_for_timeout(int((duration + 1.0) * 1000) - 2500)
    assert page.state("liveTransport") == "websocket"
    page.page.click("#mic-stop")
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=15000)
    latency = page.state("ready")["latency_ms"] / 1000
    assert len(received) > 25 * duration * 0.5, len(received)
    assert sent, "the page sent no audio"

    # audio envelope on the capture timeline: each 20 ms chunk was captured just before it was sent
    chunk_t = np.array([t for t, _ in sent])
    levels = np.array([np.sqrt(np.mean((np.frombuffer(p, "<i2") / 32768.0) ** 2)) for _, p in sent])
    loud = 20 * np.log10(np.maximum(levels, 1e-10)) > -45

    def audio_state(t: float) -> str | None:
        near = np.abs(chunk_t - t) <= 0.4
        if near.sum() < 20:
            return None  # before the first or after the last chunk
        if not loud[near].any():
            return "silence"
        if loud[np.abs(chunk_t - t) <= 0.25].mean() >= 0.5:
            return "speech"
        return None  # a boundary

    meter = MouthMeter(fixture_avatar.dataset_dir, page.state("ready")["idle_frames"], 350)
    speech_d, silence_d, speech_change, silence_change = [], [], [], []
    prev = None
    for t, jpeg in received:
        d = meter.distance(jpeg)
        region = meter.crop(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)).astype(np.float32)
        change = float(np.abs(region - prev).mean()) if prev is not None else None
        prev = region
        state = audio_state(t - latency)
        if state == "speech":
            speech_d.append(d)
            if change is not None:
                speech_change.append(change)
        elif state == "silence":
            silence_d.append(d)
            if change is not None:
                silence_change.append(change)
    print(f"live: {len(received)} frames; mouth distance from idle: speech median {np.median(speech_d):.2f} "
          f"(n={len(speech_d)}), silence p90 {np.percentile(silence_d, 90):.2f} (n={len(silence_d)}); "
          f"frame-to-frame change: speech {np.mean(speech_change):.2f}, silence {np.mean(silence_change):.2f}")
    assert len(speech_d) >= 10 and len(silence_d) >= 25  # (speech frames are dropped when rendering lags)
    assert np.percentile(silence_d, 90) < 3.0  # silences show the idle loop: the recorded, still mouth
    assert np.median(speech_d) > 2 * np.percentile(silence_d, 90) + 1.0  # speech shows a generated mouth
    assert np.mean(speech_change) > 1.5 * np.mean(silence_change)  # and it moves
    assert any('"speaking"' in m for m in texts) and any('"idle"' in m for m in texts)
    assert page.errors == []


def test_live_mic_over_webrtc_mouth_moves_with_speech_and_rests_in_silence(page, meter, mic_wav, artifacts_dir):
    """The microphone as the audio track of a mode "mic" session. The page's canvas is sampled every 100 ms
    and each sample judged by the session's `speaking` / `idle` events (from 0.3 s after `speaking` to 0.5 s
    before `idle`: speech; from 0.3 s after `idle` to the next `speaking`: silence). Speech shows a generated,
    moving mouth, silence the idle loop; and the speech stretches start at the WAV's onsets: the gaps between
    the starts that follow a silence are gaps between the (looped) WAV's onsets."""
    page.page.click("#tab-live")
    page.page.click("#mic-start")
    page.page.wait_for_function("window.synctalk.ready !== null", timeout=30000)
    assert page.state("liveTransport") == "webrtc" and page.state("ready.mode") == "mic"
    page.page.wait_for_function("window.synctalk.liveFrames > 0", timeout=30000)
    duration = len(mic_wav[1]) / 16000
    samples: list[tuple[float, np.ndarray]] = []
    end = time.monotonic() + 1.5 * duration
    while time.monotonic() < end:
        t, region = page.mouth(meter)
        if region is not None:
            samples.append((t, region))
        if len(samples) == 25:
            page.shot(artifacts_dir, "live_mic_webrtc")
        page.page.wait_for_timeout(40)
    assert page.video_playing()
    page.page.click("#mic-stop")
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=15000)
    events = [e for e in page.state("liveEvents") if e["type"] in ("speaking", "idle")]
    marks = [(e["t"] / 1000, e["type"]) for e in events]
    ready_t = next(e["t"] for e in page.state("liveEvents") if e["type"] == "ready") / 1000

    def judged(t: float) -> str | None:
        before = [(mt, kind) for mt, kind in marks if mt <= t]
        after = [(mt, kind) for mt, kind in marks if mt > t]
        if not before:
            return "silence" if t > ready_t + 0.5 and (not after or after[0][0] - t > 0.1) else None
        mt, kind = before[-1]
        if kind == "speaking":
            return "speech" if t - mt > 0.3 and (not after or after[0][0] - t > 0.5) else None
        return "silence" if t - mt > 0.3 and (not after or after[0][0] - t > 0.1) else None

    speech, silence = [], []
    for (t, region), (_, prev) in zip(samples[1:], samples, strict=False):
        state = judged(t)
        if state is not None:
            (speech if state == "speech" else silence).append((mouth_distance(meter, region),
                                                               float(np.abs(region - prev).mean())))
    sp, si = np.array(speech), np.array(silence)
    print(f"live webrtc: {len(samples)} samples; mouth distance from idle: speech median {np.median(sp[:, 0]):.2f} "
          f"(n={len(sp)}), silence p90 {np.percentile(si[:, 0], 90):.2f} (n={len(si)}); change: speech "
          f"{sp[:, 1].mean():.2f}, silence {si[:, 1].mean():.2f}")
    assert len(sp) >= 15 and len(si) >= 30
    assert np.percentile(si[:, 0], 90) < 3.5  # silences show the idle loop: the recorded, still mouth
    assert np.median(sp[:, 0]) > 2 * np.percentile(si[:, 0], 90) + 1.0  # speech shows a generated mouth
    assert sp[:, 1].mean() > 1.5 * si[:, 1].mean()  # and it moves
    # the stretches that start after a silence of 1 s start at the WAV's onsets
    starts = [mt for (mt, kind), prev in zip(marks, [(ready_t, "idle"), *marks], strict=False)
              if kind == "speaking" and prev[1] == "idle" and mt - prev[0] > 1.0]
    wav_onsets = onsets(mic_wav[1], min_silence_s=1.0)
    gaps = [b - a for a, b in zip(wav_onsets, wav_onsets[1:], strict=False)]
    gaps.append(duration - wav_onsets[-1] + wav_onsets[0])  # (the fake microphone loops the file)
    assert len(starts) >= 2
    for a, b in zip(starts, starts[1:], strict=False):
        assert min(abs((b - a) - g) for g in gaps) < 0.25, (starts, gaps)
    assert page.errors == []


# ---------------------------------------------------------------------------------------------
# The bundled demo avatar (a real person) as `make run` serves it


def frame_of(page: Page, element: str) -> np.ndarray | None:
    """The whole picture an element shows now (canvas or <img>), BGR; None while it shows nothing."""
    url = page.page.evaluate("""(id) => { const el = document.getElementById(id);
        const w = el.tagName === 'CANVAS' ? el.width : el.naturalWidth;
        const h = el.tagName === 'CANVAS' ? el.height : el.naturalHeight;
        if (!w || !h) return null;
        const c = document.createElement('canvas'); c.width = w; c.height = h;
        c.getContext('2d').drawImage(el, 0, 0); return c.toDataURL('image/png'); }""", element)
    if not url:
        return None
    data = np.frombuffer(base64.b64decode(url.split(",", 1)[1]), np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)


DEMO_CLOSED = 0.03  # mouth opening (inner-lip gap / eye-corner distance) of a closed mouth, at most


def test_demo_avatar_mouth_opens_while_speaking_and_is_closed_when_idle(browser, default_server, artifacts_dir):  # noqa: F811
    """The page on the default server (the bundled real-person avatar): while a text is spoken the received
    frames show an open mouth in a good share of frames; the idle loop shows it closed."""
    from types import SimpleNamespace

    page = Page(browser, SimpleNamespace(url=default_server))
    try:
        assert "GRID" in page.page.inner_text("#attribution")  # the real person's credit line is shown
        idle = []
        for _ in range(12):
            idle.append(frame_of(page, "idle-view"))
            page.page.wait_for_timeout(90)
        page.shot(artifacts_dir, "demo_idle")
        page.page.fill("#text", "Hello! I am the demo avatar. Watch my mouth open wide while I talk to you.")
        page.page.click("#speak")
        page.page.wait_for_function("window.synctalk.mode === 'speaking'", timeout=60000)
        page.page.wait_for_function("window.synctalk.streamFrames >= 10", timeout=30000)
        speech = []
        while page.state("mode") == "speaking" and len(speech) < 60:
            speech.append(frame_of(page, "frame-view"))
            if len(speech) == 20:
                page.shot(artifacts_dir, "demo_speaking")
            page.page.wait_for_timeout(70)
        assert page.errors == []
    finally:
        page.close()
    idle_open = mouth_openings([f for f in idle if f is not None])
    speech_open = mouth_openings([f for f in speech if f is not None])
    print(f"demo: idle opening median {np.nanmedian(idle_open):.3f} p90 {np.nanpercentile(idle_open, 90):.3f}; "
          f"speech median {np.nanmedian(speech_open):.3f} p75 {np.nanpercentile(speech_open, 75):.3f} over "
          f"{len(speech_open)} frames")
    assert np.isfinite(idle_open).mean() > 0.9 and np.isfinite(speech_open).mean() > 0.9  # a face is found
    # the real speaker's open mouth reaches about 0.1 and his closed one stays under 0.02; the shipped model
    # opens less (see demo_avatar/README.md), so the test asks for a closed idle and a clearly wider mouth
    # while speaking than when idle
    assert np.nanmedian(idle_open) <= DEMO_CLOSED, idle_open  # closed when idle
    assert np.nanmedian(speech_open) > 1.5 * np.nanmedian(idle_open), speech_open  # opens while speaking
    assert np.nanpercentile(speech_open, 75) > np.nanpercentile(idle_open, 90), speech_open
