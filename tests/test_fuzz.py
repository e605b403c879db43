"""Issue 21, hostile input: categories of bad requests replayed against a real server (uvicorn in a thread of
this process, the fixture avatar, small limits) with a seeded generator. Every case must end in a 4xx with a
JSON `{error, detail}` body (or a stream that starts normally, for mutated but decodable audio), never a 5xx;
`/health` must answer after each case, and no per-session object may be left alive at the end.

Categories: corrupt and truncated media uploads, wrong types, oversize and over-long inputs, path-like avatar
names, malformed JSON bodies, malformed WebSocket frames (bad JSON, binary garbage, huge messages) and slow
clients (a stalled upload, a slow but steady one)."""
from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_api import LiveServer, audio_file, build_app, make_settings, speech_like
from test_reliability import live_counts, settled, silent_flac

SEED = 21
MAX_UPLOAD = 256 * 1024
MAX_AUDIO_S = 30.0
BODY_TIMEOUT_S = 1.0
EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg", ".m4a")
PATH_NAMES = ("../x", "/etc/passwd", "..", "../../etc/passwd", "synth/../synth", "synth/", "./synth", "%2e%2e%2f",
              "..\\..\\boot.ini", "synth\x00", "a" * 4096, "~root", "synth?x=1", "synth#", " ")


# ----------------------------------------------------------------------------------------------
# The server and the checks


@pytest.fixture(scope="module")
def fuzz_server(fixture_avatar, tmp_path_factory):
    cfg = make_settings(fixture_avatar, tmp_path_factory.mktemp("fuzz"), idle_seconds=0.8, max_upload_bytes=MAX_UPLOAD,
                        max_audio_seconds=MAX_AUDIO_S, body_timeout_s=BODY_TIMEOUT_S)
    app, _ = build_app(cfg)
    with LiveServer(app) as running:
        running.ws_url = running.url.replace("http://", "ws://")
        yield running


@pytest.fixture()
def client(fuzz_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as c:
        yield c


def check(client: httpx.Client, r: httpx.Response, case: str, ok: tuple[int, ...] = ()) -> None:
    """No 5xx; an error is JSON {error, detail} (both strings); a 2xx only where `ok` allows it; /health
    still answers."""
    assert r.status_code < 500, (case, r.status_code, r.text[:300])
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "detail"}, (case, body)
        assert isinstance(body["error"], str) and body["error"] and isinstance(body["detail"], str), (case, body)
    else:
        assert r.status_code in ok, (case, r.status_code)
    assert client.get("/health").status_code == 200, case


def send(client: httpx.Client, request: httpx.Request) -> httpx.Response:
    """Send `request`; a stream that starts (200) is hung up after its headers, an error is read whole."""
    r = client.send(request, stream=True)
    if r.status_code >= 300:
        r.read()
    r.close()
    return r


def upload(client: httpx.Client, name: str, data: bytes, field: str = "audio_file") -> httpx.Response:
    return send(client, client.build_request("POST", "/generate-from-audio", files={field: (name, data)}))


