"""Trial: does matching a foreign voice's Whisper features to the avatar's training voice, or amplifying
them, help the lips follow it? (docs/training-guide.md, "Matching a foreign voice's feature statistics".)

    python scripts/voice_match_trial.py --match {none,mean,meanstd,gain,smooth} [--gain G] [--width W] -- EVALUATE_ARGS...

Runs `evaluate.py` with EVALUATE_ARGS, the cross-driven files' features (per channel, over their speech
frames under the engine's speech gate) shifted (`mean`) or shifted and scaled (`meanstd`) to the training
voice's statistics (its speech frames in the dataset's `aud_whisper.npy`). The held-out rows use the
dataset's own features and are not touched; `none` is plain `evaluate.py`. `gain` moves every frame's
features `G` times as far from the engine's row of digital silence (G > 1: articulate more). `smooth`
averages the features over `W` encoder frames (50 Hz) centred on each (steadier lips, slower ones).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter1d

import evaluate
from synctalk.audio import load_audio
from synctalk.engine import LipSyncEngine

log = logging.getLogger("voice_match_trial")


def speech_stats(features: np.ndarray, speaking: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of `features` `[n, rows, C]` over the speaking frames."""
    rows = features if speaking is None else features[np.asarray(speaking, bool)[: len(features)]]
    flat = rows.reshape(-1, features.shape[-1]).astype(np.float64)
    return flat.mean(0), flat.std(0) + 1e-6


def matched(features: np.ndarray, speaking: np.ndarray | None, target: tuple[np.ndarray, np.ndarray],
            scale: bool) -> np.ndarray:
    """`features` whose speaking frames have the `target` (mean, std) per channel (the std only if `scale`)."""
    keep = np.ones(len(features), bool) if speaking is None else np.asarray(speaking, bool)[: len(features)]
    if not keep.any():
        return features
    mu, sd = speech_stats(features, keep)
    mu_t, sd_t = target
    out = np.array(features, copy=True)
    x = features[keep].astype(np.float64)
    out[keep] = ((x - mu) / sd * sd_t + mu_t) if scale else (x - mu + mu_t)
    return out


Change = Callable[[LipSyncEngine, np.ndarray, np.ndarray], np.ndarray]  # (engine, audio, features) -> features


def patch_features(change: Change) -> None:
    """Patch `LipSyncEngine.features` so every clip's features (not the engine's own digital silence) pass
    through `change`."""
    plain = LipSyncEngine.features

    def features(self: LipSyncEngine, audio16k: np.ndarray) -> np.ndarray:
        out = plain(self, audio16k)
        return change(self, audio16k, out) if np.any(audio16k) else out

    LipSyncEngine.features = features  # type: ignore[method-assign]


def amplified(gain: float) -> Change:
    """Features moved `gain` times as far from the features of digital silence."""
    def change(engine: LipSyncEngine, audio16k: np.ndarray, out: np.ndarray) -> np.ndarray:
        silence = engine._silence_features()
        rest = silence[len(silence) // 2]
        return (rest + gain * (out - rest)).astype(np.float32)
    return change


def smoothed(width: int) -> Change:
    """Features averaged over `width` encoder frames (50 Hz, edges repeated) centred on each."""
    def change(engine: LipSyncEngine, audio16k: np.ndarray, out: np.ndarray) -> np.ndarray:
        n, rows, channels = out.shape
        flat = uniform_filter1d(out.reshape(n * rows, channels).astype(np.float64), width, axis=0, mode="nearest")
        return flat.reshape(out.shape).astype(np.float32)
    return change


def matched_to(dataset_dir: Path, scale: bool) -> Change:
    """Features whose speaking frames are matched (`matched`) to the dataset's voice."""
    target: list[tuple[np.ndarray, np.ndarray]] = []

    def change(engine: LipSyncEngine, audio16k: np.ndarray, out: np.ndarray) -> np.ndarray:
        if not target:
            train = np.load(dataset_dir / "aud_whisper.npy").astype(np.float32)
            voice = load_audio(str(dataset_dir / "aud.wav"))
            target.append(speech_stats(train, engine.speaking(voice, len(train))))
        speaking = engine.speaking(audio16k, len(out))
        log.info("matching %d of %d frames to %s's voice", len(out) if speaking is None else int(speaking.sum()),
                 len(out), dataset_dir.name)
        return matched(out, speaking, target[0], scale)
    return change


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--match", choices=("none", "mean", "meanstd", "gain", "smooth"), required=True)
    p.add_argument("--gain", type=float, default=2.0, help="with --match gain: the factor")
    p.add_argument("--width", type=int, default=3, help="with --match smooth: encoder frames (50 Hz) averaged")
    p.add_argument("--dataset_dir", default="dataset/grid_s1", help="the training voice's dataset")
    p.add_argument("evaluate_args", nargs=argparse.REMAINDER, help="after --: evaluate.py's arguments")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.match == "gain":
        patch_features(amplified(args.gain))
    elif args.match == "smooth":
        if args.width < 1:
            p.error(f"--width must be at least 1, got {args.width}")
        patch_features(smoothed(args.width))
    elif args.match != "none":
        patch_features(matched_to(Path(args.dataset_dir), scale=args.match == "meanstd"))
    rest = args.evaluate_args[1:] if args.evaluate_args[:1] == ["--"] else args.evaluate_args
    return evaluate.main(rest)


if __name__ == "__main__":
    sys.exit(main())
