"""Issue 21, reliability: nothing lost, nothing unbounded, no client starving another.

One server process (`api.py`, the fixture avatar, a bearer token, small limits) serves the checks that need
its log or its start-up: duration limits for uploads and text (413), busy TTS (503 + Retry-After), the
WebSocket Origin check, token redaction in the access log, protected docs, no absolute paths in /health and
/debug/status, torch threads, a client leaving before `ready`, live audio far ahead of real time (1008), a
stalled upload (408) and stale temporaries removed at start-up. The rest are unit tests of the pieces."""
from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_api import LiveServer, audio_file, build_app, make_settings, parse_mjpeg, speech_like
from test_live import ServerProcess

from services.generator import live_jobs
from services.live import AheadMeter, origin_allowed
from services.streaming import MJPEGResponse, StreamStats, paced_parts
from services.timeline import live_objects
from synctalk import audio as audio_io

TOKEN = "s3cret-token-42"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_AUDIO_S = 20
BODY_TIMEOUT_S = 1.0
MAX_AHEAD_S = 2.0
STALE = ("checkpoint/.synth_old.tmp4190001.onnx", "dataset/.aud.wav.tmp4190002")
IN_USE = f"checkpoint/.synth_new.tmp{os.getpid()}.onnx"  # a live process writing it now


# ----------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def server(fixture_avatar, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    proc = ServerProcess(fixture_avatar, root, headers=AUTH, auth_token=TOKEN, max_audio_seconds=MAX_AUDIO_S,
                         body_timeout_s=BODY_TIMEOUT_S, ws_max_ahead_s=MAX_AHEAD_S)
    proc.env.update(SYNCTALK_TTS__MAX_CONCURRENT="1", SYNCTALK_TTS__MAX_QUEUED="0", SYNCTALK_MODELS__THREADS="1")
    hours_ago = time.time() - 7200
    for rel in STALE:  # left by a killed ONNX export and a killed preprocessing run
        (root / rel).write_bytes(b"partial")
        os.utime(root / rel, (hours_ago, hours_ago))
    (root / IN_USE).write_bytes(b"being written")
    proc.root = root
    with proc as running:
        yield running


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def silent_flac(seconds: float, sr: int = 8000) -> bytes:
    """`seconds` of digital silence as FLAC (compresses to almost nothing: a duration bomb)."""
    buf = io.BytesIO()
    block = np.zeros(sr * 60, np.int16)
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC", subtype="PCM_16") as f:
        for start in range(0, int(seconds * sr), len(block)):
            f.write(block[: min(len(block), int(seconds * sr) - start)])
    return buf.getvalue()


