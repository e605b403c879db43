"""The timeline of a conversation session (`services/webrtc.py`): speech queued as segments, rendered ahead
of play-out by a worker thread, and committed frame by frame on one media clock.

Output frame k (40 ms) starts at t0 + k/25 on the monotonic clock, t0 being the first time a track asks
for media (`Clock`). Each frame is *committed* (speech, blend or idle, and its 640 samples) the first time
either track reaches it, at its due time (`SpeechTimeline.commit`): a speech frame's audio and its picture
always belong together, and an interrupt takes effect at the next frame (<= 40 ms).

Speech comes in *segments* (one per TTS sentence, or one uploaded clip; `make_segment`). The worker thread
prepares each segment (streamed Whisper features, `LipSyncEngine.render` a few frames at a time, at most
`webrtc.render_ahead_s` ahead of play-out) and anchors it on the clock: right after the previous segment
(gapless) or, when nothing is playing, as soon as its first frames are rendered, plus a head start when
frames take longer to make than to play (so the first 2 s play without dropped frames). When speech
ends or is cut the frames cross-fade back to the idle loop and the audio fades out over 10 ms.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from config import WebRTCConfig
from services.generator import FeatureFeed
from services.timeline import IdleLoop
from synctalk.engine import LipSyncEngine, pingpong_step
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, FUTURE_ROWS, SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger("webrtc")

FADE_SAMPLES = SAMPLE_RATE // 100  # 10 ms fade-out when speech is cut
FIRST_BATCH, BATCH = 2, 4  # frames per render call: a small first batch starts speech sooner
CATCH_UP_FRAMES = 50  # a segment's first 2 s are planned to play without dropped frames
KEPT_SLOTS = 200  # committed frames remembered (the two tracks read the same frame a few ms apart)

_warmed: weakref.WeakSet = weakref.WeakSet()
_warm_lock = threading.Lock()
# seconds to make one speech frame (features + render), per engine: measured by every session's renders
# (and the warm-up), so a session starts with what the last one learnt about the machine's load
_frame_seconds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prepare_seconds: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the same for a segment's start


# ---------------------------------------------------------------------------------------------
# Speech: utterances (speak commands) and segments (sentences)


@dataclass(eq=False)
class Utterance:
    """One speak command: its text (or uploaded audio), progress and cancellation."""

    id: str
    text: str | None = None
    voice: str | None = None
    audio: np.ndarray | None = None  # uploaded speech, 16 kHz
    pieces: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)
    complete: bool = False  # every segment has been produced
    frames: int = 0  # frames produced so far
    played: int = 0  # frames played so far


@dataclass(eq=False)
class Segment:
    """A stretch of speech audio (one sentence or one clip) with its features, frame order and the
    frames rendered ahead of play-out."""

    utterance: Utterance
    audio: np.ndarray  # 16 kHz float32, exactly total x 640 samples
    total: int
    feed: FeatureFeed
    offset: int  # frames of the utterance before this segment
    anchor: int | None = None  # output frame showing segment frame 0 (None until prepared)
    order: np.ndarray | None = None  # source frame per segment frame
    idle_state: tuple[int, int] = (0, 1)  # idle walk (position, direction) to resume after the segment
    frames: dict[int, np.ndarray] = field(default_factory=dict)
    next_render: int = 0  # frames below this are rendered (or were skipped as late)


def make_segment(engine: LipSyncEngine, utterance: Utterance, audio16k: np.ndarray) -> Segment | None:
    """A segment of `audio16k` padded or cut to whole frames (None when shorter than half a frame)."""
    total = int(round(len(audio16k) / SAMPLES_PER_FRAME))
    if total <= 0:
        return None
    audio = np.zeros(total * SAMPLES_PER_FRAME, np.float32)
    n = min(len(audio), len(audio16k))
    audio[:n] = audio16k[:n]
    feed = FeatureFeed(engine, audio)
    total = min(total, feed.total)
    segment = Segment(utterance, audio[: total * SAMPLES_PER_FRAME], total, feed, utterance.frames)
    utterance.frames += total
    return segment


@dataclass
class Slot:
    """One committed output frame: what it shows and the 640 samples played with it."""

    k: int
    kind: str  # "idle", "speech", "blend"
    audio: np.ndarray | None  # None = silence
    segment: Segment | None = None
    a: int = 0  # segment frame (speech)
    idle_pos: int = 0  # idle source frame (idle, blend)
    weight: float = 1.0  # blend: share of the idle frame


class Clock:
    """The session's media clock: frame k starts at t0 + k / FPS (monotonic seconds); t0 is set by the
    first `start()` (the first time a track asks for media)."""

    def __init__(self) -> None:
        self.t0: float | None = None

    def start(self) -> float:
        """Start the clock now unless it runs already; its t0."""
        if self.t0 is None:
            self.t0 = time.monotonic()
        return self.t0

    def deadline(self, k: float) -> float:
        """When frame k starts (the clock must be started)."""
        assert self.t0 is not None
        return self.t0 + k / FPS

    def now_frame(self) -> float:
        """The (fractional) frame playing now; 0 before the clock starts."""
        return 0.0 if self.t0 is None else (time.monotonic() - self.t0) * FPS


class SpeechTimeline:
    """The frames of one session: segments queued by the producer, rendered ahead by a worker thread,
    committed frame by frame by the tracks (`commit(k)`), with events for `emit` (called on the event
    loop's thread, inside `commit`)."""

    def __init__(self, engine: LipSyncEngine, idle: IdleLoop, cfg: WebRTCConfig, blend_frames: int,
                 emit: Callable[[dict], None], scheduler: FrameScheduler | None = None):
        self.engine = engine
        self.scheduler = scheduler  # the avatar's: speech frames share U-Net batches with its other streams
        self.idle = idle
        self.clock = Clock()
        self.emit = emit
        self.blend_frames = int(blend_frames)
        self.interrupt_blend_frames = int(cfg.interrupt_blend_frames)
        self.margin_s = cfg.start_margin_ms / 1000.0
        self.ahead_frames = max(BATCH, int(round(cfg.render_ahead_s * FPS)))
        self.prepare_s = _prepare_seconds.get(engine, 0.25)  # estimate of the time to prepare a segment
        self.frame_s = _frame_seconds.get(engine, 0.03)  # estimate of the time to make one speech frame
        self.segments: collections.deque[Segment] = collections.deque()
        self.slots: dict[int, Slot] = {}
        self.k_committed = -1
        self.idle_pos, self.idle_dir = -1, 1  # the first idle step shows idle frame 0
        self.blend_left = self.blend_total = 0
        self.fade: np.ndarray | None = None  # audio of the first frame after a cut (faded out)
        self.current: Utterance | None = None  # the utterance being played
        self.last_played: Segment | None = None
        self.interrupt_requested = False
        self.cut_utterance: Utterance | None = None
        self.closed = False
        self.error: BaseException | None = None
        self.last_speech_frame: np.ndarray | None = None  # the last speech picture taken, for blends
        self.stats = {"rendered": 0, "skipped": 0, "late": 0, "render_s": 0.0}
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="webrtc-render", daemon=True)

    # -- producer side ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the render worker thread."""
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker (a render in flight finishes first)."""
        with self._cv:
            self.closed = True
            for seg in self.segments:
                seg.utterance.cancel.set()
            self._cv.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def add(self, segment: Segment) -> bool:
        """Queue a segment after the others (False when its utterance was cancelled meanwhile)."""
        with self._cv:
            if segment.utterance.cancel.is_set() or self.closed:
                return False
            self.segments.append(segment)
            self._cv.notify_all()
            return True

    def busy(self) -> bool:
        """Whether speech (not cancelled) is playing or waiting in the timeline."""
        with self._cv:
            return self._live()

    def _live(self) -> bool:
        if self.current is not None and not self.current.cancel.is_set():
            return True
        return any(not s.utterance.cancel.is_set() for s in self.segments)

    def ahead(self) -> tuple[float, float]:
        """(seconds of speech queued ahead of the playhead, seconds of it already rendered)."""
        with self._cv:
            now = self.clock.now_frame()
            audio = rendered = 0.0
            for seg in self.segments:
                if seg.utterance.cancel.is_set():
                    continue
                if seg.anchor is None:
                    audio += seg.total
                    continue
                start = max(now, seg.anchor)
                audio += max(0.0, seg.anchor + seg.total - start)
                rendered += max(0.0, seg.anchor + seg.next_render - start)
            return audio / FPS, rendered / FPS

    def interrupt(self) -> bool:
        """Cut the speech at the next frame (queued segments are dropped); False if nothing is playing."""
        with self._cv:
            if not self._live():
                return False
            live = self.current is not None and not self.current.cancel.is_set()
            self.cut_utterance = self.current if live else next(
                s.utterance for s in self.segments if not s.utterance.cancel.is_set())
            for seg in self.segments:
                seg.utterance.cancel.set()
            if self.current is not None:
                self.current.cancel.set()
            # segments not yet playing go now; the playing one is cut at the next frame (`_cut`)
            playing = self.segments[0] if self.segments and self.segments[0] is self.last_played else None
            self.segments = collections.deque([playing] if playing is not None else [])
            self.interrupt_requested = True
            self._cv.notify_all()
            return True

    # -- the tracks' side: commit frames in order ----------------------------------------------------

    def commit(self, k: int) -> Slot:
        """Frame k, deciding it (and any earlier undecided frame) now if nobody has yet."""
        with self._cv:
            while self.k_committed < k:
                self._commit_next()
            self._cv.notify_all()
            slot = self.slots.get(k)
        if slot is None:  # older than the remembered frames: a track far behind the other
            slot = Slot(k, "idle", None, idle_pos=max(0, self.idle_pos))
        return slot

    def _commit_next(self) -> None:
        k = self.k_committed + 1
        if self.interrupt_requested:
            self._cut(k)
        seg = self.segments[0] if self.segments else None
        anchor = None if seg is None else seg.anchor  # None until the segment is prepared
        if seg is not None and anchor is not None and k >= anchor:
            slot = self._speech(k, seg, anchor)
        else:
            if self.last_played is not None:  # speech just ended: cross-fade back to the idle loop
                self.idle_pos, self.idle_dir = self.last_played.idle_state
                self.last_played = None
                self._start_blend(self.blend_frames)
            self._end_if_done(k)
            slot = self._idle(k)
        self.slots[k] = slot
        self.slots.pop(k - KEPT_SLOTS, None)
        self.k_committed = k

    def _speech(self, k: int, seg: Segment, anchor: int) -> Slot:
        a = k - anchor
        utt = seg.utterance
        if self.current is not utt:
            if self.current is not None:
                self._ended(self.current, k)
            self.current = utt
            self.emit({"type": "speech_started", "utterance_id": utt.id, "frame": k, "time": round(k / FPS, 4)})
        utt.played = seg.offset + a + 1
        self.last_played = seg
        self.blend_left = 0
        self.fade = None
        if a >= seg.total - 1:
            self.segments.popleft()
        audio = seg.audio[a * SAMPLES_PER_FRAME:(a + 1) * SAMPLES_PER_FRAME]
        return Slot(k, "speech", audio, segment=seg, a=a)

    def _idle(self, k: int) -> Slot:
        self.idle_pos, self.idle_dir = pingpong_step(self.idle_pos, self.idle_dir, self.idle.count)
        audio, self.fade = self.fade, None
        if self.blend_left > 0:
            done = self.blend_total - self.blend_left + 1
            self.blend_left -= 1
            return Slot(k, "blend", audio, idle_pos=self.idle_pos, weight=done / (self.blend_total + 1))
        return Slot(k, "idle", audio, idle_pos=self.idle_pos)

    def _start_blend(self, frames: int) -> None:
        self.blend_left = self.blend_total = max(0, int(frames))

    def _cut(self, k: int) -> None:
        """Apply an interrupt at frame k: drop the segments, fade the audio, blend back to idle."""
        self.interrupt_requested = False
        playing = self.last_played
        if playing is not None:
            a = self.current.played - playing.offset if self.current is not None else playing.total
            rest = playing.audio[a * SAMPLES_PER_FRAME:(a + 1) * SAMPLES_PER_FRAME]
            if len(rest):
                fade = np.zeros(SAMPLES_PER_FRAME, np.float32)
                n = min(FADE_SAMPLES, len(rest))
                fade[:n] = rest[:n] * np.linspace(1.0, 0.0, n, dtype=np.float32)
                self.fade = fade
            self.idle_pos, self.idle_dir = playing.idle_state
            self.last_played = None
            self._start_blend(self.interrupt_blend_frames)
        utt = self.cut_utterance
        position = utt.played / FPS if utt is not None else 0.0
        self.emit({"type": "interrupted", "utterance_id": utt.id if utt is not None else None,
                   "frame": k, "time": round(k / FPS, 4), "position": round(position, 4)})
        # segments queued after the interrupt (a replacing utterance) stay
        self.segments = collections.deque(s for s in self.segments if not s.utterance.cancel.is_set())
        self.current = None
        self.cut_utterance = None

    def _end_if_done(self, k: int) -> None:
        utt = self.current
        if utt is not None and utt.complete and not any(s.utterance is utt for s in self.segments):
            self._ended(utt, k)
            self.current = None

    def _ended(self, utt: Utterance, k: int) -> None:
        self.emit({"type": "speech_ended", "utterance_id": utt.id, "frame": k, "time": round(k / FPS, 4),
                   "position": round(utt.played / FPS, 4), "duration": round(utt.frames / FPS, 4)})

    def mark_complete(self, utt: Utterance) -> None:
        """Every segment of `utt` has been queued (its end can be announced once they have played)."""
        with self._cv:
            utt.complete = True

    # -- the video track's side -----------------------------------------------------------------------

    async def picture(self, k: int, give_up_at: float) -> np.ndarray | None:
        """Frame k's picture (committing the frame): the rendered speech frame (None when it is not ready by
        monotonic `give_up_at`, or was skipped), the idle loop, or a blend from the last speech frame."""
        slot = self.commit(k)
        if slot.kind == "speech":
            while True:
                decided, frame = self.speech_frame(slot)
                if frame is not None:
                    self.last_speech_frame = frame
                    return frame
                if decided or time.monotonic() > give_up_at:
                    self.skip_rendering(slot)
                    return None
                await asyncio.sleep(0.004)
        idle = self.idle.frame(slot.idle_pos)
        if slot.kind == "blend" and self.last_speech_frame is not None:
            return cv2.addWeighted(self.last_speech_frame, 1.0 - slot.weight, idle, slot.weight, 0.0)
        return idle

    def speech_frame(self, slot: Slot) -> tuple[bool, np.ndarray | None]:
        """(decided, frame) of a speech slot: the rendered frame (taken), or (True, None) when it was
        skipped or dropped, or (False, None) while it is still being rendered."""
        seg = slot.segment
        assert seg is not None
        with self._cv:
            frame = seg.frames.pop(slot.a, None)
            if frame is not None:
                return True, frame
            return (slot.a < seg.next_render or seg.utterance.cancel.is_set() or self.closed), None

    def skip_rendering(self, slot: Slot) -> None:
        """The video track gave up waiting for this speech frame: do not render it any more."""
        seg = slot.segment
        if seg is None:
            return
        with self._cv:
            if seg.next_render <= slot.a:
                self.stats["skipped"] += slot.a + 1 - seg.next_render
                seg.next_render = slot.a + 1
            seg.frames.pop(slot.a, None)

    # -- the render worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    job = None
                    while job is None:
                        if self.closed:
                            return
                        job = self._next_job()
                        if job is None:
                            self._cv.wait(0.02)
                kind, seg, lo, hi = job
                if kind == "prepare":
                    self._prepare(seg)
                else:
                    self._render(seg, lo, hi)
        except BaseException as exc:  # reported to the client as an `error` event
            log.exception("webrtc render worker failed")
            with self._cv:
                self.error = exc
                self.closed = True

    def _next_job(self) -> tuple[str, Segment, int, int] | None:
        """The next piece of work (lock held): prepare the first unanchored segment once the one before it
        is close enough to play-out, or render the next frames of an anchored one."""
        now = self.clock.now_frame()
        horizon = max(now, self.k_committed) + self.ahead_frames
        prev_end: int | None = None
        for seg in self.segments:
            if seg.utterance.cancel.is_set():
                continue
            if seg.anchor is None:
                if prev_end is not None and prev_end > horizon:
                    return None
                return "prepare", seg, 0, 0
            late = int(math.ceil(now)) - seg.anchor  # frames below this are past their due time
            if seg.next_render < min(late, seg.total) and self.clock.t0 is not None:
                self.stats["late"] += min(late, seg.total) - seg.next_render
                seg.next_render = min(late, seg.total)
            if seg.next_render < seg.total:
                if seg.anchor + seg.next_render > horizon:
                    return None
                return "render", seg, seg.next_render, min(seg.total, seg.next_render + BATCH)
            prev_end = seg.anchor + seg.total
        return None

    def _idle_state_at(self, k: int) -> tuple[int, int]:
        """The idle walk's (position, direction) shown at frame k - 1 if the walk continues (lock held)."""
        pos, direction = self.idle_pos, self.idle_dir
        for _ in range(max(0, k - 1 - self.k_committed)):
            pos, direction = pingpong_step(pos, direction, self.idle.count)
        return max(0, pos), direction

    def _prepare(self, seg: Segment) -> None:
        """Render a segment's first frames and anchor it on the clock."""
        with self._cv:
            before = [(s, s.anchor) for s in self.segments
                      if s.anchor is not None and s is not seg and not s.utterance.cancel.is_set()]
            prev, prev_anchor = before[-1] if before else (None, 0)
            now = self.clock.now_frame()
            soon = int(math.ceil(now + (self.prepare_s + self.margin_s) * FPS)) + self._catch_up(seg.total)
            if prev is not None:
                tentative = max(prev_anchor + prev.total, self.k_committed + 1)
                seg.idle_state = prev.idle_state
            else:
                tentative = max(soon, self.k_committed + 1)
                seg.idle_state = self._idle_state_at(tentative)
        seg.order = self.engine.frame_order(seg.total, start_frame=seg.idle_state[0], loop_back=True)
        start = time.perf_counter()
        self._render(seg, 0, min(seg.total, FIRST_BATCH))
        spent = time.perf_counter() - start
        with self._cv:
            self.prepare_s = _prepare_seconds[self.engine] = 0.7 * self.prepare_s + 0.3 * spent
            if seg.utterance.cancel.is_set() or seg not in self.segments:
                return
            ready = int(math.ceil(self.clock.now_frame() + self.margin_s * FPS)) + self._catch_up(seg.total)
            # after a playing segment: right after it (gapless); else as soon as it is ready (the idle walk
            # was predicted for `tentative`, a frame or two off when the prepare-time estimate was)
            seg.anchor = max(tentative if prev is not None else 0, ready, self.k_committed + 1)
            if prev is None and abs(seg.anchor - tentative) > 2:
                log.debug("segment anchored at %d, predicted %d", seg.anchor, tentative)
            self._cv.notify_all()

    def _catch_up(self, total: int) -> int:
        """Extra head start (frames) so that, when frames take longer to make than to play, the first
        `CATCH_UP_FRAMES` of a segment are still ready in time (0 when rendering is faster than real time)."""
        return int(math.ceil(max(0.0, min(total, CATCH_UP_FRAMES) * (self.frame_s * FPS - 1.0))))

    def _render(self, seg: Segment, lo: int, hi: int) -> None:
        """Render segment frames [lo, hi) into `seg.frames` (outside the lock)."""
        if hi <= lo or seg.utterance.cancel.is_set():
            with self._cv:
                seg.next_render = max(seg.next_render, hi)
            return
        start = time.perf_counter()
        features = seg.feed.ensure(hi + FUTURE_ROWS, seg.utterance.cancel)
        if seg.utterance.cancel.is_set():
            return
        if seg.order is None:
            raise RuntimeError("a segment is rendered before its frame order is set (`_prepare`)")
        windows = self.engine.audio_windows(features, range(lo, hi), speaking=seg.feed.speaking)
        if self.scheduler is not None and seg.anchor is not None and self.clock.t0 is not None:
            frames = self.scheduler.render(windows, seg.order[lo:hi], self.clock.deadline(seg.anchor + lo))
        else:
            frames = self.engine.render(windows, seg.order[lo:hi])
        with self._cv:
            self.stats["rendered"] += hi - lo
            spent = time.perf_counter() - start
            self.stats["render_s"] += spent
            self.frame_s = _frame_seconds[self.engine] = 0.8 * self.frame_s + 0.2 * spent / (hi - lo)
            if seg.next_render <= lo:
                for i, frame in enumerate(frames):
                    seg.frames[lo + i] = frame
                seg.next_render = hi
            self._cv.notify_all()


def warm_speech(engine: LipSyncEngine) -> None:
    """Make the first speech of a session as fast as later ones: the streamed features and the render
    batch sizes the timeline uses run once per engine (on half a second of silence)."""
    with _warm_lock:
        if engine in _warmed:
            return
        for _ in range(2):  # the second round measures without first-call costs
            start = time.perf_counter()
            feed = FeatureFeed(engine, np.zeros(SAMPLE_RATE // 2, np.float32))
            features = feed.ensure(FIRST_BATCH + FUTURE_ROWS)
            order = engine.frame_order(BATCH)
            engine.render(engine.audio_windows(features, range(FIRST_BATCH)), order[:FIRST_BATCH])
            _prepare_seconds[engine] = time.perf_counter() - start
            features = feed.ensure(feed.total)
            start = time.perf_counter()
            engine.render(engine.audio_windows(features, range(BATCH)), order[:BATCH])
            _frame_seconds[engine] = (time.perf_counter() - start) / BATCH
        _warmed.add(engine)
