"""Streaming server latency and throughput: `python api.py` in a subprocess, 1/2/4 concurrent clients.

    python bench/server.py [--sizes small 328] [--clients 1 2 4] [--seconds 8] [--threads 1]
                           [--batch_size 8] [--workdir DIR]

For each model size an avatar is built in a temp folder (bench/inference.py's `make_avatar`: frames of
the shared May clip or the synthetic fixture, a fixed face box, a randomly initialised checkpoint:
speed does not depend on the weights) and the server is started on it. Then, per concurrency level,
every client requests at once:
  - text:   GET /generate with a sentence no client asked for before (so TTS runs in the request);
  - upload: POST /generate-from-audio with `--seconds` of speech (WAV).
Per request: time to the first JPEG part (for text: TTS of the whole sentence, reported alone as
`tts_seconds`, comes first), time to the first *speech* frame (the part whose 40 ms of
audio is the first voiced one; the audio is fetched back from the TTS cache for the text path), frames
delivered per second between the first and the last part, and how far the last part lags the audio
clock. Baselines from the same run, in-process with the server stopped: the engine alone (render +
JPEG encode, frames/s: the ceiling for the server) and the time to the first frame when the whole
utterance's features are computed before rendering (no streaming). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from common import free_port, load_bench_inference  # bench/common.py

from services.generator import FrameGenerationService
from services.models import warm_engine
from synctalk import audio as audio_io
from synctalk.engine import LipSyncEngine

REPO = Path(__file__).resolve().parents[1]

FPS = 25
SENTENCE = "Streaming lip sync should start quickly and keep pace with the voice, request number {k}."


def first_voiced_frame(audio16k: np.ndarray) -> int:
    """Index of the first 40 ms frame whose RMS exceeds 10% of the loudest frame's."""
    n = len(audio16k) // 640
    rms = np.sqrt((audio16k[: n * 640].reshape(n, 640) ** 2).mean(axis=1))
    return int(np.argmax(rms > 0.1 * rms.max()))


def wav_to_16k(data: bytes) -> np.ndarray:

    return audio_io.load_audio(data, sr=16000)


class Server:
    """`python api.py` on a free port with the bench avatar."""

    def __init__(self, root: Path, threads: int, batch: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, SYNCTALK_PATHS__DATASET_ROOT=str(root / "dataset"),
                   SYNCTALK_PATHS__CHECKPOINT_ROOT=str(root / "checkpoint"),
                   SYNCTALK_PATHS__DEMO_ROOT=str(root / "no-demo"), SYNCTALK_MODELS__DEVICE="cpu",
                   SYNCTALK_MODELS__THREADS=str(threads), SYNCTALK_MODELS__BATCH_SIZE=str(batch),
                   SYNCTALK_MODELS__BACKEND="onnx", OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "api.py"), "--port", str(self.port), "--avatar", "bench",
             "--log-level", "warning"], env=env, cwd=REPO)

    def __enter__(self) -> Server:
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5).json().get("status") == "ok":
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def one_request(client: httpx.AsyncClient, kind: str, payload, voiced_of) -> dict:
    """One streamed request, timed per part."""
    start = time.perf_counter()
    if kind == "text":
        request = client.build_request("GET", "/generate", params={"text": payload})
    else:
        request = client.build_request("POST", "/generate-from-audio", files={"audio_file": ("speech.wav", payload)})
    response = await client.send(request, stream=True)
    times, buf = [], b""
    async for chunk in response.aiter_raw():
        buf += chunk
        while True:  # count complete parts as they arrive
            head_end = buf.find(b"\r\n\r\n")
            if not buf.startswith(b"--frame\r\n") or head_end < 0:
                break
            length = int(buf[:head_end].split(b"Content-Length: ")[1].split(b"\r\n")[0])
            if len(buf) < head_end + 4 + length + 2:
                break
            times.append(time.perf_counter() - start)
            buf = buf[head_end + 4 + length + 2:]
    await response.aclose()
    total = int(response.headers["x-frame-count"])
    voiced = await voiced_of(client, payload)
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {"frames": len(times), "expected": total, "first_jpeg_s": times[0],
            "first_speech_frame_s": times[min(voiced, len(times) - 1)],
            "delivered_fps": (len(times) - 1) / span if span > 0 else float("nan"),
            "end_lag_s": times[-1] - (times[0] + (total - 1) / FPS)}


