"""Evaluation metrics: pure functions over numpy arrays, each testable on constructed inputs.

Images are BGR uint8 `[H, W, 3]` (or batches `[N, H, W, 3]`), landmarks float `[N, P, 2]` in pixels with
NaN rows for frames where no face was found. `evaluate.py` wires them to the model; docs/evaluation.md
says what each number means and how it relates to the literature's.

Conventions worth knowing:
- PSNR is capped at `PSNR_CAP` dB (identical images give the cap, not infinity, so averages stay finite).
- Correlations of a constant series are 0 (no co-variation), never NaN.
- SyncNet offsets follow joonson/syncnet_python: `offset = vshift - argmin_k mdist[k]`, i.e. video frame i
  matches audio frame i - offset best; a positive offset means the audio runs ahead of the picture.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

PSNR_CAP = 100.0  # dB, reported for identical images
SEAM_FLOOR = 2.0  # Sobel gradient units (8-bit grey): floor of the interior level in `seam_score`

# mediapipe face-mesh indices (478-point topology) of the lips: the 40 points of FACEMESH_LIPS
LIP_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185)
LIP_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
LIP_POINTS = LIP_OUTER + LIP_INNER
INNER_UPPER, INNER_LOWER = 13, 14  # mid inner upper / lower lip
EYE_OUTER_L, EYE_OUTER_R = 33, 263  # outer eye corners: face-size reference for the mouth opening


# ----------------------------------------------------------------------------------------------
# Pixel fidelity


def psnr(a: np.ndarray, b: np.ndarray, max_val: float = 255.0, cap: float = PSNR_CAP) -> float:
    """Peak signal-to-noise ratio in dB of two same-shape images, capped at `cap` (identical -> cap)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    if mse <= 0.0:
        return cap
    return min(cap, 10.0 * math.log10(max_val * max_val / mse))


def video_psnr(a: np.ndarray, b: np.ndarray, max_val: float = 255.0) -> float:
    """Mean over frames of the per-frame PSNR of two `[N, H, W, C]` stacks."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"video_psnr: need equal, non-zero frame counts, got {len(a)} and {len(b)}")
    return float(np.mean([psnr(x, y, max_val) for x, y in zip(a, b)]))


def ssim(a: np.ndarray, b: np.ndarray, batch: int = 16) -> float:
    """Mean SSIM (Wang et al. 2004: 11-px Gaussian window, sigma 1.5, data range 255, averaged over the
    colour channels) of two uint8 stacks `[N, H, W, C]` or two single images `[H, W, C]`."""
    import torch
    from pytorch_msssim import ssim as _ssim

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if min(a.shape[1:3]) < 11:
        raise ValueError(f"ssim: images must be at least 11 px on each side, got {a.shape[1:3]}")
    values = []
    with torch.no_grad():
        for i in range(0, len(a), batch):
            x = torch.from_numpy(np.ascontiguousarray(a[i:i + batch])).permute(0, 3, 1, 2).float()
            y = torch.from_numpy(np.ascontiguousarray(b[i:i + batch])).permute(0, 3, 1, 2).float()
            values.append(_ssim(x, y, data_range=255.0, size_average=False).numpy())
    return float(np.concatenate(values).mean())


# ----------------------------------------------------------------------------------------------
# Landmark geometry


def to_crop_coords(points: np.ndarray, boxes: np.ndarray, crop: int) -> np.ndarray:
    """Full-frame landmark pixels `[N, P, 2]` -> pixels of the `crop` x `crop` face crop cut from each
    frame's square box `[N, 4]` (x1, y1, x2, y2, exclusive ends)."""
    points = np.asarray(points, np.float64)
    boxes = np.asarray(boxes, np.float64)
    origin = boxes[:, None, :2]
    scale = crop / (boxes[:, 2] - boxes[:, 0])
    return (points - origin) * scale[:, None, None]


def lip_points(landmarks: np.ndarray) -> np.ndarray:
    """The 40 mediapipe lip points `[N, 40, 2]` of 478-point landmarks `[N, 478, 2]`."""
    return np.asarray(landmarks)[:, list(LIP_POINTS)]


