"""Evaluate a trained avatar: self-reconstruction on the held-out tail of its video, cross-driven
lip-sync on foreign audio, and the real video's own numbers as the ceiling.

    python evaluate.py --name NAME [--checkpoint N] [--audio FILE ...] [--compare NAME2|CKPT2]

Writes `result/eval/NAME/report.json` and a self-contained `report.html` (plots and frame strips
embedded) and prints a summary table. Metric definitions: docs/evaluation.md and `metrics.py`.
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
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from config import settings
from syncnet_328 import load_syncnet_checkpoint
from synctalk import landmarks
from synctalk import metrics as M
from synctalk.audio import load_audio, segments_to_mask, silence_segments, speech_envelope
from synctalk.avatar import AvatarError, AvatarRegistry, AvatarRoot
from synctalk.dataset import FEATURE_FILES, DatasetError, dataset_split
from synctalk.engine import EngineError, LipSyncEngine
from synctalk.timing import FPS, SAMPLE_RATE
from unet_328 import CheckpointError
from utils import audio_window

log = logging.getLogger("evaluate")

SR = SAMPLE_RATE
VSHIFT = 15  # SyncNet offset search: +-15 frames (syncnet_python's default)
CHUNK = 16  # frames rendered and measured per step
STRIP_FRAMES = 6  # frames per strip in the report

NOTES = [
    "Self-reconstruction uses the held-out last 10% of the training video, never seen in training, driven "
    "by its own audio; the real frames are the ground truth.",
    "LMD uses mediapipe face-mesh lip points (40, each set centred, pixels at crop resolution), not the "
    "68-point FAN mouth points of the literature, so values are not directly comparable to papers.",
    "SyncNet offset/confidence follow joonson/syncnet_python (offsets +-15 frames, mean distance per "
    "offset, confidence = median - min, LSE-D = min) but use this avatar's own per-person SyncNet on "
    "per-frame embeddings; numbers are not comparable to papers' LSE-C/LSE-D.",
    "Offset sign: positive = the audio runs ahead of the picture by that many frames (video frame i "
    "matches audio frame i - offset).",
    "The 'real' column is the training video itself measured the same way: the ceiling.",
]


class EvalError(Exception):
    """A problem with the user's input, reported as one `error:` line."""


# ----------------------------------------------------------------------------------------------
# Face landmarks (mediapipe face mesh, one image at a time so no tracking smooths the jitter away)


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


class SyncJudge:
    """The avatar's own SyncNet: per-frame face and audio embeddings (L2-normalised)."""

    def __init__(self, path: Path, device: str = "cpu"):
        import torch


        try:
            self.net, meta = load_syncnet_checkpoint(path, device)
        except CheckpointError as exc:
            raise EvalError(str(exc)) from None
        self.mode, self.size = meta["mode"], str(meta["size"])
        self.device, self.path, self._torch = device, path, torch

    def faces(self, crops: np.ndarray) -> np.ndarray:
        """Crops `[B, crop, crop, 3]` BGR uint8 -> face embeddings `[B, D]` (on the model's interior)."""
        torch, F = self._torch, self._torch.nn.functional
        b, s = self.net.size.border, self.net.size.inner
        x = torch.from_numpy(np.ascontiguousarray(crops[:, b:b + s, b:b + s])).permute(0, 3, 1, 2)
        with torch.no_grad():
            v = self.net.face_encoder(x.float().div(255.0).to(self.device)).flatten(1)
        return F.normalize(v, p=2, dim=1).cpu().numpy()

    def audio(self, features: np.ndarray, indices: np.ndarray, batch: int = 64) -> np.ndarray:
        """Audio embeddings `[len(indices), D]` of the 16-frame windows of `features` at `indices`."""

        torch, F = self._torch, self._torch.nn.functional
        out = []
        for i in range(0, len(indices), batch):
            win = np.stack([audio_window(features, int(j), self.mode) for j in indices[i:i + batch]])
            with torch.no_grad():
                a = self.net.audio_encoder(torch.from_numpy(win).float().to(self.device)).flatten(1)
            out.append(F.normalize(a, p=2, dim=1).cpu().numpy())
        return np.concatenate(out)


