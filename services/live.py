"""Live avatar: the endless idle loop (`GET /idle`) and live microphone audio over a WebSocket
(`WS /ws/live`). `api.py` includes `router`; routes get their services from `services/deps.py`, and the
app-wide token check covers both (WebSockets pass the token as `?access_token=`).

The frames of a connection come from its `services.timeline.LiveTimeline` (sessions, latency, energy
gate, idle loop; its docstring gives the timeline in output frames).

Per connection, one worker thread turns audio into features and another plans and renders frames (so
the two overlap on two cores); an async sender paces the frames; an async receiver parses messages. A
client that stops reading is closed after `server.ws_send_timeout_s` without affecting other connections.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated
from urllib.parse import urlsplit

import anyio
from fastapi import APIRouter, Query, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketDisconnected, WebSocketState

from services.deps import Services, ServicesDep
from services.errors import domain_error
from services.streaming import MJPEGResponse, mjpeg_part
from services.timeline import (
    LIVE_OBJECTS,
    Clock,
    IdleLoop,
    Item,
    LiveOptions,
    LiveTimeline,
    PCMDecoder,
    idle_loop,
)
from synctalk.engine import pingpong_step
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, SAMPLE_RATE

log = logging.getLogger("live")

router = APIRouter(tags=["live"])

MIN_RATE, MAX_RATE = 8000, 192000
MAX_CHUNK_SECONDS = 5.0  # one binary message holds at most this much audio


# ---------------------------------------------------------------------------------------------
# GET /idle

AvatarQuery = Annotated[str | None, Query(description="avatar name (see /health); default avatar if omitted")]


async def idle_parts(loop_frames: IdleLoop, quality: int, fps: int) -> AsyncIterator[bytes]:
    """Endless multipart parts of the idle loop, paced at `fps` (never faster; a slow reader is not
    caught up with a burst)."""
    pos, direction = 0, 1
    period = 1.0 / fps
    next_at = time.monotonic()
    while True:
        jpeg = await anyio.to_thread.run_sync(loop_frames.jpeg, pos, quality)
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -period:  # the reader was slow: restart the schedule instead of bursting
            next_at = time.monotonic()
        yield mjpeg_part(jpeg)
        next_at += period
        pos, direction = pingpong_step(pos, direction, loop_frames.count)


@router.get("/idle", response_class=MJPEGResponse, responses={200: {
    "content": {"multipart/x-mixed-replace; boundary=frame": {"schema": {"type": "string", "format": "binary"}}},
    "description": "endless multipart MJPEG at 25 fps; ends when the client disconnects"}})
async def idle(services: ServicesDep, avatar: AvatarQuery = None) -> MJPEGResponse:
    """Endless MJPEG of the avatar at rest: the first `server.idle_seconds` of its source frames walked
    back and forth (ping-pong) at 25 fps, mouth as recorded."""
    info = services.models.resolve(avatar)
    engine = await anyio.to_thread.run_sync(services.models.engine, info.name)
    opts = LiveOptions.from_settings(services.settings)
    frames = idle_loop(engine, opts.idle_seconds, FPS)
    headers = {"X-FPS": str(FPS), "X-Avatar": info.name, "X-Idle-Frames": str(frames.count),
               "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return MJPEGResponse(idle_parts(frames, opts.jpeg_quality, FPS), headers=headers)


# ---------------------------------------------------------------------------------------------
# WS /ws/live


class ClientMessageError(ValueError):
    """A malformed client message (answered with an `error` event; the connection stays open)."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code


CONFIG_KEYS = {"type", "sample_rate", "realtime", "frame_events"}


def parse_control(text: str) -> dict:
    """A client's JSON control message, validated; raises ClientMessageError."""
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ClientMessageError("bad_json", f"text messages must be JSON objects: {exc}") from None
    if not isinstance(msg, dict):
        raise ClientMessageError("bad_message", "text messages must be JSON objects with a 'type'")
    kind = msg.get("type")
    if kind not in ("config", "start", "stop", "end"):
        raise ClientMessageError("unknown_type", f"unknown message type {kind!r}; expected config, start, stop "
                                                 "or end")
    if kind == "config":
        extra = set(msg) - CONFIG_KEYS
        if extra:
            raise ClientMessageError("bad_config", f"unknown config fields: {', '.join(sorted(extra))}")
        if "sample_rate" in msg:
            rate = msg["sample_rate"]
            if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
                raise ClientMessageError("bad_config", f"sample_rate must be an integer in {MIN_RATE}..{MAX_RATE}, "
                                                       f"got {rate!r}")
        for key in ("realtime", "frame_events"):
            if key in msg and not isinstance(msg[key], bool):
                raise ClientMessageError("bad_config", f"{key} must be true or false, got {msg[key]!r}")
    elif set(msg) - {"type"}:
        raise ClientMessageError("bad_message", f"{kind} takes no fields")
    return msg


