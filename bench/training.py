"""Training throughput on this machine: data loader and model step measured separately (JSON).

    python bench/training.py                    # small and 328, CPU, batch 4, 1 thread
    python bench/training.py --sizes small --steps 10 --device cuda --batch 16

For each size: loader samples/s (AvatarDataset + DataLoader from the memory-mapped crop cache, no
JPEG decoding), U-Net step samples/s (forward, L1 + SSIM + frozen-SyncNet loss, backward, Adam) and
SyncNet step samples/s (triplets with in-batch negatives). Ratios compare against the 328 model measured
in the same run, and the loader against the step it feeds (> 1 means the loader is not the bottleneck).
The dataset is fabricated (random crops and features): throughput does not depend on content.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from syncnet_328 import SyncHead, build_syncnet
from synctalk.dataset import AvatarDataset, SyncNetDataset
from synctalk.train_syncnet import triplet_loss
from synctalk.trainkit import autocast, resolve_amp
from train_328 import GeneratorLoss
from unet_328 import build_unet
from utils import get_size


def fabricate(root: Path, sizes: list[str], n: int) -> Path:
    """A dataset with crop caches for `sizes` and whisper features, no frames (the cache is final)."""
    d = root / "bench"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in sizes:
        crop = get_size(name).crop
        np.save(d / f"crops_{crop}.npy", rng.integers(0, 256, (n, crop, crop, 3), dtype=np.uint8))
    np.save(d / "aud_whisper.npy", rng.standard_normal((n, 2, 384)).astype(np.float32))
    np.save(d / "crop_boxes.npy", np.tile(np.array([[0, 0, 256, 256]], np.int32), (n, 1)))
    return d


def time_loader(ds, batch: int, batches: int, workers: int) -> float:
    """Samples/s of iterating a shuffled DataLoader over `ds` (after one warm-up batch)."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    t0, count = time.perf_counter(), 0
    for _ in range(batches):
        try:
            count += len(next(it)[0])
        except StopIteration:
            it = iter(loader)
            count += len(next(it)[0])
    return count / (time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def samples_per_second(step, batch: int, steps: int, device: torch.device) -> float:
    """Samples/s of `steps` calls of `step()` on `batch` samples each, after one warm-up call."""
    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def time_unet(size: str, batch: int, steps: int, device: torch.device, amp) -> float:
    """Samples/s of full U-Net training steps (after one warm-up step)."""
    model = build_unet("whisper", size).to(device)
    syncnet = build_syncnet("whisper", size).to(device)
    inner = get_size(size).inner
    loss_fn = GeneratorLoss(inner, 1.0, 0.2, "auto", 0.05, 0.0, syncnet, (10.0, -5.0))
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    image, audio = (t.to(device) for t in model.example_inputs(batch))
    label = torch.rand(batch, 3, inner, inner, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, _ = loss_fn(model(image, audio), label, audio)
        loss.backward()
        opt.step()

    return samples_per_second(step, batch, steps, device)


def time_syncnet(size: str, batch: int, steps: int, device: torch.device, amp) -> float:
    """Samples/s of SyncNet training steps on triplets (after one warm-up step)."""
    net, head = build_syncnet("whisper", size).to(device), SyncHead().to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), 1e-4)
    face, audio = (t.to(device) for t in net.example_inputs(batch))
    shifted, frames = torch.randn_like(audio), torch.arange(batch, device=device) * 10

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, amp):
            loss, _ = triplet_loss(net, head, face, audio, shifted, frames)
        loss.backward()
        opt.step()

    return samples_per_second(step, batch, steps, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="small,328", help="comma-separated size presets")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed model steps per measurement")
    p.add_argument("--loader_batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = resolve_amp(args.amp, device)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = fabricate(Path(tmp), sizes, n=200)
        for size in sizes:
            unet_ds = AvatarDataset(d, size, split="train", build_cache=False)
            sync_ds = SyncNetDataset(d, size, split="train", build_cache=False, triplets=True)
            r = {
                "unet_loader_samples_per_s": time_loader(unet_ds, args.batch, args.loader_batches, args.workers),
                "syncnet_loader_samples_per_s": time_loader(sync_ds, args.batch, args.loader_batches, args.workers),
                "unet_step_samples_per_s": time_unet(size, args.batch, args.steps, device, amp),
                "syncnet_step_samples_per_s": time_syncnet(size, args.batch, args.steps, device, amp),
            }
            r["unet_loader_over_step"] = r["unet_loader_samples_per_s"] / r["unet_step_samples_per_s"]
            r["syncnet_loader_over_step"] = r["syncnet_loader_samples_per_s"] / r["syncnet_step_samples_per_s"]
            results[size] = {k: round(v, 3) for k, v in r.items()}
    if "328" in results:
        base = results["328"]
        for size, r in results.items():
            if size != "328":
                r["unet_step_speedup_vs_328"] = round(r["unet_step_samples_per_s"] / base["unet_step_samples_per_s"], 2)
                r["syncnet_step_speedup_vs_328"] = round(
                    r["syncnet_step_samples_per_s"] / base["syncnet_step_samples_per_s"], 2)
    print(json.dumps({"bench": "training", "device": str(device), "threads": args.threads, "batch": args.batch,
                      "workers": args.workers, "amp": str(amp).replace("torch.", "") if amp else "fp32",
                      "torch": torch.__version__, "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
