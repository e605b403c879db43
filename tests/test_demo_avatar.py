"""The bundled demo avatar: `python api.py` with default settings (what `make run` starts) serves it,
and `/generate?text=hello world` streams lip-synced frames at the audio's 25 frames/s."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import cv2
import httpx
import numpy as np
import pytest
import soundfile as sf
from conftest import REPO
from test_api import free_port, read_stream

DEMO = REPO / "demo_avatar"


@pytest.fixture(scope="module")
def default_server():
    """`python api.py` from the repository with nothing configured (no SYNCTALK_* variables), on a free
    port, user roots pointed at an empty folder so only the bundled demo can be served."""
    if not (DEMO / "checkpoint").is_dir():
        pytest.fail("demo_avatar/ is missing: build it with scripts/build_demo_avatar.sh")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCTALK_")}
    env["SYNCTALK_MODELS__THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "api.py", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_default_server_serves_the_demo_avatar(default_server):
    health = httpx.get(f"{default_server}/health", timeout=30).json()
    assert "demo" in str(health), health
    still = httpx.get(f"{default_server}/avatar", timeout=60)
    assert still.status_code == 200 and still.headers["X-Avatar"] == "demo"
    assert cv2.imdecode(np.frombuffer(still.content, np.uint8), cv2.IMREAD_COLOR) is not None


def test_hello_world_streams_lip_synced_frames_at_25_fps(default_server):
    text = "hello world"
    wav = httpx.get(f"{default_server}/get-tts-audio", params={"text": text}, timeout=60)
    audio, sr = sf.read(io.BytesIO(wav.content), dtype="float32")
    with httpx.stream("GET", f"{default_server}/generate", params={"text": text}, timeout=120) as resp:
        assert resp.status_code == 200
        expected = int(resp.headers["X-Frame-Count"])
        times, jpegs, closed = read_stream(resp)
    assert closed and abs(len(jpegs) - round(25 * len(audio) / sr)) <= 1 and len(jpegs) == expected
    # pace: every frame delivered, on average at 25 frames/s (never ahead of the audio clock)
    span = times[-1] - times[0]
    assert span >= (len(jpegs) - 1) / 25 - 0.05
    assert (len(jpegs) - 1) / span >= 22.0, f"{(len(jpegs) - 1) / span:.1f} frames/s"


def mouth_openings(frames: list[np.ndarray]) -> np.ndarray:
    """Mouth opening of each BGR frame (inner-lip gap / eye-corner distance by face mesh, synctalk.metrics)."""
    from synctalk import metrics
    from synctalk.landmarks import FaceMesh

    mesh = FaceMesh()
    try:
        return metrics.mouth_opening(np.stack([mesh(f) for f in frames]))
    finally:
        mesh.close()


def test_mouth_opens_with_the_speech_and_closes_in_pauses(default_server):
    text = "Hello world. This is the demo avatar speaking to you.  And now I stop."
    wav = httpx.get(f"{default_server}/get-tts-audio", params={"text": text}, timeout=60)
    audio, sr = sf.read(io.BytesIO(wav.content), dtype="float32")
    with httpx.stream("GET", f"{default_server}/generate", params={"text": text}, timeout=120) as resp:
        _, jpegs, closed = read_stream(resp)
    assert closed
    opening = np.nan_to_num(mouth_openings([cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]))
    hop = sr // 25
    env = np.array([np.sqrt(np.mean(audio[i * hop:(i + 1) * hop] ** 2)) if i * hop < len(audio) else 0.0
                    for i in range(len(jpegs))])
    env = np.convolve(env, np.ones(3) / 3, mode="same")
    # the mouth anticipates and trails the sound a little (coarticulation): best of +-3 frames
    best = max(np.corrcoef(np.roll(opening, lag), env)[0, 1] for lag in range(-3, 4))
    print(f"lip-sync correlation {best:.3f}")
    # measured 0.46 alone and 0.32 once inside the full suite (the evaluation's cross-driven figure for this
    # voice is 0.41); a mouth that ignores the audio scores about 0.1 (the source frames unchanged)
    assert best > 0.25, f"mouth opening vs speech envelope correlation {best:.2f}"