@dataclass
class Avatar:
    """Everything evaluation needs about one avatar at one checkpoint."""

    name: str
    dataset_dir: Path
    checkpoint: Path
    engine: object  # services.generator.LipSyncEngine
    features: np.ndarray  # [N, ...] the dataset's audio features
    audio: np.ndarray  # 16 kHz mono float32 of the training video
    held_out: tuple[int, int]  # [start, stop) frames never trained on
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

    def frame(self, index: int) -> np.ndarray:
        return self.engine.frames.get(int(index))

    @property
    def seam_depth(self) -> int:
        """How far (crop px) inside the crop edge the paste boundary zone reaches: the source border ring
        (where generated pixels start) plus 2 px."""
        return self.engine.size.border + 2


# ----------------------------------------------------------------------------------------------
# Measuring one segment


@dataclass
class Track:
    """Per-frame measurements of one segment (generated or real)."""

    landmarks: list = field(default_factory=list)  # [478, 2] full-frame pixels, NaN without a face
    seam: list = field(default_factory=list)
    face_emb: list = field(default_factory=list)
    strip: list = field(default_factory=list)  # crops at the strip positions

    def finish(self, boxes: np.ndarray, crop: int) -> dict:
        lm = np.stack(self.landmarks) if self.landmarks else np.zeros((0, 478, 2))
        lips = M.to_crop_coords(M.lip_points(lm), boxes, crop) if len(lm) else np.zeros((0, 40, 2))
        return {"landmarks": lm, "lips": lips, "opening": M.mouth_opening(lm) if len(lm) else np.zeros(0),
                "seam": np.asarray(self.seam, np.float64),
                "face_emb": np.concatenate(self.face_emb) if self.face_emb else None, "strip": self.strip}


def measure_chunk(track: Track, frames: list[np.ndarray], crops: np.ndarray, boxes: np.ndarray,
                  mesh: FaceMesh, sync: SyncJudge | None, positions: range, strip_at: set[int],
                  seam_depth: int) -> None:
    """Landmarks, seam scores, SyncNet face embeddings and strip crops of a chunk of full frames and
    their face crops (`seam_depth`: crop px inside the box edge where the paste can differ)."""
    for f, b, c, pos in zip(frames, boxes, crops, positions):
        track.landmarks.append(mesh(f))
        depth = int(math.ceil(seam_depth * (b[2] - b[0]) / len(c))) + 1  # crop px -> frame px
        track.seam.append(M.seam_score(f, b, depth=depth))
        if pos in strip_at:
            track.strip.append(c.copy())
    if sync is not None:
        track.face_emb.append(sync.faces(crops))


def fallback_mouth_box(crop: int) -> tuple[int, int, int, int]:
    """Where the mouth sits in a crop (mid-nose down) when no landmarks were found."""
    return int(0.25 * crop), int(0.2 * crop), int(0.75 * crop), int(0.6 * crop)


def strip_positions(n: int, k: int = STRIP_FRAMES) -> list[int]:
    return sorted(set(np.linspace(0, max(n - 1, 0), min(k, n)).round().astype(int).tolist()))


def sync_block(track: dict, sync: SyncJudge | None, features: np.ndarray, indices: np.ndarray) -> dict:
    """SyncNet offset / confidence / min distance of a measured segment against `features[indices]`."""
    if sync is None or track["face_emb"] is None or len(indices) < 3:
        return {}
    scores = M.sync_scores(M.sync_distances(track["face_emb"], sync.audio(features, indices), VSHIFT))
    return {"sync_offset": scores["offset"], "sync_confidence": scores["confidence"],
            "sync_min_dist": scores["min_dist"]}


