"""WebRTC sessions (`services/webrtc.py`) against a real server process (`api.py` on a free port, the fixture
avatar) driven by a Python aiortc client: the received audio and video of an utterance (frame count, lip
sync measured on the received media), no A/V drift over a minute of speech, interruption timing at the
receiver, queueing and data-channel commands, uploads, sentence-streamed TTS, the live microphone sent as
the client's audio track (mode `mic`), the 4xx answers and the clean-up of a client that vanishes; plus
unit tests of the sentence splitter.

Received media are placed on the session's media clock by their RTP timestamps: the server starts both
tracks at the same instant (video frame 0, audio sample 0), and the receiver's pts count from the first
packet of each track, so video frame k = pts / 3600 and audio sample s (48 kHz Opus) = pts."""
from __future__ import annotations

import asyncio
import io
import json
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
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamTrack
from test_api import speech_like
from test_live import IDLE_SECONDS, ServerProcess, mouth_box, onsets

from synctalk.audio import resample
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


class TimedTrack(MediaStreamTrack):
    """Relays another audio track, noting when each frame leaves: (monotonic time, media time s, seconds)."""

    kind = "audio"

    def __init__(self, inner: MediaStreamTrack):
        super().__init__()
        self.inner = inner
        self.sent: list[tuple[float, float, float]] = []

    async def recv(self):
        frame = await self.inner.recv()
        self.sent.append((time.monotonic(), float(frame.pts * frame.time_base), frame.samples / frame.sample_rate))
        return frame

    def send_time(self, media_s: float) -> float:
        """When the audio of media time `media_s` left (interpolated between frames)."""
        t, m, _ = (np.array(c) for c in zip(*self.sent, strict=True))
        return float(np.interp(media_s, m, t))


class Peer:
    """One session seen from an aiortc client: recvonly video and audio (or, with `mic`, a WAV file sent as
    the microphone track of a mode `mic` session), a data channel `events`."""

    def __init__(self, url: str, box: tuple[int, int, int, int]):
        self.url = url
        self.box = box
        self.pc = RTCPeerConnection()
        self.got = Received()
        self.session_id = ""
        self.http = httpx.AsyncClient(base_url=url, timeout=120)
        self.mic: TimedTrack | None = None
        self._tasks: list[asyncio.Task] = []

    async def open(self, mic: Path | None = None, **fields) -> None:
        self.pc.addTransceiver("video", direction="recvonly")
        if mic is None:
            self.pc.addTransceiver("audio", direction="recvonly")
        else:  # MediaPlayer paces the file in real time, like a microphone
            self.mic = TimedTrack(MediaPlayer(str(mic)).audio)
            self.pc.addTrack(self.mic)
            fields["mode"] = "mic"
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
        if self.mic is not None:
            self.mic.inner.stop()
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


def minute_of_speech(wav: bytes, seconds: float = 60.0) -> tuple[np.ndarray, int]:
    """TTS speech repeated to `seconds`, starting and ending in a loud 40 ms frame (so the first and the last
    speech frame of the utterance are loud), and its rate."""
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    per = sr // FPS
    n = len(audio) // per
    loud = np.flatnonzero(np.sqrt((audio[: n * per].reshape(n, per) ** 2).mean(axis=1)) > 0.05)
    speech = audio[loud[0] * per:(loud[-1] + 1) * per]
    tiled = np.tile(speech, int(np.ceil((seconds + 2) * sr / len(speech))))
    n = len(tiled) // per
    env = np.sqrt((tiled[: n * per].reshape(n, per) ** 2).mean(axis=1))
    end = next(i for i in range(int(seconds * FPS), n) if env[i] > 0.05) + 1
    return tiled[: end * per], sr


def audio_offset_ms(timeline: np.ndarray, reference: np.ndarray, at: int, search: int = OPUS_RATE // 10) -> float:
    """Where `reference` (48 kHz) best matches the received audio `timeline` relative to sample `at`, in ms
    (cross-correlation over +-`search` samples)."""
    lo = max(0, at - search)
    seg = timeline[lo: at + search + len(reference)]
    n = len(seg) + len(reference)
    xc = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(reference, n)), n)[: len(seg) - len(reference) + 1]
    return 1000.0 * (lo + int(np.argmax(xc)) - at) / OPUS_RATE