def strings(value) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def wait_for_log(server, text: str, timeout: float = 5.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = server.log()
        if text in log:
            return log
        time.sleep(0.1)
    return server.log()


# ----------------------------------------------------------------------------------------------
# 2. duration bombs


def test_two_hour_silent_flac_is_refused_from_its_metadata(client):
    data = silent_flac(7200)
    assert len(data) < 1024 * 1024  # passes the 20 MB upload limit easily
    start = time.perf_counter()
    r = client.post("/generate-from-audio", files={"audio_file": ("bomb.flac", data)})
    elapsed = time.perf_counter() - start
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["error"] == "audio_too_long"
    assert "server.max_audio_seconds" in body["detail"] and f"{MAX_AUDIO_S}" in body["detail"]
    assert "7200" in body["detail"]
    assert elapsed < 3.0  # refused from the header, not after decoding two hours


def test_duration_is_also_checked_while_decoding(monkeypatch):
    """A container that declares no duration is stopped once the decoded audio passes the limit."""
    monkeypatch.setattr(audio_io, "declared_seconds", lambda container, stream: None)
    data = silent_flac(120)
    with pytest.raises(audio_io.AudioTooLong, match="the limit is 30 s"):
        audio_io.load_audio(data, max_seconds=30)
    assert audio_io.load_audio(data, max_seconds=200).size == 120 * 16000


def test_text_whose_speech_exceeds_the_limit_is_refused_before_synthesis(client):
    misses = client.get("/health").json()["tts"]["cache_misses"]
    text = "word " * 100  # 500 characters: about 26 s of speech at 19 characters a second
    for r in (client.get("/generate", params={"text": text}), client.get("/get-tts-audio", params={"text": text})):
        assert r.status_code == 413, r.text
        assert r.json()["error"] == "audio_too_long" and "server.max_audio_seconds" in r.json()["detail"]
    assert client.get("/health").json()["tts"]["cache_misses"] == misses  # nothing was synthesised


# ----------------------------------------------------------------------------------------------
# 3. bounded text to speech


def test_syntheses_past_the_pool_get_503_with_retry_after(server):
    texts = [f"Request number {i} asks for a fairly long sentence so that the synthesis takes a while, "
             f"and then it goes on for another clause or two, just to be sure of it." for i in range(4)]
    results: list[httpx.Response] = []

    def ask(text: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
            results.append(c.get("/get-tts-audio", params={"text": text}))

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    busy = [r for r in results if r.status_code == 503]
    assert any(r.status_code == 200 for r in results)
    assert busy, [r.status_code for r in results]
    for r in busy:
        assert r.json()["error"] == "tts_busy" and int(r.headers["retry-after"]) >= 1


# ----------------------------------------------------------------------------------------------
# 4. WebSocket Origin


def test_origin_rule():
    assert origin_allowed(None, "127.0.0.1:8000", [])  # not a browser
    assert origin_allowed("http://127.0.0.1:8000", "127.0.0.1:8000", [])
    assert not origin_allowed("http://evil.example", "127.0.0.1:8000", [])
    assert not origin_allowed("http://127.0.0.1:9999", "127.0.0.1:8000", [])
    assert origin_allowed("http://app.example", "127.0.0.1:8000", ["http://app.example/"])
    assert not origin_allowed("http://evil.example", "127.0.0.1:8000", ["http://app.example"])
    assert origin_allowed("http://evil.example", "127.0.0.1:8000", ["*"])


def test_ws_live_checks_the_origin(server):
    import websockets
    from websockets.exceptions import InvalidStatus

    url = f"{server.ws_url}/ws/live?access_token={TOKEN}"

    async def ready(origin: str | None) -> str:
        kwargs = {"origin": origin} if origin else {}
        async with websockets.connect(url, max_size=None, **kwargs) as ws:
            return json.loads(await asyncio.wait_for(ws.recv(), 30))["type"]

    async def refused(origin: str) -> int:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(url, origin=origin):
                pass
        return info.value.response.status_code

    assert asyncio.run(refused("http://evil.example")) == 403
    assert asyncio.run(ready(f"http://127.0.0.1:{server.port}")) == "ready"  # same origin
    assert asyncio.run(ready(None)) == "ready"  # no Origin: a non-browser client


# ----------------------------------------------------------------------------------------------
# 5. secrets and paths


def test_query_token_is_redacted_in_the_access_log(server):
    r = httpx.get(f"{server.url}/health", params={"access_token": TOKEN}, timeout=30)
    assert r.status_code == 200
    log = wait_for_log(server, '"GET /health?access_token=*** HTTP/1.1" 200')
    assert '"GET /health?access_token=*** HTTP/1.1" 200' in log  # the access line, still formatted
    assert TOKEN not in log and "Logging error" not in log


def test_docs_need_the_token_when_one_is_set(server, client):
    for path in ("/docs", "/redoc", "/openapi.json"):
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (path, r.text)
        assert client.get(path).status_code == 200, path
    assert "/generate" in client.get("/openapi.json").json()["paths"]
    page = httpx.get(server.url + "/docs", params={"access_token": TOKEN}, timeout=30).text
    assert f"/openapi.json?access_token={TOKEN}" in page  # the page's schema fetch carries the token


def test_health_and_debug_status_show_no_absolute_paths(server, client):
    for path in ("/health", "/debug/status"):
        body = client.get(path).json()
        found = [s for s in strings(body) if s.startswith("/") or str(server.root) in s
                 or str(Path.cwd()) in s]
        assert not found, (path, found)
    debug = client.get("/debug/status").json()
    assert debug["frames_dir"] == ".../frames" and debug["audio_dir"] == ".../audio"  # outside the project


# ----------------------------------------------------------------------------------------------
# 6. torch threads, 10. stale temporaries (both at start-up)


def test_models_feature_threads_is_applied_to_torch(client):
    assert client.get("/health").json()["threads"] == {"torch": 1, "torch_interop": 1}


def test_stale_temporaries_are_removed_at_start_up(server):
    for rel in STALE:
        assert not (server.root / rel).exists(), rel
    assert (server.root / IN_USE).exists()
    assert server.log().count("removed stale temporary") == len(STALE)


# ----------------------------------------------------------------------------------------------
# 7. a client leaving before `ready`, 8. live audio far ahead of real time


def test_client_closing_before_ready_logs_one_line(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # handshake, then gone at once
        sock.sendall((f"GET /ws/live?access_token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                      "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    log = wait_for_log(server, "left before the connection was set up")
    assert "left before the connection was set up" in log
    assert "Traceback" not in log and "ERROR" not in log


def test_live_audio_far_ahead_of_real_time_is_closed_with_1008(server):
    import websockets
    from websockets.exceptions import ConnectionClosed

    second = (speech_like(1.0) * 32767).astype("<i2").tobytes()

    async def flood() -> tuple[list[dict], int | None]:
        events = []
        async with websockets.connect(f"{server.ws_url}/ws/live?access_token={TOKEN}", max_size=None) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
            try:
                for _ in range(6):
                    await ws.send(second)  # six seconds of audio at once
                async for msg in ws:
                    if isinstance(msg, str):
                        events.append(json.loads(msg))
            except ConnectionClosed:
                pass
            return events, ws.close_code

    for _ in range(3):  # the close raced with the sender's next frame: an ERROR traceback now and then
        events, code = asyncio.run(asyncio.wait_for(flood(), 60))
        assert code == 1008
        errors = [e for e in events if e.get("type") == "error"]
        assert errors and errors[-1]["error"] == "audio_ahead" and "server.ws_max_ahead_s" in errors[-1]["detail"]
    time.sleep(0.5)
    assert "live connection failed" not in server.log() and "Traceback" not in server.log()


def test_ahead_meter_drains_in_real_time():
    meter = AheadMeter()
    assert [round(meter.add(0.02, 0.02 * i), 6) for i in range(100)][-1] == 0.02  # a microphone
    burst = AheadMeter()
    assert burst.add(1.0, 0.0) == 1.0 and burst.add(1.0, 0.0) == 2.0 and burst.add(1.0, 2.5) == 1.0


# ----------------------------------------------------------------------------------------------
# 9. stalled uploads


def test_stalled_upload_gets_408(server):
    head = (f"POST /generate-from-audio HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
            "Content-Length: 50000\r\n\r\n--xyz\r\nContent-Disposition: form-data; name=\"audio_file\"; "
            "filename=\"a.wav\"\r\n\r\nRIFF")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(BODY_TIMEOUT_S + 10)
        start = time.perf_counter()
        sock.sendall(head.encode())  # ... and nothing more
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        elapsed = time.perf_counter() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "body_timeout" and "server.body_timeout_s" in body["detail"]
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 5


# ----------------------------------------------------------------------------------------------
# 11. nothing of a session outlives its client (a server in this process, so objects can be counted)

LEAK_SESSIONS = 40
MJPEG_SEND_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def inproc(fixture_avatar, tmp_path_factory):
    """uvicorn in a thread of this process (the fixture avatar, a 1 s MJPEG send timeout)."""
    tmp = tmp_path_factory.mktemp("reliability_inproc")
    app, _ = build_app(make_settings(fixture_avatar, tmp, idle_seconds=0.8))
    saved, MJPEGResponse.send_timeout_s = MJPEGResponse.send_timeout_s, MJPEG_SEND_TIMEOUT_S
    try:
        with LiveServer(app) as running:
            running.ws_url = running.url.replace("http://", "ws://")
            yield running
    finally:
        MJPEGResponse.send_timeout_s = saved


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_counts() -> dict[str, int]:
    """Per-session objects alive now (weak registries: no garbage collection is run to count them),
    and the live worker threads."""
    threads = sum(t.name in ("live-features", "live-frames") for t in threading.enumerate())
    return {"FrameJob": live_jobs(), **live_objects(), "live threads": threads}


def settled(timeout: float = 5.0, collect: bool = False) -> dict[str, int]:
    """`live_counts()` once every count is zero, or the last counts after `timeout` seconds (with `collect`,
    a garbage collection before each count)."""
    deadline = time.time() + timeout
    while True:
        if collect:
            gc.collect()
        counts = live_counts()
        if not any(counts.values()) or time.time() > deadline:
            return counts
        time.sleep(0.1)


def cancel_mjpeg_early(client: httpx.Client, upload: bytes, i: int) -> None:
    """Open a text (even i) or upload (odd i) stream, read two frames, hang up."""
    if i % 2:
        request = client.build_request("POST", "/generate-from-audio", files={"audio_file": ("a.wav", upload)})
    else:
        request = client.build_request("GET", "/generate", params={"text": "Hello there, how are you today?"})
    r = client.send(request, stream=True)
    try:
        assert r.status_code == 200, r.read()
        parts = parse_mjpeg(r.iter_raw())
        next(parts)
        next(parts)
    finally:
        r.close()


async def short_live_session(ws_url: str, pcm: bytes) -> None:
    """Connect, take `ready`, send a little audio, take three messages, hang up."""
    import websockets

    async with websockets.connect(ws_url + "/ws/live", max_size=None) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
        await ws.send(pcm)
        for _ in range(3):
            await asyncio.wait_for(ws.recv(), 30)


def test_cancelled_streams_and_closed_live_sessions_leave_nothing_behind(inproc):
    upload = audio_file("WAV", 4.0)
    pcm = (speech_like(0.3) * 32767).astype("<i2").tobytes()
    with httpx.Client(base_url=inproc.url, timeout=60) as client:
        cancel_mjpeg_early(client, upload, 0)  # warm up: TTS, features, idle loop JPEGs
        cancel_mjpeg_early(client, upload, 1)
        asyncio.run(short_live_session(inproc.ws_url, pcm))
        assert settled(collect=True) == dict.fromkeys(live_counts(), 0)
        start_mb = rss_mb()
        gc.disable()  # only reference counting frees objects from here on: a cycle would be seen
        try:
            for i in range(LEAK_SESSIONS):
                cancel_mjpeg_early(client, upload, i)
            assert settled() == dict.fromkeys(live_counts(), 0), "after cancelled MJPEG streams"
            for _ in range(LEAK_SESSIONS):
                asyncio.run(short_live_session(inproc.ws_url, pcm))
            assert settled() == dict.fromkeys(live_counts(), 0), "after closed live sessions"
            end_mb = rss_mb()
        finally:
            gc.enable()
        assert client.get("/health").json()["streams"]["active_streams"] == 0
    assert end_mb <= 1.15 * start_mb, (start_mb, end_mb)


class EndlessSource:
    """A `FrameSource` that never ends (one tiny JPEG per batch)."""

    total = 10**9

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.closed = False

    def next_batch(self) -> list[bytes] | None:
        return None if self.cancel.is_set() else [b"\xff\xd8 frame \xff\xd9"]

    def close(self) -> None:
        self.closed = True


def test_mjpeg_client_that_stops_reading_is_given_up():
    """The ASGI `send` of a client that stopped reading never returns: after the send timeout the response
    returns, the source is cancelled and closed and the admission place is given back."""
    source, stats, released = EndlessSource(), StreamStats(), []
    response = MJPEGResponse(paced_parts(source, stats, fps=25.0, on_close=lambda: released.append(1)))
    response.send_timeout_s = 0.5
    sent: list[dict] = []

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client never sends anything (no disconnect either)
        return {}

    async def send(message: dict) -> None:
        sent.append(message)
        if len(sent) > 5:  # the socket's buffers are full: this send never completes
            await asyncio.Event().wait()

    async def serve() -> float:
        start = time.perf_counter()
        await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send), 10)
        return time.perf_counter() - start

    elapsed = asyncio.run(serve())
    assert 0.5 <= elapsed < 3.0, elapsed
    assert source.cancel.is_set() and source.closed and released == [1]
    assert stats.snapshot()["active_streams"] == 0 and stats.snapshot()["streams_cancelled"] == 1
