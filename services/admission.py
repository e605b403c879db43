"""Admission control: how many streams this process holds at once, and the refusal past that.

Every stream that renders frames (MJPEG `/generate*`, the live WebSocket, WebRTC sessions) takes a
place before it starts and gives it back when it ends; past `capacity` the request is refused (HTTP 503
with `Retry-After`, WebSocket close 1013 "try again later") instead of making every stream stutter.
The capacity is `server.max_streams`, or, when that is 0, measured at start-up by `calibrate`: the
default avatar's frames/s through its scheduler (features, U-Net, paste, JPEG) with one calibration job
per CPU core running at once, the best of three short rounds (the first one pays one-time costs, and a
start-up that shares the machine for a moment should not cost a stream of capacity), times 0.9, over 25.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from services.generator import FrameGenerationService
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
CALIBRATION_SECONDS = 2.0  # of synthetic speech rendered once at start-up
HEADROOM = 0.9  # share of the measured throughput that admission hands out
CALIBRATION_ROUNDS = 3  # the best round counts


class Admission:
    """A thread-safe count of running streams against a capacity (None: unlimited until calibrated)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.active: dict[str, int] = {}
        self.refused = 0
        self.measured_fps: float | None = None
        self._lock = threading.Lock()

    def try_acquire(self, kind: str) -> bool:
        """Take a place for a stream of `kind`; False (and counted) when the process is full."""
        with self._lock:
            if self.capacity is not None and sum(self.active.values()) >= self.capacity:
                self.refused += 1
                return False
            self.active[kind] = self.active.get(kind, 0) + 1
            return True

    def has_room(self) -> bool:
        """Whether a new stream would be admitted now (a refusal is counted): the early check before
        expensive work such as synthesis; `try_acquire` still decides."""
        with self._lock:
            if self.capacity is not None and sum(self.active.values()) >= self.capacity:
                self.refused += 1
                return False
            return True

    def release(self, kind: str) -> None:
        """Give a place back (once per successful `try_acquire`)."""
        with self._lock:
            self.active[kind] = max(0, self.active.get(kind, 0) - 1)

    def status(self) -> dict:
        """For /health: capacity, running streams by kind, refusals, the calibration figure."""
        with self._lock:
            return {"capacity": self.capacity, "active": sum(self.active.values()), "by_kind": dict(self.active),
                    "refused": self.refused, "measured_fps": self.measured_fps}


def calibration_audio(seconds: float = CALIBRATION_SECONDS) -> np.ndarray:
    """Speech-like test audio (a voiced buzz under a syllable-rate envelope), deterministic."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.3 * envelope * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 900 * t))).astype(np.float32)


def calibrate(generator: FrameGenerationService, parallel: int = 1,
              rounds: int = CALIBRATION_ROUNDS) -> tuple[int, float]:
    """(streams, frames/s): `parallel` jobs of calibration audio at once through `generator` (with its
    scheduler, which batches across them) as fast as they go, features and JPEG included; frames/s is
    their sum, the best of `rounds` such rounds. One job alone measures one stream's pipeline, not the
    machine: on a 2-core CPU two jobs find about twice the frames/s."""
    fps = max(calibration_round(generator, parallel) for _ in range(max(1, rounds)))
    return max(1, int(HEADROOM * fps / FPS)), fps


def calibration_round(generator: FrameGenerationService, parallel: int) -> float:
    """Frames/s of `parallel` calibration jobs run to their end at once through `generator`."""
    jobs = [generator.job(calibration_audio()) for _ in range(max(1, parallel))]
    counts = [0] * len(jobs)

    def drain(k: int) -> None:
        while (batch := jobs[k].next_batch()) is not None:
            counts[k] += len(batch)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(drain, range(len(jobs))))
    for job in jobs:
        job.close()
    return sum(counts) / max(time.perf_counter() - start, 1e-6)


def calibrate_admission(admission: Admission, generator_cls: type[FrameGenerationService],
                        scheduler: FrameScheduler, jpeg_quality: int) -> None:
    """Measure and set `admission.capacity` on the avatar behind `scheduler` (server start-up)."""
    generator = generator_cls(scheduler.engine, jpeg_quality=jpeg_quality, scheduler=scheduler)
    streams, fps = calibrate(generator, parallel=os.cpu_count() or 1)
    admission.capacity, admission.measured_fps = streams, round(fps, 1)
    log.info("admission: %.1f frames/s measured on avatar %s -> %d concurrent streams at %d fps",
             fps, scheduler.engine.dataset_dir.name, streams, FPS)
