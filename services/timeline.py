"""The live timeline: the audio of one live connection in, its 25 fps frames out, in order, on the
server's clock. `services/live.py` (`WS /ws/live`) and `services/webrtc_mic.py` (the WebRTC microphone)
drive it; its idle loop is also the WebRTC sessions' picture at rest.

Timeline of one live connection (all in output frames k = 0, 1, ... at 25 fps, frame k due at
t0 + k/25 on the server's monotonic clock):

- Audio arrives as PCM16 chunks. The first chunk (or a `start` message) opens a *session*: its sample 0 is
  anchored to output frame `k_s` (0 when the session starts before any of its frames could be due, i.e.
  a client that streams right after `ready`; otherwise the next frame not yet planned), and output frame
  k shows session audio frame `a = k - k_s - D`, i.e. audio time k/25 - latency. `D` = `latency_ms` / 40
  covers the feature look-ahead (StreamingFeatures hop + look-ahead, and the U-Net's audio window reaching
  7 feature rows past the frame) plus a compute margin (`server.ws_margin_ms`); it is announced in the
  `ready` event.
- Speech vs silence is a gate on the session audio (`LiveGate`): audio frame a (40 ms) is voiced when its
  RMS is above `server.vad_threshold_db` dBFS and, with `audio.speech_vad = "silero"` (the default), the
  session's own Silero VAD gives it a speech probability above `audio.vad_threshold`; frame a is
  *speaking* when any frame in [a - hangover, a] is voiced (`server.vad_hangover_ms` of hangover).
- Speaking frames are rendered by the avatar's engine from the session's streaming Whisper features; the
  first starts on the source frame the idle loop was on and later ones walk the source frames (ping-pong,
  or stay on that frame with `server.motion = "template"`). Silent frames show the idle loop (the first
  `server.idle_seconds` of source frames, ping-pong, mouth as recorded); the return from speech to idle
  cross-fades over `server.idle_blend_frames` frames.
- Every frame is a function of the audio samples (never of how they were chunked); wall-clock timing
  only decides *when* frames leave, never faster than 25 fps. With `realtime` (default) a frame whose
  time has passed by one frame interval is not rendered, and a late frame is dropped when a newer one is
  already waiting, so latency stays bounded (about one render time) when rendering is slower than real
  time; with `"realtime": false` (config message) every frame is delivered and the clock slips instead.

Two worker threads per timeline: one turns audio into features, the other plans and renders frames (so
the two overlap on two cores).
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config import Settings
from services.streaming import encode_jpeg
from synctalk.audio import SileroStream, frame_levels_db, voiced_frames
from synctalk.engine import LipSyncEngine, pingpong_step
from synctalk.features import StreamingFeatures
from synctalk.scheduler import FrameScheduler
from synctalk.sizes import audio_input_shape, audio_window
from synctalk.timing import FPS, FUTURE_ROWS, SAMPLE_RATE, SAMPLES_PER_FRAME, WINDOW

log = logging.getLogger("live.timeline")

VAD_AHEAD_FRAMES = 0  # speech frames start at the frame holding the onset (the window sees ahead anyway)
MAX_AHEAD_S = 3.0  # the worker plans at most this far ahead of the last frame sent

LIVE_OBJECTS: weakref.WeakSet[Any] = weakref.WeakSet()  # every LiveConnection and LiveTimeline not yet freed


def live_objects() -> dict[str, int]:
    """How many `LiveConnection`s and `LiveTimeline`s exist now, by class name (both are freed when
    their client goes away)."""
    counts = {"LiveConnection": 0, "LiveTimeline": 0}
    for obj in list(LIVE_OBJECTS):
        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class LiveOptions:
    """Settings of the live paths, taken from `settings.server` (see config.py for each meaning)."""

    idle_seconds: float
    jpeg_quality: int
    ws_jpeg_quality: int
    motion: str
    vad_threshold_db: float
    vad_hangover_frames: int
    vad_probability: float | None  # Silero speech probability a voiced frame needs too (None: the level alone)
    blend_frames: int
    margin_ms: float
    send_timeout_s: float
    max_ahead_s: float = 5.0  # audio a client may send ahead of real time before it is closed (1008)
    starve_s: float = 0.5  # internal: how long the sender waits for the worker before repeating a frame

    @classmethod
    def from_settings(cls, settings: Settings) -> LiveOptions:
        """The options of `settings.server`."""
        s = settings.server
        return cls(idle_seconds=float(s.idle_seconds), jpeg_quality=int(s.jpeg_quality),
                   ws_jpeg_quality=int(s.ws_jpeg_quality), motion=str(s.motion),
                   vad_threshold_db=float(s.vad_threshold_db),
                   vad_hangover_frames=int(round(s.vad_hangover_ms * FPS / 1000)),
                   vad_probability=(float(settings.audio.vad_threshold) if settings.audio.speech_vad == "silero"
                                    else None),
                   blend_frames=int(s.idle_blend_frames), margin_ms=float(s.ws_margin_ms),
                   send_timeout_s=float(s.ws_send_timeout_s), max_ahead_s=float(s.ws_max_ahead_s))


# ---------------------------------------------------------------------------------------------
# The idle loop


class IdleLoop:
    """The first `seconds` of an avatar's source frames, walked ping-pong, as the engine's idle mode shows
    them (`LipSyncEngine.idle_frame`: the mouth as recorded, or rendered for silence). JPEGs are encoded
    once per quality and cached."""

    def __init__(self, engine: LipSyncEngine, seconds: float, fps: int):
        self.engine = engine
        self.count = max(1, min(int(engine.n_frames), int(round(seconds * fps))))
        self._jpegs: dict[int, list[bytes | None]] = {}
        self._lock = threading.Lock()

    def frame(self, index: int) -> np.ndarray:
        """Idle frame `index` (BGR, read-only)."""
        return self.engine.idle_frame(int(index))

    def jpeg(self, index: int, quality: int) -> bytes:
        """JPEG of idle frame `index` at `quality` (cached)."""
        with self._lock:
            cache = self._jpegs.setdefault(quality, [None] * self.count)
            data = cache[index]
        if data is None:
            data = encode_jpeg(self.frame(index), quality)
            with self._lock:
                cache[index] = data
        return data


_idle_loops: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_idle_lock = threading.Lock()


def idle_loop(engine: LipSyncEngine, seconds: float, fps: int) -> IdleLoop:
    """The shared `IdleLoop` of `engine` (one per engine and length)."""
    with _idle_lock:
        loops = _idle_loops.setdefault(engine, {})
        key = (round(seconds, 3), fps)
        if key not in loops:
            loops[key] = IdleLoop(engine, seconds, fps)
        return loops[key]


# ---------------------------------------------------------------------------------------------
# Live session pieces: latency, speech gate, PCM decoding


def feature_delay_samples(hop: int, lookahead: int, frame: int = SAMPLES_PER_FRAME,
                          future_rows: int = FUTURE_ROWS) -> int:
    """Worst case, over audio frames a, of (samples needed before frame a can be rendered) - 640 a:
    the features of row a + future_rows are emitted by call floor((a+7)*640/hop), which needs samples
    up to (call + 1) * hop + lookahead."""
    worst = 0
    period = max(1, hop // math.gcd(hop, frame))
    for a in range(period * 2):
        row = a + future_rows
        call = (row * frame) // hop
        need = (call + 1) * hop + lookahead
        worst = max(worst, need - a * frame)
    return worst


class LiveGate:
    """Speech vs silence per audio frame (640 samples) of one live session: voiced when the RMS exceeds
    `threshold_db` dBFS and, with `vad_threshold`, the session's Silero VAD probability (a `SileroStream`)
    exceeds it too, so a room's noise floor is a pause; frame a is speaking when any frame in
    [a - hangover, a + ahead] is voiced. Every decision is a function of the samples, not their chunking."""

    def __init__(self, threshold_db: float, hangover: int, ahead: int = VAD_AHEAD_FRAMES, frame: int = SAMPLES_PER_FRAME,
                 vad_threshold: float | None = None):
        self.threshold = float(threshold_db)
        self.hangover, self.ahead, self.frame = int(hangover), int(ahead), int(frame)
        self._prob_min = -1.0 if vad_threshold is None else float(vad_threshold)
        self.vad = SileroStream() if vad_threshold is not None else None
        self.voiced: list[bool] = []
        self.levels_db: list[float] = []
        self._probs: list[float] = []
        self._tail = np.zeros(0, np.float32)
        self.ended = False

    def push(self, pcm: np.ndarray) -> None:
        """Add samples (any chunking)."""
        buf = np.concatenate([self._tail, pcm]) if self._tail.size else pcm
        n = len(buf) // self.frame
        if self.vad is not None:
            self._probs.extend(float(x) for x in self.vad.push(pcm))
        if n:
            self.levels_db.extend(float(x) for x in frame_levels_db(buf[: n * self.frame], self.frame))
        self._tail = np.array(buf[n * self.frame:], dtype=np.float32)
        self._decide()

    def end(self, total_frames: int) -> None:
        """The audio ended; frames up to `total_frames` exist (a last partial frame counts if needed)."""
        if len(self.levels_db) < total_frames and self._tail.size:
            self.levels_db.append(float(frame_levels_db(self._tail, len(self._tail))[0]))
        if self.vad is not None:
            self._probs.extend(float(x) for x in self.vad.finish())
        del self.levels_db[total_frames:], self._probs[total_frames:]
        self.levels_db.extend([-math.inf] * (total_frames - len(self.levels_db)))  # past the audio: silent
        self._probs.extend([0.0] * (total_frames - len(self._probs)))
        del self.voiced[total_frames:]
        self._decide()
        self._tail = np.zeros(0, np.float32)
        self.ended = True

    def _decide(self) -> None:
        """Extend `voiced` over the frames whose level (and VAD probability) are in."""
        n = len(self.levels_db) if self.vad is None else min(len(self.levels_db), len(self._probs))
        a = len(self.voiced)
        if n > a:
            probs = None if self.vad is None else np.asarray(self._probs[a:n], np.float32)
            self.voiced.extend(voiced_frames(np.asarray(self.levels_db[a:n]), self.threshold, probs, self._prob_min).tolist())

    def speaking(self, a: int) -> bool | None:
        """Whether audio frame a is speech; None while undecided (frames up to a + ahead not in yet)."""
        if a + self.ahead >= len(self.voiced) and not self.ended:
            return None
        lo, hi = max(0, a - self.hangover), min(len(self.voiced), a + self.ahead + 1)
        return any(self.voiced[lo:hi])


class PCMDecoder:
    """PCM16 little-endian mono bytes at `rate` -> 16 kHz float32, as one continuous byte stream (an odd
    trailing byte waits for the next chunk; other rates are resampled with a streaming soxr resampler)."""

    def __init__(self, rate: int = SAMPLE_RATE):
        self.rate = int(rate)
        self._odd = b""
        self._resampler = None
        if self.rate != SAMPLE_RATE:
            import soxr

            self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def decode(self, data: bytes) -> np.ndarray:
        """16 kHz float32 samples of the next chunk of bytes."""
        data = self._odd + data
        cut = len(data) - (len(data) % 2)
        self._odd = data[cut:]
        pcm = np.frombuffer(data[:cut], dtype="<i2").astype(np.float32) / 32768.0
        if self._resampler is not None:
            pcm = self._resampler.resample_chunk(pcm)
        return np.asarray(pcm, dtype=np.float32)

    def finish(self) -> np.ndarray:
        """The resampler's tail (call at the end of a session or before switching rates)."""
        self._odd = b""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out = np.asarray(self._resampler.resample_chunk(np.zeros(0, np.float32), last=True), np.float32)
        import soxr

        self._resampler = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        return out


