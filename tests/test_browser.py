"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright's Python package; no
browser is ever downloaded), against a real server process with the fixture avatar under two names.

Chromium's fake microphone plays a speech WAV with long silences; the live test checks that the frames
coming back over /ws/live show a generated mouth (the mouth region leaves the idle loop's) while the WAV
speaks and the still idle loop during its silences. Screenshots go to test-artifacts/browser_*.png."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from test_live import MouthMeter, ServerProcess, speech_clip

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.browser

if not CHROMIUM.exists() and shutil.which("chromium") is None:
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")

MIC_PARTS: list = [1.5, "Hello there, how are you doing today?", 2.5, "I am fine, thank you very much.", 2.5]


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> tuple[Path, np.ndarray]:
    from synctalk.audio import write_wav

    audio = speech_clip(MIC_PARTS)
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    write_wav(path, audio, 16000)
    return path, audio


@pytest.fixture(scope="module")
def page_server(fixture_avatar, tmp_path_factory):
    with ServerProcess(fixture_avatar, tmp_path_factory.mktemp("browser_server"), names=("synth", "synth2")) as srv:
        yield srv


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
    """A fresh page on the server, recording console errors and uncaught exceptions."""

    def __init__(self, browser, server):
        self.context = browser.new_context(viewport={"width": 1200, "height": 800})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(f"console.error: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.goto(server.url + "/")
        self.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)

    def state(self, key: str):
        return self.page.evaluate(f"window.synctalk.{key}")

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


def test_page_loads_without_console_errors(page, page_server, artifacts_dir):
    assert page.page.title() == "SyncTalk 2D"
    page.page.wait_for_function("document.getElementById('voice').options.length > 1")
    # two avatars on the server: the picker is shown and switches the idle stream
    assert page.page.is_visible("#avatar-picker")
    assert page.page.eval_on_selector_all("#avatar option", "os => os.map(o => o.value)") == ["synth", "synth2"]
    page.page.select_option("#avatar", "synth2")
    page.page.wait_for_function("document.getElementById('idle-view').src.includes('avatar=synth2')")
    page.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
    page.page.select_option("#avatar", "synth")
    page.page.wait_for_timeout(500)
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
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=30000)
    page.page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
    assert page.page.is_hidden("#frame-view")
    page.shot(artifacts_dir, "text_done")
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


def test_upload_plays(page, mic_wav, artifacts_dir):
    page.page.click("#tab-upload")
    page.page.set_input_files("#file", str(mic_wav[0]))
    page.page.click("#play")
    page.page.wait_for_function("window.synctalk.streamFrames >= 25", timeout=60000)
    page.shot(artifacts_dir, "upload_playing")
    duration = len(mic_wav[1]) / 16000
    page.page.wait_for_function("window.synctalk.mode === 'idle'", timeout=int((duration + 30) * 1000))
    assert page.state("streamFrames") >= int(duration * 25) - 2
    assert page.errors == []


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


def test_live_mic_mouth_moves_with_speech_and_rests_in_silence(page, fixture_avatar, mic_wav, artifacts_dir):
    """Fake microphone = the speech WAV (looped). Frames are matched to the audio the page sent: a frame
    received at t shows the audio captured at t - latency. A frame is judged "silence" when no 20 ms chunk
    within 0.4 s of its audio is above -45 dBFS, "speech" when at least half of those within 0.25 s are;
    frames in between (boundaries) are not judged."""
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
