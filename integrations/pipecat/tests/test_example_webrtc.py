"""The example's browser mode end to end: an aiortc client (standing in for the browser) connects to
`example.create_app` over SmallWebRTC, asks for a sentence and receives the avatar's video, its voice
and the data-channel events."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the Pipecat integration needs its own venv: make pipecat")

import example  # noqa: E402
import httpx  # noqa: E402
from aiortc import RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402
from synctalk_pipecat import load_engine  # noqa: E402

log = logging.getLogger("test_example_webrtc")
AVATAR_EVENTS = {"speech_started", "speech_ended", "interrupted"}
LONG_TEXT = "This reply is long enough to be interrupted, because the user has something to say before it ends."
SILENT_RMS = 0.005
marks: dict[str, float] = {}


async def read_track(track, out: list) -> None:
    """Append (arrival time, frame) for every frame of `track` until it ends."""
    try:
        while True:
            out.append((time.monotonic(), await track.recv()))
    except MediaStreamError:
        return


async def session(app) -> tuple[list, list, list, float]:
    video, audio, events = [], [], []
    pc = RTCPeerConnection()
    pc.addTransceiver("audio", direction="recvonly")  # SmallWebRTC expects audio first, then video
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("events")
    channel.on("message", lambda m: events.append((time.monotonic(), json.loads(m))))
    readers = []

    @pc.on("track")
    def on_track(track) -> None:
        readers.append(asyncio.ensure_future(read_track(track, video if track.kind == "video" else audio)))

    await pc.setLocalDescription(await pc.createOffer())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://example") as client:
        answer = (await client.post("/api/offer", json={"sdp": pc.localDescription.sdp,
                                                        "type": pc.localDescription.type})).json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        deadline = time.monotonic() + 60
        while len(video) < 25:  # idle frames flow before anything is said
            assert time.monotonic() < deadline, "no video"
            await asyncio.sleep(0.05)
        said = time.monotonic()
        assert (await client.post("/api/say", json={"text": "Hello there, nice to meet you."})).json()["queued"]
        while not any(e["type"] == "speech_ended" for _, e in events):
            assert time.monotonic() < deadline + 60, f"no speech_ended; events {events}"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        # then a long reply, interrupted 1 s after it starts playing
        await client.post("/api/say", json={"text": LONG_TEXT})
        while sum(e["type"] == "speech_started" for _, e in events) < 2:
            assert time.monotonic() < deadline + 120, f"no second speech_started; events {events}"
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)
        marks["interrupt"] = time.monotonic()
        assert (await client.post("/api/interrupt")).json()["interrupted"]
        await asyncio.sleep(1.5)
    await pc.close()
    for reader in readers:
        reader.cancel()
    # let the server's pipeline wind down (the disconnect cancels it) before asyncio.run cancels the rest
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    await asyncio.wait(others, timeout=20)
    return video, audio, events, said


def test_browser_mode_plays_speech_and_sends_events():
    engine = load_engine(example.DEMO_DATASET, example.DEMO_CHECKPOINT)
    video, audio, events, said = asyncio.run(asyncio.wait_for(session(example.create_app(engine)), 150))
    events = [(t, e) for t, e in events if e.get("type") in AVATAR_EVENTS]  # RTVI messages share the channel
    types = [e["type"] for _, e in events]
    assert types == ["speech_started", "speech_ended", "speech_started", "interrupted"], types
    start, end = events[0][0], events[1][0]
    ended = events[1][1]
    assert ended["duration"] > 1.0 and ended["position"] == pytest.approx(ended["duration"])
    frame = video[-1][1]
    assert (frame.height, frame.width) == engine.frame_shape[:2]

    def rms(frames) -> float:
        pcm = np.concatenate([f.to_ndarray().reshape(-1).astype(np.float32) / 32768 for f in frames])
        return float(np.sqrt(np.mean(pcm * pcm)))

    speaking = [f for t, f in audio if start <= t <= end]
    before = [f for t, f in audio if t < said]
    log.info("video %d frames, audio %d frames; rms before %.4f, while speaking %.4f; events %s",
             len(video), len(audio), rms(before) if before else 0.0, rms(speaking), types)
    assert rms(speaking) > 0.02 and (not before or rms(before) < 0.005)
    fps = sum(start <= t <= end for t, _ in video) / (end - start)
    log.info("video while speaking: %.1f fps", fps)
    assert fps > 10

    # the interruption, as the client hears it: the last loud 20 ms of audio arrives soon after
    t_int = marks["interrupt"]
    loud = [t for t, f in audio if t > events[2][0] and rms([f]) > SILENT_RMS]
    assert any(t < t_int for t in loud), "the second reply was not audible before the interrupt"
    last_loud = max(loud)
    log.info("interrupt at %.2f s of the reply (event position %.2f s): last audible audio %+.0f ms after it",
             t_int - events[2][0], events[3][1]["position"], 1000 * (last_loud - t_int))
    assert last_loud - t_int <= 0.2
