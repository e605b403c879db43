"""One frame scheduler per engine: every stream of an avatar submits its next frames with a deadline,
and one worker forms U-Net batches across streams.

Without it each stream would take the engine's lock for its own small batch, so N streams queue
behind each other and the U-Net runs N half-empty batches where one full batch would do. Here:

- `submit(windows, frame_indices, deadline)` queues a request and returns a `Future` of its frames
  (full frames pasted back, or generated crops with `paste=False`).
- The worker waits for a first request, then at most `max_wait_s` for company (or until a full batch
  is queued), takes frames earliest-deadline-first across requests (a request may be split over
  batches), runs the U-Net once per batch and hands each request its crops.
- Paste-back (and a request's `finish`, e.g. the MJPEG streams' JPEG encoding) runs in a bounded pool
  (`paste_workers`, default the core count), so the U-Net worker moves on to the next batch while the
  previous one is pasted, and N streams never encode more than `paste_workers` frames at once.
- A cancelled future is dropped the next time the worker looks at it: its frames are never rendered.
- Live streams' Whisper windows are batched the same way (`feature_encoder()`, a `WindowBatcher`): each
  stream's `StreamingFeatures` hands its ready windows to one encoder worker, which waits at most
  `max_wait_s` for other streams' windows and encodes them in one call (equal to encoding alone up to float
  rounding, ~1e-6).
- `batching=False` turns all of this off: each request is rendered alone on the engine in the caller's
  thread (`LipSyncEngine.render`, whose lock lets one stream's batch run at a time), which is what a
  stream does without a scheduler. The server's `server.batching` switch; `bench/server.py` measures
  it as the baseline of the scheduler.

Every frame is rendered exactly as `LipSyncEngine.render` renders it alone (the U-Net treats the
samples of a batch independently), which `tests/test_scheduler.py` checks. Degradation policy
(dropping or repeating late frames) stays with each stream; the scheduler never slows one stream for
another beyond the batch it is already running.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from synctalk.engine import LipSyncEngine
from synctalk.features import FILE_BATCH, StreamingFeatures

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: requests hold arrays
class _Request:
    """One stream's frames waiting for the U-Net."""

    windows: np.ndarray  # [n, C, H, W] float32
    indices: np.ndarray  # [n] source frames
    deadline: float  # time.monotonic() by which the stream needs them
    seq: int  # submission order: ties of deadline go first-come first-served
    paste: bool
    future: Future
    crops: np.ndarray  # [n, crop, crop, 3] uint8, filled batch by batch
    finish: Callable[[np.ndarray], Any] | None = None  # applied to each full frame in the paste pool
    taken: int = 0  # frames handed to a batch
    done: int = 0  # frames rendered
    started: bool = False

    @property
    def n(self) -> int:
        return len(self.indices)


@dataclass
class SchedulerStats:
    """Counters of one scheduler (read without a lock: approximate while running)."""

    batches: int = 0
    frames: int = 0
    requests: int = 0
    cancelled: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.frames / self.batches if self.batches else 0.0

    def snapshot(self) -> dict:
        """JSON-able counters."""
        return {"batches": self.batches, "frames": self.frames, "requests": self.requests,
                "cancelled": self.cancelled, "mean_batch": round(self.mean_batch, 3)}


class WindowBatcher:
    """One worker encoding the audio windows of several streams in shared calls: `encode(windows)` blocks
    until this stream's rows are ready. `encode_fn` maps windows `[B, ...]` to `B * k` rows (k per window,
    in order), as `StreamingFeatures.encode_windows` does."""

    def __init__(self, encode_fn: Callable[[np.ndarray], np.ndarray], max_batch: int = FILE_BATCH,
                 max_wait_s: float = 0.003):
        self.encode_fn = encode_fn
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.stats = {"calls": 0, "windows": 0, "requests": 0}
        self._queue: list[tuple[np.ndarray, Future]] = []
        self._cv = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="feature-batcher", daemon=True)
        self._worker.start()

    def encode(self, windows: np.ndarray) -> np.ndarray:
        """The rows of `windows`, encoded together with whatever other streams queued meanwhile."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the feature batcher is closed")
            self._queue.append((np.asarray(windows, np.float32), future))
            self.stats["requests"] += 1
            self._cv.notify_all()
        return future.result()

    def close(self) -> None:
        """Stop the worker; queued requests fail with RuntimeError."""
        with self._cv:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cv.notify_all()
        for _, future in pending:
            future.set_exception(RuntimeError("the feature batcher is closed"))
        self._worker.join(timeout=30)

    def _next(self) -> list[tuple[np.ndarray, Future]] | None:
        """Requests for one call (whole requests, up to `max_batch` windows unless one is larger)."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            until = time.monotonic() + self.max_wait_s
            while sum(len(w) for w, _ in self._queue) < self.max_batch and (left := until - time.monotonic()) > 0:
                self._cv.wait(left)
            taken: list[tuple[np.ndarray, Future]] = []
            count = 0
            while self._queue and (not taken or count + len(self._queue[0][0]) <= self.max_batch):
                taken.append(self._queue.pop(0))
                count += len(taken[-1][0])
            return taken

    def _run(self) -> None:
        while (taken := self._next()) is not None:
            windows = np.concatenate([w for w, _ in taken])
            try:
                rows = self.encode_fn(windows)
            except BaseException as exc:  # fail this call's streams, keep serving
                log.exception("feature batch failed")
                for _, future in taken:
                    future.set_exception(exc)
                continue
            self.stats["calls"] += 1
            self.stats["windows"] += len(windows)
            per, start = len(rows) // max(1, len(windows)), 0
            for w, future in taken:
                future.set_result(rows[start:start + per * len(w)])
                start += per * len(w)


