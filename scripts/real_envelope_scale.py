"""The recorded speaker's own mouth-opening vs speech-envelope correlation at several pause shares: the scale
for a cross-driven file's whole-file figure (docs/evaluation.md, "Real envelope correlation at a pause share").

    python scripts/real_envelope_scale.py dataset/NAME [--shares 0 0.05 0.1 0.2 0.3] [--held_out]

Uses every frame of the recording (or, with --held_out, the held-out frames only): openings from the
dataset's landmarks, the envelope of `aud.wav`, pauses as `evaluate.py` finds them (aligned silences of at
least 300 ms when `utterances.json` has them). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

import evaluate
from synctalk import metrics as M
from synctalk.audio import envelope_frames, load_audio
from synctalk.dataset import DatasetError, check_dataset, dataset_split, frame_openings

log = logging.getLogger("real_envelope_scale")


def scale(dataset_dir: Path, shares: list[float], held_out: bool) -> dict:
    """{"frames", "pause_share", "whole", "speech", "at_share": {share: corr}} of the recording."""
    audio = load_audio(str(dataset_dir / "aud.wav"))
    n = min(envelope_frames(len(audio)), len(list((dataset_dir / "landmarks").glob("*.lms"))))
    idx = dataset_split(dataset_dir, n, "val") if held_out else np.arange(n)
    log.info("%d frames: reading landmarks", len(idx))
    opening = frame_openings(dataset_dir, idx, "the envelope scale")
    envelope, silent, _ = evaluate.held_out_audio(dataset_dir, audio, idx)
    return {"dataset": str(dataset_dir), "frames": int(len(idx)), "held_out": held_out,
            "pause_share": round(float(silent.mean()), 4),
            "whole": round(M.envelope_correlation(opening, envelope), 4),
            "speech": round(M.envelope_correlation(opening, envelope, ~silent), 4),
            "at_share": {f"{s:g}": round(M.envelope_correlation_at_pause_share(opening, envelope, silent, s), 4)
                         for s in shares}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_dir", help="dataset/NAME (made by data_utils/process.py)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3],
                   help="pause shares in [0, 1) to report the correlation at")
    p.add_argument("--held_out", action="store_true", help="the held-out frames only (as evaluate.py)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bad = [s for s in args.shares if not 0.0 <= s < 1.0]
    if bad:
        p.error(f"--shares must be in [0, 1), got {bad[0]:g}")
    try:
        result = scale(check_dataset(args.dataset_dir), args.shares, args.held_out)
    except (DatasetError, OSError) as exc:
        print(f"real_envelope_scale: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
