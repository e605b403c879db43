"""Conversation sessions over WebRTC (aiortc): one peer connection per session carrying the avatar's video
(25 fps: the idle loop when silent, lip-synced frames while speaking), the speech the lips are made from
(silence when idle) and a data channel of JSON events; controlled over REST or the data channel.

A session is in one of two modes, chosen by the offer: `speech` (default: the server speaks texts and
uploads it is sent) or `mic` (the client sends its microphone as an audio track and the avatar's video
mirrors it on the `/ws/live` timeline, `services/webrtc_mic.py`; no audio goes back).

    POST   /webrtc/offer               SDP offer (+ avatar, voice, mode) -> SDP answer + session_id
    GET    /sessions/{id}              state of a session
    POST   /sessions/{id}/speak        JSON {text, voice?, interrupt?} or a multipart audio upload
    POST   /sessions/{id}/interrupt    stop the speech (and drop queued speech) now
    DELETE /sessions/{id}              close the session

One media clock per session (`services/sessions.py`): video frame k has pts 3600 k (1/90000) and the audio
sample 640 k (pts in samples at 16 kHz, 20 ms frames) is the same instant, so a receiver that schedules
both tracks by their timestamps plays them in sync. The tracks pace themselves on that clock and take each
frame from the session's `SpeechTimeline` (speech rendered ahead by its worker thread, idle loop, blends).
A producer task per session synthesises the sentences of queued speak commands one by one
(`synctalk.text.split_sentences`), so the first sentence plays while the next ones are synthesised.

A session whose peer vanishes (no RTCP receiver report for `webrtc.peer_timeout_s`, connection failed or
closed, or never connected within `webrtc.connect_timeout_s`) is closed: tasks, worker thread and tracks end.
"""
from __future__ import annotations

import asyncio
import collections
import fractions
import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal, Protocol

import anyio
import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from config import Settings, WebRTCConfig
from services.admission import RETRY_AFTER_S
from services.deps import Services, ServicesDep
from services.errors import APIError
from services.sessions import Clock, SpeechTimeline, Utterance, make_segment, warm_speech
from services.timeline import LiveOptions, idle_loop
from services.tts import SynthesisCancelled, TextError, TTSBusy, TTSUnavailable, check_text, estimate_speech_seconds
from services.uploads import decode_upload, read_upload
from services.webrtc_mic import MicFrames
from synctalk.scheduler import FrameScheduler
from synctalk.text import split_sentences
from synctalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger("webrtc")

router = APIRouter(tags=["webrtc"])

VIDEO_CLOCK = 90000  # RTP video clock (Hz)
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
AUDIO_CHUNK = SAMPLES_PER_FRAME // 2  # 20 ms audio frames (the Opus packet time)
TTS_LOW_WATER_S = 3.0  # a later sentence is synthesised at once when less speech than this is queued
TTS_RENDER_HEADROOM_S = 0.8  # ... else once this much of the queued speech is rendered
CLOSED_REMEMBERED = 1024  # ids of closed sessions kept to answer 410 instead of 404


# ---------------------------------------------------------------------------------------------
# Media tracks


