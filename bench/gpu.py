"""GPU figures in one command (JSON on stdout). On a machine without CUDA it prints the JSON with every
CUDA section skipped and the reason, and exits 0.

    python bench/gpu.py                     # CUDA: the full set, well under 8 minutes on one GPU
    python bench/gpu.py --device cpu --quick  # the same code path on the CPU with tiny budgets (smoke run)

Sections (each a key of the JSON object; `docs/deployment.md` documents the schema):
- `unet`: U-Net frames/s, torch eager, per size (328, small) x dtype (float32, float16, bfloat16) x batch
  (1, 8, 32), random weights (speed does not depend on them);
- `pipeline`: the offline pipeline as `inference_328.py` runs it (features + engine.run with paste-back,
  frames discarded instead of encoded), frames/s, small and 328, torch backend on the device;
- `streams`: real-time streams one `FrameScheduler` holds at 25 fps: the scheduler's full-batch throughput
  / 25, then a check run with that many paced streams reporting each stream's delivered fps;
- `features`: Whisper streaming features, milliseconds of compute per 40 ms of audio;
- `training`: U-Net and SyncNet training steps, samples/s (bench/training.py's steps);
- `parity`: the bundled demo checkpoint on 16 held-out samples of the bundled demo avatar, run as training
  runs it on the device (channels-last, autocast fp32 / fp16 / bf16) against the CPU's fp32 output:
  largest and mean absolute difference, each output's L1 to the real crops, and the training loss's pixel
  terms as the training step computes them under that autocast (a device or precision that breaks the
  network or the loss shows here before a training run is spent on it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import fixtures  # bench/fixtures.py: avatar and audio builders (sibling)
import numpy as np
import torch
import training as training_bench  # bench/training.py: the training steps (sibling script)

from config import settings
from synctalk.dataset import AvatarDataset
from synctalk.engine import LipSyncEngine
from synctalk.features import FeatureConfig, StreamingFeatures, extract_features, load_whisper_encoder
from synctalk.scheduler import FrameScheduler
from synctalk.timing import FPS, SAMPLE_RATE
from synctalk.trainkit import autocast
from train_328 import GeneratorLoss
from unet_328 import build_unet, load_unet_checkpoint

SECTIONS = ("unet", "avatars", "pipeline", "streams", "features", "training", "parity")
NEEDS_AVATARS = {"pipeline", "streams", "features"}  # these run on the avatars (and audio) that `avatars` builds
SIZES = ("328", "small")
DTYPES = ("float32", "float16", "bfloat16")
BATCHES = (1, 8, 32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step, count: int, seconds: float, device: torch.device) -> float:
    """Items per second of `step()` (which handles `count` items), after one warm-up call."""
    step()
    sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    sync(device)
    return n * count / (time.perf_counter() - start)


def bench_unet(device: torch.device, seconds: float, quick: bool) -> dict:
    """Frames/s of the bare U-Net per size, dtype and batch."""
    out: dict = {}
    dtypes = ("float32",) if device.type == "cpu" else DTYPES
    batches = (1, 8) if quick else BATCHES
    for size in SIZES:
        for dtype in dtypes:
            model = build_unet("whisper", size).to(device=device, dtype=getattr(torch, dtype)).eval()
            for batch in batches:
                image, audio = (t.to(device=device, dtype=getattr(torch, dtype)) for t in model.example_inputs(batch))
                with torch.inference_mode():
                    fps = rate(lambda m=model, i=image, a=audio: m(i, a), batch, seconds, device)
                out[f"{size}/{dtype}/b{batch}"] = round(fps, 1)
    return out


def build_avatar(work: Path, size: str) -> tuple[Path, Path, np.ndarray]:
    """A temporary avatar of 125 generated 512x512 frames (bench/fixtures.py; no video decoding, so no
    PyAV needed) and 10 s of 16 kHz speech (the shared clip when ../shared exists, else synthetic)."""
    ds, ckpt = fixtures.make_avatar(None, work / size, size, "whisper", 125)
    return ds, ckpt, fixtures.speech(fixtures.default_audio(), 10.0)


def bench_pipeline(engines: dict, audio: np.ndarray, device: torch.device) -> dict:
    """Offline pipeline frames/s per size (features + render + paste, no encoding)."""
    out = {}
    for size, engine in engines.items():
        start = time.perf_counter()
        feats = engine.features(audio)
        n = engine.run(feats, engine.frame_order(len(feats)), lambda frame: None)
        sync(device)
        out[size] = round(n / (time.perf_counter() - start), 1)
    return out


def paced_streams(sched: FrameScheduler, feats: np.ndarray, streams: int, seconds: float) -> list[float]:
    """Run `streams` clients each asking for 4 frames at a time on a 25 fps clock; delivered fps each."""
    engine, delivered = sched.engine, [0] * streams
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        t0, k = time.monotonic(), 0
        while time.monotonic() < stop:
            idx = [(k + j) % len(feats) for j in range(4)]
            deadline = t0 + (k + 4) / FPS
            sched.submit(engine.audio_windows(feats, idx), engine.frame_order(4, start_frame=k + i),
                         deadline).result()
            k += 4
            delivered[i] = k
            time.sleep(max(0.0, t0 + k / FPS - time.monotonic()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [round(d / seconds, 1) for d in delivered]


def bench_streams(engine: LipSyncEngine, audio: np.ndarray, seconds: float) -> dict:
    """Streams the scheduler holds at 25 fps: estimate from full-batch throughput, then a check run."""
    feats = engine.features(audio)
    sched = FrameScheduler(engine, max_wait_s=0.004)
    try:
        windows = engine.audio_windows(feats, range(engine.batch_size))
        order = engine.frame_order(engine.batch_size)
        throughput = rate(lambda: sched.render(windows, order), engine.batch_size, seconds, torch.device("cpu"))
        estimate = max(1, int(throughput // FPS))
        fps = paced_streams(sched, feats, estimate, seconds)
        return {"throughput_fps": round(throughput, 1), "streams": estimate, "per_stream_fps": fps,
                "min_stream_fps": min(fps), "mean_batch": round(sched.stats.mean_batch, 2)}
    finally:
        sched.close()


def bench_features(device: torch.device, audio: np.ndarray, config: FeatureConfig) -> dict:
    """Whisper streaming features: ms of compute per 40 ms of audio (streaming) and offline batched."""
    encoder = load_whisper_encoder(config.whisper_path, device=device)
    stream = StreamingFeatures(encoder, device=device, config=config)
    start = time.perf_counter()
    rows = sum(len(stream.push(audio[i:i + stream.hop])) for i in range(0, len(audio), stream.hop))
    rows += len(stream.flush())
    sync(device)
    streaming = 1000 * (time.perf_counter() - start) / rows
    start = time.perf_counter()
    n = len(extract_features(audio, "whisper", device=device, config=config, batch_size=16))
    sync(device)
    return {"streaming_ms_per_40ms": round(streaming, 3),
            "offline_batched_ms_per_40ms": round(1000 * (time.perf_counter() - start) / n, 3)}


def bench_training(device: torch.device, quick: bool) -> dict:
    """Samples/s of one U-Net and one SyncNet training step per size (bench/training.py)."""
    amp = training_bench.resolve_amp("auto", device)
    steps, batch = (2, 2) if quick else (20, 16)
    out = {}
    for size in SIZES:
        out[f"unet/{size}"] = round(training_bench.time_unet(size, batch, steps, device, amp), 1)
        out[f"syncnet/{size}"] = round(training_bench.time_syncnet(size, batch, steps, device, amp), 1)
    return out


def demo_samples(work: Path, count: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, audio, label) of the first `count` held-out samples of the bundled demo avatar; its crop
    cache is built in `work` (the frames are linked, not copied), never in the repository."""
    src, ds_dir = fixtures.REPO / "demo_avatar" / "dataset" / "demo", work / "demo"
    ds_dir.mkdir(parents=True)
    for item in src.iterdir():
        (ds_dir / item.name).symlink_to(item)
    ds = AvatarDataset(ds_dir, "small", split="val", seed=0)
    image, audio, label = (torch.stack(t) for t in zip(*(ds[i] for i in range(min(count, len(ds))))))
    return image, audio, label


