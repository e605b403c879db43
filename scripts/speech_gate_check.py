"""How the speech gate splits a dataset's track, checked against its aligned silences (utterances.json,
e.g. GRID's word alignments): the share of silent frames it calls speech, of spoken frames it calls
pauses, and how often the few-frames-at-a-time calls of the streaming paths agree with one pass.

    python scripts/speech_gate_check.py dataset/grid_s1        # prints one JSON line per gate
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from config import load_settings
from synctalk.audio import AudioError, SpeechGate, load_audio
from synctalk.dataset import DatasetError, aligned_silence_mask
from synctalk.timing import FPS, SAMPLE_RATE

FRAME = SAMPLE_RATE // FPS


def chunked(gate: SpeechGate, audio: np.ndarray, n: int, step: int = 13) -> np.ndarray:
    """`gate.speaking_at` asked `step` frames at a time, as the streaming paths ask it."""
    return np.concatenate([gate.speaking_at(audio, min(step, n - first), first) for first in range(0, n, step)])


def check(gate: SpeechGate, audio: np.ndarray, silent: np.ndarray) -> dict:
    """The gate's figures against the aligned silence mask `silent`."""
    n = len(silent)
    said = gate.speaking(audio, n)
    return {"silences_called_speech": round(float(said[silent].mean()), 3),
            "words_called_pause": round(float((~said[~silent]).mean()), 3),
            "chunked_agreement": round(float((chunked(gate, audio, n) == said).mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_dir", type=Path)
    args = p.parse_args(argv)
    try:
        audio = load_audio(args.dataset_dir / "aud.wav")
        n = len(audio) // FRAME
        silent = aligned_silence_mask(args.dataset_dir, n)
    except (AudioError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if silent is None:
        print(f"error: {args.dataset_dir} has no aligned silences (utterances.json)", file=sys.stderr)
        return 2
    configured = load_settings().speech_gate() or SpeechGate()
    for name, gate in (("level", SpeechGate(configured.threshold_db, configured.hangover_ms)),
                       ("configured", configured)):
        print(json.dumps({"gate": name, **vars(gate), **check(gate, audio, silent)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
