"""A dataset's words said again by a TTS voice at the recorded times: a dubbed voice variant for training.

    python data_utils/tts_voice.py DATASET_DIR [--engine piper|espeak] [--voice NAME] [--tag TAG] [-q]

Reads the word timings of `DATASET_DIR/utterances.json` (`words`: [start_s, end_s, word] per utterance;
`scripts/grid_s1_dataset.py` writes them from GRID's word alignments), speaks every distinct word once
with the engine (Piper without its random noise, so a rerun gives the same track), trims and
time-stretches each spoken word into its recorded span (`synctalk.audio.dub_words`) and writes
`aud_voice_<tag>.wav` (to listen to) and its features `aud_whisper_voice_<tag>.npy`, one row per video
frame like `aud_whisper.npy`. `train_328.py --voice_aug P` then draws from it like from the pitch-shifted
variants (docs/training-guide.md). Outputs are written atomically; bad input exits with code 2.
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
from synctalk.dataset import DatasetError, aligned_words
from synctalk.errors import one_line
from synctalk.fileio import atomic_path
from synctalk.metrics import pearson
from synctalk.timing import SAMPLE_RATE
from synctalk.tts import EspeakTTS, PiperTTS, TTSService, TTSUnavailable

log = logging.getLogger("tts_voice")


def make_engine(name: str, voice: str | None) -> TTSService:
    """The TTS engine `name` as the server configures it (`settings.tts`); Piper without its noise."""
    tts = settings.tts
    if name == "piper":
        return PiperTTS(tts.piper_model_path, tts.piper_config_path, voice or tts.default_voice, None,
                        noise_scale=0.0, noise_w_scale=0.0)
    return EspeakTTS(voice or tts.espeak_voice, max_text_chars=None)


def speak_words(engine: TTSService, texts: set[str], progress: bool) -> dict[str, np.ndarray]:
    """Each distinct word spoken once: text -> 16 kHz float32 audio."""
    spoken = {}
    for k, text in enumerate(sorted(texts), 1):
        spoken[text] = engine.synthesize(text).to_16k()
        if progress and k % 10 == 0:
            log.info("spoke %d/%d words", k, len(texts))
    return spoken


def dub(dataset_dir: Path, engine: TTSService, tag: str, progress: bool = True) -> tuple[Path, Path]:
    """Write `aud_voice_<tag>.wav` and `aud_whisper_voice_<tag>.npy` in `dataset_dir`; returns both paths."""
    words = aligned_words(dataset_dir)
    recorded = dataset_dir / "aud.wav"
    if not recorded.is_file():
        raise DatasetError(f"{recorded} not found (preprocess the video first: data_utils/process.py)")
    recorded_audio = audio_io.load_audio(str(recorded), sr=SAMPLE_RATE)
    n_samples = len(recorded_audio)
    last = max(end for _, end, _ in words)
    if last * SAMPLE_RATE > n_samples + SAMPLE_RATE:
        raise DatasetError(f"the words run to {last:.1f} s but {recorded} is {n_samples / SAMPLE_RATE:.1f} s")
    spoken = speak_words(engine, {w for _, _, w in words}, progress)
    track = audio_io.dub_words([(a, b, spoken[w]) for a, b, w in words], n_samples)
    wav_path, feat_path = dataset_dir / f"aud_voice_{tag}.wav", dataset_dir / f"aud_whisper_voice_{tag}.npy"
    audio_io.write_wav(wav_path, track)
    feats = speech_features.extract_features(track, "whisper", device="cpu",
                                             config=settings.audio.feature_config(), progress=progress)
    with atomic_path(feat_path) as tmp:
        np.save(tmp, feats.astype(np.float32, copy=False))
    log.info("%d words (%d distinct) dubbed by %s into %s", len(words), len(spoken), engine.name, feat_path)
    log.info("loudness envelope correlates %.2f with the recorded voice's (the words' timing)",
             pearson(audio_io.speech_envelope(track), audio_io.speech_envelope(recorded_audio)))
    return wav_path, feat_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset_dir", type=Path, help="dataset/NAME with utterances.json words and aud.wav")
    p.add_argument("--engine", choices=["piper", "espeak"], default="piper")
    p.add_argument("--voice", help="engine voice (default: settings.tts.default_voice / espeak_voice)")
    p.add_argument("--tag", help="name of the variant in the file names (default: the engine's name)")
    p.add_argument("--threads", type=int, default=settings.models.threads, help="torch intra-op threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, warnings only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    tag = args.tag or args.engine
    if not tag.replace("-", "").replace("_", "").isalnum():
        sys.stderr.write(f"error: --tag must be letters, digits, '-' or '_', got {tag!r}\n")
        return 2
    try:
        torch.set_num_threads(args.threads)
        wav_path, feat_path = dub(args.dataset_dir, make_engine(args.engine, args.voice), tag, not args.quiet)
    except (DatasetError, TTSUnavailable, ValueError, OSError) as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")
        return 2
    print(f"wrote {wav_path} and {feat_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
