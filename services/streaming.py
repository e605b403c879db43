"""MJPEG delivery: multipart framing, real-time pacing against the audio clock, stream counters.

A stream is a blocking `FrameSource` (one `next_batch()` call = one engine batch of JPEG frames)
driven from a worker thread (`anyio.to_thread.run_sync`) by a producer task that fills a bounded
asyncio queue; the response's async generator takes frames from the queue and sends frame i no earlier
than `start + i / fps`, where `start` is the moment the first part is sent. When the client goes away,
Starlette cancels the generator at its current `await`; its `finally` sets the source's cancel flag,
cancels the producer and waits for the batch in flight, so no work continues and no task leaks.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import numpy as np
import simplejpeg
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

BOUNDARY = "frame"
MJPEG_MEDIA_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
MJPEG_END = f"--{BOUNDARY}--\r\n".encode()


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 BGR frame (simplejpeg, 4:2:0 chroma): the one encoder of every stream."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=int(quality), colorspace="BGR",
                                  colorsubsampling="420")


def mjpeg_part(jpeg: bytes) -> bytes:
    """One multipart part: boundary, `Content-Type` and `Content-Length` headers, the JPEG, CRLF."""
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n".encode()
    return head + jpeg + b"\r\n"


@dataclass
class StreamStats:
    """Process-wide stream counters (thread-safe), reported by /health and /debug/status."""

    streams_started: int = 0
    streams_completed: int = 0
    streams_cancelled: int = 0
    streams_failed: int = 0
    active_streams: int = 0
    frames_generated: int = 0
    frames_sent: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        """Add to one or more counters atomically."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of every counter."""
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class FrameSource(Protocol):
    """What the pacer drives: a blocking producer of JPEG batches with a cancel flag."""

    total: int  # frames this source will produce (announced in the response headers)
    cancel: threading.Event

    def next_batch(self) -> list[bytes] | None:
        """The next JPEG frames (blocking), or None when finished or cancelled."""
        ...


async def paced_parts(source: FrameSource, stats: StreamStats, fps: float, queue_frames: int = 16,
                      on_close: Callable[[], None] | None = None) -> AsyncIterator[bytes]:
    """Multipart parts of `source`'s frames at real-time pace, then the closing boundary.

    Frame i is sent no earlier than `start + i / fps`; it is late only when generation is slower than
    real time (frames are never dropped). The outcome ("completed", "cancelled" or "failed") is
    counted in `stats` and logged; `on_close()` runs once at the end (admission gives the place back).
    """
    queue: asyncio.Queue[bytes | None | Exception] = asyncio.Queue(maxsize=max(1, queue_frames))

    async def produce() -> None:
        try:
            while not source.cancel.is_set():
                batch = await anyio.to_thread.run_sync(source.next_batch)
                if batch is None:
                    break
                for jpeg in batch:
                    await queue.put(jpeg)
            await queue.put(None)
        except Exception as exc:  # hand the failure to the consumer, which logs it
            await queue.put(exc)

    stats.add(streams_started=1, active_streams=1)
    outcome = "cancelled"
    producer = asyncio.create_task(produce())
    loop = asyncio.get_running_loop()
    start: float | None = None
    index = 0
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                outcome = "failed"
                log.error("stream generation failed after %d frames", index, exc_info=item)
                return
            if start is None:
                start = loop.time()
            delay = start + index / fps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield mjpeg_part(item)
            stats.add(frames_sent=1)
            index += 1
        yield MJPEG_END
        outcome = "completed"
    finally:
        source.cancel.set()
        if not producer.done():
            producer.cancel()
        try:
            # Wait for the batch in flight (threads cannot be interrupted; one batch is short). Shielded:
            # after a disconnect the surrounding anyio scope is cancelled and would re-cancel any await.
            with anyio.CancelScope(shield=True):
                await asyncio.gather(producer, return_exceptions=True)
        finally:
            stats.add(active_streams=-1, **{f"streams_{outcome}": 1})
            log.info("stream %s after %d of %d frames", outcome, index, source.total)
            if on_close is not None:
                on_close()


class MJPEGResponse(StreamingResponse):
    """`StreamingResponse` for `multipart/x-mixed-replace` that always closes its body iterator, so
    cleanup runs at once on every ASGI server (with spec >= 2.4 a disconnect surfaces as an error from
    `send` while the generator is suspended at a `yield`)."""

    media_type = MJPEG_MEDIA_TYPE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
