"""Conversation latency over WebRTC vs the MJPEG path: text in -> first received speech video frame and first
audio sample, p50/p95 over `--requests` requests, for a one-sentence and a 1,000-character text.

    python bench/webrtc.py [--requests 20] [--size small] [--threads 1] [--batch_size 8] [--workdir DIR]

The avatar is built with `bench/fixtures.py`'s `make_avatar` (frames of the shared May clip or the
synthetic fixture, a random checkpoint of `--size`; speed does not depend on the weights) and
`python api.py` is started on it (bench/server.py's `Server`). Every request uses a text no request used
before (TTS runs in the request).

- webrtc: one session (aiortc client, recvonly video + audio, data channel), then per request
  `POST /sessions/{id}/speak`; the first speech frame is the received video frame whose pts is the
  `speech_started` event's frame, the first audio sample the received audio packet holding that frame's
  first sample (both by their RTP timestamps, timed at arrival). Each utterance is interrupted once both
  have arrived (`interrupt_last_sound_s`: from sending `POST .../interrupt` to the arrival of the last
  received audio packet with sound, RMS above SOUND_RMS), and the next request waits until no sentence is
  being synthesised and the idle loop is back.
- mjpeg (baseline, same run and server): `GET /generate?text=...`, time to the first JPEG part for the same
  two texts (sentence-streamed: the first sentence is synthesised before the first frame, the others while
  the stream runs; the page gets the audio from `/get-tts-audio` separately).
Prints one JSON object (each section also goes to stderr as soon as it is measured).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import fixtures  # bench/fixtures.py (sibling)
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from server import Server  # bench/server.py: api.py in a subprocess on the bench avatar

SHORT = "Request {k} asks the avatar a short question, and it answers right away."
LONG_TAIL = (
    " The first sentence is synthesised on its own, so its audio can start the stream at once, while the"
    " next sentences are synthesised behind it, one after the other, and queued for play-out. Long sentences"
    " without a full stop, like this one which goes on and on with commas, clauses and more clauses that"
    " nobody would say in one breath, are cut at clause boundaries instead. A very long run of words without"
    " any punctuation at all is cut at word boundaries so that no single piece of text takes the speech"
    " engine too long and the stream never stalls for it. That is how the first audio arrives quickly even"
    " for a text of a thousand characters like this one, which keeps going with a few more words so that it"
    " is long enough. And this is the final sentence of the long text used by the benchmark, number {k}."
)
LONG = "Request {k} is long." + LONG_TAIL
SOUND_RMS = 1e-3  # a received audio packet louder than this (full scale 1) is sound, not the silence after an interrupt


def long_text(k: int) -> str:
    """A unique text of about 1,000 characters (cut at a word boundary, at most 1,000)."""
    text = LONG.format(k=k) + " It keeps going with a few more words to make up the length." * 4
    return text[:999].rsplit(" ", 1)[0].rstrip(".,") + "."


class BenchPeer:
    """An aiortc client session recording arrival times by RTP timestamp."""

    def __init__(self, url: str):
        self.url = url
        self.pc = RTCPeerConnection()
        self.video: dict[int, float] = {}  # frame k -> arrival
        self.audio: list[tuple[int, int, float, float]] = []  # (pts @48 kHz, samples, arrival, RMS)
        self.events: list[tuple[float, dict]] = []
        self.session_id = ""

    async def open(self, client: httpx.AsyncClient) -> None:
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver("audio", direction="recvonly")
        channel = self.pc.createDataChannel("events")
        channel.on("message", lambda m: self.events.append((time.perf_counter(), json.loads(m))))
        self.pc.on("track", lambda track: asyncio.ensure_future(self._pull(track)))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        body = (await client.post("/webrtc/offer", json={"sdp": self.pc.localDescription.sdp, "type": "offer"})).json()
        self.session_id = body["session_id"]
        await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], body["type"]))
        while len(self.video) < 10:
            await asyncio.sleep(0.05)

    async def _pull(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.perf_counter()
                if track.kind == "video":
                    self.video[frame.pts // 3600] = now
                else:
                    pcm = frame.to_ndarray().astype(np.float32) / 32768.0
                    self.audio.append((frame.pts, frame.samples, now, float(np.sqrt(np.mean(pcm * pcm)))))
        except Exception:  # the track ended
            return

    def event(self, kind: str, utterance: str) -> dict | None:
        return next((e for _, e in self.events if e["type"] == kind and e.get("utterance_id") == utterance), None)

    async def one(self, client: httpx.AsyncClient, text: str) -> dict:
        """Speak `text`; seconds from the request to the first speech video frame and audio sample."""
        start = time.perf_counter()
        r = await client.post(f"/sessions/{self.session_id}/speak", json={"text": text})
        r.raise_for_status()
        utt = r.json()["utterance_id"]
        while (started := self.event("speech_started", utt)) is None:
            await asyncio.sleep(0.005)
        k0 = started["frame"]
        first_sample = k0 * 1920  # 48 kHz samples per 40 ms frame
        while True:
            video = self.video.get(k0) or next((t for k, t in sorted(self.video.items()) if k > k0), None)
            audio = next((t for pts, n, t, _ in self.audio if pts + n > first_sample), None)
            if video is not None and audio is not None:
                break
            await asyncio.sleep(0.005)
        cut = time.perf_counter()
        await client.post(f"/sessions/{self.session_id}/interrupt")
        while (await client.get(f"/sessions/{self.session_id}")).json()["synthesizing"]:
            await asyncio.sleep(0.05)  # a sentence being synthesised when interrupted is finished first
        await asyncio.sleep(1.0)  # back to the idle loop; sound still arriving by now would be counted
        sound = [t for _, _, t, rms in self.audio if t > cut and rms > SOUND_RMS]  # none: 0 (it stopped before)
        return {"first_video_s": video - start, "first_audio_s": audio - start,
                "last_sound_s": (max(sound) if sound else cut) - cut}

    async def close(self, client: httpx.AsyncClient) -> None:
        await client.delete(f"/sessions/{self.session_id}")
        await self.pc.close()


async def first_mjpeg_part(client: httpx.AsyncClient, text: str) -> float:
    """Seconds from GET /generate to its first complete JPEG part (the stream is then dropped)."""
    start = time.perf_counter()
    async with client.stream("GET", "/generate", params={"text": text}) as response:
        if response.status_code != 200:
            raise RuntimeError(f"GET /generate: {response.status_code} {(await response.aread()).decode()[:300]}")
        buf = b""
        async for chunk in response.aiter_raw():
            buf += chunk
            head_end = buf.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(buf[:head_end].split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(buf) >= head_end + 4 + length:
                    return time.perf_counter() - start
    raise RuntimeError("the stream ended before one JPEG part")


def percentiles(values: list[float]) -> dict:
    """p50 / p95 / max in seconds (3 decimals)."""
    return {"p50": round(float(np.percentile(values, 50)), 3), "p95": round(float(np.percentile(values, 95)), 3),
            "max": round(float(np.max(values)), 3), "n": len(values)}


async def measure(url: str, requests: int) -> dict:
    """Both paths, both texts, `requests` each."""
    counter = iter(range(10**6))
    texts = {"one_sentence": lambda: SHORT.format(k=next(counter)), "chars_1000": lambda: long_text(next(counter))}
    out: dict = {"webrtc": {}, "mjpeg": {}}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        peer = BenchPeer(url)
        await peer.open(client)
        await peer.one(client, "Warm up the session.")
        for name, make in texts.items():
            runs = [await peer.one(client, make()) for _ in range(requests)]
            out["webrtc"][name] = {"first_video_frame_s": percentiles([r["first_video_s"] for r in runs]),
                                   "first_audio_sample_s": percentiles([r["first_audio_s"] for r in runs]),
                                   "interrupt_last_sound_s": percentiles([r["last_sound_s"] for r in runs])}
            print(json.dumps({"webrtc": {name: out["webrtc"][name]}}), file=sys.stderr, flush=True)
        await peer.close(client)
        await first_mjpeg_part(client, "Warm up the stream.")
        for name, make in texts.items():
            out["mjpeg"][name] = {"first_video_frame_s": percentiles(
                [await first_mjpeg_part(client, make()) for _ in range(requests)])}
            print(json.dumps({"mjpeg": {name: out["mjpeg"][name]}}), file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20, help="requests per path and text (default 20)")
    parser.add_argument("--size", default="small", choices=["small", "328"])
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads in the server")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")

    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_webrtc_")) / args.size
    fixtures.make_avatar(fixtures.default_video(), root, args.size, "whisper")
    report: dict = {"cpu_count": os.cpu_count(), "size": args.size, "threads": args.threads,
                    "requests": args.requests, "text_chars": {"one_sentence": len(SHORT.format(k=0)),
                                                              "chars_1000": len(long_text(0))}}
    with Server(root, args.threads, args.batch_size) as server:
        report.update(asyncio.run(measure(server.url, args.requests)))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
