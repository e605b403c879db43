"""Avatar and audio builders shared by the benchmarks: a temporary dataset with a fixed lower-face box and
a randomly initialised checkpoint (speed does not depend on the weights), and a WAV of a given length.

Media: the shared clips (`../shared/media`) when they exist, else the repository's synthetic fixture clip,
else generated frames and a synthetic vowel-like signal. PyAV is imported only to decode a video, so a
benchmark that builds from generated frames runs where PyAV is not installed (e.g. a lent GPU machine).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from synctalk import audio as audio_io
from synctalk import face as face_crop
from unet_328 import build_unet, save_checkpoint
from utils import get_size

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "media"


def default_audio() -> Path | None:
    """The shared English speech clip, or None when ../shared is absent."""
    path = SHARED / "audio" / "musetalk_eng.wav"
    return path if path.is_file() else None


def default_video() -> Path | None:
    """The shared May clip, else the repository's synthetic fixture clip, else None."""
    for path in (SHARED / "video" / "real3dportrait_May_5s.mp4", REPO / "tests" / "fixtures" / "synth_fixture.mp4"):
        if path.is_file():
            return path
    return None


def speech(path: Path | None, seconds: float) -> np.ndarray:
    """Exactly `seconds` of 16 kHz float32 audio: `path` looped if it is shorter, or a synthetic
    vowel-like signal when `path` is None (then no decoder is needed)."""
    if path is not None:
        audio = audio_io.load_audio(str(path), sr=16000)
        reps = int(np.ceil(seconds * 16000 / len(audio)))
        audio = np.tile(audio, reps)[: int(seconds * 16000)]
    else:
        t = np.arange(int(seconds * 16000)) / 16000
        env = 0.5 * (1 + np.sin(2 * np.pi * 3 * t))
        audio = (0.3 * env * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 700 * t)).astype(np.float32)
    return audio


def make_audio(path: Path | None, seconds: float, out_dir: Path) -> Path:
    """`out_dir`/bench_audio.wav holding `speech(path, seconds)`."""
    out = out_dir / "bench_audio.wav"
    audio_io.write_wav(out, speech(path, seconds), 16000)
    return out


def make_avatar(video: Path | None, root: Path, size: str, mode: str, max_frames: int = 250) -> tuple[Path, Path]:
    """dataset/<bench>/ (frames, crop_boxes.npy, crops cache) and a random checkpoint of `size`; the
    first `max_frames` frames of `video`, or 125 generated 512x512 frames when `video` is None."""

    ds = root / "dataset" / "bench"
    (ds / "full_body_img").mkdir(parents=True, exist_ok=True)
    frames = []
    if video is not None:
        import av  # only to decode a clip (see the module docstring)

        with av.open(str(video)) as c:
            for frame in c.decode(video=0):
                frames.append(frame.to_ndarray(format="bgr24"))
                if len(frames) >= max_frames:
                    break
    else:
        rng = np.random.default_rng(0)
        base = cv2.GaussianBlur(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), (0, 0), 8)
        frames = [np.roll(base, i, axis=1) for i in range(125)]
    h, w = frames[0].shape[:2]
    side = int(0.4 * min(h, w))
    x1, y1 = (w - side) // 2, int(0.45 * h)
    y1 = min(y1, h - side)
    boxes = np.tile(np.array([x1, y1, x1 + side, y1 + side], np.int32), (len(frames), 1))
    crop = get_size(size).crop
    crops = np.empty((len(frames), crop, crop, 3), np.uint8)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(ds / "full_body_img" / f"{i}.jpg"), frame)
        crops[i] = face_crop.crop_face(frame, boxes[i], crop)
    np.save(ds / "crop_boxes.npy", boxes)
    np.save(ds / f"crops_{crop}.npy", crops)
    torch.manual_seed(0)
    ckpt = root / "checkpoint" / "bench" / "1.pth"
    save_checkpoint(ckpt, build_unet(mode, size).state_dict(), {"kind": "unet", "mode": mode, "size": size, "epoch": 1})
    return ds, ckpt