def skew_seconds(got: Received, frames: range) -> float:
    """How much later the video of `frames` arrived than the audio of the same media time (median of
    arrival minus media time, video minus audio)."""
    video = [t - k / FPS for t, k, _ in got.video if k in frames]
    per = OPUS_RATE // FPS
    audio = [t - p / OPUS_RATE for t, p, _ in got.audio if frames.start * per <= p < frames.stop * per]
    return float(np.median(video) - np.median(audio))


def video_edge(mouth: dict[int, float], step: int) -> tuple[float, int]:
    """Where the received video switches between the idle loop and generated speech near frame `step`: a
    frame within 1 s counts as idle when its mouth is within twice the idle side's median distance of an
    idle-loop frame (that median is the codec's noise, about 2.5 grey levels; a generated mouth, even a
    closed one, is 13 or more away, while open ones are about 25: a midpoint between the two sides' medians
    fell among the closed generated frames). The switch lies between the last frame of the first state and
    the first of the second. Returns (the middle of that interval, its width in frames: 0 when no frame near
    the switch is missing)."""
    frames = [k for k in range(step - FPS, step + FPS) if k in mouth]
    before, after = [mouth[k] for k in frames if k < step], [mouth[k] for k in frames if k >= step]
    assert before and after, f"no frame received on one side of frame {step}"
    idle_after = np.median(after) < np.median(before)
    ceiling = 2 * min(np.median(before), np.median(after))
    second = [(mouth[k] <= ceiling) == idle_after for k in frames]
    assert second == sorted(second), (f"the video switches back and forth near frame {step}: "
                                      f"{[round(mouth[k], 1) for k in frames]}")
    last_first = max(k for k, s in zip(frames, second, strict=True) if not s)
    first_second = min(k for k, s in zip(frames, second, strict=True) if s)
    return (last_first + 1 + first_second) / 2, first_second - last_first - 1


@pytest.mark.slow
def test_lips_and_voice_do_not_drift_over_60_s_of_speech(fixture_avatar, tmp_path_factory, box, idle_refs):
    """A minute of uploaded speech in one session; everything measured on the received media, placed by its
    RTP timestamps (video frame k = pts / 3600, audio by its 48 kHz pts). The uploaded audio is found in the
    received audio by cross-correlation of its first and its last 2 s; the video's switches from the idle
    loop to generated speech and back are found from the mouth region. The lips must be within 40 ms of the
    voice at the start and after the minute, and the arrival-time skew between the tracks (first 10 s vs
    last 10 s) must not move by more than 40 ms. (A server of its own without the cross-fade back to
    idle, so that the end of the speech is a clean switch in the video too.)"""
    async def scenario(url: str) -> tuple[Received, np.ndarray, int]:
        peer = Peer(url, box)
        try:
            await peer.open()
            audio, sr = minute_of_speech((await peer.http.get("/get-tts-audio", params={"text": LONG_TEXT})).content)
            buf = io.BytesIO()
            sf.write(buf, audio, sr, format="WAV", subtype="PCM_16")
            r = await peer.post("/speak", files={"audio_file": ("minute.wav", buf.getvalue())})
            assert r.status_code == 200, r.text
            await peer.wait_for(lambda: peer.got.of_type("speech_ended"), 200)
            await asyncio.sleep(1.5)
            return peer.got, audio, sr
        finally:
            await peer.close()

    with ServerProcess(fixture_avatar, tmp_path_factory.mktemp("drift_server"), idle_blend_frames=0) as srv:
        got, speech, sr = run(scenario(srv.url))
    duration = len(speech) / sr
    k0, k1 = got.of_type("speech_started")[0]["frame"], got.of_type("speech_ended")[0]["frame"]
    assert duration >= 60.0 and abs((k1 - k0) - FPS * duration) <= 1
    # audio: the received track holds the upload from `at` on (+ the codec's delay)
    ref = resample(speech, sr, OPUS_RATE)
    tl, two, per = got.audio_timeline(), 2 * OPUS_RATE, OPUS_RATE // FPS
    at = k0 * per
    audio_start = k0 + audio_offset_ms(tl, ref[:two], at) / 1000 * FPS
    audio_end = k0 + len(ref) / per + audio_offset_ms(tl, ref[-two:], at + len(ref) - two) / 1000 * FPS
    # video: where the mouth leaves the idle loop and returns to it
    mouth = {k: idle_distance(m, idle_refs) for _, k, m in got.video}
    (video_start, gap_start), (video_end, gap_end) = video_edge(mouth, k0), video_edge(mouth, k1)
    lag_start_ms, lag_end_ms = 1000 * (video_start - audio_start) / FPS, 1000 * (video_end - audio_end) / FPS
    window = 10 * FPS
    skew_first, skew_last = skew_seconds(got, range(k0, k0 + window)), skew_seconds(got, range(k1 - window, k1))
    print(f"drift over {duration:.1f} s: video - audio {lag_start_ms:.1f} ms at the start, {lag_end_ms:.1f} ms at "
          f"the end (frames missing at the switches: {gap_start}, {gap_end}); arrival skew video - audio "
          f"{1000 * skew_first:.0f} ms in the first 10 s, {1000 * skew_last:.0f} ms in the last 10 s")
    assert gap_start <= 1 and gap_end <= 1, "frames around the switches were dropped: the lag cannot be measured"
    assert abs(lag_start_ms) <= 40 and abs(lag_end_ms) <= 40, (lag_start_ms, lag_end_ms)
    assert abs(lag_end_ms - lag_start_ms) <= 40
    assert abs(skew_last - skew_first) <= 0.040, (skew_first, skew_last)


