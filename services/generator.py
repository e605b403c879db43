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
from synctalk.features import FILE_BATCH, StreamingFeatures, load_whisper_encoder
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
                 stats: StreamStats | None = None, template: int = 0, first_batch: int = 1,
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

    def order_prefix(self, known: int, final: bool) -> np.ndarray:
        """The source frames of the first output frames that no later audio can change, for a clip of at
        least `known` frames (exactly `known` when `final`): all of them here."""
        return self.frame_order(known)

    def encode(self, frame: np.ndarray) -> bytes:
        """JPEG bytes of a BGR frame at this service's quality."""
        return encode_jpeg(frame, self.jpeg_quality)

    def render_jpegs(self, windows: np.ndarray, order: np.ndarray, deadline: float) -> list[bytes]:
        """JPEG frames for audio `windows` on source frames `order`: through the scheduler when there is
        one (paste and encoding then run in its bounded paste pool), else rendered alone on the engine."""
        if self.scheduler is None:
            return [self.encode(f) for f in self.engine.render(windows, order)]
        return self.scheduler.render(windows, order, deadline, finish=self.encode)

    def job(self, audio16k: np.ndarray, on_frame: Callable[[int, bytes], None] | None = None,
            final: bool = True) -> FrameJob:
        """A generation job for 16 kHz mono float audio; `on_frame(i, jpeg)` sees every frame. With
        `final=False` more audio follows through `job.feed.append` until `job.feed.finish()`."""
        return FrameJob(self, audio16k, on_frame, final)


