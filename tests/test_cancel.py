"""Interruption and sentence-streamed speech against a real server (uvicorn on a free port, the fixture
avatar, one stream at a time: `server.max_streams = 1`):

- MJPEG request ids: `X-Request-Id` on every speech stream, `DELETE /generate/{request_id}` ends a running
  stream within 200 ms and gives its admission place back at once; unknown, malformed and duplicate ids;
- `/ws/live` `stop`: queued audio is dropped, the next frames are idle frames, the socket keeps working;
- sentence-streamed TTS for `/generate`: the first frame leaves while a later sentence is still being
  synthesised (a TTS engine wrapper holds that sentence until the test has the first frame), the frame
  count is round(25 x duration) of the concatenated sentence audio, and that audio is what
  `/get-tts-audio` returns for the same text;
- the growing feature feed and frame job (audio appended piece by piece) give the frames of the whole clip.
"""
from __future__ import annotations

import asyncio
import gc
import io
import json
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import soundfile as sf
from test_api import LiveServer, audio_file, decode, make_settings, parse_mjpeg, speech_like, wait_for

from services.generator import EnhancedFrameGenerationService, live_jobs
from synctalk.tts import EspeakTTS, TTSResult, TTSService, join_results

FPS = 25
SENTENCES = ["The first sentence starts the stream.", "The second sentence waits for the test.",
             "And the third one ends it."]
TEXT = " ".join(SENTENCES)


# ----------------------------------------------------------------------------------------------
# A TTS engine whose synthesis of chosen texts waits for the test


class GatedTTS(TTSService):
    """espeak-ng, except that a text in `held` waits (at most `hold_s`) until `gate` is set; records every
    result in order."""

    name = "gated"

    def __init__(self, hold_s: float = 30.0) -> None:
        self.inner = EspeakTTS()
        self.held: set[str] = set()
        self.gate = threading.Event()
        self.entered = threading.Event()  # a held text's synthesis has started
        self.hold_s = hold_s
        self.results: list[tuple[str, TTSResult]] = []

    def voices(self) -> list[str]:
        return self.inner.voices()

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        if text in self.held:
            self.entered.set()
            self.gate.wait(self.hold_s)
        result = self.inner.synthesize(text, voice)
        self.results.append((text, result))
        return result


# ----------------------------------------------------------------------------------------------
# Server and helpers


@pytest.fixture(scope="module")
def live(fixture_avatar, tmp_path_factory):
    from api import create_app
    from services.deps import Services
    from services.models import ModelService
    from services.tts import FallbackTTS

    cfg = make_settings(fixture_avatar, tmp_path_factory.mktemp("cancel"), max_streams=1)
    engine = GatedTTS()
    services = Services(settings=cfg, models=ModelService(cfg), tts=FallbackTTS([engine]))
    with LiveServer(create_app(services)) as server:
        server.services, server.cfg, server.engine, server.avatar = services, cfg, engine, fixture_avatar
        first = cv2.imread(str(Path(fixture_avatar.dataset_root) / fixture_avatar.name / "full_body_img" / "0.jpg"))
        server.frame_shape = first.shape
        yield server


@pytest.fixture()
def client(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, error: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["detail"]


class StreamReader(threading.Thread):
    """Reads one MJPEG response in the background: part arrival times, JPEGs, whether the closing boundary
    came, when the body ended."""

    def __init__(self, url: str, method: str, path: str, **kwargs) -> None:
        super().__init__(daemon=True)
        self.url, self.method, self.path, self.kwargs = url, method, path, kwargs
        self.headers: httpx.Headers | None = None
        self.status: int | None = None
        self.times: list[float] = []
        self.jpegs: list[bytes] = []
        self.closed = False
        self.ended_at: float | None = None
        self.first_frame = threading.Event()
        self.error: BaseException | None = None
        self.body = b""

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=120) as c, c.stream(self.method, self.path,
                                                                            **self.kwargs) as r:
                self.status, self.headers = r.status_code, r.headers
                if r.status_code != 200:
                    self.body = r.read()
                    return
                chunks = r.iter_raw()
                for t, jpeg in parse_mjpeg(chunks):
                    if jpeg is None:
                        self.closed = True
                        break
                    self.times.append(t)
                    self.jpegs.append(jpeg)
                    self.first_frame.set()
                for _ in chunks:  # the body must end right after the closing boundary
                    pass
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.ended_at = time.perf_counter()
            self.first_frame.set()


