"""Server-side frame generation on one loaded `synctalk.engine.LipSyncEngine`: audio -> streamed
features -> frames -> JPEG batches, a few frames at a time (`FrameJob`, a `services.streaming.FrameSource`).
"""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

from services.streaming import StreamStats, encode_jpeg
from synctalk.engine import LipSyncEngine
from synctalk.features import StreamingFeatures, load_whisper_encoder
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, FUTURE_ROWS, SAMPLES_PER_FRAME


class FrameGenerationService:
    """Audio -> features -> frames -> JPEG bytes for the server, a few frames at a time, on one loaded
    `LipSyncEngine`. This base service animates a single template frame (source frame `template`);
    `EnhancedFrameGenerationService` can stand in for it wherever it is used.

    `job(audio16k)` returns a `FrameJob`: each blocking `next_batch()` computes just enough features
    (the streaming Whisper routine, so the first frame does not wait for the whole utterance), renders
    the next batch and JPEG-encodes it. Output frame i is the mouth for audio [40 i, 40 i + 40) ms, the
    training indexing, and there are round(25 x duration) frames (none for audio under 40 ms).

    With a `scheduler` (the server passes the avatar's), frames are rendered in batches shared with the
    avatar's other streams, each batch due when the stream's clock needs it; without one they are
    rendered alone on the engine (one stream at a time: the baseline the benchmark compares against).
    """

    def __init__(self, engine: LipSyncEngine, jpeg_quality: int, batch_size: int | None = None,
                 stats: StreamStats | None = None, template: int = 0, first_batch: int = 2,
                 scheduler: FrameScheduler | None = None):
        self.engine = engine
        self.scheduler = scheduler
        self.batch_size = max(1, int(batch_size or engine.batch_size))
        self.first_batch = max(1, min(int(first_batch), self.batch_size))  # small: an early first frame
        self.jpeg_quality = int(jpeg_quality)
        self.stats = stats  # services.streaming.StreamStats (frames_generated), optional
        self.template = int(template) % engine.n_frames
        self.fps = FPS  # output frame rate (the routes' X-FPS header and pacing)

    def frame_order(self, n: int) -> np.ndarray:
        """Source frame for each of `n` output frames: the template frame throughout."""
        return np.full(n, self.template, dtype=np.int64)

    def encode(self, frame: np.ndarray) -> bytes:
        """JPEG bytes of a BGR frame at this service's quality."""
        return encode_jpeg(frame, self.jpeg_quality)

    def render(self, windows: np.ndarray, order: np.ndarray, deadline: float) -> list[np.ndarray]:
        """Full frames for audio `windows` on source frames `order`, through the scheduler when there is one."""
        if self.scheduler is None:
            return self.engine.render(windows, order)
        return self.scheduler.render(windows, order, deadline)

    def job(self, audio16k: np.ndarray, on_frame: Callable[[int, bytes], None] | None = None) -> FrameJob:
        """A generation job for 16 kHz mono float audio; `on_frame(i, jpeg)` sees every frame."""
        return FrameJob(self, audio16k, on_frame)


class EnhancedFrameGenerationService(FrameGenerationService):
    """Moves through the source frames (upstream's ping-pong walk with `loop_back`, so a clip ends on
    the frame it started from and hands over smoothly to the still or idle picture); the mouth is
    blended in with the engine's feathered paste mask, as in the base service."""

    def frame_order(self, n: int) -> np.ndarray:
        """Ping-pong source order from the template frame, walking back to it by the end."""
        return self.engine.frame_order(n, start_frame=self.template, loop_back=True)


