"""WebRTC sessions (`services/webrtc.py`) against a real server process (`api.py` on a free port, the fixture
avatar) driven by a Python aiortc client: the received audio and video of an utterance (frame count, lip
sync measured on the received media), interruption timing at the receiver, queueing and data-channel
commands, uploads, sentence-streamed TTS, the 4xx answers and the clean-up of a client that vanishes;
plus unit tests of the sentence splitter.

Received media are placed on the session's media clock by their RTP timestamps: the server starts both
tracks at the same instant (video frame 0, audio sample 0), and the receiver's pts count from the first
packet of each track, so video frame k = pts / 3600 and audio sample s (48 kHz Opus) = pts."""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import soundfile as sf
from aiortc import RTCPeerConnection, RTCSessionDescription
from test_api import speech_like
from test_live import IDLE_SECONDS, ServerProcess, mouth_box

from synctalk.text import split_sentences

FPS = 25
OPUS_RATE = 48000
SENTENCE = "The quick brown fox jumps over the lazy dog and then it runs far away."
LONG_TEXT = " ".join([
    "Conversation grade streaming means the avatar starts talking almost as soon as it is asked to.",
    "The first sentence is synthesised on its own, so its audio can start the stream at once.",
    "While it plays, the next sentences are synthesised behind it, one after the other, and queued.",
    "Long sentences without a full stop, like this one which goes on and on with commas, clauses and more "
    "clauses that nobody would ever say in one breath, are cut at clause boundaries instead.",
    "A very long run of words without any punctuation at all is cut at word boundaries so that no single "
    "piece of text ever takes the speech engine too long to say and the stream never stalls for it.",
    "That is how the first audio arrives quickly even for a text of a thousand characters like this one.",
    "And this is the final sentence of the long text used by the test.",
])


# ----------------------------------------------------------------------------------------------
# Sentence splitting (no server)


def test_sentences_are_split_at_sentence_marks_but_not_abbreviations():
    text = "Hello there. How are you today?  Dr. Smith is fine!\nNew line without a mark"
    assert split_sentences(text) == ["Hello there.", "How are you today?", "Dr. Smith is fine!",
                                     "New line without a mark"]
    assert split_sentences("   ") == []


def test_long_sentences_are_cut_at_clauses_then_words_and_give_the_text_back():
    clauses = ("This sentence has a first clause, then a second clause that is rather long; and then a third "
               "one: which goes on, and on, until it is far longer than the limit of one piece of text.")
    pieces = split_sentences(clauses, max_chars=60, first_chars=60)
    assert len(pieces) > 2 and all(len(p) <= 60 for p in pieces)
    assert all(p[-1] in ",;:." for p in pieces)  # every cut is at a clause boundary
    assert " ".join(pieces) == clauses
    words = " ".join(f"word{i}" for i in range(200))  # no punctuation at all
    pieces = split_sentences(words, max_chars=50, first_chars=20)
    assert len(pieces[0]) <= 20 and all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == words


def test_the_first_piece_is_short_so_speech_starts_early():
    pieces = split_sentences(LONG_TEXT)
    assert len(pieces[0]) <= 90 and len(pieces) >= 7
    assert " ".join(pieces) == " ".join(LONG_TEXT.split())


# ----------------------------------------------------------------------------------------------
# aiortc client


@dataclass
class Received:
    """Everything one client received: mouth regions of video frames, audio and events."""

    video: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # (arrival, frame k, mouth gray)
    audio: list[tuple[float, int, np.ndarray]] = field(default_factory=list)  # (arrival, pts @48 kHz, mono)
    events: list[tuple[float, dict]] = field(default_factory=list)

    def of_type(self, kind: str) -> list[dict]:
        return [e for _, e in self.events if e.get("type") == kind]

    def audio_timeline(self) -> np.ndarray:
        """The received audio placed by pts (48 kHz, sample 0 = media time 0)."""
        end = max(p + len(a) for _, p, a in self.audio)
        out = np.zeros(end, np.float32)
        for _, p, a in self.audio:
            out[p:p + len(a)] = a
        return out

    def envelope(self) -> np.ndarray:
        """RMS of the received audio per 40 ms video frame."""
        tl = self.audio_timeline()
        per = OPUS_RATE // FPS
        n = len(tl) // per
        return np.sqrt((tl[: n * per].reshape(n, per).astype(np.float64) ** 2).mean(axis=1))