def audio_block(opening: np.ndarray, audio16k: np.ndarray, closed_max: float) -> tuple[dict, dict]:
    """Envelope correlation and closure in silences; also the series for the plots."""
    n = len(opening)
    env = speech_envelope(audio16k, SR, FPS)[:n]
    env = np.pad(env, (0, n - len(env)))
    segments = silence_segments(env, FPS, 300.0)
    silent = segments_to_mask(segments, n)
    values = {"envelope_corr": M.envelope_correlation(opening, env),
              "closure_in_silence": M.closure_share(opening, silent, closed_max),
              "silent_frames": int(silent.sum())}
    return values, {"envelope": env, "silences": segments}


def render(av: Avatar, features: np.ndarray, rows: np.ndarray, frames: np.ndarray
           ) -> tuple[list[np.ndarray], np.ndarray]:
    """Generated (full frames, crops): output j uses the audio window at feature row `rows[j]` on the
    avatar's source frame `frames[j]`. The crops are the model's output at crop size; the full frames
    are those crops pasted back the way the engine pastes them."""
    eng = av.engine
    crops = eng.render_crops(eng.audio_windows(features, rows), frames)
    full = [eng.paste(crop, int(fi), np.empty(eng.frame_shape, np.uint8)) for crop, fi in zip(crops, frames)]
    return full, crops


def sample_openings(av: Avatar, mesh: FaceMesh, count: int = 60) -> np.ndarray:
    """Mouth openings of `count` frames spread over the whole real video (for its closed-mouth range)."""
    n = len(av.boxes)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
    return M.mouth_opening(np.stack([mesh(av.frame(int(i))) for i in idx]))


def _progress(n: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=n, desc=desc, unit="frame", leave=False, disable=None)