class FeatureFeed:
    """Per-frame features of a known clip. Whisper mode runs `synctalk.features.StreamingFeatures` one
    hop at a time, only as far as asked, so rows for the first frames exist long before the last ones
    (the windows are the ones `extract_features` uses, so the frames equal the offline CLI's). Other
    modes (ave) are computed in one call up front."""

    def __init__(self, engine: LipSyncEngine, audio16k: np.ndarray):

        self.engine = engine
        self.audio = np.ascontiguousarray(np.asarray(audio16k, dtype=np.float32).reshape(-1))
        self._stream = None
        self.features: np.ndarray | None = None
        if engine.mode == "whisper":
            cfg = engine.feature_config
            encoder = load_whisper_encoder(cfg.whisper_path, device=engine.feature_device)
            self._stream = StreamingFeatures(encoder, config=cfg)
            self.total = self._stream.n_frames(len(self.audio))
            self._rows = np.zeros((self.total, *self._stream.empty().shape[1:]), np.float32)
            self._count = self._pushed = 0
            self._flushed = False
        else:
            self.features = engine.features(self.audio)
            self.total = len(self.features)

    def ensure(self, k: int, cancel: threading.Event | None = None) -> np.ndarray:
        """Features with at least min(k, total) rows (stops early when `cancel` is set)."""
        if self._stream is None:
            return self.features
        k = min(k, self.total)
        while self._count < k and not (cancel is not None and cancel.is_set()):
            if self._pushed < len(self.audio):
                chunk = self.audio[self._pushed: self._pushed + self._stream.hop]
                self._pushed += len(chunk)
                new = self._stream.push(chunk)
            elif not self._flushed:
                new = self._stream.flush()  # silence-padded tail: the last frames
                self._flushed = True
            else:
                raise RuntimeError(f"feature stream ended at {self._count} of {self.total} frames")
            new = new[: self.total - self._count]
            self._rows[self._count: self._count + len(new)] = new
            self._count += len(new)
        return self._rows[: self._count]


LIVE_JOBS: weakref.WeakSet[FrameJob] = weakref.WeakSet()  # every FrameJob not yet freed


def live_jobs() -> int:
    """How many `FrameJob`s exist now (a stream's job is freed when its client goes away)."""
    return len(LIVE_JOBS)


class FrameJob:
    """One stream's generation state (a `services.streaming.FrameSource`): blocking `next_batch()`
    calls return JPEG batches in frame order until `total` frames are out or `cancel` is set.
    `close()` cancels the job and drops its audio, features and frame order at once (the stream calls it
    when it ends, so nothing big waits for a garbage collection)."""

    def __init__(self, service: FrameGenerationService, audio16k: np.ndarray,
                 on_frame: Callable[[int, bytes], None] | None = None):
        self.service = service
        self.feed: FeatureFeed | None = FeatureFeed(service.engine, audio16k)
        # audio shorter than one frame (40 ms) makes no frame (the server answers 400 audio_too_short)
        self.total = self.feed.total if len(self.feed.audio) >= SAMPLES_PER_FRAME else 0
        self.order = service.frame_order(self.total)
        self.cancel = threading.Event()
        self.on_frame = on_frame
        self.next_frame = 0
        self.t0: float | None = None  # when the first batch was asked for: frame i is due t0 + i / 25
        LIVE_JOBS.add(self)

    def close(self) -> None:
        """Cancel the job and release its audio, features and frame order (call once no batch runs)."""
        self.cancel.set()
        self.feed, self.on_frame = None, None
        self.order = self.order[:0]

    def next_batch(self) -> list[bytes] | None:
        """The next frames as JPEG bytes, or None when finished, cancelled or closed."""
        svc, start, feed = self.service, self.next_frame, self.feed
        if self.cancel.is_set() or feed is None or start >= self.total:
            return None
        end = min(self.total, start + (svc.first_batch if start == 0 else svc.batch_size))
        # frame i's window reads feature rows [i - 8, i + 8): rows up to end + FUTURE_ROWS must exist
        features = feed.ensure(end + FUTURE_ROWS, self.cancel)
        if self.cancel.is_set():
            return None
        if self.t0 is None:
            self.t0 = time.monotonic()
        windows = svc.engine.audio_windows(features, range(start, end))
        frames = svc.render(windows, self.order[start:end], self.t0 + start / FPS)
        jpegs = [svc.encode(f) for f in frames]
        if svc.stats is not None:
            svc.stats.add(frames_generated=len(jpegs))
        on_frame = self.on_frame
        if on_frame is not None:
            for k, jpeg in enumerate(jpegs):
                on_frame(start + k, jpeg)
        self.next_frame = end
        return jpegs
