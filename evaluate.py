"""Evaluate a trained avatar with numbers you can trust: held-out self-reconstruction under
cross-reference (the U-Net's reference input is another frame, so the real mouth cannot leak in),
baselines in the same run (copy-reference, mean training crop, the real video), a verdict, per-file
cross-driven lip-sync on foreign audio, and SyncNet numbers only when the SyncNet is trustworthy.

    python evaluate.py --name NAME [--checkpoint N] [--audio FILE ...] [--compare NAME2|CKPT2] [--strict]

Writes `result/eval/NAME/report.json` and a self-contained `report.html` (plots and frame strips
embedded) and prints a summary whose first line is the verdict. Metric definitions:
docs/evaluation.md and `synctalk/metrics.py`.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from config import settings
from syncnet_328 import load_syncnet_checkpoint
from synctalk import face as face_crop
from synctalk import landmarks
from synctalk import metrics as M
from synctalk.audio import load_audio, long_runs, segments_to_mask, silence_segments, speech_envelope
from synctalk.avatar import AvatarError, AvatarRegistry, AvatarRoot
from synctalk.dataset import FEATURE_FILES, DatasetError, aligned_silence_mask, dataset_split, describe_split
from synctalk.engine import EngineError, LipSyncEngine
from synctalk.fileio import write_text_atomic
from synctalk.timing import FPS, SAMPLE_RATE
from unet_328 import CheckpointError
from utils import audio_window

log = logging.getLogger("evaluate")

SR = SAMPLE_RATE
VSHIFT = 15  # SyncNet offset search: +-15 frames (syncnet_python's default)
CHUNK = 16  # frames rendered and measured per step
STRIP_FRAMES = 6  # frames per strip in the report
CLOSED_SAMPLE = 60  # training frames searched for the closed-mouth reference (and the closed range)
MEAN_CROP_FRAMES = 200  # training crops averaged for the mean-crop baseline
SILENCE_MS = 300.0  # silences at least this long must show a closed mouth
SILENCE_EDGE_MS = 120.0  # "interior" closure leaves out this much at each end of a silence (lips move ahead of speech)
EXIT_UNUSABLE = 3  # exit code of --strict when the verdict is UNUSABLE

POLICIES = {
    "closed": "cross-reference: one fixed closed-mouth training frame",
    "random": "cross-reference: a random training frame per held-out frame (seeded)",
    "same": "diagnostic: reference = target, upper bound (the real mouth leaks into the input)",
}
DEFAULT_POLICIES = ("closed", "random", "same")
SYNC_KEYS = ("sync_offset", "sync_confidence", "sync_min_dist")

NOTES = [
    "Held-out frames were never trained on (see 'split'); each is rendered from its own audio and compared "
    "with the real frame.",
    "Cross-reference: the U-Net's reference input is another frame (a fixed closed-mouth training frame, "
    "or a random training frame per held-out frame), so the real mouth shape is not handed to the network. "
    "The 'reference = target' run is a diagnostic upper bound only: it leaks the answer.",
    "Baselines in the same run: copy-reference pastes the reference crop unchanged, mean crop pastes the "
    "mean training crop, real is the real video. A model that does not beat copy-reference on crop PSNR "
    "and mouth-opening correlation is UNUSABLE.",
    "Cross-driven files use the engine's production path (each frame's own crop as reference); each file "
    "has its own row and signed numbers (offset) are never averaged.",
    "LMD uses mediapipe face-mesh lip points (40, each set centred, pixels at crop resolution), not the "
    "68-point FAN mouth points of the literature, so values are not directly comparable to papers.",
    "SyncNet offset/confidence follow joonson/syncnet_python (offsets +-15 frames, confidence = median - "
    "min, LSE-D = min) on this avatar's own SyncNet; they are shown only when its held-out accuracy is at "
    f"least {M.SYNCNET_MIN_ACCURACY}. Positive offset = the audio runs ahead of the picture.",
]


class EvalError(Exception):
    """A problem with the user's input, reported as one `error:` line."""


FaceMesh = landmarks.FaceMesh


# ----------------------------------------------------------------------------------------------
# The avatar: dataset files, checkpoint, engine, SyncNet


def pingpong(start: int, stop: int, count: int) -> np.ndarray:
    """`count` frame indices walking start..stop-1 and back (the video plays forwards then backwards)."""
    span = stop - start
    if span <= 1:
        return np.full(count, start, dtype=np.int64)
    period = 2 * span - 2
    k = np.arange(count) % period
    return start + np.where(k < span, k, period - k)


def runs_of(indices: np.ndarray) -> list[tuple[int, int]]:
    """Positions (start, end) of the runs of consecutive values in a sorted index array."""
    idx = np.asarray(indices)
    if not len(idx):
        return []
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    bounds = [0, *cuts.tolist(), len(idx)]
    return list(zip(bounds[:-1], bounds[1:]))


def not_measurable(accuracy: float | None) -> str:
    """The text shown instead of a SyncNet-derived number when the SyncNet cannot be trusted."""
    acc = "unknown" if accuracy is None or not math.isfinite(accuracy) else f"{accuracy:.2f}"
    return f"not measurable (SyncNet accuracy {acc})"


class SyncJudge:
    """The avatar's own SyncNet: per-frame face and audio embeddings (L2-normalised) and its accuracy."""

    def __init__(self, path: Path, device: str = "cpu"):
        try:
            self.net, meta = load_syncnet_checkpoint(path, device)
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
        self.mode, self.size = meta["mode"], str(meta["size"])
        acc = meta.get("accuracy")
        self.accuracy = float(acc) if acc is not None else None
        self.device, self.path = device, path

    @property
    def trusted(self) -> bool:
        """Held-out accuracy at least `metrics.SYNCNET_MIN_ACCURACY`."""
        return M.syncnet_trusted(self.accuracy)

    def faces(self, crops: np.ndarray) -> np.ndarray:
        """Crops `[B, crop, crop, 3]` BGR uint8 -> face embeddings `[B, D]` (on the model's interior)."""
        b, s = self.net.size.border, self.net.size.inner
        x = torch.from_numpy(np.ascontiguousarray(crops[:, b:b + s, b:b + s])).permute(0, 3, 1, 2)
        with torch.no_grad():
            v = self.net.face_encoder(x.float().div(255.0).to(self.device)).flatten(1)
        return torch.nn.functional.normalize(v, p=2, dim=1).cpu().numpy()

    def audio(self, features: np.ndarray, indices: np.ndarray, batch: int = 64) -> np.ndarray:
        """Audio embeddings `[len(indices), D]` of the 16-frame windows of `features` at `indices`."""
        out = []
        for i in range(0, len(indices), batch):
            win = np.stack([audio_window(features, int(j), self.mode) for j in indices[i:i + batch]])
            with torch.no_grad():
                a = self.net.audio_encoder(torch.from_numpy(win).float().to(self.device)).flatten(1)
            out.append(torch.nn.functional.normalize(a, p=2, dim=1).cpu().numpy())
        return np.concatenate(out)


def sync_status(sync: SyncJudge | None) -> dict:
    """The SyncNet part of the report: path, held-out accuracy, whether its numbers are shown."""
    if sync is None:
        return {"path": None, "accuracy": None, "trusted": False,
                "note": "no SyncNet checkpoint: SyncNet numbers are left out"}
    note = ("" if sync.trusted else
            f"{not_measurable(sync.accuracy)}: below {M.SYNCNET_MIN_ACCURACY}, the SyncNet cannot tell "
            "in-sync from off-sync pairs reliably, so no SyncNet number is shown")
    return {"path": str(sync.path), "accuracy": sync.accuracy, "trusted": sync.trusted, "note": note}


