"""Crop geometry: the one place that turns landmarks into a crop box, cuts and masks the face crop, and
pastes a generated crop back. Preprocessing, training, inference and the server all import it from here.

Conventions (see docs/preprocessing.md for the arithmetic with figures):
- Boxes are integer `(x1, y1, x2, y2)` in full-frame pixels with exclusive ends; ours are square.
- Landmarks are float `[P, 2]` pixel coordinates: 478 mediapipe face-mesh points (ours) or 110 PFLD
  points (upstream datasets).
- Images are BGR uint8; model tensors BGR float32 in [0, 1].
- One resize rule for frame -> crop (`crop_face`): INTER_AREA when the box is larger than the crop
  (shrinking, anti-aliased), INTER_CUBIC when it is smaller or equal (enlarging). The rule depends only on
  (box, size), so the crop cache made at preprocessing and a crop cut at inference are identical.
- Paste-back (crop -> box) is bicubic, as upstream.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from synctalk.sizes import ModelSize, get_size
from synctalk.timing import FPS

# ----------------------------------------------------------------------------------------------
# Landmark indices

# mediapipe face mesh (478-point topology)
MP_CHEEK_LEFT = 234  # face oval at cheekbone / tragus height, image left for a frontal face
MP_CHEEK_RIGHT = 454  # its mirror point
MP_NASION = 168  # top of the nose, between the eyes
MP_SUBNASALE = 2  # bottom of the nose, above the upper lip
MP_CHIN = 152  # lowest point of the chin on the face oval
MP_BOX_POINTS = (MP_CHEEK_LEFT, MP_CHEEK_RIGHT, MP_NASION, MP_SUBNASALE, MP_CHIN)
CHIN_FACTOR = 1.25  # the box reaches at least 25 % of the nose-middle-to-chin distance below the chin

# upstream PFLD 110-point topology (synctalk2d-spec.md 4.4/4.5)
UP_LEFT, UP_RIGHT, UP_TOP = 1, 31, 52

# One-Euro filter defaults (Casiez et al. 2012) for the box-defining landmarks; coordinates are divided by
# the first face width, so the speed term is in face widths per second and independent of resolution.
SMOOTH_MIN_CUTOFF = 1.0  # Hz: cut-off at rest (lower = steadier, more lag)
SMOOTH_BETA = 4.0  # cut-off increase per face width per second of motion (higher = less lag when moving)
SMOOTH_D_CUTOFF = 1.0  # Hz: cut-off of the speed estimate

Box = tuple[int, int, int, int]


# ----------------------------------------------------------------------------------------------
# Crop boxes


def crop_box_mediapipe(lms: np.ndarray) -> Box:
    """Square crop box from 478 mediapipe landmarks `[478, 2]` (pixels): from the middle of the nose down
    to below the chin, cheek to cheek.

    side = max(|p454 - p234|, CHIN_FACTOR * (y152 - top)), top = (y168 + y2) / 2,
    centre x = (x234 + x454) / 2; the box is `side` wide, centred on that x, starting at `top`.
    Values are rounded to whole pixels (round half to even, numpy's `rint`)."""
    p = np.asarray(lms, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 468 or p.shape[1] < 2:
        raise ValueError(f"crop_box_mediapipe needs [478, 2] landmarks, got {p.shape}")
    left, right = p[MP_CHEEK_LEFT, :2], p[MP_CHEEK_RIGHT, :2]
    top = 0.5 * (p[MP_NASION, 1] + p[MP_SUBNASALE, 1])
    width = float(np.hypot(*(right - left)))
    side = max(width, CHIN_FACTOR * (p[MP_CHIN, 1] - top), 1.0)
    cx = 0.5 * (left[0] + right[0])
    s = int(np.rint(side))
    x1 = int(np.rint(cx - side / 2.0))
    y1 = int(np.rint(top))
    return x1, y1, x1 + s, y1 + s


def crop_box_upstream(lms: np.ndarray) -> Box:
    """Upstream's box from 110 PFLD landmarks (synctalk2d-spec.md 4.5): x from point 1 to point 31,
    y from point 52 down by the same width. Points are truncated to int first, as upstream reads them."""
    p = np.asarray(lms, dtype=np.float64).astype(np.int64)
    if p.ndim != 2 or p.shape[0] < 110:
        raise ValueError(f"crop_box_upstream needs [110, 2] landmarks, got {p.shape}")
    xmin, xmax, ymin = int(p[UP_LEFT, 0]), int(p[UP_RIGHT, 0]), int(p[UP_TOP, 1])
    w = xmax - xmin
    return xmin, ymin, xmax, ymin + w


def clamp_box(box: Sequence[float], frame_w: int, frame_h: int) -> Box:
    """Keep a square box inside a `frame_w` x `frame_h` frame.

    Rule: a box wider or taller than the frame's short side first shrinks about its centre to that side;
    then it is shifted (not shrunk) back inside the frame. Shifting keeps the crop square and its scale
    unchanged, at the price of the face moving inside the crop near the frame edges (reported by
    preprocessing as `boxes_shifted_share`)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(1, int(round(min(x2 - x1, y2 - y1))))
    limit = min(frame_w, frame_h)
    if side > limit:
        cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
        side = limit
        x1, y1 = cx - side / 2.0, cy - side / 2.0
    nx1 = int(min(max(round(x1), 0), frame_w - side))
    ny1 = int(min(max(round(y1), 0), frame_h - side))
    return nx1, ny1, nx1 + side, ny1 + side


# ----------------------------------------------------------------------------------------------
# Temporal smoothing


class OneEuroFilter:
    """One-Euro low-pass filter (Casiez, Roussel, Vogel, CHI 2012) over a fixed-shape float array.

    Each element is filtered independently: an exponential smoother whose cut-off frequency grows with
    the element's (smoothed) speed, `fc = min_cutoff + beta * |dx/dt|`, so the signal is steady at rest
    and follows quickly when it moves. `scale` divides the values first (speeds in `scale` units)."""

    def __init__(self, fps: float = float(FPS), min_cutoff: float = SMOOTH_MIN_CUTOFF, beta: float = SMOOTH_BETA,
                 d_cutoff: float = SMOOTH_D_CUTOFF, scale: float = 1.0):
        self.dt = 1.0 / fps
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.scale = float(scale) if scale > 0 else 1.0
        self.x_hat: np.ndarray | None = None
        self.dx_hat: np.ndarray | None = None

    def _alpha(self, cutoff: np.ndarray | float) -> np.ndarray | float:
        tau = 1.0 / (2.0 * math.pi * np.asarray(cutoff))
        return 1.0 / (1.0 + tau / self.dt)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Filter the next sample; returns the smoothed values in the input's units."""
        x = np.asarray(x, dtype=np.float64) / self.scale
        if self.x_hat is None:
            self.x_hat, self.dx_hat = x.copy(), np.zeros_like(x)
            return x * self.scale
        dx = (x - self.x_hat) / self.dt
        a_d = self._alpha(self.d_cutoff)
        assert self.dx_hat is not None
        self.dx_hat = a_d * dx + (1.0 - a_d) * self.dx_hat
        a = self._alpha(self.min_cutoff + self.beta * np.abs(self.dx_hat))
        self.x_hat = a * x + (1.0 - a) * self.x_hat
        return self.x_hat * self.scale


class BoxTracker:
    """Per-frame crop boxes from a landmark stream: One-Euro smoothing of the box-defining landmarks,
    then the box rule matching the point count, then `clamp_box`. Preprocessing (online) and
    `dataset_crop_boxes` (from saved `.lms`) run this same code, so both give the same boxes."""

    def __init__(self, frame_w: int, frame_h: int, smooth: bool = True, fps: float = float(FPS),
                 min_cutoff: float = SMOOTH_MIN_CUTOFF, beta: float = SMOOTH_BETA):
        self.frame_w, self.frame_h = int(frame_w), int(frame_h)
        self.smooth = smooth
        self.fps, self.min_cutoff, self.beta = fps, min_cutoff, beta
        self.filter: OneEuroFilter | None = None

    def smoothed(self, lms: np.ndarray) -> np.ndarray:
        """The landmarks with the box-defining points replaced by their smoothed values (478 points);
        110-point (upstream) landmarks are returned unchanged: upstream never smoothed."""
        lms = np.asarray(lms, dtype=np.float64)
        if not self.smooth or lms.shape[0] < 468:
            return lms
        pts = lms[list(MP_BOX_POINTS), :2]
        if self.filter is None:
            width = float(np.hypot(*(pts[1] - pts[0])))
            self.filter = OneEuroFilter(self.fps, self.min_cutoff, self.beta, scale=max(width, 1.0))
        out = lms.copy()
        out[list(MP_BOX_POINTS), :2] = self.filter(pts)
        return out

    def __call__(self, lms: np.ndarray) -> Box:
        """The clamped box for the next frame's landmarks."""
        lms = self.smoothed(lms)
        box = crop_box_mediapipe(lms) if lms.shape[0] >= 468 else crop_box_upstream(lms)
        return clamp_box(box, self.frame_w, self.frame_h)


def boxes_from_landmarks(landmarks: Iterable[np.ndarray], frame_w: int, frame_h: int, smooth: bool = True,
                         min_cutoff: float = SMOOTH_MIN_CUTOFF, beta: float = SMOOTH_BETA) -> np.ndarray:
    """int32 `[N, 4]` boxes for a landmark sequence (478 points: smoothed + our rule + clamp;
    110 points: upstream's rule, unclamped, as upstream used it)."""
    seq = list(landmarks)
    if seq and np.asarray(seq[0]).shape[0] < 468:
        return np.array([crop_box_upstream(p) for p in seq], dtype=np.int32).reshape(-1, 4)
    tracker = BoxTracker(frame_w, frame_h, smooth=smooth, min_cutoff=min_cutoff, beta=beta)
    return np.array([tracker(p) for p in seq], dtype=np.int32).reshape(-1, 4)


def box_jitter(boxes: np.ndarray) -> float:
    """Mean absolute frame-to-frame change of the box centre, in % of the box side (0 for < 2 boxes).
    The change is the Euclidean distance between consecutive centres over the mean of their sides."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(b) < 2:
        return 0.0
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0], axis=1)
    side = (b[:, 2] - b[:, 0] + b[:, 3] - b[:, 1]) / 2.0
    step = np.hypot(*np.diff(centre, axis=0).T)
    return float(np.mean(100.0 * step / np.maximum(0.5 * (side[1:] + side[:-1]), 1.0)))


# ----------------------------------------------------------------------------------------------
# Dataset readers


def load_landmarks(path: str | Path) -> np.ndarray:
    """A `.lms` file (one `x y` line per point) as float32 `[P, 2]`."""
    arr = np.loadtxt(str(path), dtype=np.float32, ndmin=2)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{path}: expected lines of 'x y', got an array of shape {arr.shape}")
    return arr


def format_landmarks(lms: np.ndarray) -> str:
    """The `.lms` text of float landmarks `[P, 2]`: `x y` per line with 2 decimals."""
    p = np.asarray(lms, dtype=np.float64)[:, :2]
    return ("%.2f %.2f\n" * len(p)) % tuple(p.ravel())


def _frame_size(dataset_dir: Path) -> tuple[int, int]:
    """(width, height) of `full_body_img/0.jpg`."""
    first = dataset_dir / "full_body_img" / "0.jpg"
    img = cv2.imread(str(first), cv2.IMREAD_COLOR) if first.is_file() else None
    if img is None:
        raise FileNotFoundError(f"{first} is missing or unreadable (needed for the frame size)")
    return int(img.shape[1]), int(img.shape[0])


def dataset_crop_boxes(dataset_dir: str | Path) -> np.ndarray:
    """Crop boxes int `[N, 4]` of a dataset folder: `crop_boxes.npy` when present, else computed from
    `landmarks/<i>.lms` with the rule matching the point count (478: ours, smoothed and clamped to the
    frame size of `full_body_img/0.jpg`; 110: upstream's rule)."""
    dataset_dir = Path(dataset_dir)
    saved = dataset_dir / "crop_boxes.npy"
    if saved.is_file():
        boxes = np.load(saved)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{saved} has shape {boxes.shape}, expected [N, 4]")
        return boxes.astype(np.int32)
    lms_dir = dataset_dir / "landmarks"
    numbers = sorted(int(p.stem) for p in lms_dir.glob("*.lms") if p.stem.isdigit()) if lms_dir.is_dir() else []
    if not numbers:
        raise FileNotFoundError(f"{dataset_dir} has neither crop_boxes.npy nor landmarks/<i>.lms")
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
        raise ValueError(f"{lms_dir}: .lms files are not numbered 0..N-1 (missing {missing})")
    seq = [load_landmarks(lms_dir / f"{i}.lms") for i in numbers]
    if seq[0].shape[0] < 468:
        return boxes_from_landmarks(seq, 0, 0)
    w, h = _frame_size(dataset_dir)
    return boxes_from_landmarks(seq, w, h)


# ----------------------------------------------------------------------------------------------
# Crop, mask, network input


def crop_interpolation(box: Sequence[int], size: int) -> int:
    """The one frame -> crop resize rule: INTER_AREA when shrinking, INTER_CUBIC when enlarging."""
    x1, y1, x2, y2 = box
    return cv2.INTER_AREA if max(x2 - x1, y2 - y1) > size else cv2.INTER_CUBIC


def cut_box(frame: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The pixels of `box` (x1, y1, x2, y2); parts outside the frame are black. A view when inside."""
    x1, y1, x2, y2 = (int(v) for v in box)
    fh, fw = frame.shape[:2]
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"empty crop box {tuple(box)}")
    if x1 >= 0 and y1 >= 0 and x2 <= fw and y2 <= fh:
        return frame[y1:y2, x1:x2]
    out = np.zeros((y2 - y1, x2 - x1) + frame.shape[2:], dtype=frame.dtype)
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, fw), min(y2, fh)
    if fx2 > fx1 and fy2 > fy1:
        out[fy1 - y1:fy2 - y1, fx1 - x1:fx2 - x1] = frame[fy1:fy2, fx1:fx2]
    return out


def crop_face(frame_bgr: np.ndarray, box: Sequence[int], size: int, interpolation: int | None = None) -> np.ndarray:
    """`size` x `size` uint8 crop of `box` from a BGR frame (see `crop_interpolation` for the resize
    rule; out-of-frame parts, possible only with unclamped upstream boxes, are black)."""
    box = tuple(int(v) for v in box)
    region = cut_box(frame_bgr, box)
    if interpolation is None:
        interpolation = crop_interpolation(box, size)
    if region.shape[0] == size and region.shape[1] == size:
        return np.ascontiguousarray(region)
    return cv2.resize(region, (size, size), interpolation=interpolation)


def mask_rect(inner: int) -> tuple[int, int, int, int]:
    """The masked rectangle `(x, y, w, h)` of the model's `inner` x `inner` input (OpenCV rect order, as
    upstream's `cv2.rectangle(img, (5, 5, 310, 305))` on 320, i.e. rows 5..309 and columns 5..314).

    Other sizes scale the margins with floor: left = top = right = 5 * inner // 320 and bottom =
    10 * inner // 320 (160 -> margins 2, 2, 2 and 5: (2, 2, 156, 153))."""
    side = 5 * inner // 320
    bottom = 10 * inner // 320
    return side, side, inner - 2 * side, inner - side - bottom


def _size(size_preset: str | ModelSize) -> ModelSize:
    return size_preset if isinstance(size_preset, ModelSize) else get_size(size_preset)


def make_unet_input(crop: np.ndarray, reference_crop: np.ndarray, size_preset,
                    teeth_crop: np.ndarray | None = None) -> np.ndarray:
    """U-Net image input float32 `(6, inner, inner)`, BGR in [0, 1]: channels 0-2 the reference crop's
    interior, 3-5 the target crop's interior with `mask_rect` blacked out; with `teeth_crop` (the teeth
    reference of a model trained with one), `(9, inner, inner)` with its interior in channels 6-8. Crops
    are uint8 `[crop, crop, 3]` of the preset (`'328'`, `'small'` or a `utils.ModelSize`)."""
    size = _size(size_preset)
    b, s = size.border, size.inner
    crops = [reference_crop, crop] + ([] if teeth_crop is None else [teeth_crop])
    if any(c.shape[:2] != (size.crop, size.crop) for c in crops):
        raise ValueError(f"crops must be {size.crop}x{size.crop} for size {size.name}, got "
                         f"{', '.join(str(c.shape[:2]) for c in crops)}")
    out = np.empty((3 * len(crops), s, s), dtype=np.float32)
    for k, c in enumerate(crops):
        np.multiply(c[b:b + s, b:b + s].transpose(2, 0, 1), np.float32(1.0 / 255.0), out=out[3 * k:3 * k + 3])
    x, y, w, h = mask_rect(s)
    out[3:6, y:y + h, x:x + w] = 0.0
    return out


# ----------------------------------------------------------------------------------------------
# Paste-back

# Where the mouth sits in the model's input square (fractions of the side, x0, y0, x1, y1), measured on
# the mediapipe crops of data_utils/process.py (the crop runs from mid-nose to below the chin). GRID s1, lip
# landmarks of 750 frames, 1st-99th percentile: x 0.36-0.76, y 0.31-0.52; padded on every side (more
# below, where the jaw moves with the mouth).
MOUTH_BOX = (0.25, 0.22, 0.85, 0.66)


def mouth_slices(side: int, box: tuple[float, float, float, float] = MOUTH_BOX) -> tuple[slice, slice]:
    """(rows, columns) of the mouth region in a `side` x `side` image."""
    x0, y0, x1, y1 = (int(round(v * side)) for v in box)
    return slice(y0, y1), slice(x0, x1)


def paste_mask(crop: int, border: int = 4, feather: float = 0.15) -> np.ndarray:
    """Feathered blend mask float32 `[crop, crop]` in [0, 1]: 0 on the `border + 1` px ring at the crop
    edge (the border is never generated and one more pixel keeps the box outline original), rising with
    a smoothstep over `feather * crop` px to 1 inside. Separable: the product of the row and column
    ramps, so the corners are rounded."""
    ring = border + 1
    width = max(feather * crop, 1.0)
    centre = np.arange(crop, dtype=np.float64) + 0.5
    dist = np.minimum(centre, crop - centre) - ring  # distance from the inner edge of the ring
    t = np.clip(dist / width, 0.0, 1.0)
    ramp = t * t * (3.0 - 2.0 * t)
    ramp[:ring] = 0.0
    ramp[crop - ring:] = 0.0
    return np.outer(ramp, ramp).astype(np.float32)


COLOR_SIGMA = 0.05  # colour correction smoothing, share of the crop side (8 px of the small model's 168)


def color_region(mask: np.ndarray) -> np.ndarray:
    """Where colour matching compares generated and source pixels: the generated part of the paste mask
    (m > 0.02) outside the mouth box, whose content legitimately differs from the source frame's."""
    region = np.asarray(mask) > 0.02
    rows, cols = mouth_slices(region.shape[0])
    region[rows, cols] = False
    return region


def match_color(pred: np.ndarray, original: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """`pred` (uint8 BGR) plus a smooth colour correction: the per-channel difference `original - pred`
    over `region` (bool `[H, W]`), spread by a normalised Gaussian convolution of `sigma` px (so it follows
    the lighting and fades in where the region is sparse) and filled in with the region's mean difference
    where it has no pixels near (the mouth box). The field is smooth, so it is built on a grid about
    `sigma / 2` times coarser and resized up: low frequencies only, the lips, teeth and jaw edges of `pred`
    are kept. An empty region returns `pred` unchanged."""
    if not np.any(region):
        return pred
    step = max(1, int(sigma // 2))
    small = (max(1, pred.shape[1] // step), max(1, pred.shape[0] // step))
    w = cv2.resize(region.astype(np.float32), small, interpolation=cv2.INTER_AREA)[..., None]
    diff = (cv2.resize(original, small, interpolation=cv2.INTER_AREA).astype(np.float32)
            - cv2.resize(pred, small, interpolation=cv2.INTER_AREA).astype(np.float32))
    num = cv2.GaussianBlur(diff * w, (0, 0), sigma / step)
    den = cv2.GaussianBlur(w, (0, 0), sigma / step)[..., None]
    mean = (diff * w).sum(axis=(0, 1)) / max(float(w.sum()), 1e-6)
    fill = 0.05  # below this much region weight the mean difference takes over
    field = cv2.resize((num + fill * mean) / (den + fill), pred.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    return cv2.add(pred, field, dtype=cv2.CV_8U)  # rounded and saturated


def paste_back(frame: np.ndarray, crop_pred: np.ndarray, box: Sequence[int], mask: np.ndarray | None = None,
               color_match: bool = False, crop_orig: np.ndarray | None = None,
               interpolation: int = cv2.INTER_CUBIC) -> np.ndarray:
    """Paste a generated crop (uint8 BGR `[crop, crop, 3]`) into `frame` at `box` (x1, y1, x2, y2,
    exclusive ends; may reach outside the frame, which is clipped). `frame` is modified and returned.

    mask None: upstream's hard paste, the crop resized (bicubic) to the box replaces the box.
    mask `[crop, crop]` (from `paste_mask`): resized with the crop (bilinear) and blended,
    frame = frame * (1 - m) + crop * m. `color_match` first corrects the crop's low-frequency colour to
    the original crop's (`crop_orig`, cut from the frame if not given) outside the mouth box
    (`match_color` over `color_region(mask)`, sigma `COLOR_SIGMA` of the crop side)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        raise ValueError(f"empty paste box {tuple(box)}")
    if color_match and mask is not None:
        if crop_orig is None:
            crop_orig = cv2.resize(cut_box(frame, (x1, y1, x2, y2)), crop_pred.shape[1::-1],
                                   interpolation=crop_interpolation((x1, y1, x2, y2), crop_pred.shape[0]))
        crop_pred = match_color(crop_pred, crop_orig, color_region(mask), COLOR_SIGMA * len(mask))
    fh, fw = frame.shape[:2]
    fx1, fy1, fx2, fy2 = max(x1, 0), max(y1, 0), min(x2, fw), min(y2, fh)
    if fx2 <= fx1 or fy2 <= fy1:
        return frame
    sub = (slice(fy1 - y1, fy2 - y1), slice(fx1 - x1, fx2 - x1))
    resized = cv2.resize(crop_pred, (w, h), interpolation=interpolation)[sub]
    target = frame[fy1:fy2, fx1:fx2]
    if mask is None:
        target[...] = resized
        return frame
    m = cv2.resize(np.asarray(mask, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)[sub]
    blended = resized.astype(np.float32) * m[..., None] + target.astype(np.float32) * (1.0 - m[..., None])
    target[...] = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
    return frame


BLEND_MODES = ("feather", "none")


class Paster:
    """The one paste-back policy shared by the engine, evaluation and training validation: the
    feathered mask of the model size (or upstream's hard paste with `blend="none"`), with the generated
    crop's low-frequency colour matched to the source frame's outside the mouth (`color_match`, on by
    default: no colour step at the paste border)."""

    def __init__(self, size_preset, blend: str = "feather", color_match: bool = True):
        if blend not in BLEND_MODES:
            raise ValueError(f"unknown blend {blend!r}; choose one of {BLEND_MODES}")
        size = _size(size_preset)
        self.blend = blend
        self.color_match = color_match
        self.mask = paste_mask(size.crop, size.border)
        self.region = color_region(self.mask)

    def shown_crop(self, crop_pred: np.ndarray, crop_orig: np.ndarray) -> np.ndarray:
        """The generated crop as this policy pastes it over the source crop `crop_orig`: colour matched
        when `color_match` is on and the blend is feathered, else unchanged (what evaluation measures)."""
        if self.blend == "none" or not self.color_match:
            return crop_pred
        return match_color(crop_pred, crop_orig, self.region, COLOR_SIGMA * len(self.mask))

    def __call__(self, frame: np.ndarray, crop_pred: np.ndarray, box: Sequence[int],
                 crop_orig: np.ndarray | None = None) -> np.ndarray:
        """Paste `crop_pred` into `frame` (modified and returned); `crop_orig` is the source crop used
        for colour matching (cut from the frame when not given)."""
        if self.blend == "none":
            return paste_back(frame, crop_pred, box, None)
        if self.color_match and crop_orig is not None:
            return paste_back(frame, self.shown_crop(crop_pred, crop_orig), box, self.mask)
        return paste_back(frame, crop_pred, box, self.mask, color_match=self.color_match)