def test_interrupt_silences_audio_and_returns_to_idle(server, box, idle_refs):
    """The interrupt stops the sound and brings back the idle loop (within 1 s here, where the text would go on
    for many seconds; the 200 ms target is measured by bench/webrtc.py, `interrupt_last_sound_s`)."""
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
    # audio: sound is still arriving just after the request, and has stopped within 1 s of it
    loud = [t for t, _, a in got.audio if t > t_request and np.sqrt(np.mean(a ** 2)) > 1e-3]
    assert loud and max(loud) - t_request < 1.0, f"audio went on for {max(loud) - t_request:.3f} s"
    # video: cross-fade frames, then idle-loop frames, the first of them within 1 s of the request
    after = [(t, k, idle_distance(m, idle_refs)) for t, k, m in got.video if k >= cut["frame"]]
    speech_level = np.median([idle_distance(m, idle_refs) for _, k, m in got.video
                              if cut["frame"] - 20 <= k < cut["frame"]])
    idle_level = np.median([d for _, _, d in after[10:]])
    assert speech_level > 2 * idle_level  # the measure tells speech frames from idle ones
    midpoint = (speech_level + idle_level) / 2
    first_idle = next(after[i][0] for i in range(len(after)) if all(d < midpoint for _, _, d in after[i:i + 10]))
    assert first_idle - t_request < 1.0, f"video back to idle after {first_idle - t_request:.3f} s"
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


def wav_state(audio: np.ndarray, at: float) -> str | None:
    """Speech, silence or None (a boundary) at time `at` of a 16 kHz clip: silence when no 20 ms chunk within
    0.4 s is above -45 dBFS, speech when at least half of those within 0.25 s are."""
    per = 320
    n = len(audio) // per
    loud = 20 * np.log10(np.maximum(np.sqrt((audio[: n * per].reshape(n, per) ** 2).mean(axis=1)), 1e-10)) > -45
    t = (np.arange(n) + 0.5) * per / 16000
    near = np.abs(t - at) <= 0.4
    if near.sum() < 20:
        return None
    if not loud[near].any():
        return "silence"
    return "speech" if loud[np.abs(t - at) <= 0.25].mean() >= 0.5 else None