def bench_parity(device: torch.device, work: Path) -> dict:
    """The demo U-Net on `device` per autocast dtype vs the CPU's fp32 output on the same samples."""
    image, audio, label = demo_samples(work)
    ckpt = max((fixtures.REPO / "demo_avatar" / "checkpoint" / "demo").glob("*.pth"), key=lambda p: int(p.stem))
    model, _ = load_unet_checkpoint(ckpt)
    model = model.float().eval()
    loss_fn = GeneratorLoss(int(image.shape[-1]), 1.0, 0.2, "auto", 0.0, 0.0, mouth_weight=4.0, grad_weight=2.0)
    with torch.inference_mode():
        ref = model(image, audio).float()
        ref_terms = loss_terms(loss_fn, ref, label)
    out = {"samples": len(image), "cpu_fp32_l1_to_real": round(float((ref - label).abs().mean()), 5),
           "cpu_fp32_loss_terms": ref_terms}
    loss_fn = loss_fn.to(device)
    model = model.to(device)
    x = image.to(device).contiguous(memory_format=torch.channels_last) if device.type == "cuda" else image.to(device)
    for name in (("float32",) if device.type == "cpu" else DTYPES):
        dtype = None if name == "float32" else getattr(torch, name)
        with torch.inference_mode(), autocast(device, dtype):
            raw = model(x, audio.to(device))
            terms = loss_terms(loss_fn, raw, label.to(device))  # as the training step computes them
        pred = raw.float().cpu()
        out[name] = {"max_abs_diff": round(float((pred - ref).abs().max()), 5),
                     "mean_abs_diff": round(float((pred - ref).abs().mean()), 6),
                     "l1_to_real": round(float((pred - label).abs().mean()), 5), "loss_terms": terms}
    return out