def landmark_distance(gen: np.ndarray, real: np.ndarray) -> float:
    """Mouth landmark distance (LMD): per frame, centre each point set on its own centroid and take the
    mean Euclidean distance over points; mean over the frames where both sets exist. NaN if none."""
    gen, real = np.asarray(gen, np.float64), np.asarray(real, np.float64)
    if gen.shape != real.shape:
        raise ValueError(f"landmark_distance: shapes differ {gen.shape} vs {real.shape}")
    ok = ~(np.isnan(gen).any(axis=(1, 2)) | np.isnan(real).any(axis=(1, 2)))
    if not ok.any():
        return float("nan")
    g = gen[ok] - gen[ok].mean(axis=1, keepdims=True)
    r = real[ok] - real[ok].mean(axis=1, keepdims=True)
    return float(np.linalg.norm(g - r, axis=2).mean())


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """Per-frame mouth opening: inner-lip gap (points 13-14) divided by the outer-eye-corner distance
    (points 33-263), so it does not depend on face size or crop scale. `[N, 478, 2]` -> `[N]` (NaN where
    no face)."""
    lm = np.asarray(landmarks, np.float64)
    gap = np.linalg.norm(lm[:, INNER_UPPER] - lm[:, INNER_LOWER], axis=1)
    face = np.linalg.norm(lm[:, EYE_OUTER_L] - lm[:, EYE_OUTER_R], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(face > 0, gap / face, np.nan)


def pearson(a: np.ndarray, b: np.ndarray, eps: float = 1e-9) -> float:
    """Pearson correlation over the positions where both series are finite; 0 when either is constant
    (no co-variation) and NaN when fewer than 3 positions remain."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"pearson: shapes differ {a.shape} vs {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    sa, sb = math.sqrt(float((a * a).sum())), math.sqrt(float((b * b).sum()))
    if sa < eps or sb < eps:
        return 0.0
    return float((a * b).sum() / (sa * sb))


def opening_correlation(gen_opening: np.ndarray, real_opening: np.ndarray) -> float:
    """Correlation of the generated mouth opening with the real video's, frame by frame."""
    return pearson(gen_opening, real_opening)


def temporal_jitter(points: np.ndarray) -> float:
    """Mean absolute second difference of landmark tracks `[N, P, 2]` (pixels / frame^2): the mean over
    frames and points of |p[t+1] - 2 p[t] + p[t-1]| (Euclidean). Triples with a missing frame are
    skipped; NaN when none is left."""
    p = np.asarray(points, np.float64)
    if len(p) < 3:
        return float("nan")
    second = p[2:] - 2.0 * p[1:-1] + p[:-2]  # [N-2, P, 2]
    mag = np.linalg.norm(second, axis=2)
    ok = ~np.isnan(mag).any(axis=1)
    return float(mag[ok].mean()) if ok.any() else float("nan")


def jitter_ratio(gen_points: np.ndarray, real_points: np.ndarray) -> float:
    """Temporal jitter of the generated mouth relative to the real video's (1 = as steady as real)."""
    g, r = temporal_jitter(gen_points), temporal_jitter(real_points)
    if not (math.isfinite(g) and math.isfinite(r)) or r <= 0:
        return float("nan")
    return g / r


# ----------------------------------------------------------------------------------------------
# Sharpness and seams


def laplacian_variance(image: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image: a focus / sharpness measure (higher = sharper)."""
    img = np.asarray(image)
    grey = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F).var())


def mouth_box(lips: np.ndarray, shape: tuple[int, int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """Integer box (x1, y1, x2, y2) around lip points `[P, 2]`, grown by `margin` of its size per side and
    clipped to an image of `shape` (H, W)."""
    h, w = shape[:2]
    lo, hi = np.nanmin(lips, axis=0), np.nanmax(lips, axis=0)
    grow = (hi - lo) * margin
    x1, y1 = np.floor(lo - grow).astype(int)
    x2, y2 = np.ceil(hi + grow).astype(int) + 1
    return max(0, x1), max(0, y1), min(w, x2), min(h, y2)


def sharpness_ratio(gen_regions: Sequence[np.ndarray], real_regions: Sequence[np.ndarray]) -> float:
    """Mean Laplacian variance of the generated mouth regions over the real ones' (1 = as sharp as
    real, < 1 blurrier)."""
    if len(gen_regions) != len(real_regions) or not len(gen_regions):
        raise ValueError("sharpness_ratio: need equal, non-zero region counts")
    g = np.mean([laplacian_variance(x) for x in gen_regions])
    r = np.mean([laplacian_variance(x) for x in real_regions])
    return float(g / r) if r > 0 else float("nan")


def _grey(image: np.ndarray) -> np.ndarray:
    """float32 grey levels of a BGR (or already grey) image."""
    img = np.asarray(image)
    return (cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if img.ndim == 3 else img).astype(np.float32)


def _gradient_magnitude(image: np.ndarray) -> np.ndarray:
    grey = _grey(image)
    gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    return np.sqrt(gx * gx + gy * gy)


def seam_profile(frame: np.ndarray, box: Sequence[int], depth: int, outside: int = 2, ring: int = 8) -> np.ndarray:
    """Gradient magnitude averaged along the edges of `box`, as a function of the distance to the edge:
    entry j is `j - outside` px from the edge (negative = outside the box), for j < outside + depth + ring.
    Box sides on (or too close to) the image border are left out; corners are left out. Empty if no
    side qualifies."""
    grad = _gradient_magnitude(frame)
    h, w = grad.shape
    x1, y1, x2, y2 = (int(v) for v in box)
    length = outside + depth + ring
    inset = depth + ring  # keep away from the corners, where two edges meet
    profiles = []
    if x1 - outside >= 0 and y2 - y1 > 2 * inset:  # left edge: columns x1 - outside ...
        profiles.append(grad[y1 + inset:y2 - inset, x1 - outside:x1 - outside + length].mean(axis=0))
    if x2 + outside <= w and y2 - y1 > 2 * inset:  # right edge, read inwards
        profiles.append(grad[y1 + inset:y2 - inset, x2 + outside - length:x2 + outside][:, ::-1].mean(axis=0))
    if y1 - outside >= 0 and x2 - x1 > 2 * inset:  # top edge
        profiles.append(grad[y1 - outside:y1 - outside + length, x1 + inset:x2 - inset].mean(axis=1))
    if y2 + outside <= h and x2 - x1 > 2 * inset:  # bottom edge, read inwards
        profiles.append(grad[y2 + outside - length:y2 + outside, x1 + inset:x2 - inset][::-1].mean(axis=1))
    profiles = [p for p in profiles if len(p) == length]
    return np.mean(profiles, axis=0) if profiles else np.zeros(0)


def seam_score(frame: np.ndarray, box: Sequence[int], depth: int = 3, outside: int = 2, ring: int = 8) -> float:
    """How visible the paste boundary is: the peak of the edge-averaged gradient in the seam zone (from
    `outside` px outside the box edge to `depth` px inside it, where pasted and original pixels meet)
    over its median in the `ring` px just inside that zone. Averaging along the edge cancels texture, so
    a seamless paste scores about 1 and a visible edge (colour step, blur change) well above 1. The
    interior level is floored at `SEAM_FLOOR` (a flat, textureless interior would divide by ~0)."""
    prof = seam_profile(frame, box, depth, outside, ring)
    if not len(prof):
        return float("nan")
    zone, interior = prof[:outside + depth], prof[outside + depth:]
    return float(zone.max()) / max(float(np.median(interior)), SEAM_FLOOR)


# ----------------------------------------------------------------------------------------------
# SyncNet offset and confidence (LSE-D / LSE-C definitions of joonson/syncnet_python)


def sync_distances(video_emb: np.ndarray, audio_emb: np.ndarray, vshift: int = 15) -> np.ndarray:
    """Mean audio-video embedding distance per candidate offset: `[2 vshift + 1]`, entry k compares video
    frame i with audio frame i + (k - vshift), averaged over the frames where that audio frame exists.
    Euclidean distance, as syncnet_python's `calc_pdist`."""
    v, a = np.asarray(video_emb, np.float64), np.asarray(audio_emb, np.float64)
    if v.ndim != 2 or v.shape != a.shape:
        raise ValueError(f"sync_distances: need two [N, D] arrays of one shape, got {v.shape} and {a.shape}")
    n = len(v)
    out = np.full(2 * vshift + 1, np.nan)
    for k in range(2 * vshift + 1):
        lag = k - vshift
        lo, hi = max(0, -lag), min(n, n - lag)
        if hi > lo:
            out[k] = np.linalg.norm(v[lo:hi] - a[lo + lag:hi + lag], axis=1).mean()
    return out


def sync_scores(mdist: np.ndarray) -> dict:
    """Offset and confidence from the per-offset mean distances `[2 vshift + 1]` (syncnet_python):
    offset = vshift - argmin, min_dist (LSE-D) = min, confidence (LSE-C) = median - min."""
    mdist = np.asarray(mdist, np.float64)
    if mdist.ndim != 1 or len(mdist) % 2 != 1:
        raise ValueError(f"sync_scores: need an odd-length 1-D array of distances, got {mdist.shape}")
    vshift = len(mdist) // 2
    k = int(np.nanargmin(mdist))
    lo = float(mdist[k])
    return {"offset": vshift - k, "min_dist": lo, "median_dist": float(np.nanmedian(mdist)),
            "confidence": float(np.nanmedian(mdist)) - lo}


# ----------------------------------------------------------------------------------------------
# Audio: closure and envelope correlation (speech activity itself lives in synctalk.audio)


def closed_mouth_threshold(real_opening: np.ndarray, frac: float = 0.15, min_spread: float = 0.1) -> float:
    """Upper end of the real video's closed-mouth range: its 5th percentile of the opening plus `frac`
    of its 5-95 percentile spread (the closed cluster sits at the bottom of the distribution). The
    spread is taken as at least `min_spread` (a typical speaking range in these units), so a mostly
    silent sample does not shrink the range to the landmark noise."""
    op = np.asarray(real_opening, np.float64)
    op = op[np.isfinite(op)]
    if not len(op):
        return float("nan")
    lo, hi = np.percentile(op, [5, 95])
    return float(lo + frac * max(hi - lo, min_spread))


def closure_share(opening: np.ndarray, silent: np.ndarray, closed_max: float) -> float:
    """Share of silent frames (with a face) whose mouth opening is within the closed range
    (<= `closed_max`). NaN when there is no such frame."""
    op = np.asarray(opening, np.float64)
    sel = np.asarray(silent, bool) & np.isfinite(op)
    if not sel.any() or not math.isfinite(closed_max):
        return float("nan")
    return float((op[sel] <= closed_max).mean())


def envelope_correlation(opening: np.ndarray, envelope: np.ndarray, frames: np.ndarray | None = None) -> float:
    """Correlation of the mouth opening with the speech envelope (frames aligned, lengths cut to the
    shorter); `frames`, a bool mask, keeps only those frames (e.g. speech without its pauses, where the
    pauses' closed mouth and low energy no longer carry the correlation)."""
    n = min(len(opening), len(envelope))
    a, b = np.asarray(opening, np.float64)[:n], np.asarray(envelope, np.float64)[:n]
    if frames is not None:
        keep = np.asarray(frames, bool)[:n]
        a, b = a[:len(keep)][keep], b[:len(keep)][keep]
    return pearson(a, b)


PAUSE_SHARE_DRAWS = 20  # random subsets averaged by `envelope_correlation_at_pause_share`


def envelope_correlation_at_pause_share(opening: np.ndarray, envelope: np.ndarray, silent: np.ndarray,
                                        share: float, seed: int = 0) -> float:
    """`envelope_correlation` over a subset of frames in which pauses (`silent`) make up `share`: every
    speech frame and a random draw of pause frames (or, when `share` is above the frames' own, every pause
    and a draw of speech frames), averaged over PAUSE_SHARE_DRAWS seeded draws. Pauses carry much of the
    whole-file figure, so it is the fair scale for a file with that share of pauses. NaN without speech or
    (for a share above 0) without pauses."""
    n = min(len(opening), len(envelope), len(silent))
    pause = np.flatnonzero(np.asarray(silent, bool)[:n])
    speech = np.flatnonzero(~np.asarray(silent, bool)[:n])
    if not len(speech) or not 0.0 <= share < 1.0 or (share > 0 and not len(pause)):
        return float("nan")
    if share <= len(pause) / n:
        kept_pauses, kept_speech = int(round(share * len(speech) / (1.0 - share))), len(speech)
    else:
        kept_pauses, kept_speech = len(pause), int(round(len(pause) * (1.0 - share) / share))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(PAUSE_SHARE_DRAWS):
        keep = np.concatenate([rng.choice(speech, kept_speech, replace=False),
                               rng.choice(pause, kept_pauses, replace=False)])
        frames = np.zeros(n, bool)
        frames[keep] = True
        values.append(envelope_correlation(opening[:n], envelope[:n], frames))
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


# ----------------------------------------------------------------------------------------------
# Inner-mouth detail and the colour step across the paste border

SYNCNET_MIN_ACCURACY = 0.65  # held-out pair accuracy below which SyncNet numbers mean nothing (chance: 0.5)
COLOUR_STEP_MAX = 3.0  # CIE76 delta E: a paste adding more colour step than this at its border is visible
TEETH_LIGHT, TEETH_CHROMA = 0.7, 0.7  # teeth: L* >= 0.7 x skin L*, chroma <= 0.7 x skin chroma
MIN_MOUTH_AREA = 12.0  # px^2 at crop resolution: an inner-lip polygon smaller than this is a closed mouth


def syncnet_trusted(accuracy: float | None) -> bool:
    """Whether a SyncNet with this held-out accuracy may judge sync (None or NaN: unknown, not trusted)."""
    return accuracy is not None and math.isfinite(accuracy) and accuracy >= SYNCNET_MIN_ACCURACY


def lab(image: np.ndarray) -> np.ndarray:
    """CIE Lab float32 of a BGR uint8 image (L* in 0..100, a*, b* about -128..127)."""
    return cv2.cvtColor(np.asarray(image, np.float32) / 255.0, cv2.COLOR_BGR2LAB)


def inner_lip_points(landmarks: np.ndarray) -> np.ndarray:
    """The 20 inner-lip points `[N, 20, 2]` (a closed polygon, in order) of 478-point landmarks."""
    return np.asarray(landmarks)[:, list(LIP_INNER)]


def mouth_area(inner_lips: np.ndarray) -> float:
    """Area (px^2) of the inner-lip polygon `[20, 2]`: the open mouth; NaN without landmarks."""
    pts = np.asarray(inner_lips, np.float64)
    return float("nan") if np.isnan(pts).any() else float(abs(cv2.contourArea(pts.astype(np.float32))))


def open_mouth_mask(shape: tuple[int, ...], inner_lips: np.ndarray, min_area: float = MIN_MOUTH_AREA,
                    inset: int = 0) -> np.ndarray | None:
    """Boolean mask (`shape[:2]`) of the open mouth: inside the inner-lip polygon `[20, 2]` (image pixels),
    shrunk by `inset` px; all False when the mouth is closed (polygon under `min_area` px^2), None
    without landmarks."""
    pts = np.asarray(inner_lips, np.float64)
    area = mouth_area(pts)
    if not math.isfinite(area):
        return None
    filled = np.zeros(shape[:2], np.uint8)
    if area < min_area:
        return filled.astype(bool)
    cv2.fillPoly(filled, [np.round(pts).astype(np.int32)], 1)
    kernel = np.ones((2 * inset + 1, 2 * inset + 1), np.uint8)
    return (cv2.erode(filled, kernel) if inset > 0 else filled).astype(bool)


def teeth_share(image: np.ndarray, inner_lips: np.ndarray, min_area: float = MIN_MOUTH_AREA) -> float:
    """Share of the open mouth (`open_mouth_mask`) with teeth-bright pixels: L* at least `TEETH_LIGHT` of
    the image's median L* (the skin level; teeth in the mouth's shade are a little darker than skin) and
    chroma at most `TEETH_CHROMA` of its median chroma (teeth are pale; lips are saturated and the cavity
    dark). 0 when the mouth is closed, NaN without landmarks."""
    inside = open_mouth_mask(np.asarray(image).shape, inner_lips, min_area)
    if inside is None:
        return float("nan")
    if not inside.any():
        return 0.0
    img = lab(image)
    light, chroma = img[..., 0], np.hypot(img[..., 1], img[..., 2])
    bright = (light >= TEETH_LIGHT * np.median(light)) & (chroma <= TEETH_CHROMA * np.median(chroma))
    return float(bright[inside].mean())


def mouth_texture(image: np.ndarray, inner_lips: np.ndarray, min_area: float = MIN_MOUTH_AREA,
                  inset: int = 1) -> float:
    """Inner-mouth detail: mean absolute horizontal grey-level gradient (Sobel d/dx) inside the open mouth
    (`open_mouth_mask` shrunk by `inset` px, so the lips' own edge counts less). The vertical edges
    between separate teeth score high; a pale band or a dark gap, whose edges run along the mouth, scores
    low. 0 when the mouth is closed, NaN without landmarks."""
    inside = open_mouth_mask(np.asarray(image).shape, inner_lips, min_area, inset)
    if inside is None:
        return float("nan")
    if not inside.any():
        return 0.0
    return float(np.abs(cv2.Sobel(_grey(image), cv2.CV_32F, 1, 0, ksize=3))[inside].mean())


def _edge_bands(mask: np.ndarray, band: int) -> tuple[np.ndarray, np.ndarray]:
    """(inside, outside) boolean bands of a paste mask: pixels fully pasted (m >= 0.99) within `band`
    px of the rest, and pixels untouched (m <= 0.01) within `band` px of the pasted part."""
    m = np.asarray(mask, np.float32)
    full, none = (m >= 0.99).astype(np.uint8), (m <= 0.01).astype(np.uint8)
    to_not_full = cv2.distanceTransform(full, cv2.DIST_L2, 3)  # distance to the nearest not-full pixel
    to_touched = cv2.distanceTransform(none, cv2.DIST_L2, 3)
    return (full > 0) & (to_not_full <= band), (none > 0) & (to_touched <= band)


def colour_steps(image: np.ndarray, mask: np.ndarray, band: int = 4, sectors: int = 8) -> np.ndarray:
    """Per angular sector around the image centre: mean Lab just inside minus just outside the paste
    mask's edge (`[sectors, 3]`, NaN where a sector has no pixels in a band)."""
    inside, outside = _edge_bands(mask, band)
    h, w = inside.shape
    yy, xx = np.mgrid[0:h, 0:w]
    sector = ((np.arctan2(yy - (h - 1) / 2, xx - (w - 1) / 2) + np.pi) / (2 * np.pi) * sectors).astype(int) % sectors
    img = lab(image)
    out = np.full((sectors, 3), np.nan)
    for k in range(sectors):
        a, b = inside & (sector == k), outside & (sector == k)
        if a.any() and b.any():
            out[k] = img[a].mean(axis=0) - img[b].mean(axis=0)
    return out


def colour_step(image: np.ndarray, mask: np.ndarray, band: int = 4, sectors: int = 8) -> float:
    """The colour step across the paste border of one image: the largest over sectors of the delta E
    (CIE76) between the mean colour just inside and just outside the mask edge."""
    steps = colour_steps(image, mask, band, sectors)
    norms = np.linalg.norm(steps, axis=1)
    return float(np.nanmax(norms)) if np.isfinite(norms).any() else float("nan")


def colour_step_excess(generated: np.ndarray, real: np.ndarray, mask: np.ndarray, band: int = 4,
                       sectors: int = 8) -> float:
    """Colour step the paste adds: per sector, the delta E between the generated image's inside-minus-
    outside Lab difference and the real image's (the face's own shading cancels), largest over sectors.
    0 for a clean paste; a tinted lower face gives about the tint's delta E."""
    diff = colour_steps(generated, mask, band, sectors) - colour_steps(real, mask, band, sectors)
    norms = np.linalg.norm(diff, axis=1)
    return float(np.nanmax(norms)) if np.isfinite(norms).any() else float("nan")


def paste_composite(generated: np.ndarray, real: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The crop a feathered paste shows: generated * mask + real * (1 - mask), rounded to uint8."""
    m = np.asarray(mask, np.float32)[..., None]
    out = np.asarray(generated, np.float32) * m + np.asarray(real, np.float32) * (1.0 - m)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