async def sleep_until(deadline: float) -> None:
    """Sleep until the monotonic time `deadline` (no-op when it has passed)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


class FrameSource(Protocol):
    """Where the video track takes its frames: `SpeechTimeline` (speech mode) or `MicFrames` (mic mode)."""

    clock: Clock
    closed: bool

    async def picture(self, k: int, give_up_at: float) -> np.ndarray | None:
        """Frame k (BGR), or None when it cannot be had by monotonic `give_up_at`."""
        ...


class AvatarVideoTrack(MediaStreamTrack):
    """The avatar at 25 fps on the session clock: frame k has pts 3600 k (1/90000 s). A frame that cannot
    be delivered within one frame interval of its due time is dropped (its pts is skipped), so the video
    never drifts from the audio."""

    kind = "video"

    def __init__(self, source: FrameSource):
        super().__init__()
        self.source = source
        self.k = 0
        self.sent = 0
        self.dropped = 0

    async def recv(self) -> av.VideoFrame:
        """The next frame, at its due time."""
        src = self.source
        src.clock.start()
        period = 1.0 / FPS
        while True:
            if self.readyState != "live" or src.closed:
                raise MediaStreamError
            k = self.k
            self.k += 1
            await sleep_until(src.clock.deadline(k))
            picture = await src.picture(k, src.clock.deadline(k) + period)
            if picture is None or time.monotonic() > src.clock.deadline(k) + 2 * period:
                self.dropped += 1
                continue
            frame = av.VideoFrame.from_ndarray(picture, format="bgr24")
            frame.pts, frame.time_base = k * (VIDEO_CLOCK // FPS), VIDEO_TIME_BASE
            self.sent += 1
            return frame


class SpeechAudioTrack(MediaStreamTrack):
    """The speech on the session clock in 20 ms frames of 16 kHz mono PCM16 (pts in samples): samples
    640 k .. 640 k + 639 play with video frame k; silence when idle."""

    kind = "audio"

    def __init__(self, timeline: SpeechTimeline):
        super().__init__()
        self.timeline = timeline
        self.j = 0

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms of audio, at its due time."""
        tl = self.timeline
        t0 = tl.clock.start()
        if self.readyState != "live" or tl.closed:
            raise MediaStreamError
        j = self.j
        self.j += 1
        await sleep_until(t0 + j * AUDIO_CHUNK / SAMPLE_RATE)
        slot = tl.commit(j // 2)
        pcm = np.zeros(AUDIO_CHUNK, np.int16)
        # a speech frame committed ahead (the video renders ahead) whose utterance was interrupted since:
        # silent at once, so the audio stops within a packet of the interrupt however far ahead the video is
        cut = slot.segment is not None and slot.segment.utterance.cancel.is_set()
        if slot.audio is not None and not cut:
            half = slot.audio[(j % 2) * AUDIO_CHUNK:(j % 2 + 1) * AUDIO_CHUNK]
            pcm[: len(half)] = np.round(np.clip(half, -1.0, 1.0) * 32767.0).astype(np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=AUDIO_CHUNK)
        frame.planes[0].update(pcm.tobytes())
        frame.sample_rate = SAMPLE_RATE
        frame.pts, frame.time_base = j * AUDIO_CHUNK, AUDIO_TIME_BASE
        return frame


# ---------------------------------------------------------------------------------------------
# Sessions


async def drain(track: MediaStreamTrack) -> None:
    """Read and discard a remote track (audio a speech-mode client sends anyway), so nothing piles up."""
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        return


class WebRTCSession:
    """One peer connection: tracks, timeline, event channel, the speech producer (speech mode) or the
    microphone's frames (mic mode), and the watchdog."""

    def __init__(self, registry: SessionRegistry, services: Services, scheduler: FrameScheduler, avatar: str,
                 voice: str | None, mode: str = "speech"):
        engine = scheduler.engine
        self.id = uuid.uuid4().hex
        self.registry = registry
        self.services = services
        self.cfg: WebRTCConfig = services.settings.webrtc
        self.avatar = avatar
        self.voice = voice
        self.mode = mode
        self.scheduler = scheduler
        self.mic: MicFrames | None = None  # mic mode: made by `answer`
        self.remote_audio: MediaStreamTrack | None = None  # the client's audio track, if it sends one
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.closed = False
        self.events: collections.deque[dict] = collections.deque(maxlen=100)
        self.channel: Any = None
        servers = [RTCIceServer(urls=s.urls, username=s.username, credential=s.credential)
                   for s in self.cfg.ice_servers]
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=servers or None))
        idle = idle_loop(engine, services.settings.server.idle_seconds, FPS)
        self.timeline = SpeechTimeline(engine, idle, self.cfg, services.settings.server.idle_blend_frames, self.emit,
                                       scheduler=scheduler)
        self.engine = engine
        self.video = AvatarVideoTrack(self.timeline)
        self.audio = SpeechAudioTrack(self.timeline)
        self.queue: collections.deque[Utterance] = collections.deque()
        self.producing: Utterance | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -- events -----------------------------------------------------------------------------------

    def emit(self, event: dict) -> None:
        """Send a JSON event on the data channel (kept in `events` too; dropped when no channel is open)."""
        event = {**event, "session_id": self.id}
        self.events.append(event)
        if self.channel is not None and self.channel.readyState == "open":
            try:
                self.channel.send(json.dumps(event))
            except Exception as exc:  # the channel closed under us
                log.debug("event not sent: %s", exc)

    # -- set-up -----------------------------------------------------------------------------------

    async def answer(self, sdp: str, kind: str) -> RTCSessionDescription:
        """Apply the client's offer; the answer with the avatar's tracks attached (speech mode: video and
        audio; mic mode: video, and the client's audio is consumed)."""
        self.pc.on("track", self._on_remote_track)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except Exception as exc:  # aiortc raises ValueError, KeyError, ... on malformed SDP
            raise APIError(400, "bad_sdp", f"cannot parse the SDP offer: {exc or type(exc).__name__}") from None
        kinds = {t.kind for t in self.pc.getTransceivers()}
        if "video" not in kinds:
            raise APIError(400, "bad_sdp", "the offer has no video media section (add a recvonly video and "
                                               "audio transceiver)")
        if self.mode == "mic":
            await self._setup_mic()
        self.pc.addTrack(self.video)
        if "audio" in kinds and self.mic is None:
            self.pc.addTrack(self.audio)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_state)
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise APIError(400, "bad_sdp", f"cannot answer the SDP offer: {exc or type(exc).__name__}") from None
        self._start_tasks()
        return self.pc.localDescription

    def _on_remote_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self.remote_audio = track

    async def _setup_mic(self) -> None:
        """Mic mode: the client's audio track drives the video (`MicFrames`, on the /ws/live timeline)."""
        if self.remote_audio is None:
            raise APIError(400, "bad_sdp", "mode 'mic' needs an offer that sends audio (the microphone track: "
                                               "an audio transceiver with direction sendrecv or sendonly)")
        opts = LiveOptions.from_settings(self.services.settings)
        self.mic = await anyio.to_thread.run_sync(MicFrames, self.scheduler, opts, self.emit)
        self.video.source = self.mic

    def _start_tasks(self) -> None:
        """Start the work of the session: speech producer or microphone reader, and the watchdog."""
        name = self.id[:8]
        self._tasks = [asyncio.create_task(self._watch(), name=f"webrtc-watch-{name}")]
        if self.mic is None:
            self.timeline.start()
            self._tasks.append(asyncio.create_task(self._produce(), name=f"webrtc-produce-{name}"))
        if self.remote_audio is not None:
            reader = self.mic.consume(self.remote_audio) if self.mic is not None else drain(self.remote_audio)
            self._tasks.append(asyncio.create_task(reader, name=f"webrtc-audio-in-{name}"))

    def _on_datachannel(self, channel: Any) -> None:
        self.channel = channel
        channel.on("message", lambda message: asyncio.ensure_future(self._on_message(message)))
        ready = {"type": "ready", "avatar": self.avatar, "fps": FPS, "sample_rate": SAMPLE_RATE, "mode": self.mode}
        if self.mic is not None:
            ready["latency_ms"] = round(self.mic.latency_ms)
        self.emit(ready)

    async def _on_state(self) -> None:
        state = self.pc.connectionState
        log.info("session %s: connection %s", self.id[:8], state)
        if state == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()
        if state in ("failed", "closed"):
            await self.close(f"connection {state}")

    async def _on_message(self, message: Any) -> None:
        """A JSON command on the data channel: speak, interrupt (speech mode), end, stop (mic mode) or close."""
        try:
            msg = json.loads(message) if isinstance(message, str) else None
            if not isinstance(msg, dict):
                raise APIError(400, "bad_message", "data channel messages must be JSON objects with a 'type'")
            kind = msg.get("type")
            if kind == "speak":
                body = SpeakRequest.model_validate({k: v for k, v in msg.items() if k != "type"})
                result = await self.speak_text(body.text, body.voice, body.interrupt)
                self.emit({"type": "queued", **result})
            elif kind == "interrupt":
                await self.interrupt()
            elif kind == "end" and self.mic is not None:
                self.mic.end()
            elif kind == "stop" and self.mic is not None:
                self.emit({"type": "stopped", **self.mic.stop()})
            elif kind == "close":
                await self.close("closed by the client")
            else:
                expected = "end, stop or close" if self.mic is not None else "speak, interrupt or close"
                raise APIError(400, "unknown_type", f"unknown message type {kind!r}; expected {expected}")
        except APIError as exc:
            self.emit({"type": "error", "error": exc.error, "detail": str(exc.detail)})
        except (ValueError, TypeError) as exc:
            self.emit({"type": "error", "error": "bad_message", "detail": str(exc)})

    # -- commands ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise APIError(410, "session_closed", f"session {self.id} is closed")

    def _check_speech_mode(self) -> None:
        """Speak and interrupt need a speech-mode session (409 `mic_session` otherwise)."""
        self._check_open()
        if self.mic is not None:
            raise APIError(409, "mic_session", "this session's video follows the microphone (mode 'mic'); open a "
                                               "session without mode 'mic' to make the avatar speak")

    async def speak_text(self, text: str, voice: str | None, interrupt: bool) -> dict:
        """Queue `text` (sentence-streamed TTS); with `interrupt`, cut what is playing first."""
        self._check_speech_mode()
        settings = self.services.settings
        try:
            text = check_text(text, settings.tts.max_text_chars)
        except TextError as exc:
            raise APIError(400, exc.code, str(exc)) from None
        estimate = estimate_speech_seconds(text)
        if estimate > settings.server.max_audio_seconds:
            raise APIError(413, "audio_too_long", f"the text would take about {estimate:.0f} s to speak; the "
                                                      f"limit is {settings.server.max_audio_seconds:g} s")
        voice = voice or self.voice
        if voice:
            known = await anyio.to_thread.run_sync(self.services.tts.voices)
            if voice not in known:
                raise APIError(404, "unknown_voice", f"unknown voice {voice!r}; available: {', '.join(known)}")
        pieces = split_sentences(text, self.cfg.sentence_chars, self.cfg.first_sentence_chars)
        utt = Utterance(uuid.uuid4().hex[:12], text=text, voice=voice or None, pieces=pieces)
        return await self._enqueue(utt, interrupt)

    async def speak_audio(self, audio16k: np.ndarray, interrupt: bool) -> dict:
        """Queue uploaded speech; with `interrupt`, cut what is playing first."""
        self._check_speech_mode()
        utt = Utterance(uuid.uuid4().hex[:12], audio=audio16k)
        return await self._enqueue(utt, interrupt)

    async def _enqueue(self, utt: Utterance, interrupt: bool) -> dict:
        if interrupt:
            await self.interrupt(quiet=True)
        if len(self.queue) >= self.cfg.max_queued:
            raise APIError(429, "queue_full", f"{len(self.queue)} speak commands are already waiting")
        busy = self.speaking()
        self.queue.append(utt)
        self._wake.set()
        return {"session_id": self.id, "utterance_id": utt.id, "queued": busy,
                "sentences": len(utt.pieces) if utt.text is not None else 1}

    def speaking(self) -> bool:
        """Whether speech is playing, being prepared or waiting (mic mode: whether the frame playing now
        shows speech)."""
        if self.mic is not None:
            return self.mic.speaking()
        producing = self.producing is not None and not self.producing.cancel.is_set()
        return bool(self.queue) or producing or self.timeline.busy()

    async def interrupt(self, quiet: bool = False) -> dict:
        """Stop the speech at the next frame and drop queued commands; 409 when nothing is playing
        (unless `quiet`)."""
        self._check_speech_mode()
        cut = self.timeline.interrupt()
        dropped = len(self.queue)
        for utt in self.queue:
            utt.cancel.set()
        self.queue.clear()
        producing = self.producing if self.producing is not None and not self.producing.cancel.is_set() else None
        if producing is not None:
            producing.cancel.set()
        if not cut and producing is None and not dropped:
            if quiet:
                return {"session_id": self.id, "interrupted": False}
            raise APIError(409, "nothing_playing", "nothing is playing or queued in this session")
        if not cut:  # nothing had reached the timeline yet: the interrupt is immediate
            self.emit({"type": "interrupted", "utterance_id": producing.id if producing else None,
                       "frame": None, "time": None, "position": 0.0})
        return {"session_id": self.id, "interrupted": True, "dropped": dropped}

    # -- background tasks -------------------------------------------------------------------------

    async def _produce(self) -> None:
        """Turn queued commands into timeline segments, one sentence at a time."""
        while not self.closed:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            utt = self.queue.popleft()
            self.producing = utt
            try:
                await self._produce_one(utt)
            except SynthesisCancelled:
                pass
            except (TTSBusy, TTSUnavailable) as exc:
                self.emit({"type": "error", "error": "tts_busy" if isinstance(exc, TTSBusy) else "tts_unavailable",
                           "detail": str(exc), "utterance_id": utt.id})
                utt.cancel.set()
            except Exception as exc:  # a bad sentence or audio must not end the session
                log.exception("session %s: speech failed", self.id[:8])
                self.emit({"type": "error", "error": "speech_failed", "detail": str(exc), "utterance_id": utt.id})
                utt.cancel.set()
            finally:
                self.producing = None
                self.timeline.mark_complete(utt)

    async def _produce_one(self, utt: Utterance) -> None:
        engine = self.engine

        def add(audio16k: np.ndarray) -> None:
            seg = make_segment(engine, utt, audio16k)
            if seg is not None:
                self.timeline.add(seg)

        if utt.audio is not None:
            await anyio.to_thread.run_sync(add, utt.audio)
            return
        for n, piece in enumerate(utt.pieces):
            if utt.cancel.is_set() or self.closed:
                return
            if n > 0:
                await self._tts_turn(utt)
            try:
                result = await anyio.to_thread.run_sync(self.services.tts.synthesize, piece, utt.voice,
                                                        utt.cancel.is_set)
            except ValueError as exc:  # nothing speakable in this piece: skip it
                log.info("session %s: piece not spoken (%s)", self.id[:8], exc)
                continue
            if utt.cancel.is_set():
                return
            await anyio.to_thread.run_sync(add, result.to_16k().astype(np.float32))

    async def _tts_turn(self, utt: Utterance) -> None:
        """Wait before synthesising a later sentence while the render buffer is still filling up (TTS and
        rendering share the CPU), unless the queued speech runs low: then it is needed now."""
        while not (utt.cancel.is_set() or self.closed):
            audio, rendered = self.timeline.ahead()
            if audio < TTS_LOW_WATER_S or rendered >= TTS_RENDER_HEADROOM_S:
                return
            await asyncio.sleep(0.02)

    async def _watch(self) -> None:
        """Close the session when its peer is gone: never connected, failed, or silent (no RTCP)."""
        while not self.closed:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            error = self.mic.error if self.mic is not None else self.timeline.error
            if error is not None:
                self.emit({"type": "error", "error": "internal", "detail": f"rendering failed: {error}"})
                await self.close("rendering failed")
                return
            if self.connected_at is None:
                if now - self.created > self.cfg.connect_timeout_s:
                    await self.close("the peer never connected")
                    return
                continue
            last = self.connected_at
            for stat in (await self.pc.getStats()).values():
                if getattr(stat, "type", "") == "remote-inbound-rtp":
                    last = max(last, stat.timestamp.timestamp() - time.time() + now)
            if now - last > self.cfg.peer_timeout_s:
                await self.close(f"no report from the peer for {now - last:.0f} s")
                return

    async def close(self, reason: str) -> None:
        """End everything: tasks, worker thread, tracks, peer connection; forget the session."""
        if self.closed:
            return
        self.closed = True
        self.services.admission.release("webrtc")
        st = self.timeline.stats
        log.info("session %s closed: %s (video %d frames sent, %d dropped; %d rendered in %.1f ms each, %d not "
                 "rendered in time, %d given up)", self.id[:8], reason, self.video.sent, self.video.dropped,
                 st["rendered"], 1000 * st["render_s"] / max(1, st["rendered"]), st["late"], st["skipped"])
        self.emit({"type": "closed", "reason": reason})
        self.registry.forget(self)
        for utt in self.queue:
            utt.cancel.set()
        if self.producing is not None:
            self.producing.cancel.set()
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._wake.set()
        await anyio.to_thread.run_sync(self.timeline.close)
        if self.mic is not None:
            await anyio.to_thread.run_sync(self.mic.close)
        self.video.stop()
        self.audio.stop()
        await self.pc.close()

    def describe(self) -> dict:
        """What GET /sessions/{id} reports."""
        out: dict[str, Any] = {"session_id": self.id, "avatar": self.avatar, "voice": self.voice, "mode": self.mode,
                               "connection": self.pc.connectionState, "speaking": self.speaking(),
                               "queued": len(self.queue), "synthesizing": self.producing is not None,
                               "video_frames_sent": self.video.sent, "video_frames_dropped": self.video.dropped,
                               "audio_frames_sent": self.audio.j, "events": list(self.events)[-20:]}
        if self.mic is not None:
            out["mic"] = {"latency_ms": round(self.mic.latency_ms), "audio_seconds": round(self.mic.audio_seconds, 3),
                          "filled_seconds": round(self.mic.filled_seconds, 3)}
        return out


