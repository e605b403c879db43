"""Offline inference throughput: our pipeline against the bare U-Net and a re-creation of upstream's loop.

    python bench/inference.py [--seconds 30] [--size 328] [--threads 1,2] [--batch_size 8] [--reps 3]
                              [--audio FILE] [--video FILE] [--workdir DIR]

All three runs use the same audio (the first `--seconds` of it) and the same avatar:
  (a) unet_ort:   the U-Net alone in ONNX Runtime, batch `--batch_size`, inputs prepared once;
  (b) pipeline:   ours, as `inference_328.py` runs it: speech features + LipSyncEngine.run (ORT, batched,
                  feathered paste in a worker thread) streaming into the H.264/AAC encoder;
  (c) upstream:   upstream's loop re-created: features, then per frame JPEG read + crop + bicubic resize,
                  PyTorch eager at batch 1, hard paste, frame written to an MJPG file on disk, then the
                  file muxed with the audio into H.264/AAC.
The avatar is built in a temp folder from a video (default: the shared May clip when ../shared exists,
else the synthetic fixture clip, else generated frames) with a fixed lower-face box and a randomly
initialised checkpoint of `--size`: speed does not depend on the weights. Each thread count of `--threads`
(default 1 and 2) gets `--reps` rounds of the three runs in turn, with that many ORT intra-op and torch
threads. Prints one JSON object: per thread count the frames/s of each round, the medians, the ratios of
the medians b/a (target >= 0.85) and b/c (target >= 3) and whether both are met; `all_met` over every
thread count.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from fixtures import default_audio, default_video, make_audio, make_avatar  # bench/fixtures.py (sibling)

import inference_328
from config import settings
from synctalk import audio as audio_io
from synctalk import face as face_crop
from synctalk import features as speech_features
from synctalk.engine import LipSyncEngine, pingpong_order
from unet_328 import load_unet_checkpoint
from utils import audio_window, get_size

FPS = 25


def bench_unet_ort(engine, n: int) -> float:
    """(a) frames/s of the engine's ORT session alone on n frames, batch = engine.batch_size."""
    slot = engine._slots[0]
    rng = np.random.default_rng(0)
    slot.image[...] = rng.random(slot.image.shape, dtype=np.float32)
    slot.audio[...] = rng.standard_normal(slot.audio.shape, dtype=np.float32)
    engine.runner.run(slot.image, slot.audio, slot.pred)  # warm-up
    start = time.perf_counter()
    for s in range(0, n, engine.batch_size):
        b = min(engine.batch_size, n - s)
        engine.runner.run(slot.image[:b], slot.audio[:b], slot.pred[:b])
    return n / (time.perf_counter() - start)


def bench_pipeline(ds: Path, ckpt: Path, audio_path: Path, out_dir: Path, batch: int, threads: int) -> dict:
    """(b) our full pipeline through inference_328's own code path."""

    out = out_dir / "ours.mp4"
    args = inference_328.parse_args([
        "--name", ds.name, "--audio_path", str(audio_path), "--output", str(out), "--backend", "onnx",
        "--device", "cpu", "--threads", str(threads), "--batch_size", str(batch),
        "--dataset_root", str(ds.parent), "--checkpoint_root", str(ckpt.parent.parent)])
    _, n, seconds = inference_328.run(args)
    return {"frames": n, "seconds": round(seconds, 2), "fps": n / seconds}