class Peer:
    """One session seen from an aiortc client: recvonly video and audio, a data channel `events`."""

    def __init__(self, url: str, box: tuple[int, int, int, int]):
        self.url = url
        self.box = box
        self.pc = RTCPeerConnection()
        self.got = Received()
        self.session_id = ""
        self.http = httpx.AsyncClient(base_url=url, timeout=120)
        self._tasks: list[asyncio.Task] = []

    async def open(self, **fields) -> None:
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        self.channel = self.pc.createDataChannel("events")
        self.channel.on("message", lambda m: self.got.events.append((time.monotonic(), json.loads(m))))
        self.pc.on("track", lambda track: self._tasks.append(asyncio.ensure_future(self._pull(track))))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        r = await self.http.post("/webrtc/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer",
                                                        **fields})
        assert r.status_code == 200, r.text
        body = r.json()
        self.session_id = body["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        await self.wait_for(lambda: self.got.of_type("ready") and len(self.got.video) >= 5, 30)

    async def _pull(self, track) -> None:
        x1, y1, x2, y2 = self.box
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                if track.kind == "video":
                    assert frame.pts % 3600 == 0
                    bgr = frame.to_ndarray(format="bgr24")
                    mouth = cv2.cvtColor(np.ascontiguousarray(bgr[y1:y2, x1:x2]), cv2.COLOR_BGR2GRAY)
                    self.got.video.append((now, frame.pts // 3600, mouth.astype(np.float32)))
                else:
                    assert frame.sample_rate == OPUS_RATE
                    pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels)).mean(axis=1) / 32768.0
                    self.got.audio.append((now, frame.pts, pcm.astype(np.float32)))
        except Exception:  # MediaStreamError: the track ended
            return

    async def wait_for(self, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out; events: {[e for _, e in self.got.events]}"
            await asyncio.sleep(0.02)

    async def post(self, path: str, **kwargs) -> httpx.Response:
        return await self.http.post(f"/sessions/{self.session_id}{path}", **kwargs)

    async def close(self) -> None:
        await self.http.delete(f"/sessions/{self.session_id}")
        await self.http.aclose()
        await self.pc.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 240))