class SessionRegistry:
    """The open sessions of one app (and the ids of recently closed ones, answered with 410)."""

    def __init__(self) -> None:
        self.sessions: dict[str, WebRTCSession] = {}
        self.closed_ids: collections.OrderedDict[str, None] = collections.OrderedDict()

    def add(self, session: WebRTCSession) -> None:
        self.sessions[session.id] = session

    def forget(self, session: WebRTCSession) -> None:
        """Remove a closed session (its id is remembered)."""
        self.sessions.pop(session.id, None)
        self.closed_ids[session.id] = None
        while len(self.closed_ids) > CLOSED_REMEMBERED:
            self.closed_ids.popitem(last=False)

    def get(self, session_id: str) -> WebRTCSession:
        """The open session `session_id`; 410 when it was closed, 404 when unknown."""
        session = self.sessions.get(session_id)
        if session is not None:
            return session
        if session_id in self.closed_ids:
            raise APIError(410, "session_closed", f"session {session_id} is closed")
        raise APIError(404, "unknown_session", f"no session {session_id!r}")


def get_registry(request: Request) -> SessionRegistry:
    """The app's session registry (created on first use)."""
    registry = getattr(request.app.state, "webrtc_sessions", None)
    if registry is None:
        registry = request.app.state.webrtc_sessions = SessionRegistry()
    return registry