@dataclass
class Avatar:
    """Everything evaluation needs about one avatar at one checkpoint."""

    name: str
    dataset_dir: Path
    checkpoint: Path
    engine: LipSyncEngine
    features: np.ndarray  # [N, ...] the dataset's audio features
    gated: np.ndarray  # the same through the engine's speech gate: what the model is driven with
    speaking: np.ndarray | None  # the gate's per-frame speech mask (None without a gate)
    audio: np.ndarray  # 16 kHz mono float32 of the training video
    held_out: np.ndarray  # sorted frame indices never trained on
    train_frames: np.ndarray  # sorted training frame indices
    split: dict  # describe_split(): what was held out
    sync: SyncJudge | None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.checkpoint.stem}"

    @property
    def crop(self) -> int:
        return self.engine.size.crop

    @property
    def boxes(self) -> np.ndarray:
        return self.engine.boxes

    @property
    def meta(self) -> dict:
        return self.engine.meta

    @property
    def judge(self) -> SyncJudge | None:
        """The SyncNet when its numbers may be shown, else None (nothing SyncNet-derived is computed)."""
        return self.sync if self.sync is not None and self.sync.trusted else None

    def frame(self, index: int) -> np.ndarray:
        return self.engine.frames.get(int(index))

    def crop_of(self, index: int) -> np.ndarray:
        return np.asarray(self.engine.crop(int(index)))

    @property
    def seam_depth(self) -> int:
        """How far (crop px) inside the crop edge the paste boundary zone reaches: the source border ring
        (where generated pixels start) plus 2 px."""
        return self.engine.size.border + 2

    @property
    def mask(self) -> np.ndarray:
        """The paste mask at crop size (where generated pixels replace the source)."""
        return face_crop.paste_mask(self.crop, self.engine.size.border)


# ----------------------------------------------------------------------------------------------
# Rendering with a chosen reference, and the baselines