def bench_upstream(ds: Path, ckpt: Path, audio_path: Path, out_dir: Path) -> dict:
    """(c) upstream's loop: eager batch 1, per-frame JPEG + crop, hard paste, frames to disk, then mux."""

    model, meta = load_unet_checkpoint(ckpt)
    size = get_size(meta["size"])
    crop, inner, bd = size.crop, size.inner, size.border
    boxes = np.load(ds / "crop_boxes.npy")
    n_src = len(boxes)
    start = time.perf_counter()
    audio = audio_io.load_audio(str(audio_path), sr=16000)
    feats = speech_features.extract_features(audio, meta["mode"])
    n = int(round(FPS * len(audio) / 16000))
    order = pingpong_order(n_src, n)
    first = cv2.imread(str(ds / "full_body_img" / "0.jpg"))
    h, w = first.shape[:2]
    tmp_video = out_dir / "upstream_temp.avi"
    writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    with torch.no_grad():
        for i in range(n):
            idx = int(order[i])
            frame = cv2.imread(str(ds / "full_body_img" / f"{idx}.jpg"))
            x1, y1, x2, y2 = (int(v) for v in boxes[idx])
            crop_img = cv2.resize(frame[y1:y2, x1:x2], (crop, crop), interpolation=cv2.INTER_CUBIC)
            img = crop_img[bd:bd + inner, bd:bd + inner].copy()
            masked = img.copy()
            mx, my, mw, mh = face_crop.mask_rect(inner)  # (5, 5, 310, 305) at 320, as upstream
            cv2.rectangle(masked, (mx, my, mw, mh), (0, 0, 0), -1)
            x = np.concatenate([img, masked], axis=2).transpose(2, 0, 1)[None].astype(np.float32) / 255.0
            a = audio_window(feats, i, meta["mode"])[None]
            pred = model(torch.from_numpy(x), torch.from_numpy(a))[0].numpy().transpose(1, 2, 0) * 255
            crop_img[bd:bd + inner, bd:bd + inner] = pred.astype(np.uint8)
            frame[y1:y2, x1:x2] = cv2.resize(crop_img, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
            writer.write(frame)
    writer.release()
    # mux (upstream: ffmpeg -i temp -i audio -c:v libx264 -c:a aac -crf 20)
    out = out_dir / "upstream.mp4"
    with av.open(str(tmp_video)) as src, av.open(str(out), "w") as dst:
        vs = dst.add_stream("libx264", rate=FPS)
        vs.width, vs.height, vs.pix_fmt, vs.options = w - w % 2, h - h % 2, "yuv420p", {"crf": "20"}
        aus = dst.add_stream("aac", rate=16000)
        aus.layout = "mono"
        for k, frame in enumerate(src.decode(video=0)):
            img = frame.to_ndarray(format="bgr24")[: h - h % 2, : w - w % 2]
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")
            vf.pts = k
            dst.mux(vs.encode(vf))
        dst.mux(vs.encode(None))
        pcm = audio.astype(np.float32)
        for s in range(0, len(pcm), 1024):
            af = av.AudioFrame.from_ndarray(pcm[None, s:s + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 16000, s
            dst.mux(aus.encode(af))
        dst.mux(aus.encode(None))
    tmp_video.unlink()
    seconds = time.perf_counter() - start
    return {"frames": n, "seconds": round(seconds, 2), "fps": n / seconds}


def bench_threads(ds: Path, ckpt: Path, audio_path: Path, root: Path, n: int, threads: int, batch: int,
                  upstream: bool, reps: int = 1) -> dict:
    """(a), (b) and (c) at one thread count (ORT intra-op threads and torch threads alike), `reps` rounds
    of the three in turn (so a slow spell of the machine touches every run alike); the frames/s of each
    round, their medians and the ratios of the medians."""
    torch.set_num_threads(threads)
    runs: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    for _ in range(reps):
        engine = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=batch, threads=threads)
        runs["a"].append(bench_unet_ort(engine, n))
        del engine
        runs["b"].append(bench_pipeline(ds, ckpt, audio_path, root, batch, threads)["fps"])
        if upstream:
            runs["c"].append(bench_upstream(ds, ckpt, audio_path, root)["fps"])
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    out: dict = {"threads": threads, "reps": reps, "frames": n, "a_unet_ort_fps": round(med["a"], 2),
                 "b_pipeline_fps": round(med["b"], 2), "b_over_a": round(med["b"] / med["a"], 3)}
    if upstream:
        out["c_upstream_fps"] = round(med["c"], 2)
        out["b_over_c"] = round(med["b"] / med["c"], 2)
    out["rounds_fps"] = {k: [round(x, 2) for x in v] for k, v in runs.items() if v}
    out["met"] = out["b_over_a"] >= TARGETS["b_over_a"] and out.get("b_over_c", 0.0) >= TARGETS["b_over_c"]
    return out


TARGETS = {"b_over_a": 0.85, "b_over_c": 3.0}


def main() -> None:

    # defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="audio length driving every run")
    parser.add_argument("--size", default="328", help="model size preset (328 = upstream)")
    parser.add_argument("--mode", default="whisper")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts, each a full (a)(b)(c) run")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--audio", type=Path, default=default_audio())
    parser.add_argument("--video", type=Path, default=default_video())
    parser.add_argument("--workdir", type=Path, default=None, help="keep the avatar and outputs here")
    parser.add_argument("--skip_upstream", action="store_true", help="only (a) and (b)")
    parser.add_argument("--reps", type=int, default=3, help="rounds of (a), (b), (c) per thread count (medians)")
    args = parser.parse_args()
    try:
        threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    if not threads or min(threads) < 1:
        parser.error("--threads needs at least one thread count >= 1")
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ds, ckpt = make_avatar(args.video, root, args.size, args.mode)
        audio_path = make_audio(args.audio, args.seconds, root)
        n = int(round(FPS * args.seconds))
        frames = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=1).frame_shape
        result: dict = {"size": args.size, "mode": args.mode, "batch_size": args.batch_size,
                        "audio_seconds": args.seconds, "frames": n, "frame_size": list(frames[1::-1]),
                        "color_match": settings.models.color_match, "video": str(args.video),
                        "audio": str(args.audio), "cpu_count": os.cpu_count(),
                        "load_average": [round(x, 2) for x in os.getloadavg()]}
        result["runs"] = [bench_threads(ds, ckpt, audio_path, root, n, t, args.batch_size, not args.skip_upstream,
                                        args.reps) for t in threads]
        result["targets"] = TARGETS
        result["all_met"] = all(r["met"] for r in result["runs"])
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