def upload_stream(live, seconds: float, request_id: str | None = None) -> StreamReader:
    params = {"request_id": request_id} if request_id is not None else {}
    reader = StreamReader(live.url, "POST", "/generate-from-audio", params=params,
                          files={"audio_file": ("speech.wav", audio_file("WAV", seconds), "audio/wav")})
    reader.start()
    return reader


def wait_frames(reader: StreamReader, n: int, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while len(reader.jpegs) < n:
        assert reader.is_alive() and time.time() < deadline, (reader.status, reader.body, reader.error)
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# Request ids and DELETE /generate/{request_id}


def test_cancel_ends_the_stream_at_once_and_frees_its_place(client, live):
    reader = upload_stream(live, 8.0, "cancel-me_1")
    wait_frames(reader, 5)
    assert reader.headers["x-request-id"] == "cancel-me_1"
    total = int(reader.headers["x-frame-count"])
    start = time.perf_counter()
    r = client.delete("/generate/cancel-me_1")
    assert r.status_code == 200 and r.json() == {"request_id": "cancel-me_1", "cancelled": True}
    reader.join(10)
    assert not reader.is_alive() and reader.error is None
    ended = reader.ended_at - start
    print(f"DELETE -> end of the MJPEG body: {ended * 1000:.0f} ms, after {len(reader.jpegs)} of {total} frames")
    assert ended < 0.2, ended
    assert reader.closed, "the stream ends with its closing boundary"
    assert len(reader.jpegs) < total / 2
    assert live.services.admission.status()["active"] == 0  # the place came back at once
    assert len(live.services.requests) == 0
    # the only place (max_streams = 1) is free: the next stream is admitted and runs to its end
    follow = upload_stream(live, 1.0, "cancel-me_1")  # a finished id can be used again
    follow.join(60)
    assert follow.status == 200 and follow.closed and len(follow.jpegs) == int(follow.headers["x-frame-count"])
    assert_error(client.delete("/generate/cancel-me_1"), 404, "unknown_request")  # already finished
    stats = client.get("/debug/status").json()["streams"]
    assert stats["streams_cancelled"] >= 1
    gc.collect()
    wait_for(lambda: (gc.collect() or True) and live_jobs() == 0)  # the cancelled job was released too


def test_unknown_and_malformed_ids_are_refused(client):
    assert_error(client.delete("/generate/no-such-stream"), 404, "unknown_request")
    for bad in ("bad!id", "a" * 65, "dot.ted"):
        assert_error(client.delete(f"/generate/{bad}"), 422, "invalid_request")
        assert_error(client.get("/generate", params={"text": "Hello.", "request_id": bad}), 422, "invalid_request")
        r = client.post("/generate-from-audio", params={"request_id": bad},
                        files={"audio_file": ("a.wav", audio_file("WAV", 0.5))})
        assert_error(r, 422, "invalid_request")
    assert_error(client.get("/generate", params={"text": "Hello.", "request_id": ""}), 422, "invalid_request")


def test_a_running_id_cannot_be_reused(client, live):
    reader = upload_stream(live, 6.0, "dup")
    wait_frames(reader, 2)
    r = client.post("/generate-from-audio", params={"request_id": "dup"},
                    files={"audio_file": ("a.wav", audio_file("WAV", 0.5))})
    assert_error(r, 409, "request_id_in_use")
    assert r.headers["x-request-id"] == "dup"
    assert_error(client.get("/generate", params={"text": "Hi.", "request_id": "dup"}), 409, "request_id_in_use")
    assert client.delete("/generate/dup").status_code == 200
    reader.join(10)
    assert reader.closed and not reader.is_alive()


def test_ids_are_made_when_absent_and_errors_carry_them(client, live):
    reader = upload_stream(live, 0.6)
    reader.join(60)
    made = reader.headers["x-request-id"]
    assert reader.status == 200 and len(made) == 32 and int(made, 16) >= 0
    assert reader.headers["x-streamed"] == "0" and reader.closed
    r = client.get("/generate", params={"text": "   ", "request_id": "empty-text"})
    assert_error(r, 400, "empty_text")
    assert r.headers["x-request-id"] == "empty-text"
    r = client.get("/generate", params={"text": "Hi.", "avatar": "nobody", "request_id": "who"})
    assert_error(r, 404, "unknown_avatar")
    assert r.headers["x-request-id"] == "who"
    assert len(live.services.requests) == 0  # failed requests give their ids back


# ----------------------------------------------------------------------------------------------
# Sentence-streamed TTS


def test_first_frame_leaves_before_the_last_sentence_is_synthesised(client, live):
    engine = live.engine
    engine.held, engine.results = {SENTENCES[1]}, []
    engine.gate.clear()
    engine.entered.clear()
    reader = StreamReader(live.url, "GET", "/generate", params={"text": TEXT, "request_id": "streamed"})
    reader.start()
    try:
        got_first = reader.first_frame.wait(20.0) and bool(reader.jpegs)
        # the first frame is out while the second sentence's synthesis is still held by the engine
        assert got_first, f"no frame while the second sentence was held ({reader.status}, {reader.error})"
        assert engine.entered.is_set() and not engine.gate.is_set()
        assert reader.headers["x-streamed"] == "1" and reader.headers["x-request-id"] == "streamed"
        assert "x-frame-count" not in reader.headers and "x-audio-duration" not in reader.headers
        assert reader.headers["x-tts-engine"] == "espeak"  # the engine behind the gate
    finally:
        engine.gate.set()
    reader.join(120)
    assert reader.error is None and reader.closed
    texts = [t for t, _ in engine.results]
    assert texts == SENTENCES  # one synthesis per sentence, in order
    joined = join_results([r for _, r in engine.results])
    expected = int(round(len(joined.to_16k()) / 640))
    assert len(reader.jpegs) == expected == round(FPS * joined.duration_s)
    assert all(decode(j).shape == live.frame_shape for j in (reader.jpegs[0], reader.jpegs[-1]))
    for i, t in enumerate(reader.times):  # still paced in real time
        assert t - reader.times[0] >= i / FPS - 0.02
    # the page's audio is the concatenation of the sentences (cached: nothing is synthesised again)
    r = client.get("/get-tts-audio", params={"text": TEXT})
    wav, sr = sf.read(io.BytesIO(r.content), dtype="int16")
    assert sr == joined.sample_rate and len(wav) == len(joined.audio)
    assert np.abs(wav.astype(np.int32) - np.round(joined.audio * 32767).astype(np.int32)).max() <= 1
    assert len(engine.results) == 3


def test_cached_or_one_sentence_text_is_not_streamed(client, live):
    live.engine.held = set()
    with client.stream("GET", "/generate", params={"text": TEXT}) as r:  # cached by the test above
        parts = list(parse_mjpeg(r.iter_raw()))
    assert r.headers["x-streamed"] == "0" and int(r.headers["x-frame-count"]) == len(parts) - 1
    with client.stream("GET", "/generate", params={"text": "Just one sentence."}) as r:
        parts = list(parse_mjpeg(r.iter_raw()))
    assert r.headers["x-streamed"] == "0" and int(r.headers["x-frame-count"]) == len(parts) - 1


def test_cancel_while_synthesising_stops_the_request(client, live):
    engine = live.engine
    first = "This first sentence is held before anything streams."
    engine.held, engine.results = {first}, []
    engine.gate.clear()
    engine.entered.clear()
    reader = StreamReader(live.url, "GET", "/generate", params={"text": first + " A second one.",
                                                                 "request_id": "held"})
    reader.start()
    assert engine.entered.wait(20)
    assert client.delete("/generate/held").json() == {"request_id": "held", "cancelled": True}
    engine.gate.set()
    reader.join(30)
    assert reader.status == 499 and json.loads(reader.body)["error"] == "request_cancelled"
    assert [t for t, _ in engine.results] == [first]  # the second sentence was never synthesised
    assert live.services.tts.slots.admitted == 0 and len(live.services.requests) == 0


# ----------------------------------------------------------------------------------------------
# The growing feed gives the frames of the whole clip


def test_streamed_job_renders_the_frames_of_the_whole_clip(live):
    engine = live.services.models.engine(live.avatar.name)
    service = EnhancedFrameGenerationService(engine, jpeg_quality=90, batch_size=8)
    audio = speech_like(2.3, seed=3)
    whole = service.job(audio)
    streamed = service.job(audio[:9000], final=False)
    out: dict[str, list[bytes]] = {"whole": [], "streamed": []}

    def drain(name: str, job) -> None:
        while (batch := job.next_batch()) is not None:
            out[name].extend(batch)

    worker = threading.Thread(target=drain, args=("streamed", streamed))
    worker.start()
    for lo, hi in ((9000, 20000), (20000, 31111), (31111, len(audio))):  # pieces arrive while it renders
        time.sleep(0.3)
        streamed.feed.append(audio[lo:hi])
    streamed.feed.finish()
    worker.join(60)
    drain("whole", whole)
    assert streamed.total == whole.total == round(len(audio) / 640) == len(out["streamed"]) == len(out["whole"])
    assert np.array_equal(streamed.feed.ensure(whole.total), whole.feed.ensure(whole.total))
    assert np.array_equal(streamed.order, whole.order)  # ping-pong out and back, as for a known clip
    diffs = [np.abs(decode(a).astype(np.int16) - decode(b)).mean() for a, b in zip(out["streamed"], out["whole"],
                                                                                  strict=True)]
    assert max(diffs) < 0.5, max(diffs)  # float rounding of other batch splits at most


# ----------------------------------------------------------------------------------------------
# /ws/live stop


async def ws_stop_session(url: str) -> dict:
    """Speech sent ahead of real time, `stop` once speech frames flow, then new speech and `end`."""
    import websockets

    pcm = (np.clip(speech_like(4.0, seed=5), -1, 1) * 32767).astype("<i2").tobytes()
    frames: list[tuple[float, dict]] = []
    events: list[tuple[float, dict]] = []
    async with websockets.connect(url.replace("http", "ws", 1) + "/ws/live", max_size=None) as ws:
        ready = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "config", "frame_events": True}))
        pending: dict | None = None

        async def reader() -> None:
            nonlocal pending
            async for msg in ws:
                now = time.perf_counter()
                if isinstance(msg, bytes):
                    frames.append((now, pending or {}))
                    pending = None
                elif (event := json.loads(msg))["type"] == "frame":
                    pending = event
                else:
                    events.append((now, event))

        task = asyncio.create_task(reader())
        for i in range(0, len(pcm), 16000):  # 0.5 s chunks, all at once (4 s ahead of real time)
            await ws.send(pcm[i:i + 16000])
        deadline = time.perf_counter() + 60
        while sum(f.get("state") == "speech" for _, f in frames) < 10:
            assert time.perf_counter() < deadline, "no speech frames"
            await asyncio.sleep(0.01)
        stop_at = time.perf_counter()
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.sleep(1.5)
        resumed_at = time.perf_counter()
        for i in range(0, 48000, 16000):  # the socket still works: 1.5 s of new speech, then `end`
            await ws.send(pcm[i:i + 16000])
        await ws.send(json.dumps({"type": "end"}))
        deadline = time.perf_counter() + 60
        while not any(e["type"] == "idle" and t > resumed_at + 0.5 for t, e in events):
            assert time.perf_counter() < deadline, "the new speech never ended"
            await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return {"ready": ready, "frames": frames, "events": events, "stop_at": stop_at, "resumed_at": resumed_at}


