"""Thread side of the avatar processor: utterances, streamed Whisper features and rendered frames.

One worker thread per `AvatarRenderer` turns each utterance's 16 kHz audio into feature rows
(`synctalk.features.StreamingFeatures`, one hop at a time, so the first frames render long before the
utterance ends) and renders frame a as soon as feature rows up to a + FUTURE_ROWS exist, through the
shared `FrameScheduler` (batched with other streams) or the engine directly. The asyncio side (the
processor's media clock) takes rendered frames in order; nothing here touches the event loop.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np
import soxr
from loguru import logger

from synctalk.engine import LipSyncEngine, pingpong_step
from synctalk.features import StreamingFeatures, load_whisper_encoder
from synctalk.scheduler import FrameScheduler
from synctalk.sizes import audio_window
from synctalk.timing import FPS, FUTURE_ROWS, SAMPLE_RATE

FEATURE_CHUNK = SAMPLE_RATE * 2 // 5  # 0.4 s of audio per feature job: renders interleave with features


@dataclass(eq=False)  # identity: holds arrays
class Utterance:
    """One TTS response (TTSStartedFrame .. TTSStoppedFrame): its audio as received (mono int16 at
    `rate`, the rate it leaves at), its 16 kHz copy for the features, and its rendered frames."""

    id: str
    context_id: str | None
    rate: int = 0
    pcm: bytearray = field(default_factory=bytearray)  # int16 mono at `rate`
    resampler: soxr.ResampleStream | None = None
    pending: collections.deque = field(default_factory=collections.deque)  # 16 kHz float32 not yet featurised
    audio16k: list[np.ndarray] = field(default_factory=list)  # kept for non-streaming feature modes
    ended: bool = False  # no more audio will come
    cancelled: bool = False
    features_done: bool = False
    rows: np.ndarray | None = None  # feature rows [n_rows, ...] (capacity may be larger)
    n_rows: int = 0
    total: int | None = None  # frames, known once the features are flushed
    frames: dict[int, bytes] = field(default_factory=dict)  # rendered RGB frames not yet played
    sources: dict[int, tuple[int, int]] = field(default_factory=dict)  # ping-pong (source frame, direction)
    walk: tuple[int, int] | None = None  # ping-pong (position, direction) after the last rendered frame
    next_render: int = 0
    played: int = 0
    last_audio_at: float = field(default_factory=time.monotonic)
    held: list = field(default_factory=list)  # TTSStartedFrame held until the first frame leaves
    stopped: object | None = None  # TTSStoppedFrame held until the last frame leaves

    def add_rows(self, rows: np.ndarray) -> None:
        """Append feature rows (grows the buffer by doubling)."""
        if not len(rows):
            return
        if self.rows is None:
            self.rows = np.zeros((max(64, 2 * len(rows)), *rows.shape[1:]), np.float32)
        elif self.n_rows + len(rows) > len(self.rows):
            grown = np.zeros((max(2 * len(self.rows), self.n_rows + len(rows)), *rows.shape[1:]), np.float32)
            grown[: self.n_rows] = self.rows[: self.n_rows]
            self.rows = grown
        self.rows[self.n_rows: self.n_rows + len(rows)] = rows
        self.n_rows += len(rows)

    def audio_chunk(self, a: int) -> bytes:
        """The int16 bytes that leave with frame a: samples [a rate/25, (a+1) rate/25), zero-padded."""
        lo, hi = round(a * self.rate / FPS), round((a + 1) * self.rate / FPS)
        chunk = bytes(self.pcm[2 * lo: 2 * hi])
        return chunk + b"\0" * (2 * (hi - lo) - len(chunk))

    @property
    def seconds(self) -> float:
        """Duration of the audio received so far."""
        return len(self.pcm) / 2 / self.rate if self.rate else 0.0


class AvatarRenderer:
    """Audio -> features -> frames for a queue of utterances, on one worker thread.

    `idle_state()` gives the ping-pong position the speech starts from (the idle loop's current one);
    speech walks the same `loop_frames` source frames, so returning to the idle loop does not jump.
    """

    def __init__(self, engine: LipSyncEngine, scheduler: FrameScheduler | None, loop_frames: int,
                 idle_state: Callable[[], tuple[int, int]], batch_size: int = 4, max_ahead_frames: int = 125):
        self.engine = engine
        self.scheduler = scheduler
        self.loop_frames = max(1, int(loop_frames))
        self.idle_state = idle_state
        self.batch_size = max(1, int(batch_size))
        self.max_ahead = max(self.batch_size, int(max_ahead_frames))
        self.queue: collections.deque[Utterance] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._reset = False
        self._stream: StreamingFeatures | None = None
        if engine.mode == "whisper":
            cfg = engine.feature_config
            encoder = load_whisper_encoder(cfg.whisper_path, device=engine.feature_device)
            self._stream = StreamingFeatures(encoder, config=cfg, batch_size=4)
        self._warm_up()
        self._thread = threading.Thread(target=self._run, name="avatar-render", daemon=True)
        self._thread.start()

    def _warm_up(self) -> None:
        """One feature call and one render on silence, so the first utterance does not pay for the
        runtimes' first-call set-up."""
        if self._stream is not None:
            rows = self._stream.push(np.zeros(self._stream.hop + self._stream.lookahead, np.float32))
            self._stream.reset()
        else:
            rows = np.zeros((0, *self.engine.features(np.zeros(SAMPLE_RATE, np.float32)).shape[1:]), np.float32)
        window = audio_window(rows, 0, self.engine.mode)[None]
        self.engine.render(window, [0])

    # -- the asyncio side -------------------------------------------------------------------------

    def add(self, utt: Utterance) -> None:
        """Queue an utterance (its audio follows with `feed`)."""
        with self._cv:
            self.queue.append(utt)
            self._cv.notify_all()

    def feed(self, utt: Utterance, audio16k: np.ndarray) -> None:
        """More 16 kHz float32 audio of `utt`."""
        if not len(audio16k):
            return
        with self._cv:
            utt.pending.append(np.asarray(audio16k, np.float32))
            utt.last_audio_at = time.monotonic()
            self._cv.notify_all()

    def end(self, utt: Utterance) -> None:
        """No more audio for `utt`: its features are flushed (silence-padded) and its last frames rendered."""
        with self._cv:
            utt.ended = True
            self._cv.notify_all()

    def cancel_all(self) -> list[Utterance]:
        """Drop every queued utterance (an interruption); returns them."""
        with self._cv:
            dropped = list(self.queue)
            for utt in dropped:
                utt.cancelled = True
                utt.frames.clear()
            self.queue.clear()
            self._reset = True
            self._cv.notify_all()
        return dropped

    def head(self) -> Utterance | None:
        """The first queued utterance."""
        with self._cv:
            return self.queue[0] if self.queue else None

    def rendered(self, utt: Utterance) -> int:
        """Frames of `utt` rendered so far."""
        with self._cv:
            return utt.next_render

    def take(self, utt: Utterance, a: int) -> tuple[bytes, tuple[int, int]] | None:
        """Rendered frame a of `utt` (RGB bytes) and its walk state (source frame, direction), or None
        while it is not rendered."""
        with self._cv:
            frame = utt.frames.pop(a, None)
            if frame is None:
                return None
            self._cv.notify_all()  # the worker may be waiting on `max_ahead`
            return frame, utt.sources.pop(a)

    def finish(self, utt: Utterance) -> None:
        """`utt` has played out: remove it from the queue."""
        with self._cv:
            if utt in self.queue:
                self.queue.remove(utt)

    def close(self) -> None:
        """Stop the worker thread (the batch in flight finishes first)."""
        with self._cv:
            self._closed = True
            for utt in self.queue:
                utt.cancelled = True
            self.queue.clear()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- the worker thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                job = self._next_job()
                while job is None and not self._closed:
                    self._cv.wait()
                    job = self._next_job()
                if self._closed:
                    return
            kind, utt, arg = job
            try:
                if kind == "render":
                    self._render(utt, arg)
                else:
                    self._features(utt, arg)
            except Exception:  # a broken utterance must not take the worker down
                logger.exception(f"avatar: utterance {utt.id} failed; it ends here")
                with self._cv:
                    utt.features_done = True
                    utt.total = utt.next_render
                    self._reset = True

    def _next_job(self) -> tuple[str, Utterance, object] | None:
        """The next piece of work (caller holds the lock): render what the features allow, else
        featurise. Features run in utterance order (the stream is sequential)."""
        if self._reset:
            if self._stream is not None:
                self._stream.reset()
            self._reset = False
        for utt in self.queue:
            if utt.cancelled:
                continue
            limit = utt.total if utt.features_done else utt.n_rows - FUTURE_ROWS
            if utt.next_render < (limit or 0) and utt.next_render - utt.played < self.max_ahead:
                return "render", utt, min(limit, utt.next_render + self.batch_size)
            if utt.features_done:
                continue
            if utt.pending:
                take, size = [], 0
                while utt.pending and size < FEATURE_CHUNK:
                    take.append(utt.pending.popleft())
                    size += len(take[-1])
                return "features", utt, np.concatenate(take)
            if utt.ended:
                return "flush", utt, None
            return None  # waiting for this utterance's audio; later ones wait behind it
        return None

    def _features(self, utt: Utterance, audio: object) -> None:
        """Feature rows of the next audio chunk (`audio` is None: flush the stream)."""
        stream = self._stream
        if stream is None:  # a mode without streaming features: all at once when the audio ends
            if audio is not None:
                utt.audio16k.append(audio)  # type: ignore[arg-type]
                return
            full = np.concatenate(utt.audio16k) if utt.audio16k else np.zeros(0, np.float32)
            rows = self.engine.features(full)
        else:
            rows = stream.push(audio) if audio is not None else stream.flush()  # type: ignore[arg-type]
        with self._cv:
            if utt.cancelled:
                return
            utt.add_rows(rows)
            if audio is None:
                utt.features_done = True
                utt.total = utt.n_rows
            self._cv.notify_all()

    def _render(self, utt: Utterance, end: object) -> None:
        """Render frames [next_render, end) of `utt`."""
        with self._cv:
            start, rows = utt.next_render, utt.rows
            n_rows, walk = utt.n_rows, utt.walk
        stop = int(end)  # type: ignore[call-overload]
        if walk is None:
            walk = self.idle_state()
        walks = []
        for _ in range(start, stop):
            walk = pingpong_step(walk[0], walk[1], self.loop_frames)
            walks.append(walk)
        sources = [w[0] for w in walks]
        assert rows is not None
        windows = np.stack([audio_window(rows[:n_rows], a, self.engine.mode) for a in range(start, stop)])
        if self.scheduler is not None:
            frames = self.scheduler.render(windows, sources)
        else:
            frames = self.engine.render(windows, sources)
        rgb = [cv2.cvtColor(f, cv2.COLOR_BGR2RGB).tobytes() for f in frames]
        with self._cv:
            if utt.cancelled:
                return
            for k, a in enumerate(range(start, stop)):
                utt.frames[a] = rgb[k]
                utt.sources[a] = walks[k]
            utt.next_render, utt.walk = stop, walk
            self._cv.notify_all()