def loss_terms(loss_fn: GeneratorLoss, pred: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """The training loss's pixel terms of (generated, real), rounded, for the parity comparison."""
    _, terms = loss_fn(pred, label, torch.zeros(1, device=pred.device))
    return {k: round(float(v), 5) for k, v in terms.items()}


def run(device: torch.device, quick: bool, config: FeatureConfig, only: set[str] | None = None) -> dict:
    """The sections in `only` (default all, plus `avatars` when a section needs them) on `device`, speech
    features per `config`; a failing section reports its error instead of stopping the run."""
    wanted = set(only or SECTIONS)
    if wanted & NEEDS_AVATARS:
        wanted.add("avatars")
    seconds = 0.3 if quick else 2.0
    result: dict = {"device": str(device), "quick": quick}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    with tempfile.TemporaryDirectory(prefix="bench_gpu") as tmp:
        sections = {"unet": lambda: bench_unet(device, seconds, quick)}
        engines: dict = {}
        audio = np.zeros(0, np.float32)

        def load() -> dict:
            nonlocal audio
            for size in (("small",) if quick else SIZES):
                ds, ckpt, audio = build_avatar(Path(tmp), size)
                engines[size] = LipSyncEngine.load(ds, ckpt, backend="torch", device=str(device),
                                                   dtype="float32" if device.type == "cpu" else "float16",
                                                   batch_size=8 if quick else 32, threads=1,
                                                   feature_config=config)
            return {"avatars": sorted(engines)}

        sections.update(avatars=load, pipeline=lambda: bench_pipeline(engines, audio, device),
                        streams=lambda: bench_streams(engines["small"], audio, seconds * 3),
                        features=lambda: bench_features(device, audio[: 4 * SAMPLE_RATE] if quick else audio, config),
                        training=lambda: bench_training(device, quick),
                        parity=lambda: bench_parity(device, Path(tmp)))
        for name, section in sections.items():
            if name not in wanted:
                continue
            start = time.perf_counter()
            try:
                result[name] = section()
            except Exception as exc:  # report and go on: one broken section should not hide the rest
                result[name] = {"error": f"{type(exc).__name__}: {exc}"}
            result.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description="GPU benchmark (JSON).")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (smoke run of the same code)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run, numbers not comparable)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = p.parse_args()
    only = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not only or only - set(SECTIONS):
        p.error(f"--sections: unknown {sorted(only - set(SECTIONS)) or 'empty list'}; choose from {', '.join(SECTIONS)}")
    base = {"host": platform.node(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({**base, "skipped": "no CUDA device on this machine: every section skipped"}, indent=1))
        return 0
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    print(json.dumps({**base, **run(torch.device(args.device), args.quick, settings.audio.feature_config(), only)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