RegistryDep = Annotated[SessionRegistry, Depends(get_registry)]


# ---------------------------------------------------------------------------------------------
# Routes


class OfferRequest(BaseModel):
    """Body of POST /webrtc/offer."""

    model_config = ConfigDict(extra="forbid")
    sdp: str = Field(description="the client's SDP offer (with recvonly video and audio, and a data channel; "
                                 "mode `mic`: the audio sends the microphone)")
    type: str = Field("offer", description="must be `offer`")
    avatar: str | None = Field(None, description="avatar name (see /health); default avatar if omitted")
    voice: str | None = Field(None, description="default TTS voice of the session's speak commands")
    mode: Literal["speech", "mic"] = Field("speech", description="`speech`: the avatar says texts and uploads; "
                                           "`mic`: the video follows the client's audio track (live microphone)")


class AnswerBody(BaseModel):
    """Response of POST /webrtc/offer."""

    sdp: str
    type: str
    session_id: str


class SpeakRequest(BaseModel):
    """JSON body of POST /sessions/{id}/speak (and the `speak` data-channel message)."""

    model_config = ConfigDict(extra="forbid")
    text: str = Field(description="what the avatar says (spoken sentence by sentence)")
    voice: str | None = None
    interrupt: bool = Field(False, description="cut what is playing (and drop queued speech) instead of queueing")


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed SDP, bad text or audio"}, 404: {"description": "unknown session, avatar or voice"},
    409: {"description": "interrupt with nothing playing; speak or interrupt in a mic-mode session"},
    410: {"description": "the session is closed"},
    413: {"description": "speech longer than server.max_audio_seconds"},
    429: {"description": "too many speak commands queued"}, 503: {"description": "too many sessions"},
}