def test_microphone_track_moves_the_mouth_in_speech_and_rests_in_silence(server, box, idle_refs, mic_wav):
    """Mode `mic`: the client sends a WAV as its audio track (aiortc MediaPlayer, paced like a microphone).
    A received frame shows the audio sent `latency` before it arrived: frames of speech must show a generated,
    moving mouth, frames of silence the idle loop. The latency from a speech onset leaving the client to the
    `speaking` event is the announced one plus transport."""
    path, audio = mic_wav
    duration = len(audio) / 16000

    async def scenario() -> tuple[Received, TimedTrack, dict]:
        peer = Peer(server.url, box)
        try:
            await peer.open(mic=path)
            speak = await peer.post("/speak", json={"text": "hello"})
            peer.channel.send(json.dumps({"type": "interrupt"}))
            await asyncio.sleep(duration + 1.5)
            status = (await peer.http.get(f"/sessions/{peer.session_id}")).json()
            assert peer.mic is not None
            return peer.got, peer.mic, {"speak": (speak.status_code, speak.json()), "status": status}
        finally:
            await peer.close()

    got, mic, info = run(scenario())
    ready = got.of_type("ready")[0]
    assert ready["mode"] == "mic" and ready["latency_ms"] > 0
    latency = ready["latency_ms"] / 1000
    assert info["speak"][0] == 409 and info["speak"][1]["error"] == "mic_session"
    assert [e["error"] for e in got.of_type("error")] == ["mic_session"]
    assert info["status"]["mode"] == "mic" and not got.audio  # no audio comes back in mic mode
    assert info["status"]["mic"]["audio_seconds"] == pytest.approx(duration, abs=0.5)
    # every frame judged by the audio it shows: sent `latency` before the frame arrived
    judged: dict[str, list[tuple[float, np.ndarray]]] = {"speech": [], "silence": []}
    send_t, media_t = np.array([t for t, _, _ in mic.sent]), np.array([m for _, m, _ in mic.sent])
    prev = None
    for t, _, m in got.video:
        state = wav_state(audio, float(np.interp(t - latency, send_t, media_t, left=-9, right=-9)))
        d = idle_distance(m, idle_refs)
        if state is not None and prev is not None:
            judged[state].append((d, float(np.abs(m - prev).mean())))
        prev = m
    speech, silence = np.array(judged["speech"]), np.array(judged["silence"])
    print(f"mic: {len(got.video)} frames; mouth distance from idle: speech median {np.median(speech[:, 0]):.2f} "
          f"(n={len(speech)}), silence p90 {np.percentile(silence[:, 0], 90):.2f} (n={len(silence)}); "
          f"frame-to-frame change: speech {speech[:, 1].mean():.2f}, silence {silence[:, 1].mean():.2f}")
    assert len(speech) >= 25 and len(silence) >= 50
    assert np.median(speech[:, 0]) > 2 * np.percentile(silence[:, 0], 90) + 1.0  # speech: a generated mouth
    assert speech[:, 1].mean() > 1.5 * silence[:, 1].mean()  # that moves
    # each onset of the clip starts a speech stretch one latency (plus transport) after it left the client
    starts = [t for t, e in got.events if e["type"] == "speaking"]
    # (a pause within a sentence that outlasts the gate's hangover ends a stretch too; one that comes back
    # during the cross-fade to idle is announced again without an `idle` between)
    assert len(onsets(audio)) == 2 and len(starts) >= 2 and 2 <= len(got.of_type("idle")) <= len(starts)
    delays = [min(s for s in starts if s > mic.send_time(on)) - mic.send_time(on) for on in onsets(audio)]
    print(f"mic: announced latency {1000 * latency:.0f} ms; onset sent -> speaking event "
          f"{[round(1000 * d) for d in delays]} ms")
    assert all(latency - 0.1 < d < latency + 0.5 for d in delays), delays


def test_microphone_stop_drops_what_is_not_shown_and_brings_the_idle_loop_back(server, box, idle_refs, mic_wav):
    """Mode `mic`, the data channel's `stop` (as /ws/live's): the audio received but not shown yet (about one
    latency of it) is dropped and the idle loop is back from the frame the `stopped` event names."""
    async def scenario() -> Received:
        peer = Peer(server.url, box)
        try:
            await peer.open(mic=mic_wav[0])
            await peer.wait_for(lambda: peer.got.of_type("speaking"), 30)
            await asyncio.sleep(0.5)
            peer.channel.send(json.dumps({"type": "stop"}))
            await peer.wait_for(lambda: peer.got.of_type("stopped"), 10)
            await asyncio.sleep(0.8)
            peer.channel.send(json.dumps({"type": "end"}))  # (the audio so far plays out; later audio is new)
            await asyncio.sleep(0.3)
            return peer.got
        finally:
            await peer.close()

    got = run(scenario())
    stopped, ready = got.of_type("stopped")[0], got.of_type("ready")[0]
    assert stopped["position"] > 0.4 and stopped["dropped_s"] > 0.5 * ready["latency_ms"] / 1000, stopped
    k = stopped["frame"]
    mouth = {j: idle_distance(m, idle_refs) for _, j, m in got.video}
    before = [mouth[j] for j in range(k - 10, k) if j in mouth]
    after = [mouth[j] for j in range(k, k + 12) if j in mouth]  # (the speech that follows comes a latency later)
    assert len(before) >= 5 and len(after) >= 10
    assert np.median(before) > 2 * max(after) + 1.0, (before, after)
    assert not got.of_type("error")  # both commands were taken


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
