"""Package a trained avatar into the small, committed form the server plays and the evaluation reads
(`demo_avatar/`).

    python scripts/package_demo_avatar.py --source dataset/grid_s1 --checkpoint PATH.pth [--name demo]
        [--idle_utterances 4] [--attribution TEXT] [--eval_dir result/eval/grid_s1] [--out demo_avatar]

With an `utterances.json` in the source dataset, the package keeps whole utterances, renumbered from 0:
the first `--idle_utterances` training utterances (the frames the idle loop and the speech walk over)
followed by every held-out utterance (so `evaluate.py --name demo` measures held-out self-reconstruction
on the shipped avatar). Without one, the first `--frames` frames are kept. For each kept frame: the source
frame (re-encoded JPEG), its crop box, its audio-feature row and its 40 ms of `aud.wav`; plus the U-Net
checkpoint in fp16, `avatar.json` (attribution, idle mode) and the evaluation report. Written into a temp
folder and moved into place at the end; a hand-written README.md in OUT survives.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf

from synctalk.dataset import FEATURE_FILES, read_utterances
from synctalk.timing import SAMPLE_RATE, SAMPLES_PER_FRAME
from unet_328 import load_unet_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def kept_utterances(source: Path, idle: int) -> tuple[list[dict], list[str]] | None:
    """(utterances to keep, in package order, with their silences; held-out names) or None without
    utterances.json."""
    found = read_utterances(source)
    if found is None:
        return None
    _, held = found
    raw = json.loads((source / "utterances.json").read_text())["utterances"]
    training = [u for u in raw if u["name"] not in held][:idle]
    return training + [u for u in raw if u["name"] in held], held


def renumber(utterances: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """(source frame index of each package frame, the utterances with package frame ranges)."""
    frames, out, start = [], [], 0
    for u in utterances:
        n = u["end"] - u["start"]
        frames.extend(range(u["start"], u["end"]))
        shift = start - u["start"]
        out.append({"name": u["name"], "start": start, "end": start + n,
                    "silences": [[a + shift, b + shift] for a, b in u.get("silences", [])]})
        start += n
    return np.asarray(frames, dtype=np.int64), out


def write_dataset(src: Path, ds: Path, frames: np.ndarray, quality: int) -> None:
    """Frames, crop boxes, feature rows and audio of `frames` (source indices) into `ds`, renumbered."""
    (ds / "full_body_img").mkdir(parents=True)
    for k, i in enumerate(frames):
        img = cv2.imread(str(src / "full_body_img" / f"{int(i)}.jpg"))
        if img is None:
            raise SystemExit(f"error: cannot read {src / 'full_body_img' / f'{int(i)}.jpg'}")
        cv2.imwrite(str(ds / "full_body_img" / f"{k}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    np.save(ds / "crop_boxes.npy", np.load(src / "crop_boxes.npy")[frames].astype(np.int32))
    for name in FEATURE_FILES.values():
        if (src / name).is_file():
            np.save(ds / name, np.load(src / name, mmap_mode="r")[frames])
    audio, sr = sf.read(str(src / "aud.wav"), dtype="int16")
    if sr != SAMPLE_RATE:
        raise SystemExit(f"error: {src / 'aud.wav'} is {sr} Hz, expected {SAMPLE_RATE}")
    audio = np.pad(audio, (0, max(0, (int(frames.max()) + 1) * SAMPLES_PER_FRAME - len(audio))))
    pieces = [audio[i * SAMPLES_PER_FRAME:(i + 1) * SAMPLES_PER_FRAME] for i in frames]
    sf.write(str(ds / "aud.wav"), np.concatenate(pieces), SAMPLE_RATE, subtype="PCM_16")


def write_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    """The checkpoint with fp16 weights in `out_dir` (same file name)."""
    model, meta = load_unet_checkpoint(ckpt)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    path = out_dir / ckpt.name
    save_checkpoint(path, half, {**meta, "packaged_from": str(ckpt.name), "weights_dtype": "float16"})
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=Path, required=True, help="the trained avatar's dataset folder")
    p.add_argument("--checkpoint", type=Path, required=True, help="the U-Net checkpoint to ship (<epoch>.pth)")
    p.add_argument("--name", default="demo", help="the packaged avatar's name")
    p.add_argument("--idle_utterances", type=int, default=4, help="training utterances kept for the loop")
    p.add_argument("--frames", type=int, default=250, help="frames kept when there is no utterances.json")
    p.add_argument("--attribution", default=None, help="credit line (avatar.json, README, web page)")
    p.add_argument("--idle", default="rendered", choices=["recorded", "rendered"])
    p.add_argument("--eval_dir", type=Path, default=None, help="evaluation report folder to include")
    p.add_argument("--jpeg_quality", type=int, default=90)
    p.add_argument("--out", type=Path, default=REPO / "demo_avatar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src = args.source
    if not (src / "full_body_img").is_dir() or not args.checkpoint.is_file():
        print(f"error: need {src}/full_body_img and {args.checkpoint}", file=sys.stderr)
        return 2
    kept = kept_utterances(src, args.idle_utterances)
    n_src = len(np.load(src / "crop_boxes.npy"))
    frames, utts = renumber(kept[0]) if kept else (np.arange(min(args.frames, n_src)), [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pkg_", dir=args.out.parent))
    try:
        ds = tmp / "dataset" / args.name
        write_dataset(src, ds, frames, args.jpeg_quality)
        if kept:
            (ds / "utterances.json").write_text(json.dumps({
                "source": f"{src.name} ({len(utts)} of its utterances, renumbered)", "utterances": utts,
                "held_out": kept[1]}, indent=1) + "\n")
        (ds / "avatar.json").write_text(json.dumps({"attribution": args.attribution, "idle": args.idle},
                                                   indent=1) + "\n")
        ckpt = write_checkpoint(args.checkpoint, tmp / "checkpoint" / args.name)
        for name in ("report.json", "report.html"):
            if args.eval_dir and (args.eval_dir / name).is_file():
                (tmp / "eval").mkdir(exist_ok=True)
                shutil.copy2(args.eval_dir / name, tmp / "eval" / name)
        if (args.out / "README.md").is_file():
            shutil.copy2(args.out / "README.md", tmp / "README.md")
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(json.dumps({"out": str(args.out), "frames": len(frames), "utterances": len(utts),
                      "checkpoint": ckpt.name, "bytes": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
