"""First-batch latency of N MJPEG jobs started at once, in-process (no HTTP): the server's code path from
`FrameJob` on (streamed Whisper features, the avatar's `FrameScheduler`, paste, JPEG).

    python bench/first_frames.py [--streams 1 4] [--threads 2] [--feature_threads 1] [--first_batch 1]
                                 [--reps 8] [--avatar demo]

Each repetition starts N threads together; each makes a job for the same 4 s of speech and times its
first `next_batch()` (job creation included). Prints one JSON object: per N the p50 / p95 / max over all
repetitions, and the ratio of the p95 at the largest N to the p95 at the smallest (the same run).

`floor`: what the cores allow, from the first batch's parts timed one at a time in the same run (wall and
process CPU seconds, medians of `--reps`): one job's Whisper windows, the U-Net on N frames in one batch
(the cheapest batching) and paste + JPEG per frame. A job cannot beat its own chain of the three
(`path_s`), and N jobs cannot beat their summed CPU time spread over every core (`work_s`), so
`floor_s` = max(path_s, work_s) bounds the first batch from below whatever the scheduling;
`floor_ratio` is that bound at the largest N over the smallest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import fixtures  # bench/fixtures.py (sibling)
import numpy as np
import torch

from config import settings
from services.admission import calibration_audio
from services.generator import EnhancedFrameGenerationService, FeatureFeed
from synctalk import audio as audio_io
from synctalk.engine import LipSyncEngine
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FUTURE_ROWS


def speech() -> np.ndarray:
    """4 s of speech (bench/fixtures.py's default clip when ../shared has it, else the calibration buzz)."""
    path = fixtures.default_audio()
    if path is not None:
        return audio_io.load_audio(str(path), sr=16000)[: 4 * 16000]
    return np.tile(calibration_audio(), 2)


def first_batches(svc: EnhancedFrameGenerationService, audio: np.ndarray, n: int) -> list[float]:
    """Seconds to each of n simultaneous jobs' first batch."""
    out, go = [0.0] * n, threading.Event()

    def one(i: int) -> None:
        go.wait()
        start = time.perf_counter()
        job = svc.job(audio)
        job.next_batch()
        out[i] = time.perf_counter() - start
        job.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    go.set()
    for t in threads:
        t.join()
    return out


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of `fn()` over `reps` calls (after one warm-up call)."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def work_floor(svc: EnhancedFrameGenerationService, audio: np.ndarray, streams: list[int], reps: int) -> dict:
    """The first batch's parts timed alone and the lower bound they put on N simultaneous first batches
    (module docstring)."""
    engine, first = svc.engine, svc.first_batch
    feats = FeatureFeed(engine, audio).ensure(first + FUTURE_ROWS)
    features = timed(lambda: FeatureFeed(engine, audio).ensure(first + FUTURE_ROWS), reps)

    def unet(frames: int) -> tuple[float, float]:
        windows = engine.audio_windows(feats, [0] * frames)
        return timed(lambda: engine.render_crops(windows, [svc.template] * frames), reps)

    crop = engine.render_crops(engine.audio_windows(feats, [0]), [svc.template])[0]
    frame = np.empty(engine.frame_shape, np.uint8)
    finish = timed(lambda: svc.encode(engine.paste(crop, svc.template, frame)), reps)
    cores = os.cpu_count() or 1
    out: dict = {"cores": cores, "features_s": [round(x, 4) for x in features],
                 "paste_jpeg_s": [round(x, 4) for x in finish], "levels": {}}
    path = features[0] + unet(first)[0] + first * finish[0]  # one job's chain: the same at every N
    for n in streams:
        net = unet(n * first)
        work = (n * features[1] + net[1] + n * first * finish[1]) / cores
        out["levels"][n] = {"unet_s": [round(x, 4) for x in net], "path_s": round(path, 4),
                            "work_s": round(work, 4), "floor_s": round(max(path, work), 4)}
    lo, hi = out["levels"][min(streams)], out["levels"][max(streams)]
    out["floor_ratio"] = round(hi["floor_s"] / lo["floor_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2, help="U-Net (ORT) intra-op threads")
    p.add_argument("--feature_threads", type=int, default=settings.models.feature_threads, help="torch threads")
    p.add_argument("--first_batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--avatar", default="demo")
    args = p.parse_args()
    torch.set_num_threads(args.feature_threads)
    av = settings.paths.avatar_registry().find(args.avatar, None)
    engine = LipSyncEngine.load(av.dataset_dir, av.checkpoint_path, threads=args.threads, batch_size=8,
                                feature_config=settings.audio.feature_config(), speech_gate=settings.speech_gate())
    scheduler = FrameScheduler(engine)
    svc = EnhancedFrameGenerationService(engine, settings.server.jpeg_quality, scheduler=scheduler,
                                         first_batch=args.first_batch)
    audio = speech()
    first_batches(svc, audio, 1)  # warm-up (one-time costs)
    levels = {}
    for n in args.streams:
        lat = sorted(x for _ in range(args.reps) for x in first_batches(svc, audio, n))
        levels[n] = {"p50_s": round(statistics.median(lat), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
                     "max_s": round(lat[-1], 3)}
    scheduler.close()
    floor = work_floor(svc, audio, args.streams, args.reps)
    lo, hi = min(args.streams), max(args.streams)
    print(json.dumps({"avatar": args.avatar, "threads": args.threads, "feature_threads": args.feature_threads,
                      "first_batch": args.first_batch, "reps": args.reps, "levels": levels,
                      "p95_ratio": round(levels[hi]["p95_s"] / levels[lo]["p95_s"], 2), "floor": floor},
                     indent=2))


if __name__ == "__main__":
    main()