def self_reconstruction(av: Avatar, mesh: FaceMesh, max_frames: int | None) -> tuple[dict, dict]:
    """Drive the model with the held-out segment's own audio; compare with the real frames."""
    a, b = av.held_out
    if max_frames:
        b = min(b, a + max_frames)
    idx = np.arange(a, b)
    n = len(idx)
    gen, real = Track(), Track()
    strip_at = set(strip_positions(n))
    sums = {"psnr_crop": 0.0, "ssim_crop": 0.0, "psnr_full": 0.0, "ssim_full": 0.0}
    sharp_gen, sharp_real = [], []
    bar = _progress(n, f"{av.label} held-out")
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        fr_gen, c_gen = render(av, av.features, idx[s:e], idx[s:e])
        fr_real = [av.frame(int(i)) for i in idx[s:e]]
        c_real = np.stack([np.asarray(av.engine.crop(int(i))) for i in idx[s:e]])
        boxes = av.boxes[idx[s:e]]
        measure_chunk(gen, fr_gen, c_gen, boxes, mesh, av.sync, range(s, e), strip_at, av.seam_depth)
        measure_chunk(real, fr_real, c_real, boxes, mesh, av.sync, range(s, e), strip_at, av.seam_depth)
        k = e - s
        sums["psnr_crop"] += k * M.video_psnr(c_gen, c_real)
        sums["ssim_crop"] += k * M.ssim(c_gen, c_real)
        sums["psnr_full"] += k * M.video_psnr(np.stack(fr_gen), np.stack(fr_real))
        sums["ssim_full"] += k * M.ssim(np.stack(fr_gen), np.stack(fr_real), batch=1)
        for j in range(k):  # sharpness on the real mouth region, same region in both
            lm = real.landmarks[s + j]
            lips = M.to_crop_coords(M.lip_points(lm[None]), boxes[j:j + 1], av.crop)[0]
            x1, y1, x2, y2 = (fallback_mouth_box(av.crop) if np.isnan(lips).any()
                              else M.mouth_box(lips, (av.crop, av.crop)))
            sharp_gen.append(c_gen[j, y1:y2, x1:x2])
            sharp_real.append(c_real[j, y1:y2, x1:x2])
        bar.update(k)
    bar.close()
    boxes = av.boxes[idx]
    g, r = gen.finish(boxes, av.crop), real.finish(boxes, av.crop)
    seg_audio = av.audio[a * SR // FPS: b * SR // FPS]
    closed_max = M.closed_mouth_threshold(np.concatenate([r["opening"], sample_openings(av, mesh)]))
    model = {key: v / n for key, v in sums.items()}
    model.update({
        "lmd": M.landmark_distance(g["lips"], r["lips"]),
        "opening_corr": M.opening_correlation(g["opening"], r["opening"]),
        "sharpness_ratio": M.sharpness_ratio(sharp_gen, sharp_real),
        "seam": float(np.nanmean(g["seam"])),
        "jitter": M.temporal_jitter(g["lips"]),
        "jitter_ratio": M.jitter_ratio(g["lips"], r["lips"]),
        "face_found": float(np.mean(~np.isnan(g["opening"]))),
    })
    model.update(sync_block(g, av.sync, av.features, idx))
    gen_audio, series = audio_block(g["opening"], seg_audio, closed_max)
    model.update(gen_audio)
    real_vals = {"seam": float(np.nanmean(r["seam"])), "jitter": M.temporal_jitter(r["lips"]),
                 "jitter_ratio": 1.0, "sharpness_ratio": 1.0, "opening_corr": 1.0, "lmd": 0.0,
                 "face_found": float(np.mean(~np.isnan(r["opening"])))}
    real_vals.update(sync_block(r, av.sync, av.features, idx))
    real_vals.update(audio_block(r["opening"], seg_audio, closed_max)[0])
    result = {"frames": n, "frame_range": [a, b], "closed_mouth_max": closed_max, "model": model,
              "real": real_vals}
    art = {"gen_opening": g["opening"], "real_opening": r["opening"], "audio": seg_audio,
           "gen_strip": g["strip"], "real_strip": r["strip"], "real_lips": r["lips"], **series}
    return result, art


def cross_driven(av: Avatar, path: Path, mesh: FaceMesh, max_frames: int | None, real_lips: np.ndarray,
                 closed_max: float) -> tuple[dict, dict]:
    """Drive the avatar with a foreign audio file over the held-out frames (played back and forth)."""

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
    idx = pingpong(*av.held_out, n)
    track = Track()
    strip_at = set(strip_positions(n))
    bar = _progress(n, f"{av.label} {path.name}")
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        frames, crops = render(av, features, np.arange(s, e), idx[s:e])
        measure_chunk(track, frames, crops, av.boxes[idx[s:e]], mesh, av.sync, range(s, e), strip_at,
                      av.seam_depth)
        bar.update(e - s)
    bar.close()
    g = track.finish(av.boxes[idx], av.crop)
    audio16k = audio16k[: n * SR // FPS]
    model = {"jitter": M.temporal_jitter(g["lips"]), "jitter_ratio": M.jitter_ratio(g["lips"], real_lips),
             "seam": float(np.nanmean(g["seam"])), "face_found": float(np.mean(~np.isnan(g["opening"])))}
    model.update(sync_block(g, av.sync, features, np.arange(n)))
    values, series = audio_block(g["opening"], audio16k, closed_max)
    model.update(values)
    result = {"audio": str(path), "frames": n, "model": model}
    art = {"gen_opening": g["opening"], "audio": audio16k, "gen_strip": g["strip"], **series}
    return result, art


# ----------------------------------------------------------------------------------------------
# Report: JSON, HTML (embedded plots and frame strips), stdout table

# (section, key, label, better) for the table and the bars; better: "up", "down", "zero", "one"
ROWS = [
    ("self", "psnr_crop", "PSNR face crop (dB)", "up"),
    ("self", "ssim_crop", "SSIM face crop", "up"),
    ("self", "psnr_full", "PSNR full frame (dB)", "up"),
    ("self", "ssim_full", "SSIM full frame", "up"),
    ("self", "lmd", "mouth LMD (px @ crop)", "down"),
    ("self", "opening_corr", "mouth-opening corr. with real", "up"),
    ("self", "sharpness_ratio", "mouth sharpness / real", "one"),
    ("self", "seam", "seam score (1 = invisible)", "one"),
    ("self", "sync_confidence", "SyncNet confidence", "up"),
    ("self", "sync_min_dist", "SyncNet min distance", "down"),
    ("self", "sync_offset", "SyncNet offset (frames)", "zero"),
    ("self", "envelope_corr", "opening vs speech envelope", "up"),
    ("self", "closure_in_silence", "mouth closed in silences", "up"),
    ("self", "jitter_ratio", "mouth jitter / real", "one"),
    ("cross", "sync_confidence", "SyncNet confidence", "up"),
    ("cross", "sync_min_dist", "SyncNet min distance", "down"),
    ("cross", "sync_offset", "SyncNet offset (frames)", "zero"),
    ("cross", "envelope_corr", "opening vs speech envelope", "up"),
    ("cross", "closure_in_silence", "mouth closed in silences", "up"),
    ("cross", "jitter_ratio", "mouth jitter / real", "one"),
    ("cross", "seam", "seam score (1 = invisible)", "one"),
]


def _clean(value):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


BETTER = {"up": "higher", "down": "lower", "zero": "0", "one": "near 1"}


def table_rows(report: dict, with_better: bool = False) -> list[tuple]:
    """(label, [model, compare?, real]) per row of the summary (plus the `better` key when asked),
    cross-driven values averaged over the audio files."""
    runs = [report] + ([report["compare"]] if report.get("compare") else [])
    rows = []
    for section, key, label, better in ROWS:
        cells = []
        if section == "self":
            for run in runs:
                cells.append(run["self_reconstruction"]["model"].get(key))
            cells.append(report["self_reconstruction"]["real"].get(key))
            rows.append((f"[held-out] {label}", cells) + ((better,) if with_better else ()))
        else:
            if not report["cross_driven"]:
                continue
            for run in runs:
                vals = [c["model"].get(key) for c in run["cross_driven"] if c["model"].get(key) is not None]
                cells.append(float(np.mean(vals)) if vals else None)
            cells.append(report["self_reconstruction"]["real"].get(key))
            rows.append((f"[cross, {len(report['cross_driven'])} file(s)] {label}", cells)
                        + ((better,) if with_better else ()))
    return rows


def summary_text(report: dict) -> str:
    """The readable table printed at the end."""
    heads = [report["label"]] + ([report["compare"]["label"]] if report.get("compare") else []) + ["real video"]
    rows = table_rows(report)
    w0 = max(len(r[0]) for r in rows) + 2
    widths = [max(12, len(h) + 2) for h in heads]
    lines = ["metric".ljust(w0) + "".join(h.rjust(w) for h, w in zip(heads, widths))]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        lines.append(label.ljust(w0) + "".join(_fmt(c).rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_opening(art: dict, title: str, closed_max: float | None = None) -> str:
    """Mouth opening vs time over the audio waveform, silences shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.0))
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
    tf = np.arange(len(art["gen_opening"])) / FPS
    if art.get("real_opening") is not None:
        ax.plot(tf, art["real_opening"], color="k", lw=1.2, label="real")
    ax.plot(tf, art["gen_opening"], color="tab:red", lw=1.2, label="generated")
    if art.get("compare_opening") is not None:
        ax.plot(tf[: len(art["compare_opening"])], art["compare_opening"], color="tab:green", lw=1.0,
                label="compare")
    if closed_max is not None and math.isfinite(closed_max):
        ax.axhline(closed_max, color="tab:blue", ls="--", lw=0.8, label="closed-mouth max (real)")
    ax.set_xlabel("time (s); shaded = silences >= 300 ms; grey = waveform")
    ax.set_ylabel("mouth opening")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def plot_bars(report: dict) -> str:
    """One small bar chart per metric: model (and compare) beside the real video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, cells) for label, cells in table_rows(report) if any(c is not None for c in cells)]
    heads = [report["label"]] + ([report["compare"]["label"]] if report.get("compare") else []) + ["real"]
    cols = 4
    nrows = max(1, math.ceil(len(rows) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 2.3 * nrows), squeeze=False)
    colors = ["tab:red", "tab:green", "0.3"][-len(heads):] if len(heads) == 3 else ["tab:red", "0.3"]
    for ax, (label, cells) in zip(axes.flat, rows):
        vals = [c if c is not None else 0.0 for c in cells]
        ax.bar(range(len(vals)), vals, color=colors[: len(vals)])
        ax.set_xticks(range(len(vals)), heads, fontsize=7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_html(report: dict, arts: dict) -> str:
    """The self-contained HTML page."""
    esc = html.escape
    sr = report["self_reconstruction"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Evaluation: {esc(report['label'])}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;"
        "padding:8px;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>Evaluation of {esc(report['label'])}</h1>",
        f"<p>Checkpoint <code>{esc(report['checkpoint'])}</code>, created {esc(report['created'])}.</p>",
        "<h2>Summary</h2><table><tr><th>metric</th>",
    ]
    heads = [report["label"]] + ([report["compare"]["label"]] if report.get("compare") else []) + ["real video"]
    parts += [f"<th>{esc(h)}</th>" for h in heads] + ["<th>better</th></tr>"]
    for label, cells, better in table_rows(report, with_better=True):
        parts.append(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells)
                     + f"<td>{BETTER[better]}</td></tr>")
    parts.append("</table>")
    parts.append(f"<h2>Metric bars</h2><img src='data:image/png;base64,{arts['bars']}'>")
    parts.append(f"<h2>Held-out self-reconstruction (frames {sr['frame_range'][0]}-{sr['frame_range'][1] - 1})</h2>")
    parts.append(f"<img src='data:image/png;base64,{arts['self_plot']}'>")
    parts.append("<p>Frames: top row real, bottom row generated"
                 + (", third row the compared model" if report.get("compare") else "") + ".</p>")
    parts.append(f"<img src='data:image/jpeg;base64,{arts['self_strip']}'>")
    for i, cd in enumerate(report["cross_driven"]):
        parts.append(f"<h2>Cross-driven: {esc(Path(cd['audio']).name)} ({cd['frames']} frames)</h2>")
        parts.append(f"<img src='data:image/png;base64,{arts['cross_plots'][i]}'>")
        parts.append(f"<img src='data:image/jpeg;base64,{arts['cross_strips'][i]}'>")
    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"]) + "</ul>")
    parts.append("<h2>report.json</h2><details><summary>show</summary><pre>"
                 + esc(json.dumps(report, indent=2)) + "</pre></details></body></html>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------
# Command


def load_avatar(name: str, checkpoint: str | None, dataset_root: Path, checkpoint_root: Path,
                syncnet_root: Path, backend: str, device: str) -> Avatar:
    """Engine, held-out split, training audio and SyncNet of one avatar (found by the registry the
    server uses: the given roots, then the bundled demo); EvalError when unusable."""
    registry = AvatarRegistry([AvatarRoot(dataset_root, checkpoint_root, "user"),
                               *settings.paths.avatar_roots()[1:]])
    try:
        info = registry.find(name, checkpoint)
    except AvatarError as exc:
        raise EvalError(str(exc)) from None
    dataset_dir, ckpt = info.dataset_dir, info.checkpoint_path


    try:
        engine = LipSyncEngine.load(dataset_dir, ckpt, backend=backend, device=device,
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
        val = dataset_split(dataset_dir, n, "val")
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    sync = None
    sync_path = syncnet_root / name / "best.pth"
    if sync_path.is_file():
        sync = SyncJudge(sync_path, device)
        if sync.mode != engine.mode:
            raise EvalError(f"{sync_path} is a {sync.mode!r} SyncNet but the U-Net uses {engine.mode!r} features")
    else:
        log.warning("no SyncNet at %s: SyncNet offset/confidence are left out", sync_path)
    return Avatar(name, dataset_dir, ckpt, engine, features, audio, (int(val[0]), int(val[-1]) + 1), sync)


def evaluate_avatar(av: Avatar, audio_files: list[Path], mesh: FaceMesh, max_frames: int | None
                    ) -> tuple[dict, dict]:
    """All numbers of one avatar/checkpoint (JSON-able) and the series/crops for the page."""
    log.info("self-reconstruction of %s on held-out frames %d-%d", av.label, av.held_out[0], av.held_out[1] - 1)
    self_res, self_art = self_reconstruction(av, mesh, max_frames)
    cross, cross_arts = [], []
    for path in audio_files:
        log.info("cross-driving %s with %s", av.label, path)
        res, art = cross_driven(av, path, mesh, max_frames, self_art["real_lips"], self_res["closed_mouth_max"])
        cross.append(res)
        cross_arts.append(art)
    meta = {k: av.meta.get(k) for k in ("mode", "size", "epoch") if k in av.meta}
    result = {"name": av.name, "label": av.label, "checkpoint": str(av.checkpoint), "meta": meta,
              "syncnet": str(av.sync.path) if av.sync else None,
              "self_reconstruction": self_res, "cross_driven": cross}
    return result, {"self": self_art, "cross": cross_arts}


def parse_compare(value: str, name: str, checkpoint_root: Path) -> tuple[str, str | None]:
    """`--compare`: an epoch number or .pth of the same avatar, else another avatar (NAME2 or NAME2:N)."""
    if value.isdigit() or (value.endswith(".pth") and Path(value).is_file()):
        return name, value
    if ":" in value:
        other, ckpt = value.split(":", 1)
        return other, ckpt
    return value, None


def build_parser() -> argparse.ArgumentParser:
    # defaults (one block)
    defaults = dict(checkpoint=None, audio=[], compare=None, dataset_root=settings.paths.dataset_root,
                    checkpoint_root=settings.paths.checkpoint_root, syncnet_root=settings.paths.syncnet_root,
                    out=None, max_frames=None, backend=settings.models.backend,
                    device=settings.models.resolved_device())
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
    roots = (args.dataset_root, args.checkpoint_root, args.syncnet_root, args.backend, args.device)
    avatar = load_avatar(args.name, args.checkpoint, *roots)
    other = None
    if args.compare:
        other_name, other_ckpt = parse_compare(args.compare, args.name, args.checkpoint_root)
        other = load_avatar(other_name, other_ckpt, *roots)
    mesh = FaceMesh()
    try:
        report, arts = evaluate_avatar(avatar, list(args.audio), mesh, args.max_frames)
        if other is not None:
            report["compare"], other_arts = evaluate_avatar(other, list(args.audio), mesh, args.max_frames)
    finally:
        mesh.close()
    report.update(created=_dt.datetime.now().isoformat(timespec="seconds"), notes=NOTES,
                  settings={"max_frames": args.max_frames, "backend": args.backend, "device": args.device,
                            "vshift": VSHIFT, "fps": FPS, "silence_min_ms": 300})
    if report["syncnet"] is None:
        report["notes"] = NOTES + [f"No SyncNet checkpoint at {args.syncnet_root / args.name / 'best.pth'}: "
                                   "SyncNet numbers are missing."]
    report = _clean(report)

    sa = arts["self"]
    if other is not None:
        sa = dict(sa, compare_opening=other_arts["self"]["gen_opening"])
    page = {"bars": plot_bars(report),
            "self_plot": plot_opening(sa, "held-out: mouth opening, real vs generated",
                                      report["self_reconstruction"]["closed_mouth_max"]),
            "self_strip": strip_jpeg([sa["real_strip"], sa["gen_strip"]]
                                     + ([other_arts["self"]["gen_strip"]] if other is not None else [])),
            "cross_plots": [], "cross_strips": []}
    for i, art in enumerate(arts["cross"]):
        if other is not None:
            art = dict(art, compare_opening=other_arts["cross"][i]["gen_opening"])
        page["cross_plots"].append(plot_opening(art, f"{Path(args.audio[i]).name}: generated mouth opening",
                                                report["self_reconstruction"]["closed_mouth_max"]))
        page["cross_strips"].append(strip_jpeg([art["gen_strip"]]
                                               + ([other_arts["cross"][i]["gen_strip"]] if other is not None else [])))
    write_atomic(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out_dir / "report.html", build_html(report, page))
    return report, out_dir


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    try:
        report, out_dir = run(args)
    except EvalError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(summary_text(report))
    print(f"report: {out_dir / 'report.json'}  {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
