"""`SyncTalkAvatar`: the lip-sync avatar as a Pipecat processor (put it between the TTS service and the
output transport).

In: `TTSStartedFrame`, `TTSAudioRawFrame` (any rate, mono or stereo), `TTSStoppedFrame`,
`InterruptionFrame`. Out: one `OutputImageRawFrame` (RGB, the avatar's frame size) every 40 ms on the
processor's media clock, and while speaking the very audio that came in, cut into the 40 ms pieces
that belong to each picture (`TTSAudioRawFrame` at the TTS rate, pushed right after its image; images
carry `sync_with_audio` so an output transport shows each one when the audio before it has played).
Between utterances the pictures are the idle loop (the first `idle_seconds` of the avatar's source
frames, ping-pong, mouth as recorded); speech walks the same frames, so the hand-over does not jump,
and the end of speech cross-fades back to the recorded mouth over `blend_frames` (after an interruption
`interrupt_blend_frames`) pictures.

Timing: output frame k (the media clock, 25 fps) leaves at t0 + k/25 - `lead_frames`/25. Speech frame a
shows the mouth for audio [40 a, 40 a + 40) ms and leaves together with exactly that audio. An utterance
starts playing once `start_frames` frames are rendered (or all of a shorter one); if rendering falls
behind, the clock waits for the next speech frame rather than dropping it (pictures and audio stay
paired). The held `TTSStartedFrame` / `TTSStoppedFrame` are pushed just before the first and just after
the last speech frame, so downstream sees them when the speech really starts and ends.

Events: `speech_started`, `speech_ended` and `interrupted`, with the fields of the server's WebRTC data
channel (docs/api-reference.md#data-channel), as `AvatarEventFrame`s pushed downstream, as
`OutputTransportMessageUrgentFrame`s (a transport forwards them to the client) when `send_events` is on,
and as Pipecat event handlers `on_speech_started`, `on_speech_ended`, `on_interrupted`.

An `InterruptionFrame` drops every queued utterance and the frames rendered for it; the next tick
(at most 40 ms later) is an idle frame again.
"""
from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import soxr
from loguru import logger
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
    SystemFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from synctalk.audio import resample
from synctalk.engine import LipSyncEngine, pingpong_step
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, SAMPLE_RATE
from synctalk_pipecat.renderer import AvatarRenderer, Utterance

END_TIMEOUT_S = 1.0  # an utterance without TTSStoppedFrame ends after this long without audio
DRAIN_TIMEOUT_S = 60.0  # EndFrame waits at most this long (beyond the audio) for speech to play out


@dataclass
class AvatarEventFrame(SystemFrame):
    """An avatar playback event: `event` is the server's data-channel message (`type` is one of
    `speech_started`, `speech_ended`, `interrupted`; `utterance_id`, `frame`, `time`, and
    `position` / `duration` in seconds where they apply)."""

    event: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.name}({self.event})"


def load_engine(dataset_dir: str | Path, checkpoint: str | Path, backend: str = "onnx", device: str = "cpu",
                batch_size: int = 4, threads: int = 1) -> LipSyncEngine:
    """Load an avatar's frame engine (the same call the server makes)."""
    return LipSyncEngine.load(dataset_dir, checkpoint, backend=backend, device=device, batch_size=batch_size,
                              threads=threads)


