"""Preprocessing throughput: frames per second of the frames stage of data_utils/process.py.

    python bench/preprocess.py                      # 512x512 and 1080p, 10 s each
    python bench/preprocess.py --seconds 20 --sizes 1080p

Inputs are made from the shared May clip (../shared/media/video/real3dportrait_May_5s.mp4): looped to
`--seconds` and, for 1080p, upscaled (bicubic) into a 1920x1080 frame; H.264 + AAC, cached under
`--cache`. For each input the same run measures, in this process:
- decode: PyAV decode + BGR conversion only (the ceiling: no pipeline can be faster),
- sequential: the frames stage with every step in one thread (`--no_pipeline`),
- pipelined: the frames stage as the CLI runs it (decode / faces / JPEG threads),
and prints one JSON object with fps, CPU ms per frame (all threads), the fps two idle cores would allow
at that CPU cost, the 1-minute load average (other processes on a shared machine slow every figure) and
the ratios pipelined / sequential and pipelined / decode. Target: pipelined >= 40 fps at 1080p on 2 cores.
Face-mesh start-up (about 0.3 s) is excluded by building the tracker once before timing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np

from data_utils import process
from synctalk.landmarks import FaceTracker

REPO = Path(__file__).resolve().parents[1]

SOURCE = REPO.parent / "shared" / "media" / "video" / "real3dportrait_May_5s.mp4"
SIZES = {"512": (512, 512), "1080p": (1920, 1080)}


def make_input(src: Path, dst: Path, size: tuple[int, int], seconds: float) -> Path:
    """`src` looped to `seconds`, its picture scaled to the frame height and centred in `size`."""

    if dst.is_file():
        return dst
    w, h = size
    with av.open(str(src)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    with av.open(str(src)) as c:
        res = av.AudioResampler(format="s16", layout="mono", rate=48000)
        pcm = np.concatenate([o.to_ndarray().reshape(-1) for f in c.decode(audio=0) for o in res.resample(f)])
    n = int(round(seconds * 25))
    tmp = dst.with_name(dst.name + ".part.mp4")
    with av.open(str(tmp), "w") as out:
        vs = out.add_stream("libx264", rate=25, options={"crf": "20", "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        aus = out.add_stream("aac", rate=48000, layout="mono")
        for i in range(n):
            k = i % (2 * len(frames) - 2)  # ping-pong, so the loop has no jump
            img = frames[k if k < len(frames) else 2 * len(frames) - 2 - k]
            side = h
            big = cv2.resize(img, (side * img.shape[1] // img.shape[0], side), interpolation=cv2.INTER_CUBIC)
            canvas = np.full((h, w, 3), 90, np.uint8)
            x0 = (w - big.shape[1]) // 2
            canvas[:, x0:x0 + big.shape[1]] = big
            for p in vs.encode(av.VideoFrame.from_ndarray(canvas, format="bgr24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        total = int(seconds * 48000)
        audio = np.resize(pcm, total).astype(np.int16)
        for i in range(0, total, 1024):
            fr = av.AudioFrame.from_ndarray(audio[None, i:i + 1024], format="s16", layout="mono")
            fr.sample_rate, fr.pts = 48000, i
            for p in aus.encode(fr):
                out.mux(p)
        for p in aus.encode():
            out.mux(p)
    os.replace(tmp, dst)
    return dst


def time_decode(path: Path, info) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(1 for _ in process.video_frames_25fps(path, info))
    return _rates(n, time.perf_counter() - t0, time.process_time() - c0)


def time_frames(path: Path, info, pipeline: bool, work: Path) -> dict:
    opts = process.Options(video=path, out=work, features="none", progress=False, pipeline=pipeline)
    tmp = work / ("pipe" if pipeline else "seq")
    shutil.rmtree(tmp, ignore_errors=True)
    t0, c0 = time.perf_counter(), time.process_time()
    track = process.run_frames(path, info, tmp, opts)
    out = _rates(info.n_frames, time.perf_counter() - t0, time.process_time() - c0)
    out["face_found_share"] = round(float(track.found.mean()), 4)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _rates(n: int, wall: float, cpu: float) -> dict:
    """fps, CPU ms per frame (all threads) and the fps two otherwise idle cores would allow at that CPU
    cost (an upper bound: perfect overlap of the threads)."""
    return {"frames": n, "seconds": round(wall, 3), "fps": round(n / wall, 2),
            "cpu_ms_per_frame": round(1000.0 * cpu / n, 2),
            "cpu_bound_fps_2_cores": round(2.0 * n / max(cpu, 1e-9), 1),
            "load_average_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sizes", default="512,1080p", help="comma separated: " + ",".join(SIZES))
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "synctalk_bench_preprocess")
    p.add_argument("--skip_sequential", action="store_true")
    args = p.parse_args()
    if not SOURCE.is_file():
        sys.stderr.write(f"error: source clip not found: {SOURCE}\n")
        sys.exit(2)
    args.cache.mkdir(parents=True, exist_ok=True)

    FaceTracker().close()  # import and graph set-up outside the timings
    result = {"machine": {"cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                          "python": platform.python_version(), "cv2_threads": cv2.getNumThreads()},
              "inputs": {}}
    for name in args.sizes.split(","):
        size = SIZES[name]
        src = make_input(SOURCE, args.cache / f"may_{name}_{args.seconds:g}s.mp4", size, args.seconds)
        info, _, _ = process.scan_media(src, False)
        work = args.cache / f"work_{name}"
        work.mkdir(exist_ok=True)
        entry = {"size": list(size), "decode": time_decode(src, info)}
        if not args.skip_sequential:
            entry["sequential"] = time_frames(src, info, False, work)
        entry["pipelined"] = time_frames(src, info, True, work)
        entry["pipelined_over_decode"] = round(entry["pipelined"]["fps"] / entry["decode"]["fps"], 3)
        if "sequential" in entry:
            entry["pipelined_over_sequential"] = round(entry["pipelined"]["fps"] / entry["sequential"]["fps"], 3)
        entry["meets_40fps"] = entry["pipelined"]["fps"] >= 40.0
        result["inputs"][name] = entry
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
