"""Per-video-frame audio features of any audio (or video) file PyAV decodes.

    python data_utils/audio_features.py AUDIO OUT.npy [--mode whisper|ave] [--device cpu] [--semitones 0]

whisper (default): float32 [N, 2, 384], N = round(25 x duration), row i = audio [40i, 40i+40) ms, from
the same streaming routine the server uses. ave: upstream's [L + 2, 512] (needs --ave-checkpoint or
SYNCTALK_MODELS__AVE_CHECKPOINT). `--semitones S` first moves the voice's pitch and formants by S
(`synctalk.audio.shift_voice`): the training's voice variants, `aud_whisper_voice+3.npy` and the like
beside `aud_whisper.npy` (docs/training-guide.md). The output is written atomically; bad input exits
with code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from config import settings
from synctalk import audio as audio_io
from synctalk import features as speech_features
from synctalk.errors import one_line
from synctalk.fileio import atomic_path
from synctalk.timing import SAMPLE_RATE

REPO_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("audio_features")

DEFAULTS = {
    "mode": settings.audio.feature_mode,
    "device": "cpu",
    "ave_checkpoint": settings.models.ave_checkpoint,
    "threads": settings.models.threads,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("audio", help="input audio or video file (anything PyAV/FFmpeg decodes)")
    p.add_argument("out", help="output .npy path")
    p.add_argument("--mode", choices=["whisper", "ave"], default=DEFAULTS["mode"],
                   help="feature mode (default: settings.audio.feature_mode, 'whisper')")
    p.add_argument("--device", default=DEFAULTS["device"], help="torch device: cpu, cuda, cuda:N, mps")
    p.add_argument("--ave-checkpoint", default=DEFAULTS["ave_checkpoint"],
                   help="AVE encoder checkpoint for --mode ave (default: SYNCTALK_MODELS__AVE_CHECKPOINT)")
    p.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch intra-op threads")
    p.add_argument("--semitones", type=float, default=0.0,
                   help="move the voice's pitch and formants by this many semitones first (voice variants)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        torch.set_num_threads(args.threads)
        out = Path(args.out)
        if out.suffix != ".npy":
            raise ValueError(f"output must be a .npy file, got {out}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {args.device} requested but CUDA is not available")
        audio = audio_io.load_audio(args.audio, sr=SAMPLE_RATE)
        if args.semitones:
            audio = audio_io.shift_voice(audio, args.semitones)
        feats = speech_features.extract_features(
            audio, args.mode, device=args.device, ave_checkpoint=args.ave_checkpoint,
            config=settings.audio.feature_config(), progress=not args.quiet,
        )
        with atomic_path(out) as tmp:
            np.save(tmp, feats.astype(np.float32, copy=False))
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2
    print(f"wrote {out} {list(feats.shape)} ({len(audio) / speech_features.SAMPLE_RATE:.2f} s of audio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