def lag_of_best_correlation(mouth: dict[int, float], envelope: np.ndarray, frames: range, max_lag: int = 6) -> int:
    """The lag L (frames) maximising corr(mouth[k], envelope[k + L]) over `frames`."""
    scores = {}
    for lag in range(-max_lag, max_lag + 1):
        ks = [k for k in frames if k in mouth and 0 <= k + lag < len(envelope)]
        scores[lag] = np.corrcoef([mouth[k] for k in ks], [envelope[k + lag] for k in ks])[0, 1]
    return max(scores, key=scores.get)


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server(fixture_avatar, tmp_path_factory):
    with ServerProcess(fixture_avatar, tmp_path_factory.mktemp("webrtc_server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def box(fixture_avatar) -> tuple[int, int, int, int]:
    """The mouth region of the fixture avatar's frames (from its landmarks)."""
    return mouth_box(Path(fixture_avatar.dataset_dir), range(0, 300, 5))


@pytest.fixture(scope="module")
def idle_refs(fixture_avatar, box) -> np.ndarray:
    """Mouth regions (gray) of the idle loop's source frames."""
    x1, y1, x2, y2 = box
    count = int(round(IDLE_SECONDS * FPS))
    frames = [cv2.imread(str(Path(fixture_avatar.dataset_dir) / "full_body_img" / f"{i}.jpg")) for i in range(count)]
    return np.stack([cv2.cvtColor(f[y1:y2, x1:x2], cv2.COLOR_BGR2GRAY) for f in frames]).astype(np.float32)


def idle_distance(mouth: np.ndarray, refs: np.ndarray) -> float:
    """How far a mouth region is from the idle loop (0 + codec noise for idle frames)."""
    return float(np.abs(refs - mouth[None]).mean(axis=(1, 2)).min())


# ----------------------------------------------------------------------------------------------
# Media


def test_spoken_sentence_arrives_complete_with_its_audio(server, box, idle_refs):
    async def scenario() -> tuple[Received, float]:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            r = await peer.post("/speak", json={"text": SENTENCE})
            assert r.status_code == 200, r.text
            assert r.json()["queued"] is False and r.json()["sentences"] == 1
            await peer.wait_for(lambda: peer.got.of_type("speech_ended"), 60)
            await asyncio.sleep(0.5)
            wav = await peer.http.get("/get-tts-audio", params={"text": SENTENCE})  # the same (cached) speech
            audio, sr = sf.read(io.BytesIO(wav.content))
            return peer.got, len(audio) / sr
        finally:
            await peer.close()

    got, duration = run(scenario())
    started, ended = got.of_type("speech_started")[0], got.of_type("speech_ended")[0]
    k0, k1 = started["frame"], ended["frame"]
    ks = [k for _, k, _ in got.video]
    assert ks[0] == 0 and ks == sorted(ks)  # the receiver's clock starts with the server's frame 0
    speech_ks = [k for k in ks if k0 <= k < k1]
    # every speech frame arrived, and there are 25 x the audio duration of them
    assert len(speech_ks) == k1 - k0, f"{k1 - k0 - len(speech_ks)} speech frames missing"
    assert abs(len(speech_ks) - FPS * duration) <= 1, (len(speech_ks), duration)
    assert abs(ended["duration"] - duration) <= 1 / FPS
    # the received audio is speech exactly during those frames: silent before, loud inside, silent after
    env = got.envelope()
    assert env[:k0].max() < 1e-3 and env[k1 + 1: k1 + 10].max() < 1e-3
    assert env[k0:k1].max() > 0.05
    # the mouth is generated exactly while the received audio is speech
    mouth = {k: idle_distance(m, idle_refs) for _, k, m in got.video}
    speech_level = np.median([mouth[k] for k in range(k0, k1)])
    assert max(mouth[k] for k in range(k0 - 10, k0)) < speech_level / 2


def tone_burst(seconds: float, sr: int = 22050) -> np.ndarray:
    """A harmonic tone at constant loudness with 10 ms ramps: every 40 ms frame of it is equally loud."""
    t = np.arange(int(seconds * sr)) / sr
    tone = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6)) * 0.15
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)
    return (tone * ramp).astype(np.float32)


def test_lips_and_voice_are_in_sync_at_the_receiver(server, box, idle_refs):
    """Bursts of sound of different lengths with the idle loop between them: the mouth measure (distance of
    the received mouth region from the idle loop) and the received audio envelope are two pulse trains;
    the lag that maximises their correlation is the A/V offset the receiver sees."""
    bursts = [(0.52, 0.9), (0.84, 0.6), (0.36, 1.1), (0.68, 0.7)]  # (sound s, idle gap s)

    async def scenario() -> Received:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            for n, (sound, gap) in enumerate(bursts):
                buf = io.BytesIO()
                sf.write(buf, tone_burst(sound), 22050, format="WAV", subtype="PCM_16")
                r = await peer.post("/speak", files={"audio_file": ("burst.wav", buf.getvalue())})
                assert r.status_code == 200, r.text
                await peer.wait_for(lambda n=n: len(peer.got.of_type("speech_ended")) > n, 60)
                await asyncio.sleep(gap)
            return peer.got
        finally:
            await peer.close()

    got = run(scenario())
    starts = [e["frame"] for e in got.of_type("speech_started")]
    ends = [e["frame"] for e in got.of_type("speech_ended")]
    for (sound, _), k0, k1 in zip(bursts, starts, ends, strict=True):
        assert abs((k1 - k0) - FPS * sound) <= 1
    env = got.envelope()
    mouth = {k: idle_distance(m, idle_refs) for _, k, m in got.video}
    frames = range(starts[0] - 10, ends[-1] + 10)
    assert sum(k in mouth for k in frames) >= len(frames) - 2  # (almost) every frame arrived
    lag = lag_of_best_correlation(mouth, env, frames)
    assert abs(lag) <= 1, f"mouth and voice are {lag} frames apart at the receiver"