class EnhancedFrameGenerationService(FrameGenerationService):
    """Moves through the source frames (upstream's ping-pong walk with `loop_back`, so a clip ends on
    the frame it started from and hands over smoothly to the still or idle picture); the mouth is
    blended in with the engine's feathered paste mask, as in the base service."""

    def frame_order(self, n: int) -> np.ndarray:
        """Ping-pong source order from the template frame, walking back to it by the end."""
        return self.engine.frame_order(n, start_frame=self.template, loop_back=True)

    def order_prefix(self, known: int, final: bool) -> np.ndarray:
        """The walk out is the first half of the clip whatever its length, so without the final count only
        the first half of the `known` frames is fixed (the way back depends on the total)."""
        order = self.frame_order(known)
        return order if final else order[: (known + 1) // 2]


class FeatureFeed:
    """Per-frame features of a clip. Whisper mode runs `synctalk.features.StreamingFeatures` only as far as
    asked, the hops a request needs in one encoder call, so rows for the first frames exist long before the
    last ones (the windows are the ones `extract_features` uses, so the frames equal the offline CLI's up to
    the float rounding of batched encoder calls). The calls depend only on the clip and the batches asked
    for, never on other streams, so a stream's frames are the same bytes whatever else the server runs
    (the live streams' shared window batcher trades that for latency). Other modes (ave) are computed in one
    call once the whole clip is there.

    A feed made with `final=False` takes more audio as it arrives (`append`, from another thread) until
    `finish()` (or `fail(exc)`); `ensure` then waits for the audio it needs. `total` counts the frames of
    the audio held so far and is the clip's frame count once `final`."""

    WAIT_S = 0.05  # longest wait for audio between checks of the cancel flag

    def __init__(self, engine: LipSyncEngine, audio16k: np.ndarray, final: bool = True):
        self.engine = engine
        self.audio = np.ascontiguousarray(np.asarray(audio16k, dtype=np.float32).reshape(-1))
        self.final = bool(final)
        self.error: BaseException | None = None
        self._cv = threading.Condition()
        self._stream: StreamingFeatures | None = None
        self._speaking: np.ndarray | None = None
        self.features: np.ndarray | None = None
        if engine.mode == "whisper":
            cfg = engine.feature_config
            encoder = load_whisper_encoder(cfg.whisper_path, device=engine.feature_device)
            self._stream = StreamingFeatures(encoder, config=cfg)
            self._rows = np.zeros((self.total, *self._stream.empty().shape[1:]), np.float32)
            if engine.speech_gate is not None:  # per-row speech mask of the gate
                self._speaking = np.ones(len(self._rows), bool)
            self._count = self._pushed = 0
            self._flushed = False
        elif self.final:
            self.features = engine.features(self.audio)

    @property
    def total(self) -> int:
        """Frames of the audio held so far, round(25 x duration): the clip's count once `final`."""
        if self.features is not None:
            return len(self.features)
        return int(round(len(self.audio) / SAMPLES_PER_FRAME))

    def append(self, audio16k: np.ndarray) -> None:
        """More audio of a feed made with `final=False` (thread-safe)."""
        chunk = np.asarray(audio16k, dtype=np.float32).reshape(-1)
        with self._cv:
            if self.final:
                raise RuntimeError("the feed's audio is complete")
            self.audio = np.concatenate([self.audio, chunk])
            self._cv.notify_all()

    def finish(self) -> None:
        """The audio is complete: `total` is final, the last rows can be made."""
        with self._cv:
            self.final = True
            self._cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        """The audio will never be complete: `ensure` raises from now on."""
        with self._cv:
            self.error = exc
            self.final = True
            self._cv.notify_all()

    def wait(self, cancel: threading.Event | None = None) -> None:
        """Block until more audio, the end of the audio or a failure, at most `WAIT_S` (then the caller
        checks its cancel flag)."""
        with self._cv:
            if not self.final and not (cancel is not None and cancel.is_set()):
                self._cv.wait(self.WAIT_S)
        if self.error is not None:
            raise RuntimeError(f"the speech audio failed: {self.error}") from self.error

    def ensure(self, k: int, cancel: threading.Event | None = None) -> np.ndarray:
        """Features with at least min(k, total) rows, waiting for audio still to come (stops early when
        `cancel` is set)."""
        if self._stream is None:
            return self._whole(cancel)
        while not (cancel is not None and cancel.is_set()):
            final = self.final  # read first: once final, `audio` is complete
            if self.error is not None or self._count >= (min(k, self.total) if final else k):
                break
            if self._pushed < len(self.audio):
                chunk = self.audio[self._pushed: self._pushed + self._chunk(k)]
                self._pushed += len(chunk)
                self._add(self._stream.push(chunk))
            elif final and not self._flushed:
                self._add(self._stream.flush())  # silence-padded tail: the last frames
                self._flushed = True
            elif final:
                raise RuntimeError(f"feature stream ended at {self._count} of {self.total} frames")
            else:
                self.wait(cancel)
        if self.error is not None:
            raise RuntimeError(f"the speech audio failed: {self.error}") from self.error
        return self._rows[: self._count]

    def _chunk(self, k: int) -> int:
        """Samples to push next on the way to `k` rows: up to the end of the window of the call that emits
        row k - 1 (`StreamingFeatures.window_bounds`), so those windows are encoded in one call; at least
        one hop, at most `FILE_BATCH` hops."""
        stream = self._stream
        assert stream is not None
        last_call = -(-k // stream.frames_per_call) - 1
        need = stream.window_bounds(last_call)[1] - self._pushed
        return min(max(need, stream.hop), FILE_BATCH * stream.hop)

    def _add(self, rows: np.ndarray) -> None:
        """Keep new feature rows (at most `total`, once final; the buffer grows with the audio)."""
        if self.final:
            rows = rows[: max(0, self.total - self._count)]
        speaking = self.engine.speaking(self.audio, len(rows), first_frame=self._count)
        rows = self.engine.gate(rows, speaking)  # pauses: the model's silent mouth (docs/inference.md)
        end = self._count + len(rows)
        if end > len(self._rows):
            grown = np.zeros((max(end, 2 * len(self._rows), 64), *self._rows.shape[1:]), np.float32)
            grown[: self._count] = self._rows[: self._count]
            self._rows = grown
            if self._speaking is not None:  # the speech mask grows with the rows it describes
                self._speaking = np.concatenate([self._speaking, np.ones(len(grown) - len(self._speaking), bool)])
        if self._speaking is not None and speaking is not None:
            self._speaking[self._count: end] = speaking
        self._rows[self._count: end] = rows
        self._count = end

    @property
    def speaking(self) -> np.ndarray | None:
        """Per-frame speech mask of the rows made so far (None without a speech gate)."""
        return None if self._speaking is None else self._speaking[: self._count]

    def _whole(self, cancel: threading.Event | None) -> np.ndarray:
        """Features of a non-streaming mode, computed once the whole audio is there."""
        while self.features is None and not (cancel is not None and cancel.is_set()):
            if self.final:
                self.features = self.engine.features(self.audio)
            else:
                self.wait(cancel)
        return self.features if self.features is not None else np.zeros((0, 1), np.float32)


LIVE_JOBS: weakref.WeakSet[FrameJob] = weakref.WeakSet()  # every FrameJob not yet freed


def live_jobs() -> int:
    """How many `FrameJob`s exist now (a stream's job is freed when its client goes away)."""
    return len(LIVE_JOBS)


class FrameJob:
    """One stream's generation state (a `services.streaming.FrameSource`): blocking `next_batch()`
    calls return JPEG batches in frame order until `total` frames are out or `cancel` is set.
    `close()` cancels the job and drops its audio, features and frame order at once (the stream calls it
    when it ends, so nothing big waits for a garbage collection).

    With `final=False` the audio is still arriving (`feed.append`, `feed.finish`): `total` is None until
    it is complete, and a batch waits until its frames' audio (and source frames) are known."""

    def __init__(self, service: FrameGenerationService, audio16k: np.ndarray,
                 on_frame: Callable[[int, bytes], None] | None = None, final: bool = True):
        self.service = service
        self.feed: FeatureFeed | None = FeatureFeed(service.engine, audio16k, final=final)
        self.order = np.zeros(0, np.int64)
        self._order_key: tuple[int, bool] | None = None  # (frames, final) the order was computed for
        self._closed_total: int | None = None
        self.cancel = threading.Event()
        self.on_frame = on_frame
        self.next_frame = 0
        self.t0: float | None = None  # when the first batch was asked for: frame i is due t0 + i / 25
        LIVE_JOBS.add(self)

    @property
    def total(self) -> int | None:
        """Frames this job makes, round(25 x duration) (0 for audio under 40 ms: the server answers 400
        audio_too_short); None while the audio is still arriving."""
        feed = self.feed
        if feed is None:
            return self._closed_total
        if not feed.final:
            return None
        return feed.total if len(feed.audio) >= SAMPLES_PER_FRAME else 0

    def close(self) -> None:
        """Cancel the job and release its audio, features and frame order (call once no batch runs)."""
        self.cancel.set()
        self._closed_total = self.total
        self.feed, self.on_frame = None, None
        self.order = self.order[:0]

    def _span(self, feed: FeatureFeed, start: int) -> int | None:
        """End of the next batch [start, end), once its audio has arrived and its source frames are fixed
        (waiting for more audio otherwise); None when the job is finished or cancelled."""
        svc = self.service
        want = start + (svc.first_batch if start == 0 else svc.batch_size)
        while not self.cancel.is_set():
            final = feed.final  # read first: once final, the audio is complete
            total = self.total if final else None
            known = total if total is not None else len(feed.audio) // SAMPLES_PER_FRAME
            if (known, final) != self._order_key and (final or len(self.order) < want):
                self.order, self._order_key = svc.order_prefix(known, final), (known, final)
            end = min(want, len(self.order))
            if final or end > start:
                return end if end > start else None
            feed.wait(self.cancel)
        return None

    def next_batch(self) -> list[bytes] | None:
        """The next frames as JPEG bytes, or None when finished, cancelled or closed."""
        svc, start, feed = self.service, self.next_frame, self.feed
        if self.cancel.is_set() or feed is None:
            return None
        end = self._span(feed, start)
        if end is None:
            return None
        # frame i's window reads feature rows [i - 8, i + 8): rows up to end + FUTURE_ROWS must exist
        features = feed.ensure(end + FUTURE_ROWS, self.cancel)
        if self.cancel.is_set():
            return None
        if self.t0 is None:
            self.t0 = time.monotonic()
        windows = svc.engine.audio_windows(features, range(start, end), speaking=feed.speaking)
        jpegs = svc.render_jpegs(windows, self.order[start:end], self.t0 + start / FPS)
        if svc.stats is not None:
            svc.stats.add(frames_generated=len(jpegs))
        on_frame = self.on_frame
        if on_frame is not None:
            for k, jpeg in enumerate(jpegs):
                on_frame(start + k, jpeg)
        self.next_frame = end
        return jpegs