class AheadMeter:
    """Audio a client has sent ahead of real time: a bucket that fills with each chunk's duration and
    drains at one second per second (a real-time microphone keeps it near one chunk)."""

    def __init__(self) -> None:
        self.ahead_s = 0.0
        self._last: float | None = None

    def add(self, seconds: float, now: float) -> float:
        """Count a chunk of `seconds` arriving at monotonic `now`; returns the seconds ahead."""
        drained = 0.0 if self._last is None else now - self._last
        self._last = now
        self.ahead_s = max(0.0, self.ahead_s - drained) + seconds
        return self.ahead_s


class LiveConnection:
    """One WebSocket client: receiver task, sender task and the timeline's two worker threads."""

    def __init__(self, ws: WebSocket, services: Services, scheduler: FrameScheduler, avatar: str):
        self.ws = ws
        self.services = services
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.avatar = avatar
        self.opts = LiveOptions.from_settings(services.settings)
        self.loop = asyncio.get_running_loop()
        self.out: collections.deque[Item | None] = collections.deque()  # from the worker, in frame order
        self.out_ready = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.clock = Clock(FPS)
        self.timeline: LiveTimeline | None = None
        self.decoder = PCMDecoder(SAMPLE_RATE)
        self.frame_events = False
        self.frames_sent = 0
        self.frames_dropped = 0
        self.committed = -1  # the last frame the sender has taken (sent, or dropped as late)
        self.ahead = AheadMeter()
        LIVE_OBJECTS.add(self)

    def _emit_threadsafe(self, item: Item | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._put, item)
        except RuntimeError:  # the loop is closed: the connection is gone
            pass

    def _put(self, item: Item | None) -> None:
        self.out.append(item)
        self.out_ready.set()

    async def _next_item(self) -> Item | None:
        while not self.out:
            self.out_ready.clear()
            await self.out_ready.wait()
        return self.out.popleft()

    def _successor_due(self, now: float) -> bool:
        """Whether a later frame is already waiting and due (so the current one would be stale)."""
        return any(i is not None and i.jpeg is not None and self.clock.deadline(i.k) <= now for i in self.out)

    async def send_json(self, obj: dict) -> None:
        """Send one JSON event (raises SlowClient when the client does not take it in time)."""
        await self._send(text=json.dumps(obj))

    async def _send(self, text: str | None = None, data: bytes | None = None) -> None:
        async with self.send_lock:
            await self._send_locked(text, data)

    async def _send_locked(self, text: str | None = None, data: bytes | None = None) -> None:
        """Send one message; the caller holds `send_lock`."""
        try:
            if text is not None:
                await asyncio.wait_for(self.ws.send_text(text), self.opts.send_timeout_s)
            else:
                await asyncio.wait_for(self.ws.send_bytes(data or b""), self.opts.send_timeout_s)
        except asyncio.TimeoutError:
            raise SlowClient() from None

    @property
    def running(self) -> LiveTimeline:
        """The connection's timeline (made when `run` starts, before any handler that uses it)."""
        if self.timeline is None:
            raise RuntimeError("the live timeline has not started")
        return self.timeline

    async def stop_speech(self) -> None:
        """The client's `stop`: drop all audio not yet shown and go back to the idle loop with the next
        frame; answered with `stopped` before any frame after it."""
        self.decoder = PCMDecoder(self.decoder.rate)  # the next audio is a new stream
        self.ahead = AheadMeter()  # nothing is buffered any more
        async with self.send_lock:  # the sender is between frames: `committed` is the last one out
            info = self.running.interrupt(self.committed + 1)
            await self._send_locked(text=json.dumps({"type": "stopped", **info}))

    async def run(self) -> None:
        """Serve the connection until the client leaves, is dropped, or generation fails."""
        self.timeline = await anyio.to_thread.run_sync(
            lambda: LiveTimeline(self.engine, self.opts, self.clock, self._emit_threadsafe,
                                 scheduler=self.scheduler))
        frame_h, frame_w = self.engine.frame_shape[:2]
        await self.send_json({"type": "ready", "fps": FPS, "latency_ms": round(self.timeline.latency_ms),
                              "sample_rate": SAMPLE_RATE, "avatar": self.avatar, "width": int(frame_w),
                              "height": int(frame_h), "idle_frames": self.timeline.idle.count,
                              "jpeg_quality": self.opts.ws_jpeg_quality,
                              "vad_threshold_db": self.opts.vad_threshold_db,
                              "vad": "energy" if self.opts.vad_probability is None else "silero"})
        self.clock.t0 = time.monotonic()
        self.timeline.start_threads()
        receiver = asyncio.create_task(self.receive())
        sender = asyncio.create_task(self.send_frames())
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, SlowClient):
                    log.warning("live client not reading for %.1f s: closing it", self.opts.send_timeout_s)
                    await self._close(1008, "client is not reading")
                elif isinstance(exc, AudioAhead):
                    await self._close(1008, "audio too far ahead of real time")
                elif exc is not None and not isinstance(exc, CLIENT_GONE):
                    log.error("live connection failed: %s", exc, exc_info=exc)
                    await self._close(1011, "internal error")
        finally:
            for task in (receiver, sender):
                task.cancel()
            for outcome in await asyncio.gather(receiver, sender, return_exceptions=True):
                if isinstance(outcome, BaseException):
                    forget_frames(outcome)
            self.timeline.close()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.timeline.join)
            st = self.timeline.stats
            log.info("live connection closed: %d frames sent, %d dropped; %d rendered (%.1f ms each), "
                     "features %.1f s", self.frames_sent, self.frames_dropped, st["rendered"],
                     1000 * st["render_s"] / max(1, st["rendered"]), st["features_s"])

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            try:
                await asyncio.wait_for(self.ws.close(code, reason), 1.0)
            except Exception:  # the transport is already broken
                pass

    async def error(self, code: str, detail: str) -> None:
        """Send an `error` event."""
        await self.send_json({"type": "error", "error": code, "detail": detail})

    async def receive(self) -> None:
        """Read client messages: audio to the timeline, control messages applied, bad ones answered."""
        max_bytes = int(MAX_CHUNK_SECONDS * MAX_RATE * 2)
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data, text = msg.get("bytes"), msg.get("text")
            now = time.monotonic()
            if data is not None:
                limit = int(MAX_CHUNK_SECONDS * self.decoder.rate * 2)
                if len(data) > min(limit, max_bytes):
                    await self.error("chunk_too_large", f"binary message of {len(data)} bytes is over "
                                     f"{MAX_CHUNK_SECONDS:g} s of audio; send smaller chunks")
                    continue
                ahead = self.ahead.add(len(data) / 2 / self.decoder.rate, now)
                if ahead > self.opts.max_ahead_s:
                    log.warning("live client sent %.1f s of audio ahead of real time: closing it", ahead)
                    await self.error("audio_ahead", f"audio arrives {ahead:.1f} s ahead of real time; the limit "
                                     f"(server.ws_max_ahead_s) is {self.opts.max_ahead_s:g} s: send it as it is "
                                     "recorded")
                    raise AudioAhead()  # run() closes the socket (1008) before the sender is stopped
                pcm = self.decoder.decode(data)
                if pcm.size:
                    self.running.push_audio(pcm, now)
                continue
            if text is None:
                continue
            try:
                control = parse_control(text)
            except ClientMessageError as exc:
                await self.error(exc.code, str(exc))
                continue
            kind = control["type"]
            if kind == "config":
                if "sample_rate" in control and control["sample_rate"] != self.decoder.rate:
                    tail = self.decoder.finish()
                    if tail.size:
                        self.running.push_audio(tail, now)
                    self.decoder = PCMDecoder(control["sample_rate"])
                if "realtime" in control:
                    self.running.realtime = control["realtime"]
                if "frame_events" in control:
                    self.frame_events = control["frame_events"]
            elif kind == "start":
                self.running.start(now)
            elif kind == "stop":
                await self.stop_speech()
            else:  # end: the audio so far plays out
                tail = self.decoder.finish()
                if tail.size:
                    self.running.push_audio(tail, now)
                self.running.stop(now)

    async def send_frames(self) -> None:
        """Send the worker's frames (and their events) at their due times, never faster than fps."""
        fps = FPS
        period = 1.0 / fps
        last_at: float | None = None
        while True:
            item = await self._next_item()
            if item is None:
                err = self.running.error
                await self.error("internal", f"frame generation failed: {err}")
                raise RuntimeError(f"timeline failed: {err}")
            if item.epoch != self.running.epoch:
                continue  # planned before a stop: never shown
            for event in item.events:
                await self.send_json(event)
            if item.jpeg is None:
                self.frames_dropped += 1
                self.committed = item.k
                self.running.sent(item.k)
                continue
            deadline = self.clock.deadline(item.k)
            send_at = max(deadline, time.monotonic())
            if last_at is not None:  # never faster than fps (a skipped slot lets the stream catch up)
                send_at = max(send_at, last_at + period - 0.002)
            late = send_at - deadline
            if self.running.realtime and late >= period and self._successor_due(send_at):
                self.frames_dropped += 1  # a newer frame is already due: skip this stale one
                self.committed = item.k
                self.running.sent(item.k)
                continue
            if not self.running.realtime and late > 0.002:
                self.clock.shift(late)
            delay = send_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            async with self.send_lock:  # the frame event and its frame together, never split by a stop
                if item.epoch != self.running.epoch:
                    continue  # a stop came while it waited
                self.committed = item.k
                if self.frame_events:
                    await self._send_locked(text=json.dumps({
                        "type": "frame", "frame": item.k, "state": item.kind,
                        "audio_time": None if item.audio_time is None else round(item.audio_time, 4)}))
                await self._send_locked(data=item.jpeg)
            last_at = send_at
            self.frames_sent += 1
            self.running.sent(item.k)


def forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of `exc` and the exceptions it chains to. The event loop may keep the last
    exception a socket raised (uvloop does); its traceback would otherwise keep this connection's frames,
    and so the connection, its timeline and their buffers, alive after the client is gone."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.__traceback__ = None
        todo += [item.__cause__, item.__context__]


class SlowClient(Exception):
    """A send did not complete within `server.ws_send_timeout_s`: the client stopped reading."""


class AudioAhead(Exception):
    """The client sent audio more than `server.ws_max_ahead_s` ahead of real time (closed with 1008)."""


# the client is gone: starlette's disconnect errors, uvicorn's ClientDisconnected (an OSError)
CLIENT_GONE = (WebSocketDisconnect, WebSocketDisconnected, ConnectionError, OSError)


def origin_allowed(origin: str | None, host: str | None, allowed: list[str]) -> bool:
    """Whether a WebSocket handshake's `Origin` may connect: no Origin (a non-browser client) always;
    otherwise one of `allowed` (`server.cors_origins`, `*` for any) or, when that is empty, the same
    origin (its host:port equals the `Host` header)."""
    if not origin:
        return True
    if allowed:
        return "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}
    return bool(host) and urlsplit(origin).netloc.lower() == str(host).lower()


@router.websocket("/ws/live")
async def ws_live(websocket: WebSocket, services: ServicesDep, avatar: str | None = None) -> None:
    """Live microphone in, lip-synced JPEG frames out (protocol in docs/api-reference.md)."""
    origin = websocket.headers.get("origin")
    if not origin_allowed(origin, websocket.headers.get("host"), list(services.settings.server.cors_origins)):
        log.warning("live connection from origin %s refused (server.cors_origins)", origin)
        await websocket.close(1008, "origin not allowed")  # before accept: the handshake gets 403
        return
    await websocket.accept()
    try:
        await serve_live(websocket, services, avatar)
    except CLIENT_GONE as exc:  # the client left early (e.g. before `ready`): one line, no traceback
        log.info("live client left before the connection was set up: %s", type(exc).__name__)


async def serve_live(websocket: WebSocket, services: Services, avatar: str | None) -> None:
    """Load the avatar's engine and run the connection (errors before `ready` are sent as an event)."""
    try:
        info = services.models.resolve(avatar)
        scheduler = await anyio.to_thread.run_sync(services.models.scheduler, info.name)
        if scheduler.engine.mode != "whisper":
            raise ValueError(f"avatar {info.name!r} uses {scheduler.engine.mode} audio features; live mode "
                             f"needs a whisper-mode checkpoint")
    except Exception as exc:
        code = (domain_error(exc) or (503, "unavailable"))[1]
        await websocket.send_text(json.dumps({"type": "error", "error": code, "detail": str(exc)}))
        await websocket.close(1008 if code == "unknown_avatar" else 1011)
        return
    if not services.admission.try_acquire("live"):
        await websocket.send_text(json.dumps({"type": "error", "error": "busy", "detail":
                                              f"this server is at its capacity of {services.admission.capacity} "
                                              f"streams; retry shortly"}))
        await websocket.close(1013)  # try again later
        return
    try:
        await LiveConnection(websocket, services, scheduler, info.name).run()
    finally:
        services.admission.release("live")
