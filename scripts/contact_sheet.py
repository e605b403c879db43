"""A contact sheet of an avatar on its held-out utterances: real above generated, speech and silence
frames, each with a mouth zoom.

    python scripts/contact_sheet.py --name demo [--checkpoint EPOCH] [--out docs/images/demo_contact_sheet.jpg]

Generated frames are the evaluation's cross-reference rendering (evaluate.py): the held-out frame driven
by its own audio, with the avatar's most closed-mouth training frame as the U-Net's reference, so the real
mouth never leaks in. Columns: the held-out frames where the real mouth is most open (speech) and frames
inside aligned silences (when the dataset has them). Rows: real crop, generated crop, real mouth zoom,
generated mouth zoom.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

import evaluate as ev
from config import settings
from synctalk import metrics as M
from synctalk.dataset import aligned_silence_mask
from synctalk.face import mouth_slices
from synctalk.fileio import write_bytes_atomic
from synctalk.landmarks import FaceMesh

REPO = Path(__file__).resolve().parents[1]
CELL = 192  # px per cell


def pick_columns(av: ev.Avatar, mesh: FaceMesh, speech: int, silence: int) -> tuple[list[int], list[int]]:
    """(held-out frames with the widest real mouth, held-out frames inside aligned silences)."""
    idx = av.held_out
    lms = np.stack([mesh(av.frame(int(i))) for i in idx])
    opening = np.nan_to_num(M.mouth_opening(lms), nan=-1.0)
    order = np.argsort(-opening, kind="stable")
    chosen: list[int] = []
    for k in order:  # spread the speech columns over the utterances (at least 10 frames apart)
        if all(abs(int(idx[k]) - c) >= 10 for c in chosen):
            chosen.append(int(idx[k]))
        if len(chosen) == speech:
            break
    silent = aligned_silence_mask(av.dataset_dir, int(idx.max()) + 1)
    quiet = [int(i) for i in idx if silent is not None and silent[i]]
    picks = [quiet[int(p)] for p in np.linspace(0, len(quiet) - 1, silence).round()] if quiet else []
    return chosen, sorted(set(picks))


def mouth_zoom(crop: np.ndarray) -> np.ndarray:
    """The mouth region of a crop (synctalk.face.MOUTH_BOX), scaled to a cell."""
    rows, cols = mouth_slices(crop.shape[0])
    return cv2.resize(crop[rows, cols], (CELL, CELL), interpolation=cv2.INTER_CUBIC)


def sheet(av: ev.Avatar, frames: list[int], labels: list[str], closed: int) -> np.ndarray:
    """The sheet image (BGR): one column per frame, four rows."""
    targets = np.asarray(frames, dtype=np.int64)
    windows = av.engine.audio_windows(av.gated, targets, speaking=av.speaking)
    gen = ev.render_with_reference(av.engine, windows, targets, np.full(len(targets), closed))
    real = np.stack([av.crop_of(int(i)) for i in targets])
    cell = lambda c: cv2.resize(c, (CELL, CELL), interpolation=cv2.INTER_CUBIC)  # noqa: E731
    rows = [[cell(c) for c in real], [cell(c) for c in gen], [mouth_zoom(c) for c in real],
            [mouth_zoom(c) for c in gen]]
    names = ["real", "generated", "real mouth", "generated mouth"]
    head = np.full((24, CELL * len(frames) + 170, 3), 255, np.uint8)
    for k, text in enumerate(labels):
        cv2.putText(head, text, (170 + k * CELL + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    out = [head]
    for name, row in zip(names, rows):
        side = np.full((CELL, 170, 3), 255, np.uint8)
        cv2.putText(side, name, (6, CELL // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        out.append(np.hstack([side, *row]))
    return np.vstack(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="demo")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--speech", type=int, default=5, help="speech columns")
    p.add_argument("--silence", type=int, default=2, help="silence columns")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "demo_contact_sheet.jpg")
    args = p.parse_args(argv)
    paths = settings.paths
    try:
        av = ev.load_avatar(args.name, args.checkpoint, paths.dataset_root, paths.checkpoint_root,
                            paths.syncnet_root, "onnx", "cpu", paths.avatar_roots()[1:])
    except ev.EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mesh = FaceMesh()
    try:
        closed, _ = ev.closed_reference(av, mesh)
        speech, silence = pick_columns(av, mesh, args.speech, args.silence)
    finally:
        mesh.close()
    frames = speech + silence
    labels = [f"speech #{f}" for f in speech] + [f"silence #{f}" for f in silence]
    image = sheet(av, frames, labels, closed)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OSError(f"cannot encode {args.out}")
    write_bytes_atomic(args.out, jpeg.tobytes())
    print(json.dumps({"out": str(args.out), "frames": frames, "closed_reference": closed}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
