"""Model FLOPs, parameter counts and CPU throughput (torch eager vs ONNX Runtime, batch 1 and 8).

    python bench/models.py [--sizes 328 small] [--mode whisper] [--threads 1] [--seconds 3]

Prints one JSON object. FLOPs count 2 per multiply-accumulate of conv/matmul
(torch.utils.flop_counter), the same convention as the spec's 9.772 GFLOPs for the upstream U-Net.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

from syncnet_328 import build_syncnet
from unet_328 import build_unet, export_onnx
from utils import count_parameters


def flops(model: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of one forward pass (2 per MAC, conv and matmul only)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def throughput(fn, batch: int, seconds: float) -> float:
    """Frames per second of `fn()` processing `batch` frames per call (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        fn()
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def bench_unet(mode: str, size: str, threads: int, seconds: float) -> dict:

    model = build_unet(mode, size).eval()
    result = {"params": count_parameters(model), "gflops_per_frame": flops(model, model.example_inputs(1)) / 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / "unet.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for batch in (1, 8):
            image, audio = model.example_inputs(batch)
            feeds = {"image": image.numpy(), "audio": audio.numpy()}
            with torch.no_grad():
                eager = throughput(lambda i=image, a=audio: model(i, a), batch, seconds)
            onnx = throughput(lambda f=feeds: sess.run(None, f), batch, seconds)
            result[f"batch{batch}"] = {"torch_eager_fps": round(eager, 2), "onnxruntime_fps": round(onnx, 2),
                                       "onnx_over_eager": round(onnx / eager, 2)}
    return result


def bench_syncnet(mode: str, size: str, seconds: float) -> dict:
    model = build_syncnet(mode, size).eval()
    face, audio = model.example_inputs(8)
    with torch.no_grad():
        fps = throughput(lambda: model(face, audio), 8, seconds)
    return {"params": count_parameters(model), "gflops_per_pair": flops(model, model.example_inputs(1)) / 1e9,
            "batch8": {"torch_eager_fps": round(fps, 2)}}


def main() -> None:
    # defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["328", "small"])
    parser.add_argument("--mode", default="whisper")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = {"mode": args.mode, "threads": args.threads, "torch": torch.__version__, "unet": {}, "syncnet": {},
           "ave_upstream_unet_params": count_parameters(build_unet("ave", "328"))}
    for size in args.sizes:
        out["unet"][size] = bench_unet(args.mode, size, args.threads, args.seconds)
        out["syncnet"][size] = bench_syncnet(args.mode, size, args.seconds)
    print(json.dumps(out, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


if __name__ == "__main__":
    main()