# ---------------------------------------------------------------------------------------------
# The per-connection timeline (worker thread)


class Clock:
    """Frame k is due at t0 + k / fps (monotonic seconds); `shift` moves all later deadlines."""

    def __init__(self, fps: int, t0: float | None = None):
        self.fps = fps
        self.t0 = time.monotonic() if t0 is None else t0

    def deadline(self, k: int) -> float:
        """When frame k is due."""
        return self.t0 + k / self.fps

    def frame_at(self, t: float) -> float:
        """The (fractional) frame index due at time t."""
        return (t - self.t0) * self.fps

    def shift(self, seconds: float) -> None:
        """Delay every deadline by `seconds`."""
        self.t0 += seconds


@dataclass
class Session:
    """One stretch of continuous audio: its anchor, speech gate and feature rows (a growing buffer
    from which rows no longer needed are discarded)."""

    anchor: int  # output frame showing audio frame 0
    gate: LiveGate
    samples: int = 0
    stopping: bool = False  # a stop is queued: no more audio joins this session
    ended: bool = False
    total_frames: int | None = None  # known once ended
    last_audio_at: float = 0.0
    n_rows: int = 0
    _rows: np.ndarray | None = None  # rows [_base, n_rows)
    _base: int = 0

    def add_rows(self, rows: np.ndarray) -> None:
        """Append feature rows [k, 2, dim]."""
        if not len(rows):
            return
        held = self.n_rows - self._base
        if self._rows is None:
            self._rows = np.zeros((max(64, 2 * len(rows)), *rows.shape[1:]), np.float32)
        elif held + len(rows) > len(self._rows):
            grown = np.zeros((max(2 * len(self._rows), held + len(rows)), *rows.shape[1:]), np.float32)
            grown[:held] = self._rows[:held]
            self._rows = grown
        self._rows[held: held + len(rows)] = rows
        self.n_rows += len(rows)

    def discard_before(self, row: int) -> None:
        """Forget rows < `row` (no later window needs them)."""
        drop = min(row, self.n_rows) - self._base
        if self._rows is not None and drop > len(self._rows) // 2:
            held = self.n_rows - self._base
            self._rows[: held - drop] = self._rows[drop:held].copy()
            self._base += drop

    def played_out(self, k: int) -> bool:
        """Whether output frame `k` comes after this (ended) session's last frame."""
        return self.ended and self.total_frames is not None and k >= self.anchor + self.total_frames

    def window(self, a: int, mode: str) -> np.ndarray:
        """The network's audio input for session audio frame `a`: `synctalk.sizes.audio_window` of the
        whole stream (rows [a-8, a+8) zero-filled outside [0, n_rows)) over the rows still held."""
        assert self._rows is not None
        lo = max(a - WINDOW // 2, 0)
        if lo < min(self._base, self.n_rows):
            raise RuntimeError(f"feature row {lo} was already discarded")
        return audio_window(self._rows[: self.n_rows - self._base], a - self._base, mode)


@dataclass
class Planned:
    """One planned output frame."""

    k: int
    kind: str  # "idle", "speech", "blend"
    source: int  # source frame index
    a: int | None = None  # session audio frame (speech)
    weight: float = 1.0  # blend: share of the idle frame
    events: list[dict] = field(default_factory=list)
    window: np.ndarray | None = None  # speech: the network's audio input
    epoch: int = 0  # the timeline's epoch when planned (a stop starts a new one)


@dataclass
class Item:
    """What the worker hands to the sender: frame k's JPEG (None = dropped; `LiveTimeline.picture` makes
    it) and its events."""

    k: int
    jpeg: bytes | None
    kind: str
    audio_time: float | None
    events: list[dict]
    epoch: int = 0  # planned in this epoch of the timeline: the sender drops items of an older one


def _drop_item(item: Item | None) -> None:
    """The emit callback of a closed timeline: nothing goes anywhere."""


class LiveTimeline:
    """The frames of one WebSocket: ingests audio, plans frames in order, renders them, hands them out.

    Two threads: `run_features` turns audio into sessions, energy-gate levels and Whisper feature rows;
    `run_frames` plans output frames in order and renders them, so feature extraction and rendering
    overlap. Thread-safe entry points for the event loop: `push_audio`, `start`, `stop` (end of the
    audio: it plays out), `interrupt` (drop it all now), `sent`, `close`.
    Finished frames go to `emit(item)` (`emit(None)` after a failure, see `error`).
    """

    def __init__(self, engine: LipSyncEngine, opts: LiveOptions, clock: Clock, emit: Callable[[Item | None], None],
                 realtime: bool = True, features_factory: Callable[[], Any] | None = None,
                 scheduler: FrameScheduler | None = None):
        self.engine = engine
        self.scheduler = scheduler  # the avatar's: speech frames share U-Net batches with its other streams
        self.opts = opts
        self.clock = clock
        self.emit = emit
        self.realtime = realtime
        self.idle = idle_loop(engine, opts.idle_seconds, FPS)
        self.n_source = int(engine.n_frames)
        self.mode = engine.mode
        self.input_shape = audio_input_shape(self.mode)
        if features_factory is None:  # the avatar's shared encoder batches windows across its live streams
            encode = scheduler.feature_encoder() if scheduler is not None else None

            def features_factory() -> StreamingFeatures:
                return StreamingFeatures(device=engine.feature_device, config=engine.feature_config, encode=encode)
        self.features = features_factory()
        delay = feature_delay_samples(self.features.hop, self.features.lookahead)
        self.delay_frames = int(math.ceil((delay + opts.margin_ms * SAMPLE_RATE / 1000) / SAMPLES_PER_FRAME))
        self.latency_ms = 1000.0 * self.delay_frames / FPS
        self._render_out = [np.empty(tuple(engine.frame_shape), np.uint8)]  # reused output buffer
        # planning state (guarded by _cv)
        self.k_next = 0
        self.state = "idle"
        self.idle_pos, self.idle_dir = -1, 1  # the first step shows idle frame 0
        self.speech_pos, self.speech_dir = 0, 1
        self.blend_left = 0
        self._announce_idle = False
        self.last_speech_frame: np.ndarray | None = None
        self.sessions: collections.deque[Session] = collections.deque()
        self._spare_gate: LiveGate | None = None  # the audio thread's next session gate (built off the lock)
        self.sessions_started = 0
        self.k_sent = -1
        self.last_audio_posted = -math.inf  # arrival time of the latest audio chunk
        self.epoch = 0  # bumped by `interrupt`: frames planned before it are never shown
        self.last_active_k = -1  # the last frame planned as speech or blend, or announcing `idle`
        # thread plumbing
        self._inbox: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self.error: BaseException | None = None
        self.stats = {"rendered": 0, "render_s": 0.0, "features_s": 0.0}
        LIVE_OBJECTS.add(self)

    # -- entry points (event loop thread) ----------------------------------------------------------

    def push_audio(self, pcm: np.ndarray, at: float) -> None:
        """16 kHz float32 samples that arrived at monotonic time `at`."""
        with self._cv:
            self.last_audio_posted = at
        self._post(("audio", pcm, at))

    def start(self, at: float) -> None:
        """Open a session now (if none takes audio)."""
        self._post(("start", None, at))

    def stop(self, at: float) -> None:
        """End the session taking audio: flush its features; it plays out, then idle (the client's `end`)."""
        self._post(("stop", None, at))

    def interrupt(self, first_k: int) -> dict[str, Any]:
        """Drop every session and the audio not processed yet, and show the idle loop from output frame
        `first_k` (the first frame the sender has not committed to; the client's `stop`). Frames planned
        from `first_k` on belong to the old `epoch`: the sender drops them. Returns the `stopped` event's
        fields: `frame` (the first frame after the stop), `position` (seconds of the playing session's
        audio shown, None when none was playing) and `dropped_s` (seconds of received audio never shown)."""
        with self._cv:
            position, dropped = self._unplayed(first_k)
            announce = self.state != "idle" or self.last_active_k >= first_k
            self.epoch += 1
            self._inbox.clear()
            self._inbox.append(("reset", None, time.monotonic()))  # the feature stream starts over
            self.sessions.clear()
            if self.state == "speech":
                self._leave_speech()
            self.state, self.blend_left, self.last_speech_frame = "idle", 0, None
            self._announce_idle = self._announce_idle or announce
            self.k_next = min(self.k_next, first_k)
            self._cv.notify_all()
        return {"frame": first_k, "position": position, "dropped_s": round(dropped, 3)}

    def _unplayed(self, first_k: int) -> tuple[float | None, float]:
        """(seconds shown of the session playing at `first_k` or None, seconds of received audio not shown
        before `first_k`). Called with the lock held."""
        dropped = sum(len(pcm) for kind, pcm, _ in self._inbox if kind == "audio") / SAMPLE_RATE
        position = None
        for session in self.sessions:
            frames = session.total_frames if session.total_frames is not None else \
                -(-session.samples // SAMPLES_PER_FRAME)
            shown = min(max(0, first_k - session.anchor), frames)
            if position is None and first_k > session.anchor:
                position = round(shown / FPS, 4)
            dropped += max(0.0, session.samples / SAMPLE_RATE - shown / FPS)
        return position, dropped

    def sent(self, k: int) -> None:
        """The sender is done with frame k (sent or dropped)."""
        with self._cv:
            self.k_sent = max(self.k_sent, k)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop both threads (see `join`)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _post(self, msg: tuple) -> None:
        with self._cv:
            self._inbox.append(msg)
            self._cv.notify_all()

    def start_threads(self) -> None:
        """Start the two worker threads."""
        for target, name in ((self.run_features, "live-features"), (self.run_frames, "live-frames")):
            thread = threading.Thread(target=self._guard(target), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the threads after `close()` (a render in flight finishes first), then drop what the
        timeline holds: the emit callback (its connection refers back to it), the threads, queued audio,
        sessions and the feature stream, so nothing waits for a garbage collection."""
        for thread in self._threads:
            thread.join(timeout)
        if any(thread.is_alive() for thread in self._threads):
            return  # a thread still runs (a very slow render): it still needs its state
        with self._cv:
            self.emit = _drop_item
            self._threads.clear()
            self._inbox.clear()
            self.sessions.clear()
            self.features = None
            self.last_speech_frame = None

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # reported to the client by the connection handler
                log.exception("live timeline failed")
                with self._cv:
                    first = self.error is None
                    self.error = exc
                    self._closed = True
                    self._cv.notify_all()
                if first:
                    self.emit(None)
        return body

    # -- thread 1: audio -> sessions, gate, features ------------------------------------------------

    def run_features(self) -> None:
        """Thread body: inbox messages in order -> sessions, gate levels, feature rows."""
        while True:
            with self._cv:
                while not self._inbox and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
            if self._spare_gate is None:  # once messages come: the next session's gate, off the lock (VAD loads)
                self._spare_gate = self._new_gate()
            with self._cv:
                if self._closed:
                    return
                if not self._inbox:
                    continue
                kind, pcm, at = self._inbox.popleft()
                if kind == "reset":  # after `interrupt`: new audio is a new stream
                    self.features.reset()
                    continue
                if kind == "start":
                    if self._current_open() is None:
                        self._open_session(at)
                    continue
                if kind == "audio":
                    session = self._current_open() or self._open_session(at)
                    session.samples += pcm.size
                    session.last_audio_at = at
                    session.gate.push(pcm)
                    self._cv.notify_all()
                else:  # stop: end the session still taking audio, if any
                    if not self.sessions or self.sessions[-1].ended:
                        continue
                    session = self.sessions[-1]
                    session.stopping = True
            start = time.perf_counter()
            rows = self.features.push(pcm) if kind == "audio" else self.features.flush()
            self.stats["features_s"] += time.perf_counter() - start
            with self._cv:
                session.add_rows(rows)
                if kind != "audio":  # stop (from the client, or after starving): the session is complete
                    session.total_frames = session.n_rows
                    session.gate.end(session.total_frames)
                    session.ended = True
                self._cv.notify_all()

    def _current_open(self) -> Session | None:
        """The session that receives audio now (the last one, unless it has ended or is ending)."""
        if self.sessions and not self.sessions[-1].ended and not self.sessions[-1].stopping:
            return self.sessions[-1]
        return None

    def _new_gate(self) -> LiveGate:
        return LiveGate(self.opts.vad_threshold_db, self.opts.vad_hangover_frames,
                        vad_threshold=self.opts.vad_probability)

    def _open_session(self, at: float) -> Session:
        d = self.delay_frames
        if self.sessions_started == 0 and self.k_next <= d and self.clock.frame_at(at) < d:
            start = 0  # the audio clock starts with the connection
        else:
            start = max(self.k_next, int(math.ceil(self.clock.frame_at(at))))
            if self.sessions:  # an earlier session is still playing out: follow it
                prev = self.sessions[-1]
                prev_end = prev.anchor + (prev.total_frames if prev.total_frames is not None
                                          else len(prev.gate.voiced) + 1)
                start = max(start, prev_end - d)
        gate, self._spare_gate = self._spare_gate or self._new_gate(), None
        session = Session(anchor=start + d, gate=gate)
        session.last_audio_at = at
        self.sessions.append(session)
        self.sessions_started += 1
        log.debug("session %d: audio frame 0 at output frame %d", self.sessions_started, session.anchor)
        return session

    # -- thread 2: plan and render frames --------------------------------------------------------------

    def run_frames(self) -> None:
        """Thread body: plan frames in order (under the lock), render and emit them (outside it)."""
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    if self.k_next - self.k_sent > MAX_AHEAD_S * FPS:
                        self._cv.wait(0.05)  # the sender is behind (slow client)
                        continue
                    plan, wake = self._plan_next()
                    if plan is not None:
                        break
                    timeout = 0.05 if wake is None else min(0.05, wake - time.monotonic())
                    self._cv.wait(max(0.002, timeout))  # never spin with the lock held
            if plan.kind == "speech":
                self._render_speech(plan)
            else:
                self._emit_plain(plan)

    def _plan_next(self) -> tuple[Planned | None, float | None]:
        """Plan frame `k_next` if it can be decided now (advancing the state); else (None, wake time).
        Called with the lock held."""
        k = self.k_next
        now = time.monotonic()
        while self.sessions and self.sessions[0].played_out(k):
            self.sessions.popleft()  # played out
        session = self.sessions[0] if self.sessions and k >= self.sessions[0].anchor else None
        speaking = False
        a = None
        if session is not None:
            a = k - session.anchor
            decided = session.gate.speaking(a)
            if decided is None or (decided and not session.ended and session.n_rows <= a + FUTURE_ROWS):
                # waiting for audio (or for its features); a client that went quiet ends its session
                starve_at = max(self.clock.deadline(k), self.last_audio_posted) + self.opts.starve_s
                if session.stopping or session.ended:
                    return None, None  # the stop is queued: wait for its flush
                if now >= starve_at:
                    session.stopping = True
                    self._inbox.append(("stop", None, now))
                    self._cv.notify_all()
                return None, starve_at
            speaking = bool(decided)
        elif not speaking:
            due = self.clock.deadline(k) - 0.5 / FPS
            if now < due:
                return None, due  # idle frames are made just in time
        plan = self._step(k, speaking, a)
        plan.epoch = self.epoch
        if plan.kind != "idle" or plan.events:
            self.last_active_k = k
        if speaking and session is not None and a is not None:  # (speaking implies both)
            plan.window = session.window(a, self.mode)
            session.discard_before(a - WINDOW)
        self.k_next += 1
        return plan, None

    def _step(self, k: int, speaking: bool, a: int | None) -> Planned:
        """Advance the walk state by one output frame."""
        events: list[dict] = []
        if speaking:
            if a is None:
                raise ValueError(f"frame {k} is planned as speech without its session audio frame")
            if self.state != "speech":
                # start on the frame the idle loop would show now
                self.speech_pos, self.speech_dir = pingpong_step(self.idle_pos, self.idle_dir, self.idle.count)
                self.state = "speech"
                self.last_speech_frame = None
                events.append({"type": "speaking", "frame": k, "audio_time": round(a / FPS, 4)})
            elif self.opts.motion == "enhanced":
                self.speech_pos, self.speech_dir = pingpong_step(self.speech_pos, self.speech_dir, self.n_source)
            return Planned(k, "speech", self.speech_pos, a=a, events=events)
        if self.state == "speech":
            self._leave_speech()
            self.blend_left = self.opts.blend_frames
            self.state = "blend" if self.blend_left > 0 else "idle"
            self._announce_idle = True
        self.idle_pos, self.idle_dir = pingpong_step(self.idle_pos, self.idle_dir, self.idle.count)
        if self.state == "blend":
            done = self.opts.blend_frames - self.blend_left + 1
            weight = done / (self.opts.blend_frames + 1)
            self.blend_left -= 1
            if self.blend_left == 0:
                self.state = "idle"
            return Planned(k, "blend", self.idle_pos, weight=weight, events=events)
        if self._announce_idle:  # the first frame of the idle loop after speech
            self._announce_idle = False
            events.append({"type": "idle", "frame": k})
        return Planned(k, "idle", self.idle_pos, events=events)

    def _leave_speech(self) -> None:
        """Back to the idle loop: continue from the speech walk if it is inside the loop."""
        if self.speech_pos < self.idle.count:
            self.idle_pos, self.idle_dir = self.speech_pos, self.speech_dir
        else:
            self.idle_pos, self.idle_dir = self.idle.count, -1  # steps to the loop's last frame

    # -- rendering (no lock held) --------------------------------------------------------------------

    def _late(self, k: int) -> bool:
        return self.realtime and time.monotonic() > self.clock.deadline(k) + 1.0 / FPS

    def _render_speech(self, plan: Planned) -> None:
        if plan.a is None or plan.window is None:
            raise ValueError(f"frame {plan.k} is planned as speech without its audio")
        audio_time = plan.a / FPS
        if self._late(plan.k):  # realtime and already a frame interval late: skip the work
            self.emit(Item(plan.k, None, plan.kind, audio_time, plan.events, plan.epoch))
            return
        start = time.perf_counter()
        if self.scheduler is not None:
            frame = self.scheduler.render(plan.window[None], [plan.source], self.clock.deadline(plan.k))[0]
        else:
            frame = self.engine.render(plan.window[None], [plan.source], out=self._render_out)[0]
        self.stats["render_s"] += time.perf_counter() - start
        self.stats["rendered"] += 1
        self.last_speech_frame = frame
        self.emit(Item(plan.k, self.picture(frame), plan.kind, audio_time, plan.events, plan.epoch))

    def _emit_plain(self, plan: Planned) -> None:
        if plan.kind == "idle" or self.last_speech_frame is None:  # (no speech frame to blend from)
            self.emit(Item(plan.k, self.idle_picture(plan.source), "idle", None, plan.events, plan.epoch))
            return
        if self._late(plan.k):
            self.emit(Item(plan.k, None, plan.kind, None, plan.events, plan.epoch))
            return
        import cv2

        idle = self.idle.frame(plan.source)
        mixed = cv2.addWeighted(self.last_speech_frame, 1.0 - plan.weight, idle, plan.weight, 0.0)
        self.emit(Item(plan.k, self.picture(mixed), "blend", None, plan.events, plan.epoch))

    # -- what a frame is handed out as: JPEG for the WebSocket (services/webrtc_mic.py keeps the pixels) --

    def picture(self, frame: np.ndarray) -> Any:
        """The payload of a rendered or blended frame: JPEG at `server.ws_jpeg_quality`."""
        return encode_jpeg(frame, self.opts.ws_jpeg_quality)

    def idle_picture(self, index: int) -> Any:
        """The payload of idle frame `index`: its cached JPEG."""
        return self.idle.jpeg(index, self.opts.ws_jpeg_quality)
