"""MJPEG delivery: multipart framing, real-time pacing against the audio clock, stream counters.

A stream is a blocking `FrameSource` (one `next_batch()` call = one engine batch of JPEG frames)
driven from a worker thread (`anyio.to_thread.run_sync`) by a producer task that fills a bounded
asyncio queue; the response's async generator takes frames from the queue and sends frame i no earlier
than `start + i / fps`, where `start` is the moment the first part is sent. When the client goes away,
Starlette cancels the generator at its current `await`; its `finally` sets the source's cancel flag,
cancels the producer and waits for the batch in flight, so no work continues and no task leaks.

Nothing of a stream outlives its client: the generator drops its references to the source, the queue
and the producer when it ends (a cancellation's traceback keeps finished frames, and their locals, alive
until a garbage collection otherwise), the worker thread gets only a weak reference to the source, and a
client that stops reading is given up after `send_timeout_s` (`MJPEGResponse`).

A stream can also be stopped from outside (`DELETE /generate/{request_id}`): its `stop` event makes the
generator send the closing boundary at once (the frames still queued are dropped), give its place back
(`on_close`) and end the response; the batch still in flight in the worker thread is waited for in the
background before the source is closed, so the response does not wait for it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import numpy as np
import simplejpeg
from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

BOUNDARY = "frame"
MJPEG_MEDIA_TYPE = f"multipart/x-mixed-replace; boundary={BOUNDARY}"
MJPEG_END = f"--{BOUNDARY}--\r\n".encode()
MJPEG_SEND_TIMEOUT_S = 10.0  # a client that takes no data for this long is given up


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

    @property
    def total(self) -> int | None:
        """Frames this source will produce (None while not known yet: streamed speech)."""
        ...

    cancel: threading.Event

    def next_batch(self) -> list[bytes] | None:
        """The next JPEG frames (blocking), or None when finished or cancelled."""
        ...


def weak_next_batch(source: FrameSource) -> Callable[[], list[bytes] | None]:
    """`source.next_batch` through a weak reference (None once the source is gone), for the worker
    thread: a finished call's frames, kept by a cancellation traceback, then hold no stream alive."""
    ref = weakref.ref(source)

    def next_batch() -> list[bytes] | None:
        alive = ref()
        return None if alive is None else alive.next_batch()

    return next_batch


def close_source(source: FrameSource) -> None:
    """Cancel `source` and let it release what it holds (`close()`, when it has one)."""
    source.cancel.set()
    close = getattr(source, "close", None)
    if close is not None:
        close()


class _Stopped:
    """Queue marker: the stream was stopped from outside (`paced_parts`' `stop` event)."""


STOPPED = _Stopped()
QueueItem = bytes | None | Exception | _Stopped
_BACKGROUND: set[asyncio.Task] = set()  # wind-downs of stopped streams (a reference until they finish)


async def _stop_when(stop: asyncio.Event, queue: asyncio.Queue[QueueItem], cancel: threading.Event) -> None:
    """When `stop` is set: cancel generation, drop the queued frames and wake the consumer."""
    await stop.wait()
    cancel.set()
    while not queue.empty():
        queue.get_nowait()
    queue.put_nowait(STOPPED)


async def _wind_down(source: FrameSource, producer: asyncio.Task, in_flight: list[asyncio.Future],
                     stats: StreamStats, outcome: str, sent: int) -> None:
    """Wait for the batch in flight (threads cannot be interrupted; one batch is short), then count the
    outcome and close the source."""
    try:
        # shielded: after a disconnect the surrounding anyio scope is cancelled and would re-cancel any await
        with anyio.CancelScope(shield=True):
            await asyncio.gather(producer, *in_flight, return_exceptions=True)
    finally:
        stats.add(active_streams=-1, **{f"streams_{outcome}": 1})
        log.info("stream %s after %d of %s frames", outcome, sent, source.total)
        close_source(source)
        in_flight.clear()