class FrameScheduler:
    """Cross-stream batching for one `LipSyncEngine` (see the module docstring)."""

    def __init__(self, engine: LipSyncEngine, max_batch: int | None = None, max_wait_s: float = 0.004,
                 paste_workers: int | None = None, batching: bool = True):
        self.engine = engine
        self.max_batch = max(1, int(max_batch or engine.batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.batching = bool(batching)
        self.stats = SchedulerStats()
        self._queue: list[_Request] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False
        self._paste: ThreadPoolExecutor | None = None
        self._worker: threading.Thread | None = None
        self._features: WindowBatcher | None = None
        self._features_lock = threading.Lock()
        if self.batching:  # without batching nothing runs in the background
            self._paste = ThreadPoolExecutor(max(1, paste_workers or os.cpu_count() or 1),
                                             thread_name_prefix="paste")
            self._worker = threading.Thread(target=self._run, name="frame-scheduler", daemon=True)
            self._worker.start()

    # -- client side ----------------------------------------------------------------------------

    def submit(self, windows: np.ndarray, frame_indices: np.ndarray | list[int], deadline: float | None = None,
               paste: bool = True, finish: Callable[[np.ndarray], Any] | None = None) -> Future:
        """Queue frames: audio `windows` [n, C, H, W] on source frames `frame_indices`. The future's
        result is a list of n full frames (uint8 BGR) or, with `paste=False`, the n generated crops;
        with `finish` (e.g. a JPEG encoder) it is `finish(frame)` of each, computed in the paste pool."""
        indices = np.asarray(frame_indices, dtype=np.int64).reshape(-1)
        windows = np.asarray(windows, dtype=np.float32)
        if len(windows) != len(indices):
            raise ValueError(f"{len(windows)} audio windows for {len(indices)} frames")
        if finish is not None and not paste:
            raise ValueError("finish applies to pasted frames (paste=True)")
        if not self.batching:
            return self._render_alone(windows, indices, paste, finish)
        size = self.engine.size
        future: Future = Future()
        req = _Request(windows, indices, time.monotonic() if deadline is None else float(deadline),
                       next(self._seq), paste, future,
                       np.empty((len(indices), size.crop, size.crop, 3), np.uint8), finish)
        if not len(indices):
            future.set_result([])
            return future
        with self._cv:
            if self._closed:
                raise RuntimeError("the frame scheduler is closed")
            self._queue.append(req)
            self.stats.requests += 1
            self._cv.notify_all()
        return future

    def render(self, windows: np.ndarray, frame_indices: np.ndarray | list[int],
               deadline: float | None = None, finish: Callable[[np.ndarray], Any] | None = None) -> list:
        """Blocking `submit(...).result()`: full frames, as `LipSyncEngine.render` returns them (or
        `finish` of each)."""
        return self.submit(windows, frame_indices, deadline, finish=finish).result()

    def feature_encoder(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """The Whisper window encoder this avatar's live streams share (`StreamingFeatures(encode=...)`),
        made on first use; None without batching (each stream then encodes its own windows)."""
        if not self.batching:
            return None
        with self._features_lock:
            if self._features is None:
                own = StreamingFeatures(device=self.engine.feature_device, config=self.engine.feature_config,
                                        batch_size=FILE_BATCH)
                self._features = WindowBatcher(own.encode_windows, FILE_BATCH, self.max_wait_s)
            return self._features.encode

    def snapshot(self) -> dict:
        """JSON-able counters: U-Net batches and, once live streams used it, the feature batcher's."""
        out = {**self.stats.snapshot(), "batching": self.batching}
        if self._features is not None:
            calls = self._features.stats["calls"]
            out["features"] = {**self._features.stats,
                               "mean_batch": round(self._features.stats["windows"] / calls, 3) if calls else 0.0}
        return out

    def close(self) -> None:
        """Stop the worker after the batch in flight; queued requests are cancelled."""
        with self._cv:
            self._closed = True
            pending, self._queue = self._queue, []
            self._cv.notify_all()
        for req in pending:
            req.future.cancel()
        if self._worker is not None and self._paste is not None:
            self._worker.join(timeout=30)
            self._paste.shutdown(wait=True)
        with self._features_lock:
            features, self._features = self._features, None
        if features is not None:
            features.close()

    def _render_alone(self, windows: np.ndarray, indices: np.ndarray, paste: bool,
                      finish: Callable[[np.ndarray], Any] | None) -> Future:
        """Without batching: the frames on the engine in the caller's thread, as a stream without a
        scheduler renders them (the engine's lock: one stream's batch at a time); a finished future."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the frame scheduler is closed")
            self.stats.requests += 1
        future: Future = Future()
        try:
            if paste:
                frames = self.engine.render(windows, indices)
                future.set_result([finish(f) for f in frames] if finish is not None else frames)
            else:
                future.set_result(list(self.engine.render_crops(windows, indices)))
        except Exception as exc:  # handed over as the worker path hands it: through the future
            future.set_exception(exc)
            return future
        with self._cv:
            for s in range(0, len(indices), self.engine.batch_size):  # the engine's own batches
                size = min(self.engine.batch_size, len(indices) - s)
                self.stats.batches += 1
                self.stats.frames += size
                self.stats.batch_sizes[size] = self.stats.batch_sizes.get(size, 0) + 1
        return future

    # -- worker ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._render(batch)
            except BaseException as exc:  # the engine failed: fail the requests of this batch, keep serving
                log.exception("frame batch failed")
                for req in {id(r): r for r, _ in batch}.values():
                    if not req.future.done():
                        req.future.set_exception(exc)

    def _queued_frames(self) -> int:
        return sum(r.n - r.taken for r in self._queue)

    def _next_batch(self) -> list[tuple[_Request, int]] | None:
        """Wait for work, let company gather for up to `max_wait_s`, then take up to `max_batch`
        frames earliest-deadline-first. None when closed."""
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            gather_until = time.monotonic() + self.max_wait_s
            while self._queued_frames() < self.max_batch and not self._closed:
                left = gather_until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            return self._take()

    def _take(self) -> list[tuple[_Request, int]]:
        """Frames for one batch (caller holds the lock); cancelled requests are dropped here."""
        batch: list[tuple[_Request, int]] = []
        for req in sorted(self._queue, key=lambda r: (r.deadline, r.seq)):
            if not req.started:
                if not req.future.set_running_or_notify_cancel():
                    self.stats.cancelled += 1
                    self._queue.remove(req)
                    continue
                req.started = True
            while req.taken < req.n and len(batch) < self.max_batch:
                batch.append((req, req.taken))
                req.taken += 1
            if req.taken == req.n:
                self._queue.remove(req)
            if len(batch) == self.max_batch:
                break
        return batch

    def _render(self, batch: list[tuple[_Request, int]]) -> None:
        """One U-Net batch; each request whose frames are all rendered is finished in the paste pool."""
        if not batch:
            return
        windows = np.stack([req.windows[k] for req, k in batch])
        indices = np.array([req.indices[k] for req, k in batch], dtype=np.int64)
        crops = self.engine.render_crops(windows, indices)
        self.stats.batches += 1
        self.stats.frames += len(batch)
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        for (req, k), crop in zip(batch, crops):
            req.crops[k] = crop
            req.done += 1
            if req.done == req.n:
                assert self._paste is not None  # (the worker runs only with batching)
                self._paste.submit(self._finish, req)

    def _finish(self, req: _Request) -> None:
        """Paste a finished request's crops into full frames (then its `finish` of each, or hand over the
        crops) and resolve it."""
        try:
            if req.paste:
                result = [self.engine.paste(crop, int(i), np.empty(self.engine.frame_shape, np.uint8))
                          for crop, i in zip(req.crops, req.indices)]
                if req.finish is not None:
                    result = [req.finish(frame) for frame in result]
            else:
                result = list(req.crops)
            req.future.set_result(result)
        except BaseException as exc:
            req.future.set_exception(exc)