def wav_bytes(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, speech_like(seconds), 16000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# HTTP categories


def test_corrupt_and_truncated_uploads(client):
    rng = np.random.default_rng(SEED)
    good = {".wav": audio_file("WAV", 1.0), ".flac": audio_file("FLAC", 1.0), ".ogg": audio_file("OGG", 1.0)}
    cases: list[tuple[str, bytes]] = [(f"empty{ext}", b"") for ext in EXTENSIONS]
    cases += [(f"noise{i}{ext}", rng.bytes(int(rng.integers(1, 4096)))) for i, ext in enumerate(EXTENSIONS * 2)]
    for ext, data in good.items():
        cases += [(f"head{ext}", data[:44]), (f"half{ext}", data[: len(data) // 2]), (f"tail{ext}", data[len(data) // 2:])]
        for i in range(4):  # a few bytes of the header overwritten
            mutated = bytearray(data)
            for pos in rng.integers(0, min(64, len(data)), size=4):
                mutated[pos] = int(rng.integers(0, 256))
            cases.append((f"mutated{i}{ext}", bytes(mutated)))
    cases += [("wav-as.mp3", good[".wav"]), ("flac-as.wav", good[".flac"]), ("short.wav", wav_bytes(0.03))]
    for name, data in cases:
        r = upload(client, name, data)
        check(client, r, name, ok=(200,))  # a mutation may still decode
        if name in ("empty.wav", "head.wav", "noise0.wav"):
            assert r.status_code == 400 and r.json()["error"] == "corrupt_audio", (name, r.status_code)


def test_audio_under_one_frame_is_refused(client):
    for seconds in (0.01, 0.03, 0.039):
        r = upload(client, "short.wav", wav_bytes(seconds))
        assert r.status_code == 400 and r.json()["error"] == "audio_too_short", (seconds, r.status_code)
    r = upload(client, "one-frame.wav", wav_bytes(0.04))
    assert r.status_code == 200 and r.headers["x-frame-count"] == "1"


def test_the_file_field_alias_is_accepted(client):
    r = upload(client, "a.wav", wav_bytes(0.2), field="file")
    assert r.status_code == 200 and r.headers["x-frame-count"] == "5"


def test_wrong_types(client):
    cases = [
        client.build_request("POST", "/generate", json={"text": 5}),
        client.build_request("POST", "/generate", json={"text": None}),
        client.build_request("POST", "/generate", json={"text": ["a", "b"]}),
        client.build_request("POST", "/generate", json={"text": {"a": 1}}),
        client.build_request("POST", "/generate", json=["hello"]),
        client.build_request("POST", "/generate", json="hello"),
        client.build_request("POST", "/generate", json={"text": "hi", "avatar": 3}),
        client.build_request("POST", "/generate", json={"text": "hi", "unknown": 1}),
        client.build_request("POST", "/generate", data={"text": "hi"}),
        client.build_request("POST", "/generate", content=b"hi", headers={"content-type": "text/plain"}),
        client.build_request("POST", "/debug/config", json={"enabled": "maybe"}),
        client.build_request("POST", "/debug/config", json={"save_frames": [1]}),
        client.build_request("GET", "/generate"),
        client.build_request("GET", "/get-tts-audio"),
        client.build_request("POST", "/generate-from-audio", json={"audio_file": "a.wav"}),
        client.build_request("POST", "/generate-from-audio", data={"audio_file": "not a file"}),
        client.build_request("POST", "/generate-from-audio", content=b"x" * 100,
                             headers={"content-type": "application/octet-stream"}),
        client.build_request("PUT", "/generate"),
        client.build_request("DELETE", "/health"),
        client.build_request("GET", "/no/such/route"),
    ]
    for request in cases:
        r = send(client, request)
        check(client, r, f"{request.method} {request.url} {request.content[:60]!r}")
        assert r.status_code >= 400


def test_oversize_and_over_long_inputs(client, fuzz_server):
    r = upload(client, "big.wav", b"RIFF" + b"\0" * (MAX_UPLOAD + 70 * 1024))
    check(client, r, "over max_upload_bytes")
    assert r.status_code == 413 and r.json()["error"] == "upload_too_large"
    r = upload(client, "bomb.flac", silent_flac(3600))
    check(client, r, "one hour of silence")
    assert r.status_code == 413 and r.json()["error"] == "audio_too_long"
    reply = raw_request(fuzz_server.port, multipart_head(fuzz_server.port, 10**12) + "--xyz\r\n", [], 0.0)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]  # a declared terabyte: refused before reading
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == "upload_too_large"
    for text in ("word " * 2000, "x" * 100_000):
        r = send(client, client.build_request("POST", "/generate", json={"text": text}))
        check(client, r, f"text of {len(text)} characters")
        assert r.json()["error"] == "text_too_long"
    r = send(client, client.build_request("GET", "/generate", params={"text": "word " * 150}))
    check(client, r, "speech over the limit")
    assert r.json()["error"] == "audio_too_long"
    r = send(client, client.build_request("GET", "/generate", params={"text": "hi", "voice": "v" * 5000}))
    check(client, r, "long voice name")


def test_path_like_avatar_names(client):
    for name in PATH_NAMES:
        for method, path in (("GET", "/generate"), ("GET", "/avatar"), ("GET", "/idle"),
                             ("GET", "/generate-from-audio"), ("POST", "/generate-from-audio")):
            params = {"avatar": name, **({"text": "hi"} if path == "/generate" else {})}
            files = {"audio_file": ("a.wav", wav_bytes(0.2))} if method == "POST" else None
            r = send(client, client.build_request(method, path, params=params, files=files))
            check(client, r, f"{method} {path} avatar={name[:40]!r}")
            assert r.status_code in (400, 404, 422), (method, path, name[:40], r.status_code)
    for path in ("/static/..%2Fapi.py", "/static/%2e%2e%2fconfig.py", "/static/.%00", "/static/%2Fetc%2Fpasswd"):
        r = send(client, client.build_request("GET", path))
        check(client, r, path)
        assert r.status_code == 404


def test_malformed_json_bodies(client):
    bodies = [b"{", b'{"text": "hi"', b'{"text": "hi",}', b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}",
              b'{"text": "\\ud800"}', b'{"text": NaN}', b'{"text": 1e999999}', b"null", b"", b"\x00" * 64,
              json.dumps({"text": "hi", "voice": {"a": [1] * 10_000}}).encode()]
    for body in bodies:
        r = send(client, client.build_request("POST", "/generate", content=body,
                                              headers={"content-type": "application/json"}))
        check(client, r, f"POST /generate {body[:40]!r}", ok=(200,))  # a lone surrogate is still text
        r = send(client, client.build_request("POST", "/debug/config", content=body,
                                              headers={"content-type": "application/json"}))
        check(client, r, f"POST /debug/config {body[:40]!r}")
        assert r.status_code in (400, 422)


def test_malformed_multipart_bodies(client):
    for body, content_type in ((b"garbage", "multipart/form-data; boundary=xyz"), (b"--xyz\r\n", "multipart/form-data"),
                               (b"--xyz\r\nContent-Disposition: form-data; name=\"audio_file\"\r\n\r\n",
                                "multipart/form-data; boundary=xyz")):
        r = send(client, client.build_request("POST", "/generate-from-audio", content=body,
                                              headers={"content-type": content_type}))
        check(client, r, f"multipart {body[:30]!r}")
        assert r.status_code == 400


def test_malformed_multipart_is_bad_form(client):
    r = send(client, client.build_request("POST", "/generate-from-audio", content=b"garbage",
                                          headers={"content-type": "multipart/form-data; boundary=xyz"}))
    assert r.json()["error"] == "bad_form"


# ----------------------------------------------------------------------------------------------
# Slow clients


def raw_request(port: int, head: str, pieces: list[bytes], pause_s: float) -> bytes:
    """Send `head`, then each piece after `pause_s`; return the whole reply (until the server closes)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(BODY_TIMEOUT_S + 10)
        sock.sendall(head.encode())
        for piece in pieces:
            time.sleep(pause_s)
            sock.sendall(piece)
        reply = b""
        while not (b"\r\n\r\n" in reply and reply.rstrip().endswith((b"}", b"--frame--"))):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
        return reply


def multipart_head(port: int, length: int) -> str:
    return (f"POST /generate-from-audio HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {length}\r\n\r\n")


def test_slow_clients(client, fuzz_server):
    port = fuzz_server.port
    # a stalled body: 408 JSON
    reply = raw_request(port, multipart_head(port, 50_000) + "--xyz\r\n", [], 0.0)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"] == "body_timeout"
    assert client.get("/health").status_code == 200
    # slow but steady (every pause under the body timeout): served
    data = wav_bytes(0.2)
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"audio_file\"; filename=\"a.wav\"\r\n\r\n" + data
            + b"\r\n--xyz--\r\n")
    pieces = [body[i:i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    reply = raw_request(port, multipart_head(port, len(body)), pieces, BODY_TIMEOUT_S / 3)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    # headers that never end: the connection is dropped or refused, the server stays up
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 200_000)
        sock.settimeout(2)
        try:
            sock.recv(4096)
        except (TimeoutError, ConnectionError):
            pass
    assert client.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------
# WebSocket frames


async def ws_fuzz(ws_url: str) -> tuple[list[dict], int, int | None]:
    """Send each malformed frame on one connection; return the error events, the frames received after
    them, and the close code of a connection sent one 17 MiB message."""
    import websockets

    rng = np.random.default_rng(SEED)
    bad_text = ["{", "not json", "[]", "null", "42", '"str"', json.dumps({"type": "dance"}),
                json.dumps({"type": "config", "sample_rate": "fast"}), json.dumps({"type": "config", "sample_rate": 1}),
                json.dumps({"type": "config", "realtime": "yes"}), json.dumps({"type": "config", "volume": 3}),
                json.dumps({"type": "start", "x": 1}), "[" * 100_000 + "]" * 100_000, "x" * 2_000_000,
                json.dumps({"type": "config", "sample_rate": 10**30})]
    errors: list[dict] = []
    async with websockets.connect(ws_url + "/ws/live", max_size=None) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
        for text in bad_text:
            await ws.send(text)
        for size in (1, 3, 1001):
            await ws.send(rng.bytes(size))  # garbage, but valid PCM16: played as noise
        await ws.send(b"\0" * (6 * 16000 * 2))  # six seconds in one message: chunk_too_large
        await ws.send((speech_like(0.4) * 32767).astype("<i2").tobytes())
        frames, deadline = 0, time.monotonic() + 20
        while time.monotonic() < deadline and (len(errors) < len(bad_text) + 1 or frames < 10):
            msg = await asyncio.wait_for(ws.recv(), 20)
            if isinstance(msg, bytes):
                frames += 1
            elif (event := json.loads(msg))["type"] == "error":
                errors.append(event)
    async with websockets.connect(ws_url + "/ws/live", max_size=None) as ws:
        await asyncio.wait_for(ws.recv(), 30)
        try:
            await ws.send(b"\0" * (17 * 2**20))  # over uvicorn's 16 MiB message limit
            await asyncio.wait_for(ws.wait_closed(), 20)
        except websockets.ConnectionClosed:
            pass
        big_close = ws.close_code
    return errors, frames, big_close


def test_malformed_websocket_frames(client, fuzz_server):
    errors, frames, big_close = asyncio.run(asyncio.wait_for(ws_fuzz(fuzz_server.ws_url), 90))
    codes = [e["error"] for e in errors]
    assert codes.count("bad_json") >= 3 and "unknown_type" in codes and "bad_config" in codes, codes
    assert "chunk_too_large" in codes and "internal" not in codes, codes
    assert all(isinstance(e.get("detail"), str) for e in errors)
    assert frames >= 10  # the connection stayed usable
    assert big_close == 1009, big_close
    assert client.get("/health").status_code == 200


# ----------------------------------------------------------------------------------------------
# Afterwards


def test_nothing_is_left_alive_and_nothing_failed(client):
    """Runs last: every stream and live session of the cases above is gone, none failed."""
    assert settled(10.0) == dict.fromkeys(live_counts(), 0)
    streams = client.get("/health").json()["streams"]
    assert streams["active_streams"] == 0 and streams["streams_failed"] == 0, streams