def test_interrupt_silences_audio_and_returns_to_idle_within_200_ms(server, box, idle_refs):
    async def scenario() -> tuple[Received, float, dict]:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            assert (await peer.post("/speak", json={"text": LONG_TEXT})).status_code == 200
            await peer.wait_for(lambda: peer.got.of_type("speech_started"), 60)
            await asyncio.sleep(1.0)
            t_request = time.monotonic()
            r = await peer.post("/interrupt")
            await asyncio.sleep(1.0)
            status = (await peer.http.get(f"/sessions/{peer.session_id}")).json()
            return peer.got, t_request, {"response": r.json(), "code": r.status_code, "status": status}
        finally:
            await peer.close()

    got, t_request, info = run(scenario())
    assert info["code"] == 200 and info["response"]["interrupted"] is True
    assert info["status"]["speaking"] is False and info["status"]["queued"] == 0
    cut = got.of_type("interrupted")[0]
    assert cut["position"] == pytest.approx(1.0, abs=0.3), got.events
    assert not got.of_type("speech_ended")  # an interrupted utterance does not also "end"
    # audio: the last received packet with sound arrives within 200 ms of the request
    loud = [t for t, _, a in got.audio if t > t_request and np.sqrt(np.mean(a ** 2)) > 1e-3]
    assert loud and max(loud) - t_request < 0.2, f"audio went on for {max(loud) - t_request:.3f} s"
    # video: cross-fade frames, then idle-loop frames, the first of them within 200 ms of the request
    after = [(t, k, idle_distance(m, idle_refs)) for t, k, m in got.video if k >= cut["frame"]]
    speech_level = np.median([idle_distance(m, idle_refs) for _, k, m in got.video
                              if cut["frame"] - 20 <= k < cut["frame"]])
    idle_level = np.median([d for _, _, d in after[10:]])
    assert speech_level > 2 * idle_level  # the measure tells speech frames from idle ones
    midpoint = (speech_level + idle_level) / 2
    first_idle = next(after[i][0] for i in range(len(after)) if all(d < midpoint for _, _, d in after[i:i + 10]))
    assert first_idle - t_request < 0.2, f"video back to idle after {first_idle - t_request:.3f} s"
    # no frozen frame and no jump: consecutive frames keep changing a little, never a lot
    mouths = [m for _, k, m in got.video if cut["frame"] - 3 <= k < cut["frame"] + 8]
    steps = [float(np.abs(a - b).mean()) for a, b in zip(mouths, mouths[1:], strict=False)]
    assert max(steps) < 3 * max(speech_level, 1.0), steps


def test_speech_queues_by_default_and_replaces_with_interrupt_over_the_data_channel(server, box):
    async def scenario() -> Received:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            peer.channel.send(json.dumps({"type": "speak", "text": "First we say this."}))
            peer.channel.send(json.dumps({"type": "speak", "text": "Then we say that."}))
            await peer.wait_for(lambda: len(peer.got.of_type("speech_ended")) == 2, 60)
            peer.channel.send(json.dumps({"type": "speak", "text": LONG_TEXT}))
            await peer.wait_for(lambda: len(peer.got.of_type("speech_started")) == 3, 60)
            await asyncio.sleep(0.5)
            peer.channel.send(json.dumps({"type": "speak", "text": "Stop, I say this instead.", "interrupt": True}))
            await peer.wait_for(lambda: len(peer.got.of_type("speech_ended")) == 3, 60)
            peer.channel.send(json.dumps({"type": "dance"}))
            peer.channel.send("not json")
            await peer.wait_for(lambda: len(peer.got.of_type("error")) == 2, 10)
            return peer.got
        finally:
            await peer.close()

    got = run(scenario())
    queued = got.of_type("queued")
    assert [q["queued"] for q in queued] == [False, True, False, False]  # the last one replaced, not queued
    started, ended = got.of_type("speech_started"), got.of_type("speech_ended")
    ids = [q["utterance_id"] for q in queued]
    assert [e["utterance_id"] for e in started] == ids
    assert [e["utterance_id"] for e in ended] == [ids[0], ids[1], ids[3]]
    assert started[1]["frame"] == ended[0]["frame"]  # the queued one follows without a gap
    assert got.of_type("interrupted")[0]["utterance_id"] == ids[2]
    assert {e["error"] for e in got.of_type("error")} == {"unknown_type", "bad_message"}