class SyncTalkAvatar(FrameProcessor):
    """The avatar as a Pipecat video service (see the module docstring)."""

    def __init__(self, engine: LipSyncEngine, *, scheduler: FrameScheduler | None = None,
                 idle_seconds: float = 1.0, start_frames: int = 4, lead_frames: int = 2, batch_size: int = 4,
                 blend_frames: int = 4, interrupt_blend_frames: int = 2, send_events: bool = True,
                 bot_speaking_frames: bool = False, **kwargs: Any):
        """`engine`: a loaded avatar; `scheduler`: a `FrameScheduler` shared with other streams (renders
        are batched across them), else the engine renders directly. `start_frames`: frames rendered
        before an utterance starts playing. `lead_frames`: how far ahead of real time frames are pushed
        (the output transport's buffer). `blend_frames` / `interrupt_blend_frames`: cross-fade from the
        last speech picture back to the idle loop after speech ends / is interrupted (as the server's
        `server.idle_blend_frames` / `webrtc.interrupt_blend_frames`). `bot_speaking_frames`: also push Bot{Started,Stopped}Speaking
        frames (up and down), for pipelines without an output transport, which otherwise sends them."""
        super().__init__(**kwargs)
        self.engine = engine
        self.scheduler = scheduler
        self.loop_frames = max(1, min(engine.n_frames, round(idle_seconds * FPS)))
        self.start_frames = max(1, int(start_frames))
        self.lead_frames = max(0, int(lead_frames))
        self.batch_size = batch_size
        self.blend_frames = max(0, int(blend_frames))
        self.interrupt_blend_frames = max(0, int(interrupt_blend_frames))
        self.send_events = send_events
        self.bot_speaking_frames = bot_speaking_frames
        self.height, self.width = engine.frame_shape[:2]
        self.frames_out = 0  # media clock: frames pushed so far
        self._idle_pos, self._idle_dir = 0, 1
        self._idle_rgb: dict[int, bytes] = {}
        self._last_speech: bytes | None = None  # the last speech picture (the cross-fade's start)
        self._blend_total = self._blend_left = 0
        self._renderer: AvatarRenderer | None = None
        self._clock_task: asyncio.Task | None = None
        self._open: Utterance | None = None  # the utterance receiving audio
        self._playing: Utterance | None = None
        self._cancelled_contexts: set[str] = set()
        self._ids = itertools.count(1)
        for name in ("on_speech_started", "on_speech_ended", "on_interrupted"):
            self._register_event_handler(name)

    # -- life cycle ---------------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._renderer is None:
            self._renderer = await asyncio.to_thread(
                AvatarRenderer, self.engine, self.scheduler, self.loop_frames, self._idle_state, self.batch_size)
        if self._clock_task is None:
            self._clock_task = self.create_task(self._clock(), "avatar-clock")

    async def _stop(self) -> None:
        if self._clock_task is not None:
            await self.cancel_task(self._clock_task)
            self._clock_task = None
        if self._renderer is not None:
            renderer, self._renderer = self._renderer, None
            await asyncio.to_thread(renderer.close)

    async def cleanup(self) -> None:
        """Stop the clock and the render thread."""
        await super().cleanup()
        await self._stop()

    def _idle_state(self) -> tuple[int, int]:
        return self._idle_pos, self._idle_dir

    # -- frames in ----------------------------------------------------------------------------------

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Consume TTS audio and its start/stop frames; act on interruptions; pass everything else."""
        await super().process_frame(frame, direction)
        if direction == FrameDirection.UPSTREAM:
            await self.push_frame(frame, direction)
        elif isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, InterruptionFrame):
            await self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSStartedFrame):
            self._begin(frame.context_id).held.append(frame)
        elif isinstance(frame, TTSAudioRawFrame):
            self._audio(frame)
        elif isinstance(frame, TTSStoppedFrame):
            await self._tts_stopped(frame)
        elif isinstance(frame, EndFrame):
            await self._drain()
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    def _begin(self, context_id: str | None) -> Utterance:
        """A new utterance (ending the one still open)."""
        self._end_open()
        utt = Utterance(id=f"utt-{next(self._ids)}-{uuid.uuid4().hex[:6]}", context_id=context_id)
        self._open = utt
        if self._renderer is not None:
            self._renderer.add(utt)
        return utt

    def _end_open(self) -> None:
        utt, self._open = self._open, None
        if utt is None:
            return
        if utt.resampler is not None:
            tail = utt.resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            if self._renderer is not None:
                self._renderer.feed(utt, tail)
        if self._renderer is not None:
            self._renderer.end(utt)

    def _audio(self, frame: TTSAudioRawFrame) -> None:
        """Append TTS audio to the open utterance (opening one if needed) and to its 16 kHz stream."""
        if frame.context_id is not None and frame.context_id in self._cancelled_contexts:
            return
        utt = self._open
        if utt is None or (frame.context_id is not None and utt.context_id not in (None, frame.context_id)):
            utt = self._begin(frame.context_id)
        pcm = np.frombuffer(frame.audio, dtype="<i2")
        if frame.num_channels > 1:
            pcm = pcm[: len(pcm) - len(pcm) % frame.num_channels].reshape(-1, frame.num_channels).mean(axis=1)
        audio = pcm.astype(np.float32) / 32768.0
        if not utt.rate:
            utt.rate = int(frame.sample_rate)
            utt.resampler = soxr.ResampleStream(utt.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        elif frame.sample_rate != utt.rate:  # a rate change inside one response: keep the first rate
            audio = resample(audio, frame.sample_rate, utt.rate)
        if frame.num_channels == 1 and frame.sample_rate == utt.rate:
            utt.pcm += frame.audio  # the exact bytes that came in leave with the pictures
        else:
            utt.pcm += (np.clip(audio, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()
        assert utt.resampler is not None
        if self._renderer is not None:
            self._renderer.feed(utt, utt.resampler.resample_chunk(audio))

    async def _tts_stopped(self, frame: TTSStoppedFrame) -> None:
        if frame.context_id is not None and frame.context_id in self._cancelled_contexts:
            return
        utt = self._open
        if utt is None or (frame.context_id is not None and utt.context_id not in (None, frame.context_id)):
            await self.push_frame(frame)  # not ours (or already played): pass it on
            return
        utt.stopped = frame
        self._end_open()

    async def _interrupt(self) -> None:
        """Drop all speech now; the next tick shows the idle loop."""
        renderer = self._renderer
        dropped = renderer.cancel_all() if renderer is not None else []
        if self._open is not None and self._open not in dropped:
            dropped.append(self._open)
        self._open = None
        for utt in dropped:
            utt.cancelled = True
            if utt.context_id is not None:
                self._cancelled_contexts.add(utt.context_id)
        playing, self._playing = self._playing, None
        if playing is not None:
            self._start_blend(self.interrupt_blend_frames)
        if playing is not None or dropped:
            cut = playing or dropped[0]
            await self._emit({"type": "interrupted", "utterance_id": cut.id, "frame": self.frames_out,
                              "time": round(self.frames_out / FPS, 4), "position": round(cut.played / FPS, 4)})
            if playing is not None and self.bot_speaking_frames:
                await self.broadcast_frame(BotStoppedSpeakingFrame)

    async def _drain(self) -> None:
        """Let queued speech play out (EndFrame)."""
        self._end_open()
        renderer = self._renderer
        if renderer is None:
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S + sum(u.seconds for u in renderer.queue)
        while (renderer.head() is not None or self._playing is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    # -- frames out: the media clock ----------------------------------------------------------------

    async def _clock(self) -> None:
        """One output frame per 40 ms (the clock waits when a speech frame is not rendered yet)."""
        t0 = time.monotonic()
        while True:
            delay = t0 + (self.frames_out - self.lead_frames) / FPS - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if not await self._tick():
                await asyncio.sleep(0.005)
                t0 = max(t0, time.monotonic() - (self.frames_out - self.lead_frames) / FPS)

    async def _tick(self) -> bool:
        """Push output frame `frames_out`; False when it is a speech frame still being rendered."""
        renderer = self._renderer
        if renderer is None:
            return False
        utt = self._playing
        if utt is None:
            head = renderer.head()
            if head is not None and head.total == 0:  # an utterance without audio
                renderer.finish(head)
                for f in [*head.held, head.stopped]:
                    if f is not None:
                        await self.push_frame(f)
            elif head is not None and renderer.rendered(head) >= min(self.start_frames, head.total or 10**9):
                utt = self._playing = head
                await self._speech_started(utt)
        if utt is None:
            await self._push_idle()
            return True
        got = renderer.take(utt, utt.played)
        if got is None:
            if not utt.ended and time.monotonic() - utt.last_audio_at > END_TIMEOUT_S and utt is self._open:
                logger.warning(f"{self}: no TTSStoppedFrame after {END_TIMEOUT_S} s without audio; ending {utt.id}")
                self._end_open()
            return False
        rgb, walk = got
        await self._push_speech(utt, rgb, walk)
        if utt.total is not None and utt.played >= utt.total and self._playing is utt:
            await self._speech_ended(utt)
        return True

    async def _push_image(self, rgb: bytes, meta: dict[str, Any]) -> None:
        image = OutputImageRawFrame(image=rgb, size=(self.width, self.height), format="RGB")
        image.sync_with_audio = True  # shown once the audio pushed before it has played
        image.metadata["synctalk"] = {"frame": self.frames_out, **meta}
        await self.push_frame(image)

    def _start_blend(self, frames: int) -> None:
        self._blend_total = self._blend_left = frames if self._last_speech is not None else 0

    async def _push_idle(self) -> None:
        self._idle_pos, self._idle_dir = pingpong_step(self._idle_pos, self._idle_dir, self.loop_frames)
        rgb = self._idle_rgb.get(self._idle_pos)
        if rgb is None:
            rgb = cv2.cvtColor(self.engine.frames.get(self._idle_pos), cv2.COLOR_BGR2RGB).tobytes()
            self._idle_rgb[self._idle_pos] = rgb
        kind = "idle"
        if self._blend_left > 0 and self._last_speech is not None:
            weight = (self._blend_total - self._blend_left + 1) / (self._blend_total + 1)
            self._blend_left -= 1
            last, idle = (np.frombuffer(b, np.uint8) for b in (self._last_speech, rgb))
            rgb = cv2.addWeighted(last, 1.0 - weight, idle, weight, 0.0).tobytes()
            kind = "blend"
        await self._push_image(rgb, {"kind": kind, "source": self._idle_pos})
        self.frames_out += 1

    async def _push_speech(self, utt: Utterance, rgb: bytes, walk: tuple[int, int]) -> None:
        a, k = utt.played, self.frames_out
        await self._push_image(rgb, {"kind": "speech", "source": walk[0], "utterance_id": utt.id, "index": a})
        self.frames_out = k + 1
        self._last_speech = rgb
        self._idle_pos, self._idle_dir = walk  # the idle loop carries on from here (same ping-pong walk)
        if utt.cancelled:  # interrupted while the picture went out: its audio stays behind
            return
        audio = TTSAudioRawFrame(audio=utt.audio_chunk(a), sample_rate=utt.rate, num_channels=1,
                                 context_id=utt.context_id)
        audio.metadata["synctalk"] = {"frame": k, "utterance_id": utt.id, "index": a}
        await self.push_frame(audio)
        utt.played = a + 1

    async def _speech_started(self, utt: Utterance) -> None:
        for f in utt.held:
            await self.push_frame(f)
        if not utt.held:
            await self.push_frame(TTSStartedFrame(context_id=utt.context_id))
        utt.held = []
        if self.bot_speaking_frames:
            await self.broadcast_frame(BotStartedSpeakingFrame)
        await self._emit({"type": "speech_started", "utterance_id": utt.id, "frame": self.frames_out,
                          "time": round(self.frames_out / FPS, 4)})

    async def _speech_ended(self, utt: Utterance) -> None:
        assert self._renderer is not None and utt.total is not None
        self._renderer.finish(utt)
        self._playing = None
        self._start_blend(self.blend_frames)
        await self.push_frame(utt.stopped if utt.stopped is not None else TTSStoppedFrame(context_id=utt.context_id))
        if self.bot_speaking_frames:
            await self.broadcast_frame(BotStoppedSpeakingFrame)
        await self._emit({"type": "speech_ended", "utterance_id": utt.id, "frame": self.frames_out,
                          "time": round(self.frames_out / FPS, 4), "position": round(utt.played / FPS, 4),
                          "duration": round(utt.total / FPS, 4)})

    async def _emit(self, event: dict[str, Any]) -> None:
        """Publish an event: frame downstream, client message, event handler."""
        logger.debug(f"{self}: {event}")
        await self.push_frame(AvatarEventFrame(event=dict(event)))
        if self.send_events:
            await self.push_frame(OutputTransportMessageUrgentFrame(message=dict(event)))
        await self._call_event_handler(f"on_{event['type']}", dict(event))