async def paced_parts(source: FrameSource, stats: StreamStats, fps: float, queue_frames: int = 16,
                      on_close: Callable[[], None] | None = None,
                      stop: asyncio.Event | None = None) -> AsyncIterator[bytes]:
    """Multipart parts of `source`'s frames at real-time pace, then the closing boundary.

    Frame i is sent no earlier than `start + i / fps`; it is late only when generation is slower than
    real time (frames are never dropped). The outcome ("completed", "cancelled" or "failed") is
    counted in `stats` and logged; `on_close()` runs once, when the last frame is sent or as soon as the
    stream ends otherwise (admission gives the place back; a batch still in flight only finishes).
    Setting `stop` ends the stream at once: the closing boundary follows the frame being sent, `on_close()`
    runs first, and the outcome is "cancelled"."""
    queue: asyncio.Queue[QueueItem] = asyncio.Queue(maxsize=max(1, queue_frames))
    cancel, fetch = source.cancel, weak_next_batch(source)

    in_flight: list[asyncio.Future] = []  # the batch being made in a worker thread

    async def produce(queue: asyncio.Queue[QueueItem]) -> None:
        try:
            while not cancel.is_set():
                # shielded: cancelling the producer must not abandon the thread, which finishes its batch
                call = asyncio.ensure_future(anyio.to_thread.run_sync(fetch))
                in_flight[:] = [call]
                batch = await asyncio.shield(call)
                if batch is None:
                    break
                for jpeg in batch:
                    await queue.put(jpeg)
            await queue.put(None)
        except Exception as exc:  # hand the failure to the consumer, which logs it
            await queue.put(exc)

    stats.add(streams_started=1, active_streams=1)
    outcome = "cancelled"
    producer = asyncio.create_task(produce(queue))
    watcher = asyncio.create_task(_stop_when(stop, queue, cancel)) if stop is not None else None
    loop = asyncio.get_running_loop()
    start: float | None = None
    index = 0
    item: QueueItem = None
    stopped = False
    try:
        while True:
            item = await queue.get()
            if item is None or item is STOPPED:
                stopped = item is STOPPED
                break
            if isinstance(item, BaseException):
                outcome = "failed"
                log.error("stream generation failed after %d frames", index, exc_info=item)
                return
            assert isinstance(item, bytes)
            if start is None:
                start = loop.time()
            delay = start + index / fps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            yield mjpeg_part(item)
            stats.add(frames_sent=1)
            index += 1
        outcome = "cancelled" if stopped else "completed"
        if on_close is not None:  # generation is over: a client chaining streams finds the place free
            on_close()
            on_close = None
        yield MJPEG_END
    finally:
        cancel.set()
        if watcher is not None:
            watcher.cancel()
        if not producer.done():
            producer.cancel()
        if on_close is not None:  # the place comes back now: the batch in flight is the last work done
            on_close()
        wind_down = _wind_down(source, producer, in_flight, stats, outcome, index)
        # this frame may outlive the stream (kept by a cancellation traceback): keep nothing big in it
        del source, producer, queue, item, watcher
        if stopped:  # the response ends now; the batch in flight is waited for in the background
            task = asyncio.ensure_future(wind_down)
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)
        else:
            await wind_down


class ClientNotReading(Exception):
    """A send to an MJPEG client did not complete within the send timeout."""


class MJPEGResponse(StreamingResponse):
    """`StreamingResponse` for `multipart/x-mixed-replace` that always closes its body iterator, so
    cleanup runs at once on every ASGI server (with spec >= 2.4 a disconnect surfaces as an error from
    `send` while the generator is suspended at a `yield`), and gives up on a client whose sends have
    not completed for `send_timeout_s` (it stopped reading: its stream would be held for ever)."""

    media_type = MJPEG_MEDIA_TYPE
    send_timeout_s = MJPEG_SEND_TIMEOUT_S

    def __init__(self, content: AsyncIterator[bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None, media_type: str | None = None,
                 background: BackgroundTask | None = None, *, on_finish: Callable[[], None] | None = None) -> None:
        """`on_finish()` runs when the response is over however it ended (also when its body never
        started: the place and the request id are given back even then; it must be idempotent)."""
        super().__init__(content, status_code, headers, media_type, background)
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        timeout = self.send_timeout_s

        async def timed_send(message: Message) -> None:
            try:
                with anyio.fail_after(timeout):
                    await send(message)
            except TimeoutError:
                raise ClientNotReading() from None

        try:
            await super().__call__(scope, receive, timed_send)
        except ClientNotReading:  # the server closes the connection (the response is incomplete)
            log.warning("MJPEG client not reading for %.1f s: stream stopped", timeout)
        finally:
            try:
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                if self.on_finish is not None:
                    self.on_finish()