def test_uploaded_audio_is_spoken(server, box):
    buf = io.BytesIO()
    sf.write(buf, speech_like(1.6, 22050), 22050, format="WAV", subtype="PCM_16")

    async def scenario() -> tuple[Received, dict]:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            r = await peer.post("/speak", files={"audio_file": ("clip.wav", buf.getvalue())})
            assert r.status_code == 200, r.text
            await peer.wait_for(lambda: peer.got.of_type("speech_ended"), 60)
            bad = await peer.post("/speak", files={"audio_file": ("clip.txt", b"hello")})
            return peer.got, {"code": bad.status_code, "body": bad.json()}
        finally:
            await peer.close()

    got, bad = run(scenario())
    ended = got.of_type("speech_ended")[0]
    assert ended["duration"] == pytest.approx(1.6, abs=1 / FPS)
    assert bad["code"] == 415 and bad["body"]["error"] == "unsupported_format"


def test_first_sentence_starts_before_the_whole_text_could_be_synthesised(server, box):
    text = LONG_TEXT.replace("test.", "check.")  # not in the TTS cache yet

    async def scenario() -> tuple[float, float]:
        peer = Peer(server.url, box)
        try:
            await peer.open()
            t0 = time.monotonic()
            r = await peer.post("/speak", json={"text": text})
            assert r.json()["sentences"] >= 7
            await peer.wait_for(lambda: peer.got.of_type("speech_started"), 60)
            first = next(t for t, e in peer.got.events if e["type"] == "speech_started") - t0
            await peer.post("/interrupt")
            t1 = time.monotonic()
            assert (await peer.http.get("/get-tts-audio", params={"text": text})).status_code == 200
            return first, time.monotonic() - t1
        finally:
            await peer.close()

    first, whole = run(scenario())
    assert first < whole / 2, f"first speech after {first:.2f} s; synthesising the whole text takes {whole:.2f} s"


# ----------------------------------------------------------------------------------------------
# Errors and clean-up


def test_bad_requests_get_clear_4xx_errors(server, box):
    def check(r: httpx.Response, status: int, code: str) -> None:
        assert r.status_code == status, r.text
        assert r.json()["error"] == code and r.json()["detail"]

    with httpx.Client(base_url=server.url, timeout=60) as c:
        check(c.post("/webrtc/offer", json={"sdp": "hello", "type": "offer"}), 400, "bad_sdp")
        check(c.post("/webrtc/offer", json={"sdp": "v=0\r\nm=video 9 nonsense\r\n", "type": "offer"}), 400, "bad_sdp")
        check(c.post("/webrtc/offer", json={"sdp": "v=0\r\n", "type": "answer"}), 400, "bad_sdp")
        check(c.post("/webrtc/offer", json={"type": "offer"}), 422, "invalid_request")
        check(c.post("/webrtc/offer", json={"sdp": "v=0\r\nm=x\r\n", "avatar": "nobody"}), 404, "unknown_avatar")
        check(c.post("/sessions/nope/speak", json={"text": "hi"}), 404, "unknown_session")
        check(c.post("/sessions/nope/interrupt"), 404, "unknown_session")
        check(c.delete("/sessions/nope"), 404, "unknown_session")
        check(c.get("/sessions/nope"), 404, "unknown_session")

    async def scenario() -> list[tuple[httpx.Response, int, str]]:
        peer = Peer(server.url, box)
        await peer.open()
        out = [(await peer.post("/interrupt"), 409, "nothing_playing"),
               (await peer.post("/speak", json={"text": "   "}), 400, "empty_text"),
               (await peer.post("/speak", json={"text": "x" * 5000}), 400, "text_too_long"),
               (await peer.post("/speak", json={"text": "hi", "voice": "nobody"}), 404, "unknown_voice"),
               (await peer.post("/speak", content=b"{not json", headers={"content-type": "application/json"}),
                422, "invalid_request")]
        await peer.close()
        async with httpx.AsyncClient(base_url=server.url) as c:
            out += [(await c.post(f"/sessions/{peer.session_id}/speak", json={"text": "hi"}), 410, "session_closed"),
                    (await c.post(f"/sessions/{peer.session_id}/interrupt"), 410, "session_closed"),
                    (await c.delete(f"/sessions/{peer.session_id}"), 410, "session_closed")]
        return out

    for response, status, code in run(scenario()):
        check(response, status, code)


