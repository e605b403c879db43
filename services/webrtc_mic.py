"""Live microphone over WebRTC: the client's audio track drives the avatar on the `/ws/live` timeline.

A session opened with `"mode": "mic"` (`services/webrtc.py`) receives the client's microphone as an Opus
audio track. `MicFrames.consume` takes its decoded frames (aiortc: 48 kHz PCM16), mixes them to mono,
resamples them to 16 kHz with `services.timeline.PCMDecoder` (soxr, as `/ws/live` does for other rates), fills
the gaps left by lost packets with silence (by their RTP timestamps, so the audio clock never slips), and
pushes them into a `services.timeline.LiveTimeline`: the same sessions, speech gate, streamed Whisper features,
frame plan, announced latency and rendering as `WS /ws/live`. `PixelTimeline` only hands the frames out
as BGR arrays instead of JPEGs, since the video track encodes them itself.

The timeline's clock is the session's media clock (started by the video track's first frame), so live
frame k is video frame k (pts 3600 k): it shows the microphone's audio of `latency_ms` earlier. The video
track takes frame k when it is due (`picture`); a frame that is not ready within one frame interval is
dropped, as in speech sessions. The timeline's `speaking` / `idle` events go out on the data channel
when their frame is taken. The client's `end` and `stop` commands are those of `/ws/live`: the audio so
far plays out, or what is not shown yet is dropped and the idle loop returns with the next frame.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from services.sessions import Clock
from services.timeline import Clock as LiveClock
from services.timeline import Item, LiveOptions, LiveTimeline, PCMDecoder
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, SAMPLE_RATE

GAP_FILL_MAX_S = 1.0  # a hole in the RTP timestamps up to this long is filled with silence
POLL_S = 0.004  # how often the video track looks for a frame that is not ready yet


class PixelTimeline(LiveTimeline):
    """A `LiveTimeline` whose frames are BGR arrays (the WebRTC video track encodes them itself)."""

    def picture(self, frame: np.ndarray) -> Any:
        """The frame itself (a copy when it is the engine's reused output buffer)."""
        return frame if self.scheduler is not None else frame.copy()

    def idle_picture(self, index: int) -> Any:
        """Idle source frame `index` (read-only)."""
        return self.idle.frame(index)


def mono_pcm16(frame: av.AudioFrame) -> bytes:
    """The samples of a decoded audio frame as mono PCM16 little-endian bytes (channels averaged)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        samples = data.reshape(channels, -1).astype(np.float32).mean(axis=0)
    else:
        samples = data.reshape(-1, channels).astype(np.float32).mean(axis=1)
    if frame.format.name.startswith("flt"):
        samples = samples * 32767.0
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()


class MicFrames:
    """The video frames of a live-microphone session: the client's audio in, frame k's picture out."""

    def __init__(self, scheduler: FrameScheduler, opts: LiveOptions, emit: Callable[[dict], None]):
        self.clock = Clock()
        self.emit = emit
        self.closed = False
        self.started = False
        self.state = "idle"  # of the last frame taken: idle, speech or blend
        self.audio_seconds = 0.0  # microphone audio received (16 kHz seconds)
        self.filled_seconds = 0.0  # of which silence put in for lost packets
        self._live_clock = LiveClock(FPS, t0=0.0)
        self._items: dict[int, Item] = {}
        self._committed = -1  # the last frame the video track has taken (or given up on)
        self._lock = threading.Lock()
        self._failed = False
        self._decoder: PCMDecoder | None = None
        self.timeline = PixelTimeline(scheduler.engine, opts, self._live_clock, self._put, scheduler=scheduler)

    @property
    def latency_ms(self) -> float:
        """The live timeline's algorithmic latency (the `latency_ms` of `/ws/live`'s ready event)."""
        return self.timeline.latency_ms

    @property
    def error(self) -> BaseException | None:
        """Why the timeline failed, if it did."""
        return self.timeline.error

    def speaking(self) -> bool:
        """Whether the frame playing now shows speech."""
        return self.state == "speech"

    # -- the timeline's side (worker threads) ---------------------------------------------------------

    def _put(self, item: Item | None) -> None:
        with self._lock:
            if item is None:  # the timeline failed (its `error` says why)
                self._failed = True
            elif item.epoch == self.timeline.epoch:  # (one planned before a `stop` is never shown)
                self._items[item.k] = item

    # -- the video track's side -----------------------------------------------------------------------

    def start(self) -> None:
        """Run the timeline on the media clock (from the video track's first frame on)."""
        if not self.started:
            self._live_clock.t0 = self.clock.start()
            self.timeline.start_threads()
            self.started = True

    async def picture(self, k: int, give_up_at: float) -> np.ndarray | None:
        """Frame k's picture, or None when it is not ready by monotonic `give_up_at` (or was dropped)."""
        self.start()
        while True:
            found, picture = self._take(k)
            if found or self.closed or self._failed or time.monotonic() > give_up_at:
                self._committed = k
                return picture
            await asyncio.sleep(POLL_S)

    def _take(self, k: int) -> tuple[bool, Any]:
        """Hand out the frames up to k (earlier ones were given up on: only their events count)."""
        with self._lock:
            done = sorted(i for i in self._items if i <= k)
            items = [item for item in (self._items.pop(i) for i in done) if item.epoch == self.timeline.epoch]
        for item in items:
            for event in item.events:
                self.emit(event)
            self.state = item.kind
            self.timeline.sent(item.k)
        if items and items[-1].k == k:
            return True, items[-1].jpeg
        return False, None

    # -- the microphone's side --------------------------------------------------------------------------

    async def consume(self, track: MediaStreamTrack) -> None:
        """Feed the client's audio track into the timeline until it ends; then its last words play out."""
        next_pts: int | None = None
        try:
            while not self.closed:
                frame = await track.recv()
                assert isinstance(frame, av.AudioFrame)
                if not self.started:
                    continue  # no media clock yet: no frame could show this audio
                if self._decoder is None or self._decoder.rate != frame.sample_rate:
                    self._flush()
                    self._decoder, next_pts = PCMDecoder(frame.sample_rate), None
                pcm = mono_pcm16(frame)
                if next_pts is not None and frame.pts is not None and frame.time_base is not None:
                    pcm = self._silence(float((frame.pts - next_pts) * frame.time_base), frame.sample_rate) + pcm
                if frame.pts is not None:
                    next_pts = frame.pts + frame.samples
                self._push(self._decoder.decode(pcm))
        except MediaStreamError:  # the client's track ended
            pass
        if not self.closed:
            self.end()

    def _silence(self, gap_s: float, rate: int) -> bytes:
        """PCM16 silence for a hole of `gap_s` seconds in the timestamps (none when it is not a hole)."""
        if not 0.0 < gap_s <= GAP_FILL_MAX_S:
            return b""
        self.filled_seconds += gap_s
        return bytes(2 * int(round(gap_s * rate)))

    def _push(self, samples: np.ndarray) -> None:
        if samples.size:
            self.audio_seconds += samples.size / SAMPLE_RATE
            self.timeline.push_audio(samples, time.monotonic())

    def _flush(self) -> None:
        if self._decoder is not None:
            self._push(self._decoder.finish())

    def end(self) -> None:
        """The client's `end`: the audio so far plays out, then the idle loop returns; audio that comes later
        starts a new stretch."""
        self._flush()
        self.timeline.stop(time.monotonic())

    def stop(self) -> dict[str, Any]:
        """The client's `stop`: drop the audio not shown yet and show the idle loop from the next frame the
        video track has not taken; the fields of the `stopped` event (`LiveTimeline.interrupt`)."""
        if self._decoder is not None:
            self._decoder = PCMDecoder(self._decoder.rate)  # later audio is a new stream
        return self.timeline.interrupt(self._committed + 1)

    def close(self) -> None:
        """Stop the timeline's threads and wait for them (blocking: call it from a worker thread)."""
        self.closed = True
        self.timeline.close()
        self.timeline.join()
