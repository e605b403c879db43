"""Live microphone latency: audio sample in -> the frame showing that sample out, over WS /ws/live.

    python bench/live.py [--sizes small 328] [--seconds 20] [--chunk_ms 20] [--threads 1] [--workdir DIR]

For each model size an avatar is built in a temp folder (bench/fixtures.py's `make_avatar`: frames of
the shared May clip or the synthetic fixture, a randomly initialised checkpoint: speed does not depend
on the weights) and `python api.py` is started on it in a subprocess. One client then plays
`--seconds` of speech (the shared musetalk clip, else a synthetic voiced signal) like a microphone:
20 ms PCM16 chunks, each sent when its last sample has been "captured" (t_start + end of chunk), with
per-frame events on (`{"type": "config", "frame_events": true}`), in the default real-time mode.

Per speech frame received: latency = receive time - capture time of the frame's first audio sample
(t_start + audio_time). Reported: p50/p95/max, the announced (algorithmic) latency as the baseline and
the ratio p50 / announced, the share of speech frames delivered (the rest were dropped to stay real
time), delivered frames per second while speaking, and the server's per-frame render time. Prints one
JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fixtures  # bench/fixtures.py (sibling)
import httpx
import numpy as np
from common import free_port, stop_process  # bench/common.py

from synctalk import audio as audio_io

REPO = Path(__file__).resolve().parents[1]

FPS = 25


def start_server(root: Path, threads: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    """`api.py` on the avatar `bench` under `root`, on a free port; returns when /health is ok."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), SYNCTALK_PATHS__DATASET_ROOT=str(root / "dataset"),
               SYNCTALK_PATHS__CHECKPOINT_ROOT=str(root / "checkpoint"), SYNCTALK_PATHS__DEMO_ROOT=str(root / "none"),
               SYNCTALK_MODELS__DEVICE="cpu", SYNCTALK_MODELS__THREADS=str(threads))
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "api.py"), "--port", str(port), "--avatar", "bench",
                             "--log-level", "info"], cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("status") == "ok":
                return proc, port
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


async def play(port: int, audio: np.ndarray, chunk_ms: float) -> dict:
    """Stream `audio` like a microphone and time every speech frame."""
    import websockets

    frames: list[tuple[float, dict]] = []
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/live", max_size=None) as ws:
        ready = json.loads(await ws.recv())
        t_start = time.monotonic()
        await ws.send(json.dumps({"type": "config", "frame_events": True}))
        pending: dict | None = None

        async def reader() -> None:
            nonlocal pending
            async for msg in ws:
                if isinstance(msg, bytes):
                    if pending is not None:
                        frames.append((time.monotonic(), pending))
                    pending = None
                else:
                    event = json.loads(msg)
                    if event["type"] == "frame":
                        pending = event

        task = asyncio.create_task(reader())
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        step = int(round(chunk_ms * 16)) * 2
        for i in range(0, len(pcm), step):
            await asyncio.sleep(max(0.0, t_start + (i + step) / 32000 - time.monotonic()))
            await ws.send(pcm[i:i + step])
        await ws.send(json.dumps({"type": "end"}))  # the last audio plays out
        await asyncio.sleep(ready["latency_ms"] / 1000 + 1.5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    speech = [(t, e) for t, e in frames if e["state"] == "speech"]
    if not speech:
        return {"error": "no speech frames came back", "announced_ms": ready["latency_ms"]}
    lat = np.array([t - (t_start + e["audio_time"]) for t, e in speech]) * 1000
    ks = [e["frame"] for _, e in speech]
    span = speech[-1][0] - speech[0][0]
    due = sum(1 for k in range(min(ks), max(ks) + 1))  # frames of the speaking stretch(es) incl. dropped
    return {
        "announced_ms": ready["latency_ms"],
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "max_ms": round(float(lat.max()), 1),
        "p50_over_announced": round(float(np.percentile(lat, 50)) / ready["latency_ms"], 3),
        "speech_frames": len(speech),
        "delivered_share": round(len(speech) / max(1, due), 3),
        "speaking_fps": round((len(speech) - 1) / span, 2) if span > 0 else None,
        "frames_total": len(frames),
    }


def render_ms(log_text: str) -> float | None:
    m = re.findall(r"rendered \((\d+(?:\.\d+)?) ms each\)", log_text)
    return float(m[-1]) if m else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "328"], choices=["small", "328"])
    parser.add_argument("--seconds", type=float, default=20.0, help="speech played per size (default 20)")
    parser.add_argument("--chunk_ms", type=float, default=20.0, help="microphone chunk length (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="ORT/torch intra-op threads (default 1)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep avatars and logs here")
    args = parser.parse_args(argv)
    if not 2 <= args.seconds <= 600 or not 5 <= args.chunk_ms <= 1000:
        sys.stderr.write("error: --seconds must be in 2..600 and --chunk_ms in 5..1000\n")
        return 2

    result: dict = {"seconds": args.seconds, "chunk_ms": args.chunk_ms, "threads": args.threads,
                    "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        audio = audio_io.load_audio(str(fixtures.make_audio(fixtures.default_audio(), args.seconds, work)))
        result["audio"] = "musetalk_eng.wav" if fixtures.default_audio() else "synthetic"
        for size in args.sizes:
            root = work / f"avatar_{size}"
            if not (root / "checkpoint" / "bench" / "1.pth").is_file():
                fixtures.make_avatar(fixtures.default_video(), root, size, "whisper")
            log_path = work / f"server_{size}.log"
            proc, port = start_server(root, args.threads, log_path)
            try:
                stats = asyncio.run(play(port, audio, args.chunk_ms))
            finally:
                stop_process(proc, 20)
            stats["render_ms_per_frame"] = render_ms(log_path.read_text())
            result["sizes"][size] = stats
    if "small" in result["sizes"] and "328" in result["sizes"]:
        small, full = result["sizes"]["small"], result["sizes"]["328"]
        if "p50_ms" in small and "p50_ms" in full:
            result["p50_ratio_328_vs_small"] = round(full["p50_ms"] / small["p50_ms"], 3)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
