"""Build a training video of separate utterances from the GRID s1 clips, with whole held-out sentences.

    python scripts/grid_s1_dataset.py [--source ../shared/media/video/grid-s1] [--out dataset/grid_s1]
                                      [--held_out 10]

Concatenates the main-session clips (the README's second-session clips are left out: another shirt,
background and framing) into `OUT/grid_s1.mp4` (H.264 25 fps, AAC 16 kHz mono; each clip's audio cut or
padded to exactly its frames x 640 samples, so clips stay aligned) and writes `OUT/utterances.json`:
every clip's frame range with its silences from the word alignments (`sil` spans) and its words
([start_s, end_s, word] on the track: `data_utils/tts_voice.py` dubs them in another voice), and the `--held_out` whole utterances (evenly spread, deterministic) that
`synctalk.dataset.dataset_split` then keeps out of training. Next: `python data_utils/process.py
OUT/grid_s1.mp4`.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from synctalk.fileio import atomic_path, write_text_atomic
from synctalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger("grid_s1_dataset")

SECOND_SESSION = {  # from the source README: another session, not the same look
    "bbbs5s", "bgbozp", "brim1a", "bwbn5a", "bwitzp", "lbak2p", "lbbe1s", "lbbrzp", "lbiq3a", "lgbgzp",
    "lgbm5a", "lray6p", "lray7a", "lrbe8p", "lwbf5a", "lwiy7s", "pbbc7a", "pbbp2n", "pbbv6n", "pgbe5a",
    "pgbrzn", "pgby7a", "pgikzp", "pgix9a", "prwx9a", "pwbq4n", "sbag8n", "sgiczp", "srab1s", "srabzn",
    "swiozn",
}


def clip_names(source: Path) -> list[str]:
    """The clip names of `manifest.csv` (sorted), second-session clips left out."""
    with (source / "manifest.csv").open() as f:
        names = sorted(Path(row["file"]).stem for row in csv.DictReader(f))
    return [n for n in names if n not in SECOND_SESSION]


def decode_clip(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """(RGB frames, 16 kHz mono float32 audio cut/padded to len(frames) x SAMPLES_PER_FRAME) of one clip."""
    frames: list[np.ndarray] = []
    chunks: list[np.ndarray] = []
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
    with av.open(str(path)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1))
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    want = len(frames) * SAMPLES_PER_FRAME
    return frames, np.pad(audio, (0, max(0, want - len(audio))))[:want].astype(np.float32)


ALIGN_UNITS_PER_FRAME = 1000  # GRID .align times are in 1/25000 s


def aligned_silences(source: Path, name: str, offset: int, n_frames: int) -> list[list[int]]:
    """The `sil` spans of a clip's word alignment as [start, end) frame ranges (rounded inwards) shifted
    by `offset`; [] when the clip has no .align file."""
    path = source / "align" / f"{name}.align"
    if not path.is_file():
        return []
    spans = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "sil":
            a = -(-int(parts[0]) // ALIGN_UNITS_PER_FRAME)  # ceil
            b = min(int(parts[1]) // ALIGN_UNITS_PER_FRAME, n_frames)
            if b > a:
                spans.append([offset + a, offset + b])
    return spans


def aligned_words(source: Path, name: str, offset: int) -> list[list]:
    """The spoken words of a clip's word alignment as [start_s, end_s, word] on the dataset's audio track
    (the clip starts at frame `offset`); [] when the clip has no .align file."""
    path = source / "align" / f"{name}.align"
    if not path.is_file():
        return []
    units_per_s = ALIGN_UNITS_PER_FRAME * FPS
    words = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] not in ("sil", "sp"):
            words.append([round(offset / FPS + int(parts[0]) / units_per_s, 4),
                          round(offset / FPS + int(parts[1]) / units_per_s, 4), parts[2]])
    return words


def held_out_names(names: list[str], count: int) -> list[str]:
    """`count` utterances spread evenly over the list (deterministic), never the first or the last."""
    if count <= 0:
        return []
    picks = np.linspace(0, len(names) - 1, count + 2).round().astype(int)[1:-1]
    return [names[i] for i in sorted(set(picks.tolist()))]


def build(source: Path, out: Path, held_out: int) -> Path:
    """Write OUT/<name>.mp4 and OUT/utterances.json; returns the video path."""
    names = clip_names(source)
    video_path = out / f"{out.name}.mp4"
    out.mkdir(parents=True, exist_ok=True)
    utterances, start, samples = [], 0, 0
    with atomic_path(video_path) as tmp:
        with av.open(str(tmp), "w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=FPS)
            vs.pix_fmt, vs.options = "yuv420p", {"crf": "16", "preset": "medium"}
            aus = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            for k, name in enumerate(names):
                frames, audio = decode_clip(source / "video" / f"{name}.mpg")
                if k == 0:
                    vs.height, vs.width = frames[0].shape[:2]
                for img in frames:
                    vf = av.VideoFrame.from_ndarray(img, format="rgb24")
                    vf.pts, vf.time_base = start, Fraction(1, FPS)
                    container.mux(vs.encode(vf))
                    start += 1
                for s in range(0, len(audio), 1024):
                    block = audio[s:s + 1024][None]
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="flt", layout="mono")
                    af.sample_rate, af.pts, af.time_base = SAMPLE_RATE, samples, Fraction(1, SAMPLE_RATE)
                    container.mux(aus.encode(af))
                    samples += block.shape[1]
                utterances.append({"name": name, "start": start - len(frames), "end": start,
                                   "silences": aligned_silences(source, name, start - len(frames), len(frames)),
                                   "words": aligned_words(source, name, start - len(frames))})
                log.info("%3d/%d %s: %d frames", k + 1, len(names), name, len(frames))
            container.mux(vs.encode(None))
            container.mux(aus.encode(None))
    held = held_out_names(names, held_out)
    write_text_atomic(out / "utterances.json", json.dumps({
        "source": str(source), "utterances": utterances, "held_out": held,
        "note": "GRID corpus s1 (Cooke et al. 2006, CC BY 4.0, doi 10.5281/zenodo.3625687)"}, indent=1) + "\n")
    log.info("%s: %d utterances, %d frames; held out: %s", video_path, len(utterances), start, ", ".join(held))
    return video_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=Path("../shared/media/video/grid-s1"))
    p.add_argument("--out", type=Path, default=Path("dataset/grid_s1"))
    p.add_argument("--held_out", type=int, default=10, help="whole utterances kept out of training")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.source / "manifest.csv").is_file():
        sys.stderr.write(f"error: {args.source}/manifest.csv not found\n")
        return 2
    print(build(args.source, args.out, args.held_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
