"""Package a trained avatar into the small, committed form the server plays (`demo_avatar/`).

    python scripts/package_demo_avatar.py --name demo [--frames 250] [--out demo_avatar]

Copies the first N source frames (re-encoded JPEG), their crop boxes, the chosen U-Net checkpoint in
fp16 and the evaluation report into `<out>/dataset/<name>/` and `<out>/checkpoint/<name>/`, the layout
`services/models.py` discovers. Written into a temp folder and moved into place at the end.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from unet_328 import load_unet_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def pick_checkpoint(folder: Path, wanted: str | None) -> Path:
    """`<wanted>.pth`, or the highest numbered `<epoch>.pth` in `folder`."""
    if wanted:
        return folder / f"{wanted}.pth"
    numbered = sorted((int(p.stem), p) for p in folder.glob("*.pth") if p.stem.isdigit())
    if not numbered:
        raise SystemExit(f"error: no <epoch>.pth checkpoint in {folder}; train the avatar first")
    return numbered[-1][1]


def main() -> None:
    # defaults
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="demo")
    parser.add_argument("--dataset_root", type=Path, default=REPO / "dataset")
    parser.add_argument("--checkpoint_root", type=Path, default=REPO / "checkpoint")
    parser.add_argument("--checkpoint", default=None, help="epoch to ship (default: latest)")
    parser.add_argument("--eval_dir", type=Path, default=None, help="default: result/eval/NAME")
    parser.add_argument("--frames", type=int, default=250, help="source frames to ship (ping-pong loop)")
    parser.add_argument("--jpeg_quality", type=int, default=88)
    parser.add_argument("--out", type=Path, default=REPO / "demo_avatar")
    args = parser.parse_args()

    src = args.dataset_root / args.name
    ckpt = pick_checkpoint(args.checkpoint_root / args.name, args.checkpoint)
    model, meta = load_unet_checkpoint(ckpt)
    boxes = np.load(src / "crop_boxes.npy")
    n = min(args.frames, len(boxes))

    tmp = Path(tempfile.mkdtemp(prefix=".demo_pkg", dir=args.out.parent))
    try:
        ds = tmp / "dataset" / args.name
        (ds / "full_body_img").mkdir(parents=True)
        for i in range(n):
            img = cv2.imread(str(src / "full_body_img" / f"{i}.jpg"))
            if img is None:
                raise SystemExit(f"error: cannot read {src / 'full_body_img' / f'{i}.jpg'}")
            cv2.imwrite(str(ds / "full_body_img" / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, args.jpeg_quality])
        np.save(ds / "crop_boxes.npy", boxes[:n].astype(np.int32))
        if (src / "report.json").is_file():
            shutil.copy2(src / "report.json", ds / "preprocess_report.json")
        half = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        meta = {**meta, "packaged_from": ckpt.name, "weights_dtype": "float16"}
        save_checkpoint(tmp / "checkpoint" / args.name / ckpt.name, half, meta)
        eval_dir = args.eval_dir or (REPO / "result" / "eval" / args.name)
        for name in ("report.json", "report.html"):
            if (eval_dir / name).is_file():
                (tmp / "eval").mkdir(exist_ok=True)
                shutil.copy2(eval_dir / name, tmp / "eval" / name)
        for keep in ("README.md", "build_info.json"):  # hand-written files survive a re-package
            if (args.out / keep).is_file():
                shutil.copy2(args.out / keep, tmp / keep)
        if args.out.exists():
            shutil.rmtree(args.out)
        tmp.rename(args.out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(json.dumps({"out": str(args.out), "frames": n, "checkpoint": ckpt.name, "bytes": size}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