@router.post("/webrtc/offer", response_model=AnswerBody, responses=ERRORS)
async def webrtc_offer(services: ServicesDep, registry: RegistryDep, body: OfferRequest) -> dict[str, Any]:
    """Open a session: the SDP answer carries the avatar's video and speech tracks (see docs/api-reference.md)."""
    cfg = services.settings.webrtc
    if body.type != "offer":
        raise APIError(400, "bad_sdp", f"type must be 'offer', got {body.type!r}")
    if not body.sdp.lstrip().startswith("v=0") or "\nm=" not in body.sdp:
        raise APIError(400, "bad_sdp", "the offer is not an SDP session description (v=0 ... m=...)")
    if len(registry.sessions) >= cfg.max_sessions:
        raise APIError(503, "too_many_sessions", f"{len(registry.sessions)} sessions are open "
                                                     f"(webrtc.max_sessions)", headers={"Retry-After": "5"})
    info = services.models.resolve(body.avatar)
    voice = body.voice or None
    if voice is not None and voice not in await anyio.to_thread.run_sync(services.tts.voices):
        raise APIError(404, "unknown_voice", f"unknown voice {voice!r}")
    scheduler = await anyio.to_thread.run_sync(services.models.scheduler, info.name)
    if body.mode == "mic" and scheduler.engine.mode != "whisper":
        raise APIError(400, "mic_unsupported", f"avatar {info.name!r} uses {scheduler.engine.mode} audio features; "
                                               f"the live microphone needs a whisper-mode checkpoint")
    if body.mode == "speech":
        await anyio.to_thread.run_sync(warm_speech, scheduler.engine)
    if not services.admission.try_acquire("webrtc"):
        raise APIError(503, "busy", f"this server is at its capacity of {services.admission.capacity} "
                                        f"streams; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)})
    session = WebRTCSession(registry, services, scheduler, info.name, voice, body.mode)
    try:
        answer = await session.answer(body.sdp, body.type)
    except BaseException:
        await session.close("set-up failed")
        raise
    registry.add(session)
    log.info("session %s opened (avatar %s, mode %s)", session.id[:8], info.name, body.mode)
    return {"sdp": answer.sdp, "type": answer.type, "session_id": session.id}


@router.get("/sessions/{session_id}", responses=ERRORS)
async def session_status(registry: RegistryDep, session_id: str) -> dict[str, Any]:
    """State of a session: connection, speaking, queue, frames sent, recent events."""
    return registry.get(session_id).describe()


async def read_audio_upload(request: Request, settings: Settings) -> np.ndarray:
    """16 kHz mono audio of a multipart upload (`services.uploads`), at least one video frame long."""
    data, extension = await read_upload(request, settings.server.max_upload_bytes)
    audio = await decode_upload(data, extension, settings.server.max_audio_seconds)
    if audio.size < SAMPLES_PER_FRAME:
        raise APIError(400, "audio_too_short", "the audio is shorter than one video frame (40 ms)")
    return audio


@router.post("/sessions/{session_id}/speak", responses=ERRORS, openapi_extra={"requestBody": {"content": {
    "application/json": {"schema": SpeakRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "audio_file": {"type": "string", "format": "binary"}, "interrupt": {"type": "boolean"}}}}}}})