def render_with_reference(engine, windows: np.ndarray, targets: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Generated crops `[B, crop, crop, 3]` uint8: frame `targets[k]` (masked) with the crop of frame
    `refs[k]` as the U-Net's reference input, driven by audio `windows[k]`; the border ring stays the
    target's, as in the engine."""
    size = engine.size
    b, s = size.border, size.inner
    out = np.stack([np.asarray(engine.crop(int(t))) for t in targets])
    batch = max(1, int(getattr(engine, "batch_size", 8)))
    for i in range(0, len(targets), batch):
        j = min(len(targets), i + batch)
        image = np.stack([face_crop.make_unet_input(out[k], np.asarray(engine.crop(int(refs[k]))), size.name)
                          for k in range(i, j)])
        pred = np.empty((j - i, 3, s, s), np.float32)
        engine.runner.run(image, np.ascontiguousarray(windows[i:j], dtype=np.float32), pred)
        out[i:j, b:b + s, b:b + s] = np.clip(pred.transpose(0, 2, 3, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def with_interior(crops: np.ndarray, interiors: np.ndarray, border: int) -> np.ndarray:
    """Copies of `crops` whose interior (inside the `border` ring) is replaced by `interiors`' (broadcast)."""
    out = np.array(crops, copy=True)
    s = out.shape[1] - 2 * border
    out[:, border:border + s, border:border + s] = np.asarray(interiors)[..., border:border + s, border:border + s, :]
    return out


def mean_training_crop(av: Avatar, count: int = MEAN_CROP_FRAMES) -> np.ndarray:
    """The mean of up to `count` training crops spread over the training frames (uint8)."""
    pick = av.train_frames[np.unique(np.linspace(0, len(av.train_frames) - 1,
                                                 min(count, len(av.train_frames))).round().astype(int))]
    total = np.zeros((av.crop, av.crop, 3), np.float64)
    for i in pick:
        total += av.crop_of(int(i))
    return np.clip(total / len(pick) + 0.5, 0, 255).astype(np.uint8)


def closed_reference(av: Avatar, mesh: FaceMesh, count: int = CLOSED_SAMPLE) -> tuple[int, np.ndarray]:
    """(the training frame with the most closed mouth among `count` spread over the training frames, the
    openings of those frames). The first training frame when no face is found."""
    pick = av.train_frames[np.unique(np.linspace(0, len(av.train_frames) - 1,
                                                 min(count, len(av.train_frames))).round().astype(int))]
    opening = M.mouth_opening(np.stack([mesh(av.frame(int(i))) for i in pick]))
    if not np.isfinite(opening).any():
        log.warning("no face found in the sampled training frames: closed-mouth reference = frame %d", pick[0])
        return int(pick[0]), opening
    return int(pick[int(np.nanargmin(opening))]), opening


def reference_frames(policy: str, held_out: np.ndarray, train_frames: np.ndarray, closed: int,
                     seed: int) -> np.ndarray:
    """The reference frame of each held-out frame under `policy` (closed, random or same)."""
    if policy == "closed":
        return np.full(len(held_out), closed, dtype=np.int64)
    if policy == "random":
        return np.random.default_rng(seed).choice(train_frames, len(held_out)).astype(np.int64)
    if policy == "same":
        return np.asarray(held_out, np.int64)
    raise ValueError(f"unknown reference policy {policy!r}; choose from {sorted(POLICIES)}")


# ----------------------------------------------------------------------------------------------
# Measuring candidates (the model, the baselines, the real video) on the same frames


@dataclass
class Chunk:
    """The real side of a chunk of held-out (or source) frames."""

    frames: np.ndarray  # source frame indices
    positions: range  # positions in the segment
    full: list  # real full frames
    crops: np.ndarray  # real crops [k, crop, crop, 3]
    boxes: np.ndarray
    mouth_boxes: list = field(default_factory=list)  # (x1, y1, x2, y2) crop px around the real lips


class RealEnvelope(NamedTuple):
    """The real video's mouth opening, speech envelope and pause frames on the held-out frames."""

    opening: np.ndarray
    envelope: np.ndarray
    silent: np.ndarray

    def at_pause_share(self, share: float) -> float:
        """Its opening-vs-envelope correlation with pauses making up `share` of the frames."""
        return M.envelope_correlation_at_pause_share(self.opening, self.envelope, self.silent, share)


@dataclass
class Track:
    """Per-frame measurements of one candidate."""

    landmarks: list = field(default_factory=list)  # [478, 2] full-frame pixels, NaN without a face
    seam: list = field(default_factory=list)
    colour: list = field(default_factory=list)  # colour step added by the paste (delta E over real)
    colour_raw: list = field(default_factory=list)  # colour step of the pasted crop itself
    teeth: list = field(default_factory=list)  # teeth-bright share of the open mouth
    texture: list = field(default_factory=list)  # inner-mouth detail (metrics.mouth_texture: the teeth gaps)
    mouth_area: list = field(default_factory=list)  # inner-lip polygon area, crop px^2 (NaN without a face)
    sharp: list = field(default_factory=list)  # mouth regions (for the sharpness ratio)
    face_emb: list = field(default_factory=list)
    strip: list = field(default_factory=list)  # crops at the strip positions
    pix: list = field(default_factory=list)  # (frames, psnr crop, ssim crop, psnr full, ssim full)


def measure_chunk(track: Track, av: Avatar, chunk: Chunk, crops: np.ndarray, full: list, mesh: FaceMesh,
                  strip_at: set[int], pixels: bool = True, embed: bool = True) -> None:
    """Landmarks, seam, colour step, teeth, mouth regions, strips, (with `pixels`) PSNR/SSIM against the
    real frames and (with `embed`, trusted SyncNet only) SyncNet face embeddings of one chunk."""
    mask = av.mask
    crops = np.stack([av.engine.paster.shown_crop(c, r) for c, r in zip(crops, chunk.crops)])  # as pasted
    for j, (frame, crop, box, pos) in enumerate(zip(full, crops, chunk.boxes, chunk.positions)):
        lm = mesh(frame)
        track.landmarks.append(lm)
        depth = int(math.ceil(av.seam_depth * (box[2] - box[0]) / len(crop))) + 1  # crop px -> frame px
        track.seam.append(M.seam_score(frame, box, depth=depth))
        shown = M.paste_composite(crop, chunk.crops[j], mask)
        track.colour.append(M.colour_step_excess(shown, chunk.crops[j], mask))
        track.colour_raw.append(M.colour_step(shown, mask))
        inner = M.to_crop_coords(M.inner_lip_points(lm[None]), box[None], av.crop)[0]
        track.teeth.append(M.teeth_share(shown, inner))
        track.texture.append(M.mouth_texture(shown, inner))
        track.mouth_area.append(M.mouth_area(inner))
        if chunk.mouth_boxes:
            x1, y1, x2, y2 = chunk.mouth_boxes[j]
            track.sharp.append(crop[y1:y2, x1:x2])
        if pos in strip_at:
            track.strip.append(crop.copy())
    if pixels:
        k = len(crops)
        track.pix.append((k, M.video_psnr(crops, chunk.crops), M.ssim(crops, chunk.crops),
                          M.video_psnr(np.stack(full), np.stack(chunk.full)),
                          M.ssim(np.stack(full), np.stack(chunk.full), batch=1)))
    if embed and av.judge is not None:
        track.face_emb.append(av.judge.faces(crops))


def fallback_mouth_box(crop: int) -> tuple[int, int, int, int]:
    """Where the mouth sits in a crop (mid-nose down) when no landmarks were found."""
    return int(0.25 * crop), int(0.2 * crop), int(0.75 * crop), int(0.6 * crop)


def mouth_boxes(real_landmarks: list, boxes: np.ndarray, crop: int) -> list[tuple[int, int, int, int]]:
    """Crop-pixel boxes around the real lips of each frame (the fallback box without a face)."""
    out = []
    for lm, box in zip(real_landmarks, boxes):
        lips = M.to_crop_coords(M.lip_points(lm[None]), box[None], crop)[0]
        out.append(fallback_mouth_box(crop) if np.isnan(lips).any() else M.mouth_box(lips, (crop, crop)))
    return out


def strip_positions(n: int, k: int = STRIP_FRAMES) -> list[int]:
    return sorted(set(np.linspace(0, max(n - 1, 0), min(k, n)).round().astype(int).tolist()))


def with_breaks(points: np.ndarray, segments: list[tuple[int, int]]) -> np.ndarray:
    """Landmark tracks `[N, P, 2]` with two NaN frames between segments, so no temporal difference spans a cut."""
    if len(segments) <= 1:
        return points
    gap = np.full((2, *points.shape[1:]), np.nan)
    parts = []
    for a, b in segments:
        parts += [points[a:b], gap]
    return np.concatenate(parts[:-1])


def sync_values(emb: np.ndarray | None, av: Avatar, features: np.ndarray, rows: np.ndarray,
                segments: list[tuple[int, int]]) -> dict:
    """SyncNet offset / confidence / min distance of a measured candidate against `features[rows]`
    (distances averaged over segments, frame-weighted); the 'not measurable' text for an untrusted
    SyncNet; nothing without one."""
    if av.sync is None:
        return {}
    if av.judge is None:
        return {k: not_measurable(av.sync.accuracy) for k in SYNC_KEYS}
    segs = [(a, b) for a, b in segments if b - a >= 3]
    if emb is None or not segs:
        return {}
    audio = av.judge.audio(features, rows)
    dists = np.stack([M.sync_distances(emb[a:b], audio[a:b], VSHIFT) for a, b in segs])
    w = np.array([b - a for a, b in segs], np.float64)[:, None] * np.isfinite(dists)
    mdist = np.where(w.sum(0) > 0, np.nansum(np.nan_to_num(dists) * w, 0) / np.maximum(w.sum(0), 1e-9), np.nan)
    scores = M.sync_scores(mdist)
    return {"sync_offset": scores["offset"], "sync_confidence": scores["confidence"],
            "sync_min_dist": scores["min_dist"]}


def opening_of(track: Track, boxes: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """(lip points in crop px `[N, 40, 2]`, mouth opening `[N]`) of a measured candidate."""
    lm = np.stack(track.landmarks) if track.landmarks else np.zeros((0, 478, 2))
    if not len(lm):
        return np.zeros((0, 40, 2)), np.zeros(0)
    return M.to_crop_coords(M.lip_points(lm), boxes, crop), M.mouth_opening(lm)


def mouth_values(track: Track, real: Track, boxes: np.ndarray, crop: int, segments: list[tuple[int, int]],
                 envelope: np.ndarray, silent: np.ndarray, closed_max: float, interior: np.ndarray) -> dict:
    """Every image and mouth number of a candidate against the real track (same frames); `interior`:
    the silent frames away from the silences' ends (`silence_masks`)."""
    lips, opening = opening_of(track, boxes, crop)
    real_lips, real_opening = opening_of(real, boxes, crop)
    real_open = _real_open(real)
    t_gen, t_real = _open_mean(track.teeth, real_open), _open_mean(real.teeth, real_open)
    x_gen, x_real = _open_mean(track.texture, real_open), _open_mean(real.texture, real_open)
    out = {
        "lmd": M.landmark_distance(lips, real_lips),
        "opening_corr": M.opening_correlation(opening, real_opening),
        "closure_in_silence": M.closure_share(opening, silent, closed_max),
        "closure_in_silence_interior": M.closure_share(opening, interior, closed_max),
        "envelope_corr": M.envelope_correlation(opening, envelope),
        "envelope_corr_speech": M.envelope_correlation(opening, envelope, ~silent),
        "sharpness_ratio": M.sharpness_ratio(track.sharp, real.sharp) if track.sharp else float("nan"),
        "teeth_share": t_gen,
        "teeth_share_ratio": t_gen / t_real if t_real > 0 else float("nan"),
        "mouth_texture": x_gen,
        "mouth_texture_ratio": x_gen / x_real if x_real > 0 else float("nan"),
        "jitter": M.temporal_jitter(with_breaks(lips, segments)),
        "jitter_ratio": M.jitter_ratio(with_breaks(lips, segments), with_breaks(real_lips, segments)),
        "seam": float(np.nanmean(track.seam)) if track.seam else float("nan"),
        "colour_step": float(np.nanmean(track.colour_raw)) if track.colour_raw else float("nan"),
        "colour_step_excess": float(np.nanmean(track.colour)) if track.colour else float("nan"),
        "face_found": float(np.mean(np.isfinite(opening))) if len(opening) else 0.0,
    }
    out["colour_step_pass"] = bool(out["colour_step_excess"] <= M.COLOUR_STEP_MAX)
    if track.pix:
        k = np.array([p[0] for p in track.pix], np.float64)
        for i, key in enumerate(("psnr_crop", "ssim_crop", "psnr_full", "ssim_full"), start=1):
            out[key] = float(np.sum(k * np.array([p[i] for p in track.pix])) / k.sum())
    return out


def real_values(real: Track, boxes: np.ndarray, crop: int, segments: list[tuple[int, int]],
                envelope: np.ndarray, silent: np.ndarray, closed_max: float, interior: np.ndarray) -> dict:
    """The real video's own numbers (the ceiling); pairwise ones are perfect by definition."""
    lips, opening = opening_of(real, boxes, crop)
    open_ = _real_open(real)
    return {"lmd": 0.0, "opening_corr": 1.0, "sharpness_ratio": 1.0, "jitter_ratio": 1.0,
            "teeth_share_ratio": 1.0, "mouth_texture_ratio": 1.0,
            "closure_in_silence": M.closure_share(opening, silent, closed_max),
            "closure_in_silence_interior": M.closure_share(opening, interior, closed_max),
            "envelope_corr": M.envelope_correlation(opening, envelope),
            "envelope_corr_speech": M.envelope_correlation(opening, envelope, ~silent),
            "teeth_share": _open_mean(real.teeth, open_),
            "mouth_texture": _open_mean(real.texture, open_),
            "jitter": M.temporal_jitter(with_breaks(lips, segments)),
            "seam": float(np.nanmean(real.seam)) if real.seam else float("nan"),
            "colour_step": float(np.nanmean(real.colour_raw)) if real.colour_raw else float("nan"),
            "colour_step_excess": 0.0, "colour_step_pass": True,
            "face_found": float(np.mean(np.isfinite(opening))) if len(opening) else 0.0}


def _real_open(real: Track) -> np.ndarray:
    """Frames where the real mouth is open (inner-lip polygon of at least `MIN_MOUTH_AREA` px^2)."""
    return np.nan_to_num(np.asarray(real.mouth_area, np.float64)) >= M.MIN_MOUTH_AREA


def _open_mean(values: list, open_: np.ndarray) -> float:
    """Mean of a per-frame measurement over the frames where the real mouth is open (finite values)."""
    return _nanmean(np.asarray(values, np.float64)[open_])


def _nanmean(values: np.ndarray | list) -> float:
    """Mean of the finite values; NaN when there is none."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _progress(n: int, desc: str) -> tqdm:
    return tqdm(total=n, desc=desc, unit="frame", leave=False, disable=None)


def paste_all(av: Avatar, crops: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
    """Full frames with `crops` pasted back the way the engine pastes them."""
    eng = av.engine
    return [eng.paste(c, int(fi), np.empty(eng.frame_shape, np.uint8)) for c, fi in zip(crops, frames)]


def render_crops(av: Avatar, features: np.ndarray, rows: np.ndarray, targets: np.ndarray,
                 refs: np.ndarray, speaking: np.ndarray | None = None) -> np.ndarray:
    """The model's crops: audio at feature rows `rows` (pause frames per `speaking` get the window of
    silence) on source frames `targets` with reference frames `refs` (the one place the U-Net runs during
    evaluation; tests replace it)."""
    eng = av.engine
    return render_with_reference(eng, eng.audio_windows(features, rows, speaking=speaking), targets, refs)


# ----------------------------------------------------------------------------------------------
# Held-out self-reconstruction and cross-driven runs


@dataclass
class Candidate:
    """One column of the held-out tables: a name and how to get its crops for positions [s, e) (given the
    real crops there)."""

    name: str
    crops: Callable[[int, int, np.ndarray], np.ndarray]
    pixels: bool = True


def silence_masks(segments: list[tuple[int, int]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(every frame of the silences, their interior: SILENCE_EDGE_MS left out at each end) over n frames."""
    return segments_to_mask(segments, n), segments_to_mask(segments, n, round(SILENCE_EDGE_MS * FPS / 1000))


def held_out_audio(dataset_dir: Path, audio: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(speech envelope, silent-frame mask, its interior) at frames `idx` of a dataset's recording `audio`.
    Silences of at least SILENCE_MS come from the dataset's aligned silences (utterances.json, e.g. GRID
    word alignments) when it has them, else from the envelope of the whole recording."""
    env = speech_envelope(audio, SR, FPS)
    n = max(len(env), int(idx.max()) + 1 if len(idx) else 0)
    env = np.pad(env, (0, n - len(env)))
    aligned = aligned_silence_mask(dataset_dir, n)
    segments = (long_runs(aligned, FPS, SILENCE_MS) if aligned is not None
                else silence_segments(env, FPS, SILENCE_MS))
    silent, interior = silence_masks(segments, n)
    return env[idx], silent[idx], interior[idx]


def held_out_candidates(av: Avatar, idx: np.ndarray, policies: tuple[str, ...],
                        refs: dict[str, np.ndarray]) -> list[Candidate]:
    """The held-out table's columns: the mean crop, and per policy the model and its copy-reference."""
    mean_crop = mean_training_crop(av)
    border = av.engine.size.border
    def model(ref: np.ndarray) -> Callable[[int, int, np.ndarray], np.ndarray]:
        return lambda s, e, real: render_crops(av, av.gated, idx[s:e], idx[s:e], ref[s:e], av.speaking)

    def copy(ref: np.ndarray) -> Callable[[int, int, np.ndarray], np.ndarray]:
        return lambda s, e, real: with_interior(real, np.stack([av.crop_of(int(r)) for r in ref[s:e]]), border)

    cands = [Candidate("mean_crop", lambda s, e, real: with_interior(real, mean_crop[None], border))]
    for p in policies:
        cands.append(Candidate(f"{p}:model", model(refs[p])))
        if p != "same":  # copying the target's own crop is the real video
            cands.append(Candidate(f"{p}:copy_reference", copy(refs[p])))
    return cands


def measure_held_out(av: Avatar, idx: np.ndarray, cands: list[Candidate],
                     mesh: FaceMesh) -> tuple[Track, dict[str, Track]]:
    """(the real video's track, each candidate's track): every candidate rendered and measured on the
    held-out frames `idx`, chunk by chunk, beside the real frames."""
    real, tracks = Track(), {c.name: Track() for c in cands}
    strip_at = set(strip_positions(len(idx)))
    bar = _progress(len(idx), f"{av.label} held-out")
    for s in range(0, len(idx), CHUNK):
        e = min(s + CHUNK, len(idx))
        crops = np.stack([av.crop_of(int(i)) for i in idx[s:e]])
        chunk = Chunk(idx[s:e], range(s, e), [av.frame(int(i)) for i in idx[s:e]], crops, av.boxes[idx[s:e]])
        measure_chunk(real, av, chunk, chunk.crops, chunk.full, mesh, strip_at, pixels=False)
        chunk.mouth_boxes = mouth_boxes(real.landmarks[s:e], chunk.boxes, av.crop)
        real.sharp.extend(c[y1:y2, x1:x2] for c, (x1, y1, x2, y2) in zip(chunk.crops, chunk.mouth_boxes))
        for cand in cands:
            made = cand.crops(s, e, crops)
            measure_chunk(tracks[cand.name], av, chunk, made, paste_all(av, made, idx[s:e]), mesh, strip_at,
                          cand.pixels, embed=cand.name.endswith(":model"))
        bar.update(e - s)
    bar.close()
    return real, tracks


def self_reconstruction(av: Avatar, mesh: FaceMesh, max_frames: int | None, policies: tuple[str, ...] = DEFAULT_POLICIES,
                        seed: int = 0) -> tuple[dict, dict]:
    """Render the held-out frames from their own audio under each reference policy, with the baselines
    and the real video measured on the same frames."""
    idx = av.held_out[:max_frames] if max_frames else av.held_out
    n, segments = len(idx), runs_of(idx)
    closed, train_open = closed_reference(av, mesh)
    refs = {p: reference_frames(p, idx, av.train_frames, closed, seed) for p in policies}
    real, tracks = measure_held_out(av, idx, held_out_candidates(av, idx, policies, refs), mesh)
    boxes = av.boxes[idx]
    envelope, silent, interior = held_out_audio(av.dataset_dir, av.audio, idx)
    _, real_opening = opening_of(real, boxes, av.crop)
    closed_max = M.closed_mouth_threshold(np.concatenate([real_opening, train_open]))

    def values(track: Track, sync_too: bool) -> dict:
        out = mouth_values(track, real, boxes, av.crop, segments, envelope, silent, closed_max, interior)
        if sync_too:
            out.update(sync_values(np.concatenate(track.face_emb) if track.face_emb else None, av, av.features,
                                   idx, segments))
        return out

    runs = []
    for p in policies:
        run = {"policy": p, "diagnostic": p == "same",
               "description": POLICIES[p] + (f" (frame {closed})" if p == "closed" else "")
               + (f" (seed {seed})" if p == "random" else ""),
               "reference_frames": sorted(set(refs[p].tolist()))[:20],
               "model": values(tracks[f"{p}:model"], True)}
        if p != "same":
            run["copy_reference"] = values(tracks[f"{p}:copy_reference"], False)
        runs.append(run)
    real_vals = real_values(real, boxes, av.crop, segments, envelope, silent, closed_max, interior)
    real_vals.update(sync_values(np.concatenate(real.face_emb) if real.face_emb else None, av, av.features, idx,
                                 segments))
    result = {"frames": n, "segments": [[int(idx[a]), int(idx[b - 1]) + 1] for a, b in segments],
              "closed_mouth_max": closed_max, "closed_reference_frame": closed, "seed": seed, "runs": runs,
              "mean_crop": values(tracks["mean_crop"], False), "real": real_vals}
    real_lips, _ = opening_of(real, boxes, av.crop)
    art = {"real_opening": real_opening, "audio": np.concatenate([av.audio[i * SR // FPS:(i + 1) * SR // FPS]
                                                                  for i in idx]) if n else np.zeros(0),
           "real_lips": with_breaks(real_lips, segments), "real_landmarks": dict(zip(idx.tolist(), real.landmarks)),
           "real_strip": real.strip, "silences": long_runs(silent, FPS, SILENCE_MS) if n else [],
           "real_envelope": RealEnvelope(real_opening, envelope, silent),
           "openings": {p: opening_of(tracks[f"{p}:model"], boxes, av.crop)[1] for p in policies},
           "strips": {name: t.strip for name, t in tracks.items()}}
    return result, art


def measure_cross(av: Avatar, gated: np.ndarray, speaking: np.ndarray | None, idx: np.ndarray, mesh: FaceMesh,
                  real_landmarks: dict, label: str) -> tuple[Track, Track]:
    """(the model's track, the source frames' track): feature row k drives source frame `idx[k]`, with
    that frame's own crop as reference; the source frames' landmarks are cached in `real_landmarks`."""
    n = len(idx)
    track, source = Track(), Track()
    strip_at = set(strip_positions(n))
    bar = _progress(n, f"{av.label} {label}")
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        real_full = [av.frame(int(i)) for i in idx[s:e]]
        chunk = Chunk(idx[s:e], range(s, e), real_full, np.stack([av.crop_of(int(i)) for i in idx[s:e]]),
                      av.boxes[idx[s:e]])
        crops = render_crops(av, gated, np.arange(s, e), idx[s:e], idx[s:e], speaking)
        measure_chunk(track, av, chunk, crops, paste_all(av, crops, idx[s:e]), mesh, strip_at, pixels=False)
        for i, frame in zip(idx[s:e], real_full):
            if int(i) not in real_landmarks:
                real_landmarks[int(i)] = mesh(frame)
            source.landmarks.append(real_landmarks[int(i)])
        bar.update(e - s)
    bar.close()
    return track, source


def cross_driven(av: Avatar, path: Path, mesh: FaceMesh, max_frames: int | None, real_lips: np.ndarray,
                 real_landmarks: dict, closed_max: float, real_env: RealEnvelope | None = None) -> tuple[dict, dict]:
    """Drive the avatar with a foreign audio file over the held-out frames (played back and forth), the
    engine's production path (each frame's own crop as reference); the source frames unchanged are the
    baseline (a model that ignores the audio scores like them)."""
    try:
        audio16k = load_audio(str(path))
    except Exception as exc:
        raise EvalError(f"cannot read audio {path}: {exc}") from None
    try:
        features = av.engine.features(audio16k)
    except Exception as exc:  # e.g. ave mode without the AVE encoder checkpoint
        raise EvalError(f"cannot compute audio features of {path}: {exc}") from None
    n = len(features) if not max_frames else min(len(features), max_frames)
    if n < 3:
        raise EvalError(f"audio {path} is too short to evaluate ({n} frames)")
    idx = av.held_out[pingpong(0, len(av.held_out), n)]
    speaking = av.engine.speaking(audio16k, len(features))
    gated = av.engine.gate(features, speaking)  # what the model is driven with (the SyncNet hears `features`)
    track, source = measure_cross(av, gated, speaking, idx, mesh, real_landmarks, path.name)
    boxes = av.boxes[idx]
    lips, opening = opening_of(track, boxes, av.crop)
    _, source_opening = opening_of(source, boxes, av.crop)
    audio16k = audio16k[: n * SR // FPS]
    env = speech_envelope(audio16k, SR, FPS)[:n]
    env = np.pad(env, (0, n - len(env)))
    silences = silence_segments(env, FPS, SILENCE_MS)
    silent, interior = silence_masks(silences, n)
    model = {"envelope_corr": M.envelope_correlation(opening, env),
             "envelope_corr_speech": M.envelope_correlation(opening, env, ~silent),
             "closure_in_silence": M.closure_share(opening, silent, closed_max),
             "closure_in_silence_interior": M.closure_share(opening, interior, closed_max),
             "silent_frames": int(silent.sum()), "interior_silent_frames": int(interior.sum()),
             "jitter": M.temporal_jitter(lips), "jitter_ratio": M.jitter_ratio(lips, real_lips),
             "seam": _nanmean(track.seam), "colour_step_excess": _nanmean(track.colour),
             "face_found": float(np.mean(np.isfinite(opening)))}
    model["colour_step_pass"] = bool(model["colour_step_excess"] <= M.COLOUR_STEP_MAX)
    model.update(sync_values(np.concatenate(track.face_emb) if track.face_emb else None, av, features,
                             np.arange(n), [(0, n)]))
    baseline = {"envelope_corr": M.envelope_correlation(source_opening, env),
                "envelope_corr_speech": M.envelope_correlation(source_opening, env, ~silent),
                "closure_in_silence": M.closure_share(source_opening, silent, closed_max),
                "closure_in_silence_interior": M.closure_share(source_opening, interior, closed_max)}
    share = float(silent.mean()) if n else float("nan")
    real = {"pause_share": share, "envelope_corr": real_env.at_pause_share(share) if real_env else float("nan")}
    result = {"audio": str(path), "frames": n, "model": model, "source_unchanged": baseline, "real": real}
    art = {"openings": {"model": opening}, "real_opening": source_opening, "audio": audio16k,
           "gen_strip": track.strip, "silences": silences}
    return result, art


# ----------------------------------------------------------------------------------------------
# Verdict


VERDICT_KEYS = (("psnr_crop", "crop PSNR"), ("opening_corr", "mouth-opening correlation"))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def verdict(runs: list[dict]) -> dict:
    """UNUSABLE unless the model beats copy-reference on crop PSNR and mouth-opening correlation in every
    cross-reference run (a number that cannot be measured does not beat anything)."""
    reasons = []
    cross = [r for r in runs if not r.get("diagnostic") and "copy_reference" in r]
    if not cross:
        reasons.append("no cross-reference run to judge")
    for run in cross:
        for key, label in VERDICT_KEYS:
            mv, cv = run["model"].get(key), run["copy_reference"].get(key)
            if not _finite(mv) or (_finite(cv) and not mv > cv):
                reasons.append(f"{label} {_fmt(mv)} vs copy-reference {_fmt(cv)} ({run['policy']} reference)")
    if reasons:
        line = "UNUSABLE: the model does not beat pasting its reference crop unchanged: " + "; ".join(reasons)
    else:
        line = ("OK: the model beats copy-reference on crop PSNR and mouth-opening correlation under every "
                "cross-reference")
    return {"usable": not reasons, "line": line, "reasons": reasons}


# ----------------------------------------------------------------------------------------------
# Report: JSON, HTML (embedded plots and frame strips), stdout tables

# (key, label, better) of the held-out tables; better: "up", "down", "zero", "one", "real" (near the real video)
HELD_OUT_ROWS = [
    ("psnr_crop", "PSNR face crop (dB)", "up"),
    ("ssim_crop", "SSIM face crop", "up"),
    ("psnr_full", "PSNR full frame (dB)", "up"),
    ("ssim_full", "SSIM full frame", "up"),
    ("lmd", "mouth LMD (px @ crop)", "down"),
    ("opening_corr", "mouth-opening corr. with real", "up"),
    ("closure_in_silence", "mouth closed in silences >= 300 ms", "real"),
    ("closure_in_silence_interior", f"... their interior (less {SILENCE_EDGE_MS:g} ms at each end)", "real"),
    ("envelope_corr", "opening vs speech envelope", "real"),
    ("envelope_corr_speech", "... in speech only (silences left out)", "real"),
    ("sharpness_ratio", "mouth sharpness / real (Laplacian var.)", "one"),
    ("mouth_texture_ratio", "inner-mouth detail / real (d/dx inside the open lips: teeth gaps)", "one"),
    ("teeth_share", "teeth-bright share of the open mouth", "real"),
    ("teeth_share_ratio", "teeth-bright share / real", "one"),
    ("jitter_ratio", "mouth jitter / real", "one"),
    ("seam", "seam score (1 = invisible)", "real"),
    ("colour_step_excess", f"colour step at paste border (dE, pass <= {M.COLOUR_STEP_MAX:g})", "down"),
    ("sync_offset", "SyncNet offset (frames)", "zero"),
    ("sync_confidence", "SyncNet confidence", "up"),
    ("sync_min_dist", "SyncNet min distance", "down"),
]
BETTER = {"up": "higher", "down": "lower", "zero": "0", "one": "near 1", "real": "near real"}
# (key, label) of the per-file cross-driven table; `source:` keys come from the source-unchanged baseline,
# `real:` ones from the real video on its held-out frames with as many pauses as the file
CROSS_COLUMNS = [
    ("sync_offset", "offset"),
    ("sync_confidence", "confidence"),
    ("envelope_corr", "env. corr"),
    ("source:envelope_corr", "env. corr (source unchanged)"),
    ("real:envelope_corr", "env. corr, real at this pause share"),
    ("real:pause_share", "pause share"),
    ("envelope_corr_speech", "env. corr in speech"),
    ("closure_in_silence", "closed in silence"),
    ("closure_in_silence_interior", "closed (interior)"),
    ("source:closure_in_silence", "closed (source unchanged)"),
    ("jitter_ratio", "jitter / real"),
    ("colour_step_excess", "colour step dE"),
    ("seam", "seam"),
]


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _fmt(value) -> str:
    """A table cell: '-' for missing, text as is (e.g. 'not measurable ...'), numbers to 3 decimals."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "pass" if value else "FAIL"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):+d}" if value else "0"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def run_columns(report: dict) -> list[str]:
    """Column heads of the held-out tables: model (and compare), copy-reference, mean crop, real video."""
    heads = [report["label"]] + ([report["compare"]["label"]] if report.get("compare") else [])
    return heads + ["copy-reference", "mean crop", "real video"]


def run_table(report: dict, i: int) -> list[tuple[str, list, str]]:
    """(label, cells, better) rows of held-out run `i`: model / baselines / real."""
    sr = report["self_reconstruction"]
    run = sr["runs"][i]
    other = None
    if report.get("compare"):
        other = next((r for r in report["compare"]["self_reconstruction"]["runs"] if r["policy"] == run["policy"]),
                     None)
    rows = []
    for key, label, better in HELD_OUT_ROWS:
        cells = [run["model"].get(key)] + ([other["model"].get(key) if other else None] if report.get("compare")
                                           else [])
        cells += [run.get("copy_reference", {}).get(key), sr["mean_crop"].get(key), sr["real"].get(key)]
        if key.startswith("sync_"):
            cells[-3] = cells[-2] = None  # SyncNet numbers are measured on the model and the real video
        if any(c is not None for c in cells):
            rows.append((label, cells, better))
    return rows


def cross_table(report: dict) -> tuple[list[str], list[list], list[str]]:
    """(heads, one row per file (and per compared model), footer lines). Signed offsets are never averaged;
    the footer's mean is of absolute offsets and says so."""
    heads = ["file"] + [label for _, label in CROSS_COLUMNS]
    runs = [(report["label"], report["cross_driven"])]
    if report.get("compare"):
        runs.append((report["compare"]["label"], report["compare"]["cross_driven"]))
    rows, footer = [], []
    for label, cds in runs:
        for cd in cds:
            name = Path(cd["audio"]).name + (f" [{label}]" if len(runs) > 1 else "")
            row = [name]
            for key, _ in CROSS_COLUMNS:
                part, _, figure = key.rpartition(":")
                src = {"source": cd.get("source_unchanged", {}), "real": cd.get("real", {}), "": cd["model"]}[part]
                row.append(src.get(figure))
            rows.append(row)
        offsets = [cd["model"].get("sync_offset") for cd in cds]
        numeric = [abs(o) for o in offsets if _finite(o)]
        if len(numeric) > 1:
            footer.append(f"{label}: mean |offset| over {len(numeric)} files = {np.mean(numeric):.1f} frames "
                          "(mean of absolute values; signed offsets are not averaged)")
    return heads, rows, footer + real_scale_line(report)


def distinct_labels(report: dict) -> None:
    """A compared run labelled like the model (the same avatar and epoch) and the model are relabelled
    `name@folder/epoch` after their checkpoints' folders, so the tables' columns can be told apart."""
    other = report.get("compare")
    if not other or other["label"] != report["label"]:
        return
    for run in (report, other):
        path = Path(run["checkpoint"])
        run["label"] = f"{run['name']}@{path.parent.name}/{path.stem}"
    if other["label"] == report["label"]:  # the same folder name too: the whole paths
        for run in (report, other):
            run["label"] = f"{run['name']}@{run['checkpoint']}"


def real_scale_line(report: dict) -> list[str]:
    """The real video's own envelope figures on the held-out frames (its own audio), the scale for the
    cross-driven envelope columns: a file without pauses compares with the speech-only one. Empty when the
    report has no such figures."""
    real = report["self_reconstruction"].get("real", {})
    whole, speech = real.get("envelope_corr"), real.get("envelope_corr_speech")
    if not (_finite(whole) and _finite(speech)):
        return []
    return [f"for scale, the real video on its held-out frames: env. corr {whole:.3f}, in speech {speech:.3f}, "
            f"closed in silence {_fmt(real.get('closure_in_silence'))}"]


def split_text(split: dict) -> str:
    """One line naming what was held out."""
    if split.get("kind") == "utterances":
        names = ", ".join(f"{u['name']} ({u['start']}-{u['end'] - 1})" for u in split["held_out"])
        return (f"held out by utterance: {len(split['held_out'])} whole utterances never seen in training "
                f"({names}); {split.get('training_utterances', '?')} utterances trained on")
    a, b = split.get("held_out_frames", [0, 0])
    return f"held out by time: frames {a}-{b - 1} (the last {split.get('val_fraction', 0.1):.0%} of the video)"


def header_lines(report: dict) -> list[str]:
    """Verdict, split, reference policy and SyncNet trust: the lines above every table."""
    sync = report["syncnet"]
    acc = sync.get("accuracy")
    sync_line = ("SyncNet: none" if sync.get("path") is None else
                 f"SyncNet held-out accuracy {acc:.3f}" if _finite(acc) else "SyncNet held-out accuracy unknown")
    if sync.get("note"):
        sync_line += f" -- {sync['note']}"
    sr = report["self_reconstruction"]
    policies = "; ".join(r["description"] for r in sr["runs"])
    return [report["verdict"]["line"], f"split: {split_text(report['split'])}",
            f"reference policy: {policies}", sync_line]


def _table(heads: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) + 2 for i, h in enumerate(heads)] if rows else \
        [len(h) + 2 for h in heads]
    lines = ["".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append("".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return lines


def summary_text(report: dict) -> str:
    """The readable summary printed at the end: verdict first, then one table per reference run and the
    per-file cross-driven table."""
    lines = header_lines(report)
    sr = report["self_reconstruction"]
    for i, run in enumerate(sr["runs"]):
        lines += ["", f"[held-out, {sr['frames']} frames] {run['description']}"]
        rows = [[label] + [_fmt(c) for c in cells] for label, cells, _ in run_table(report, i)]
        lines += _table(["metric"] + run_columns(report), rows)
    if report["cross_driven"]:
        heads, rows, footer = cross_table(report)
        lines += ["", "[cross-driven, one row per file; reference = each frame's own crop, as in production]"]
        lines += _table(heads, [[r[0]] + [_fmt(c) for c in r[1:]] for r in rows]) + footer
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    fig.clf()
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_opening(art: dict, title: str, closed_max: float | None = None) -> str:
    """Mouth opening vs time over the audio waveform, silences shaded: the real video and each series."""
    from matplotlib.figure import Figure  # lazy: matplotlib is only needed for the HTML page

    fig = Figure(figsize=(10, 3.0))
    ax = fig.subplots()
    wav = np.asarray(art["audio"], np.float64)
    if len(wav):
        t = np.arange(len(wav)) / SR
        step = max(1, len(wav) // 20000)
        ax2 = ax.twinx()
        ax2.plot(t[::step], wav[::step], color="0.8", lw=0.5)
        ax2.set_yticks([])
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    for s, e in art.get("silences", []):
        ax.axvspan(s / FPS, e / FPS, color="tab:blue", alpha=0.08)
    if art.get("real_opening") is not None:
        ro = art["real_opening"]
        ax.plot(np.arange(len(ro)) / FPS, ro, color="k", lw=1.2, label=art.get("real_label", "real"))
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:green", "tab:brown"]
    for (name, series), color in zip(art["openings"].items(), colors):
        ax.plot(np.arange(len(series)) / FPS, series, color=color, lw=1.0, label=name)
    if closed_max is not None and math.isfinite(closed_max):
        ax.axhline(closed_max, color="tab:blue", ls="--", lw=0.8, label="closed-mouth max (real)")
    ax.set_xlabel("time (s); shaded = silences >= 300 ms; grey = waveform")
    ax.set_ylabel("mouth opening")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)
def strip_jpeg(rows: list[list[np.ndarray]], height: int = 128) -> str:
    """Rows of crops (BGR) tiled into one JPEG, base64."""
    tiles = []
    for row in rows:
        if not row:
            continue
        row = [cv2.resize(c, (height, height), interpolation=cv2.INTER_AREA) for c in row]
        tiles.append(np.concatenate(row, axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0))) for t in tiles]
    ok, buf = cv2.imencode(".jpg", np.concatenate(tiles, axis=0), [cv2.IMWRITE_JPEG_QUALITY, 88])
    return base64.b64encode(buf.tobytes()).decode("ascii")




def _html_table(heads: list[str], rows: list[list], better: list[str] | None = None) -> str:
    esc = html.escape
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in heads)
           + ("<th>better</th>" if better else "") + "</tr>"]
    for i, r in enumerate(rows):
        out.append(f"<tr><td>{esc(str(r[0]))}</td>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in r[1:])
                   + (f"<td>{BETTER[better[i]]}</td>" if better else "") + "</tr>")
    return "".join(out) + "</table>"


def build_html(report: dict, page: dict) -> str:
    """The self-contained HTML page: verdict first, then the tables, plots and strips."""
    esc = html.escape
    sr = report["self_reconstruction"]
    verdict_color = "#060" if report["verdict"]["usable"] else "#b00"
    head = header_lines(report)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation: {esc(report['label'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;"
        "padding:8px;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>Evaluation of {esc(report['label'])}</h1>",
        f"<p class='verdict' style='font-size:1.2em;font-weight:bold;color:{verdict_color}'>{esc(head[0])}</p>",
        "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in head[1:]) + "</ul>",
        f"<p>Checkpoint <code>{esc(report['checkpoint'])}</code>, created {esc(report['created'])}.</p>",
    ]
    for i, run in enumerate(sr["runs"]):
        rows = run_table(report, i)
        parts.append(f"<h2>Held-out ({sr['frames']} frames): {esc(run['description'])}</h2>")
        parts.append(_html_table(["metric"] + run_columns(report), [[r[0]] + r[1] for r in rows],
                                 [r[2] for r in rows]))
    parts.append("<h2>Held-out mouth opening</h2>")
    parts.append(f"<img src='data:image/png;base64,{page['self_plot']}'>")
    parts.append("<p>Frame rows: " + esc(", ".join(page["strip_rows"])) + ".</p>")
    parts.append(f"<img src='data:image/jpeg;base64,{page['self_strip']}'>")
    if report["cross_driven"]:
        heads, cross_rows, footer = cross_table(report)
        parts.append("<h2>Cross-driven (one row per file)</h2>" + _html_table(heads, cross_rows))
        parts += [f"<p>{esc(line)}</p>" for line in footer]
        for i, cd in enumerate(report["cross_driven"]):
            parts.append(f"<h3>{esc(Path(cd['audio']).name)} ({cd['frames']} frames)</h3>")
            parts.append(f"<img src='data:image/png;base64,{page['cross_plots'][i]}'>")
            parts.append(f"<img src='data:image/jpeg;base64,{page['cross_strips'][i]}'>")
    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<h2>report.json</h2><details><summary>show</summary><pre>"
                 + esc(json.dumps(report, indent=2)) + "</pre></details></body></html>")
    return "".join(parts)


def build_page(report: dict, arts: dict, audio_files: list[Path]) -> dict:
    """The plots and strips of the HTML page."""
    sa, sr = arts["self"], report["self_reconstruction"]
    strips = sa["strips"]
    names = ["real"] + [n for n in ("closed:copy_reference", "closed:model", "random:model", "same:model")
                        if strips.get(n)]
    title = "held-out: mouth opening, real vs model per reference policy"
    page: dict[str, Any] = {"self_plot": plot_opening(sa, title, sr["closed_mouth_max"]),
                            "self_strip": strip_jpeg([sa["real_strip"]] + [strips[n] for n in names[1:]]),
                            "strip_rows": names, "cross_plots": [], "cross_strips": []}
    for path, art in zip(audio_files, arts["cross"]):
        page["cross_plots"].append(plot_opening(dict(art, real_label="source unchanged"),
                                                f"{Path(path).name}: mouth opening", sr["closed_mouth_max"]))
        page["cross_strips"].append(strip_jpeg([art["gen_strip"]]))
    return page


# ----------------------------------------------------------------------------------------------
# Command


def load_avatar(name: str, checkpoint: str | None, dataset_root: Path, checkpoint_root: Path,
                syncnet_root: Path, backend: str, device: str, extra_roots: list | None = None) -> Avatar:
    """Engine, held-out split, training audio and SyncNet of one avatar (found by the registry the
    server uses: the given roots, then `extra_roots`); EvalError when unusable."""
    registry = AvatarRegistry([AvatarRoot(dataset_root, checkpoint_root, "user"), *(extra_roots or [])])
    try:
        info = registry.find(name, checkpoint)
    except AvatarError as exc:
        raise EvalError(str(exc)) from None
    dataset_dir, ckpt = info.dataset_dir, info.checkpoint_path
    try:
        engine = LipSyncEngine.load(dataset_dir, ckpt, backend=backend, device=device,
                                    color_match=settings.models.color_match, speech_gate=settings.speech_gate(),
                                    ave_checkpoint=settings.models.ave_checkpoint,
                                    feature_config=settings.audio.feature_config())
    except (EngineError, CheckpointError) as exc:
        raise EvalError(str(exc)) from None
    feat_path = dataset_dir / FEATURE_FILES.get(engine.mode, f"aud_{engine.mode}.npy")
    if not feat_path.is_file():
        raise EvalError(f"{feat_path} is missing (the checkpoint uses audio mode {engine.mode!r})")
    features = np.load(feat_path).astype(np.float32, copy=False)
    wav = dataset_dir / "aud.wav"
    if not wav.is_file():
        raise EvalError(f"{wav} is missing (preprocess the video first)")
    audio = load_audio(str(wav))
    n = min(engine.n_frames, len(features), len(engine.boxes))
    try:
        val, train = dataset_split(dataset_dir, n, "val"), dataset_split(dataset_dir, n, "train")
        split = describe_split(dataset_dir, n)
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    sync = None
    sync_path = syncnet_root / name / "best.pth"
    if sync_path.is_file():
        sync = SyncJudge(sync_path, device)
        if sync.mode != engine.mode:
            raise EvalError(f"{sync_path} is a {sync.mode!r} SyncNet but the U-Net uses {engine.mode!r} features")
        if not sync.trusted:
            log.warning("SyncNet %s: %s", sync_path, sync_status(sync)["note"])
    else:
        log.warning("no SyncNet at %s: SyncNet offset/confidence are left out", sync_path)
    speaking = engine.speaking(audio, len(features))
    return Avatar(name, dataset_dir, ckpt, engine, features, engine.gate(features, speaking), speaking, audio,
                  np.asarray(val), np.asarray(train), split, sync)


def evaluate_avatar(av: Avatar, audio_files: list[Path], mesh: FaceMesh, max_frames: int | None,
                    policies: tuple[str, ...] = DEFAULT_POLICIES, seed: int = 0) -> tuple[dict, dict]:
    """All numbers of one avatar/checkpoint (JSON-able) and the series/crops for the page."""
    log.info("self-reconstruction of %s on %d held-out frames (%s)", av.label, len(av.held_out), av.split["kind"])
    self_res, self_art = self_reconstruction(av, mesh, max_frames, policies, seed)
    cross, cross_arts = [], []
    for path in audio_files:
        log.info("cross-driving %s with %s", av.label, path)
        res, art = cross_driven(av, path, mesh, max_frames, self_art["real_lips"], self_art["real_landmarks"],
                                self_res["closed_mouth_max"], self_art["real_envelope"])
        cross.append(res)
        cross_arts.append(art)
    meta = {k: av.meta.get(k) for k in ("mode", "size", "epoch") if k in av.meta}
    result = {"name": av.name, "label": av.label, "checkpoint": str(av.checkpoint), "meta": meta,
              "split": av.split, "syncnet": sync_status(av.sync),
              "reference_policy": {"default": "cross-reference", "runs": list(policies), "seed": seed},
              "verdict": verdict(self_res["runs"]), "self_reconstruction": self_res, "cross_driven": cross}
    return result, {"self": self_art, "cross": cross_arts}


def parse_compare(value: str, name: str, checkpoint_root: Path) -> tuple[str, str | None]:
    """`--compare`: an epoch number or .pth of the same avatar, else another avatar (NAME2 or NAME2:N)."""
    if value.isdigit() or (value.endswith(".pth") and Path(value).is_file()):
        return name, value
    if ":" in value:
        other, ckpt = value.split(":", 1)
        return other, ckpt
    return value, None


def parse_policies(value: str) -> tuple[str, ...]:
    """`--references`: comma-separated policies, at least one cross-reference one."""
    policies = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise argparse.ArgumentTypeError(f"unknown reference policy {unknown}; choose from {', '.join(POLICIES)}")
    if not set(policies) - {"same"}:
        raise argparse.ArgumentTypeError("reference = target alone leaks the real mouth; add closed or random")
    return policies


def build_parser() -> argparse.ArgumentParser:
    # defaults (one block)
    defaults: dict[str, Any] = dict(
        checkpoint=None, audio=[], compare=None, dataset_root=settings.paths.dataset_root,
        checkpoint_root=settings.paths.checkpoint_root, syncnet_root=settings.paths.syncnet_root,
        out=None, max_frames=None, backend=settings.models.backend,
        device=settings.models.resolved_device(), references=DEFAULT_POLICIES, seed=0, strict=False)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--name", required=True, help="avatar name (dataset/<name>, checkpoint/<name>)")
    p.add_argument("--checkpoint", help="epoch number or .pth (default: the latest epoch)")
    p.add_argument("--audio", nargs="*", type=Path, help="foreign audio files for the cross-driven test")
    p.add_argument("--compare", help="a second checkpoint (epoch or .pth) or avatar (NAME2 or NAME2:EPOCH)")
    p.add_argument("--dataset_root", type=Path)
    p.add_argument("--checkpoint_root", type=Path)
    p.add_argument("--syncnet_root", type=Path)
    p.add_argument("--out", type=Path, help="report folder (default: <result_dir>/eval/<name>)")
    p.add_argument("--max_frames", type=int, help="cap on frames per segment (held-out, each audio file)")
    p.add_argument("--references", type=parse_policies,
                   help="reference policies of the held-out runs: closed, random, same (diagnostic)")
    p.add_argument("--seed", type=int, help="seed of the random-reference run")
    p.add_argument("--strict", action="store_true",
                   help=f"exit with code {EXIT_UNUSABLE} when the verdict is UNUSABLE")
    p.add_argument("--backend", choices=["onnx", "torch"])
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps")
    p.set_defaults(**defaults)
    return p


def run(args: argparse.Namespace) -> tuple[dict, Path]:
    """Evaluate, write report.json and report.html; returns (report, output folder)."""
    for path in args.audio:
        if not Path(path).is_file():
            raise EvalError(f"audio file not found: {path}")
    if args.max_frames is not None and args.max_frames < 3:
        raise EvalError(f"--max_frames must be at least 3, got {args.max_frames}")
    out_dir = args.out or settings.paths.result_dir / "eval" / args.name
    roots = (args.dataset_root, args.checkpoint_root, args.syncnet_root, args.backend, args.device,
             settings.paths.avatar_roots()[1:])
    avatar = load_avatar(args.name, args.checkpoint, *roots)
    other = None
    if args.compare:
        other_name, other_ckpt = parse_compare(args.compare, args.name, args.checkpoint_root)
        other = load_avatar(other_name, other_ckpt, *roots)
    mesh = FaceMesh()
    policies = tuple(args.references)
    try:
        report, arts = evaluate_avatar(avatar, list(args.audio), mesh, args.max_frames, policies, args.seed)
        if other is not None:
            report["compare"], _ = evaluate_avatar(other, list(args.audio), mesh, args.max_frames, policies,
                                                   args.seed)
    finally:
        mesh.close()
    distinct_labels(report)
    report.update(created=_dt.datetime.now().isoformat(timespec="seconds"), notes=list(NOTES),
                  settings={"max_frames": args.max_frames, "backend": args.backend, "device": args.device,
                            "vshift": VSHIFT, "fps": FPS, "silence_min_ms": SILENCE_MS,
                            "silence_edge_ms": SILENCE_EDGE_MS, "syncnet_min_accuracy": M.SYNCNET_MIN_ACCURACY,
                            "colour_step_max": M.COLOUR_STEP_MAX})
    report = _clean(report)
    write_text_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out_dir / "report.html", build_html(report, build_page(report, arts, list(args.audio))))
    return report, out_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        report, out_dir = run(args)
    except EvalError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(summary_text(report))
    print(f"report: {out_dir / 'report.json'}  {out_dir / 'report.html'}")
    if args.strict and not report["verdict"]["usable"]:
        return EXIT_UNUSABLE
    return 0


if __name__ == "__main__":
    sys.exit(main())