async def run_level(url: str, kind: str, clients: int, payloads: list, voiced_of) -> dict:
    """`clients` concurrent requests; per-metric mean and max."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        results = await asyncio.gather(*(one_request(client, kind, payloads[i], voiced_of) for i in range(clients)))
    out: dict = {"all_frames_delivered": all(r["frames"] == r["expected"] for r in results)}
    for key in ("first_jpeg_s", "first_speech_frame_s", "delivered_fps", "end_lag_s"):
        values = [r[key] for r in results]
        out[key] = {"mean": round(float(np.mean(values)), 3), "max": round(float(np.max(values)), 3)}
    return out


def engine_baselines(root: Path, audio16k: np.ndarray, threads: int, batch: int) -> dict:
    """In-process: engine-only frames/s (render + JPEG) and first-frame time without streaming."""
    torch.set_num_threads(threads)
    ds, ckpt = root / "dataset" / "bench", root / "checkpoint" / "bench" / "1.pth"
    engine = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", threads=threads, batch_size=batch)
    warm_engine(engine)  # weights loaded and first calls made, as in the server
    service = FrameGenerationService(engine, jpeg_quality=85, batch_size=batch)
    start = time.perf_counter()
    features = engine.features(audio16k)  # whole utterance first, as upstream's offline path
    order = engine.frame_order(len(features))
    jpeg = service.encode(engine.render(engine.audio_windows(features, range(1)), order[:1])[0])
    offline_first = time.perf_counter() - start
    n = min(len(features), 100)
    engine.render(engine.audio_windows(features, range(batch)), order[:batch])  # warm-up
    start = time.perf_counter()
    for s in range(0, n, batch):
        idx = range(s, min(n, s + batch))
        for frame in engine.render(engine.audio_windows(features, idx), order[idx.start:idx.stop]):
            service.encode(frame)
    return {"engine_fps": round(n / (time.perf_counter() - start), 2),
            "offline_first_frame_s": round(offline_first, 3), "jpeg_bytes": len(jpeg)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "328"], choices=["small", "328"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="upload length (s)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads in the server")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    bi = load_bench_inference()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_server_"))

    speech = wav_to_16k(bi.make_audio(bi.default_audio(), args.seconds + 10, work).read_bytes())
    start = max(0, first_voiced_frame(speech) - 5) * 640  # 0.2 s of lead-in, then speech
    audio_io.write_wav(work / "upload.wav", speech[start: start + int(args.seconds * 16000)], 16000)
    upload = (work / "upload.wav").read_bytes()
    upload_voiced = first_voiced_frame(wav_to_16k(upload))
    report: dict = {"cpu_count": os.cpu_count(), "threads": args.threads, "batch_size": args.batch_size,
                    "upload_seconds": args.seconds, "sizes": {}}
    counter = iter(range(10**6))

    async def text_voiced(client: httpx.AsyncClient, text: str) -> int:
        wav = (await client.get("/get-tts-audio", params={"text": text})).content  # TTS cache hit
        return first_voiced_frame(wav_to_16k(wav))

    async def upload_voiced_of(_client, _payload) -> int:
        return upload_voiced

    for size in args.sizes:
        root = work / size
        bi.make_avatar(bi.default_video(), root, size, "whisper")
        entry: dict = {"text": {}, "upload": {}}
        with Server(root, args.threads, args.batch_size) as server:
            asyncio.run(run_level(server.url, "text", 1, [SENTENCE.format(k="warm-up")], text_voiced))
            start = time.perf_counter()  # TTS alone (a sentence not synthesised before), part of "text"
            httpx.get(f"{server.url}/get-tts-audio", params={"text": SENTENCE.format(k="tts-only")}, timeout=600)
            entry["tts_seconds"] = round(time.perf_counter() - start, 3)
            for n in args.clients:
                texts = [SENTENCE.format(k=next(counter)) for _ in range(n)]
                entry["text"][str(n)] = asyncio.run(run_level(server.url, "text", n, texts, text_voiced))
                entry["upload"][str(n)] = asyncio.run(
                    run_level(server.url, "upload", n, [upload] * n, upload_voiced_of))
        entry.update(engine_baselines(root, wav_to_16k(upload), args.threads, args.batch_size))
        ceiling = min(FPS, entry["engine_fps"])  # the server paces at 25 fps at most
        for kind in ("text", "upload"):
            entry[f"{kind}_fps_over_ceiling"] = {n: round(level["delivered_fps"]["mean"] / ceiling, 3)
                                                 for n, level in entry[kind].items()}
        one = entry["upload"].get("1")
        if one:
            entry["upload_first_jpeg_over_offline_first_frame"] = round(
                one["first_jpeg_s"]["mean"] / entry["offline_first_frame_s"], 3)
        report["sizes"][size] = entry
        print(json.dumps({size: entry}), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