async def session_speak(services: ServicesDep, registry: RegistryDep, session_id: str,
                        request: Request) -> dict[str, Any]:
    """Make the avatar say a text (JSON) or an uploaded recording (multipart `audio_file`); queued after
    what is playing unless `interrupt` is true."""
    session = registry.get(session_id)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        audio = await read_audio_upload(request, services.settings)
        interrupt = request.query_params.get("interrupt", "false").lower() in ("1", "true", "yes")
        return await session.speak_audio(audio, interrupt)
    try:
        body = SpeakRequest.model_validate_json(await request.body())
    except ValueError as exc:
        raise APIError(422, "invalid_request", f"send JSON {{text, voice?, interrupt?}}: {exc}") from None
    return await session.speak_text(body.text, body.voice, body.interrupt)


@router.post("/sessions/{session_id}/interrupt", responses=ERRORS)
async def session_interrupt(registry: RegistryDep, session_id: str) -> dict[str, Any]:
    """Stop the speech within one frame (audio fades out, video cross-fades to the idle loop) and drop
    queued speech; 409 when nothing is playing."""
    return await registry.get(session_id).interrupt()


@router.delete("/sessions/{session_id}", responses=ERRORS)
async def session_close(registry: RegistryDep, session_id: str) -> dict[str, Any]:
    """Close the session (tracks end, the peer connection closes)."""
    session = registry.get(session_id)
    await session.close("closed by DELETE")
    return {"session_id": session_id, "closed": True}