def test_ws_stop_drops_the_audio_and_returns_to_idle_at_once(live):
    rec = asyncio.run(ws_stop_session(live.url))
    frames, events, stop_at = rec["frames"], rec["events"], rec["stop_at"]
    stopped = [(t, e) for t, e in events if e["type"] == "stopped"]
    assert len(stopped) == 1, events
    t_stopped, info = stopped[0]
    assert set(info) == {"type", "frame", "position", "dropped_s"}
    assert info["position"] is not None and info["position"] > 0
    assert info["dropped_s"] > 1.0  # most of the 4 s had not been shown yet
    after = [(t, f) for t, f in frames if stop_at < t < rec["resumed_at"]]
    late = [f for t, f in after if t > t_stopped]
    assert late and all(f["state"] == "idle" for f in late), [f["state"] for f in late]
    assert late[0]["frame"] >= info["frame"]  # every frame after `stopped` is the idle loop
    assert all(f["frame"] < info["frame"] for t, f in after if t <= t_stopped)  # those were already sent
    idle_events = [(t, e) for t, e in events if e["type"] == "idle" and e["frame"] >= info["frame"]]
    assert idle_events and idle_events[0][1]["frame"] == info["frame"]
    first_idle = next(t for t, f in after if f["frame"] >= info["frame"])
    print(f"stop -> stopped {1000 * (t_stopped - stop_at):.0f} ms, first idle frame {1000 * (first_idle - stop_at):.0f} ms")
    assert first_idle - stop_at < 0.3
    # the socket kept working: the new audio was spoken
    resumed = [e for t, e in events if e["type"] == "speaking" and t > rec["resumed_at"]]
    assert resumed and sum(f.get("state") == "speech" for t, f in frames if t > rec["resumed_at"]) > 5