VANISHING_CLIENT = textwrap.dedent("""
    import asyncio, sys, httpx
    from aiortc import RTCPeerConnection, RTCSessionDescription

    async def main():
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        pc.on("track", lambda t: asyncio.ensure_future(drain(t)))
        await pc.setLocalDescription(await pc.createOffer())
        body = httpx.post(sys.argv[1] + "/webrtc/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"},
                          timeout=60).json()
        await pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        httpx.post(sys.argv[1] + f"/sessions/{body['session_id']}/speak", json={"text": "I will vanish soon."})
        print(body["session_id"], flush=True)
        await asyncio.sleep(600)

    async def drain(track):
        while True:
            await track.recv()

    asyncio.run(main())
""")


def test_a_client_that_vanishes_is_cleaned_up_within_30_s(server):
    proc = subprocess.Popen([sys.executable, "-c", VANISHING_CLIENT, server.url], stdout=subprocess.PIPE, text=True)
    try:
        session_id = proc.stdout.readline().strip()
        assert session_id, "the client did not connect"
        with httpx.Client(base_url=server.url, timeout=30) as c:
            deadline = time.monotonic() + 20
            while c.get(f"/sessions/{session_id}").json().get("connection") != "connected":
                assert time.monotonic() < deadline, "the client never connected"
                time.sleep(0.1)
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)  # no goodbye: no DTLS close, no DELETE
            proc.wait(10)
            gone = time.monotonic()
            while c.get(f"/sessions/{session_id}").status_code == 200:
                assert time.monotonic() - gone < 30, "the session outlived its client by 30 s"
                time.sleep(0.5)
            assert c.get(f"/sessions/{session_id}").json()["error"] == "session_closed"
            elapsed = time.monotonic() - gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert elapsed < 30
    assert "closed: no report from the peer" in server.log() or "closed: connection" in server.log()


# ----------------------------------------------------------------------------------------------
# The web page (headless Chromium, when installed)


def test_the_page_speaks_over_webrtc_and_stop_interrupts(server):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run", "--autoplay-policy=no-user-gesture-required"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('idle-view').naturalWidth > 0", timeout=30000)
            assert page.evaluate("window.synctalk.transport") == "webrtc"
            page.fill("#text", LONG_TEXT[:400])
            page.click("#speak")
            page.wait_for_function("window.synctalk.mode === 'speaking'", timeout=60000)
            page.wait_for_function("window.synctalk.streamFrames >= 15", timeout=30000)
            assert page.evaluate("window.synctalk.transport") == "webrtc"  # no fallback to MJPEG happened
            assert page.is_visible("#frame-view") and page.is_enabled("#stop")
            started = time.monotonic()
            page.click("#stop")
            page.wait_for_function("window.synctalk.mode === 'idle'", timeout=5000)
            assert time.monotonic() - started < 2.0
            assert page.evaluate("window.synctalk.rtcEvent.type") == "interrupted"
            assert page.is_enabled("#speak") and not page.is_enabled("#stop")
            assert errors == []
        finally:
            browser.close()
