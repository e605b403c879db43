"""Training datasets: U-Net samples and SyncNet pairs read from a preprocessed `dataset/<name>/`.

Everything comes from the crop cache `crops_<crop>.npy` (uint8 `[N, crop, crop, 3]` BGR, memory-mapped)
and the per-frame audio features (`aud_whisper.npy` or `aud_ave.npy`), so no JPEG is decoded per step.
A missing cache is built once from `full_body_img/` and the crop boxes with `face_crop.crop_face`, the
very function inference uses (upstream trained on bilinear crops and inferred on bicubic ones).

Split (`dataset_split`): `val_fraction` (10 %) of the frames, contiguous, at the end of the video, is
the held-out `val` split; when the recording ends in silence (upstream asks for 5 s of it) the block ends
where the speech ends, so it still holds speech, and the silent tail is trained on. The `WINDOW // 2`
frames on each side of the block are used by neither split, so no training audio window reaches into
held-out audio. Training references are drawn from training frames only.

Held out by utterance: a dataset made of separate utterances (e.g. GRID sentences concatenated) may
carry `utterances.json` = `{"utterances": [{"name", "start", "end"}, ...], "held_out": [name, ...]}`
(frame ranges, end exclusive). Then `val` is exactly the held-out utterances, whole sentences never
seen in training, and `train` is every other frame except `GUARD` frames on each side of each of them.

Sample randomness (reference frame, SyncNet negatives) is a pure function of (seed, epoch, frame); the
training loaders pass (epoch, position) keys, so a run is reproducible and resumable whatever the number
of loader workers.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from synctalk import face as face_crop
from synctalk import metrics
from synctalk.audio import silence_mask, speech_envelope
from synctalk.fileio import atomic_path
from synctalk.sizes import ModelSize, audio_window, get_size
from synctalk.timing import WINDOW

log = logging.getLogger(__name__)

FEATURE_FILES = {"whisper": "aud_whisper.npy", "ave": "aud_ave.npy"}  # in order of preference
VAL_FRACTION = 0.1
GUARD = WINDOW // 2  # frames between the splits: a training audio window never covers held-out audio
MIN_SHIFT = 5  # SyncNet negatives: audio at least this many frames away from the face's own
UTTERANCES_FILE = "utterances.json"  # optional: utterance frame ranges and the held-out ones
NEAR_SHIFT = 15  # "shifted" negatives lie MIN_SHIFT..NEAR_SHIFT frames away; "far" ones anywhere else
VOICE_VARIANTS = "aud_whisper_voice*.npy"  # features of the track with the voice moved (voice augmentation)


class DatasetError(ValueError):
    """A dataset that is missing or incomplete; the message names the file and the fix."""


def preprocess_hint(dataset_dir: Path) -> str:
    """The command that (re)builds a dataset folder."""
    return f"python data_utils/process.py {dataset_dir}/{dataset_dir.name}.mp4"


def voice_variant_paths(dataset_dir: str | Path) -> list[Path]:
    """The dataset's voice-variant feature files (`aud_whisper_voice+3.npy`, ...: the audio track with
    the voice's pitch and formants moved, made by `data_utils/audio_features.py --semitones`; the words
    dubbed by a TTS voice, `aud_whisper_voice_piper.npy` from `data_utils/tts_voice.py`), sorted."""
    return sorted(Path(dataset_dir).glob(VOICE_VARIANTS))


def detect_mode(dataset_dir: str | Path) -> str:
    """Audio mode of a dataset from its feature files: aud_whisper.npy -> whisper, aud_ave.npy -> ave."""
    dataset_dir = Path(dataset_dir)
    for mode, fname in FEATURE_FILES.items():
        if (dataset_dir / fname).is_file():
            return mode
    raise DatasetError(
        f"no audio features in {dataset_dir} (expected {' or '.join(FEATURE_FILES.values())}); "
        f"run: {preprocess_hint(dataset_dir)}"
    )


def check_dataset(dataset_dir: str | Path) -> Path:
    """Raise DatasetError naming the first missing piece of a dataset folder; return it as a Path."""
    dataset_dir = Path(dataset_dir)
    hint = preprocess_hint(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder not found: {dataset_dir}; put the video at "
                           f"{dataset_dir}/{dataset_dir.name}.mp4 and run: {hint}")
    detect_mode(dataset_dir)
    has_boxes = (dataset_dir / "crop_boxes.npy").is_file() or (dataset_dir / "landmarks").is_dir()
    has_cache = any(dataset_dir.glob("crops_*.npy"))
    if not has_cache and not (dataset_dir / "full_body_img").is_dir():
        raise DatasetError(f"{dataset_dir}/full_body_img/ is missing; run: {hint}")
    if not has_cache and not has_boxes:
        raise DatasetError(f"{dataset_dir} has neither crop_boxes.npy nor landmarks/; run: {hint}")
    return dataset_dir


def split_frames(n: int, split: str, val_fraction: float = VAL_FRACTION, end: int | None = None) -> np.ndarray:
    """Frame indices of `split` ('train', 'val' or 'all') for a dataset of `n` frames.

    val = the `val_fraction * n` contiguous frames ending at `end` (default n: the last frames);
    train = every other frame except GUARD frames on each side of the val block (a training audio
    window never covers held-out audio). Pass `end = speech_end(dataset_dir, n)` (or use
    `dataset_split`) so trailing silence does not become the whole held-out set."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if split == "all":
        return np.arange(n)
    n_val = max(1, int(round(n * val_fraction)))
    end = n if end is None else max(0, min(int(end), n))
    if end - n_val - GUARD < 2:
        end = n  # too little before the speech end: hold out the plain tail
    if n - n_val - GUARD < 2:
        raise DatasetError(f"only {n} frames: too short to hold out {n_val} validation frames and train "
                           f"on the rest (need at least {n_val + GUARD + 2})")
    if split == "val":
        return np.arange(end - n_val, end)
    return np.concatenate([np.arange(end - n_val - GUARD), np.arange(min(n, end + GUARD), n)])


def speech_end(dataset_dir: str | Path, n: int, margin: int = 2) -> int:
    """Exclusive end frame of the last speech in `aud.wav` plus `margin` frames (the mouth closes),
    capped at n; n when the file is missing or unreadable. Silence = silence_mask (-35 dB
    below the loud level)."""

    wav = Path(dataset_dir) / "aud.wav"
    try:
        import soundfile as sf

        audio, sr = sf.read(str(wav), dtype="float32", always_2d=True)
    except Exception:  # no audio: hold out the plain tail
        return n
    env = speech_envelope(audio.mean(axis=1), sr=sr)[:n]
    loud = np.flatnonzero(~silence_mask(env))
    return n if len(loud) == 0 else min(n, int(loud[-1]) + 1 + margin)


def read_utterances(dataset_dir: str | Path) -> tuple[list[dict], list[str]] | None:
    """(utterances [{name, start, end}], held-out names) from `utterances.json`, or None without one;
    DatasetError when it is malformed."""
    path = Path(dataset_dir) / UTTERANCES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        utts = [{"name": str(u["name"]), "start": int(u["start"]), "end": int(u["end"])} for u in data["utterances"]]
        held = [str(h) for h in data.get("held_out", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is malformed ({exc}); expected {{'utterances': [{{name, start, end}}], "
                           "'held_out': [name]}") from None
    unknown = sorted(set(held) - {u["name"] for u in utts})
    if unknown:
        raise DatasetError(f"{path}: held-out utterances {unknown} are not among its utterances")
    return utts, held


def aligned_silence_mask(dataset_dir: str | Path, n: int) -> np.ndarray | None:
    """Silent frames `[n]` from the `silences` ([start, end) frame spans, e.g. from word alignments) of
    `utterances.json`; None when the file or the spans are absent (use the audio envelope instead)."""
    path = Path(dataset_dir) / UTTERANCES_FILE
    if not path.is_file():
        return None
    try:
        spans = [span for u in json.loads(path.read_text())["utterances"] for span in u.get("silences", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is malformed ({exc})") from None
    if not spans:
        return None
    mask = np.zeros(n, dtype=bool)
    for a, b in spans:
        mask[max(0, int(a)):min(n, int(b))] = True
    return mask


def aligned_words(dataset_dir: str | Path) -> list[tuple[float, float, str]]:
    """Every spoken word of the dataset as (start_s, end_s, word) on its audio track, from the `words`
    of `utterances.json` (e.g. GRID word alignments); DatasetError when there are none or they are
    malformed."""
    path = Path(dataset_dir) / UTTERANCES_FILE
    if not path.is_file():
        raise DatasetError(f"{path} not found: word timings come from a dataset's utterances.json")
    try:
        words = [(float(a), float(b), str(w)) for u in json.loads(path.read_text())["utterances"]
                 for a, b, w in u.get("words", [])]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path} is malformed ({exc}); 'words' are [start_s, end_s, word] lists") from None
    if not words:
        raise DatasetError(f"{path} lists no words (its utterances need 'words': [[start_s, end_s, word], ...])")
    bad = [w for w in words if not 0 <= w[0] < w[1] or not w[2].strip()]
    if bad:
        raise DatasetError(f"{path}: word {bad[0]} needs 0 <= start < end and a text")
    return sorted(words)


def utterance_split(n: int, utterances: list[dict], held_out: list[str], split: str) -> np.ndarray:
    """Frame indices of `split` when whole utterances are held out: `val` = the frames of the held-out
    utterances (clipped to n), `train` = all other frames except GUARD frames on each side of each."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if split == "all":
        return np.arange(n)
    val, excluded = np.zeros(n, bool), np.zeros(n, bool)
    names = set(held_out)
    for u in utterances:
        if u["name"] in names:
            val[max(0, u["start"]):min(n, u["end"])] = True
            excluded[max(0, u["start"] - GUARD):min(n, u["end"] + GUARD)] = True
    if not val.any():
        raise DatasetError(f"the held-out utterances {sorted(names)} have no frames among the {n} of the dataset")
    if (~excluded).sum() < 2:
        raise DatasetError(f"holding out {sorted(names)} leaves fewer than 2 training frames of {n}")
    return np.flatnonzero(val) if split == "val" else np.flatnonzero(~excluded)


def dataset_split(dataset_dir: str | Path, n: int, split: str, val_fraction: float = VAL_FRACTION) -> np.ndarray:
    """The split of a dataset folder: whole held-out utterances when `utterances.json` names some, else
    `split_frames` with the held-out block ending where the speech ends. Training, SyncNet and
    evaluate.py all take their split from here."""
    utts = read_utterances(dataset_dir)
    if utts is not None and utts[1]:
        return utterance_split(n, utts[0], utts[1], split)
    return split_frames(n, split, val_fraction, speech_end(dataset_dir, n))


def describe_split(dataset_dir: str | Path, n: int, val_fraction: float = VAL_FRACTION) -> dict:
    """What was held out, for reports: the utterances (names and frame ranges) or the frame block."""
    utts = read_utterances(dataset_dir)
    if utts is not None and utts[1]:
        held = set(utts[1])
        return {"kind": "utterances", "guard_frames": GUARD,
                "held_out": [u for u in utts[0] if u["name"] in held],
                "training_utterances": sum(u["name"] not in held for u in utts[0])}
    val = dataset_split(dataset_dir, n, "val", val_fraction)
    return {"kind": "tail", "guard_frames": GUARD, "held_out_frames": [int(val[0]), int(val[-1]) + 1],
            "val_fraction": val_fraction}


# ----------------------------------------------------------------------------------------------
# Crop cache


def crop_cache_path(dataset_dir: str | Path, size: str | ModelSize) -> Path:
    size = size if isinstance(size, ModelSize) else get_size(size)
    return Path(dataset_dir) / f"crops_{size.crop}.npy"


def _cache_is_current(path: Path, n_frames: int, crop: int, boxes_file: Path | None) -> bool:
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception:  # unreadable or truncated: rebuild
        return False
    if arr.dtype != np.uint8 or arr.shape != (n_frames, crop, crop, 3):
        return False
    return boxes_file is None or path.stat().st_mtime >= boxes_file.stat().st_mtime


def ensure_crop_cache(dataset_dir: str | Path, size: str | ModelSize = "328", workers: int = 4) -> Path:
    """Path of `crops_<crop>.npy`, building it first when missing or stale (frame count, crop size or an
    older mtime than crop_boxes.npy). Written to a temp file and renamed, so readers never see half a
    cache."""
    import cv2
    from tqdm import tqdm


    dataset_dir = check_dataset(dataset_dir)
    size = size if isinstance(size, ModelSize) else get_size(size)
    path = crop_cache_path(dataset_dir, size)
    frames_dir = dataset_dir / "full_body_img"
    boxes_file = dataset_dir / "crop_boxes.npy"
    if path.is_file() and not frames_dir.is_dir():
        return path  # a cache shipped without frames: nothing to rebuild from
    if not frames_dir.is_dir():
        raise DatasetError(f"{frames_dir} is missing; run: {preprocess_hint(dataset_dir)}")
    boxes = np.asarray(face_crop.dataset_crop_boxes(dataset_dir))
    if path.is_file() and _cache_is_current(path, len(boxes), size.crop,
                                            boxes_file if boxes_file.is_file() else None):
        return path
    missing = [i for i in (0, len(boxes) - 1) if not (frames_dir / f"{i}.jpg").is_file()]
    if missing:
        raise DatasetError(f"{frames_dir}/{missing[0]}.jpg is missing; run: {preprocess_hint(dataset_dir)}")
    log.info("building crop cache %s (%d frames, %d px)", path, len(boxes), size.crop)
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(len(boxes), size.crop, size.crop, 3))

        def one(i: int, out: np.ndarray = out) -> None:
            frame = cv2.imread(str(frames_dir / f"{i}.jpg"), cv2.IMREAD_COLOR)
            if frame is None:
                raise DatasetError(f"cannot read {frames_dir}/{i}.jpg; run: {preprocess_hint(dataset_dir)}")
            out[i] = face_crop.crop_face(frame, boxes[i], size.crop)

        with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2 releases the GIL while decoding
            for _ in tqdm(pool.map(one, range(len(boxes))), total=len(boxes), desc=f"crops_{size.crop}",
                          disable=None):
                pass
        out.flush()
        del out, one
    return path


# ----------------------------------------------------------------------------------------------
# Datasets


REFERENCE_POLICIES = ("random", "nearest", "closed")  # how a training sample's reference frame is drawn
NEAREST_CANDIDATES = 32  # 'nearest': random candidates searched for the closest head pose
NEAREST_MIN_GAP = 13     # 'nearest': candidates at least this many frames (0.5 s) away from the target
CLOSED_SHARE = 0.10      # 'closed': the training frames with the smallest mouth opening, this share
INNER_MOUTH_GROW = 1     # px the inner-mouth loss mask reaches beyond the inner-lip polygon
CONTEXT_KEEP = 3         # context_drop: frames each side of the centre whose audio rows a sample keeps
TEETH_SHARE = 0.03       # teeth reference: the training frames showing the most teeth, this share


def mediapipe_landmarks(dataset_dir: str | Path, frames: Sequence[int] | np.ndarray, purpose: str) -> np.ndarray:
    """Landmarks `[len(frames), 478, 2]` of `frames` from `landmarks/<i>.lms`; a missing file or another
    point topology is a DatasetError saying that `purpose` needs them."""
    folder = Path(dataset_dir) / "landmarks"
    missing = next((int(i) for i in frames if not (folder / f"{int(i)}.lms").is_file()), None)
    if missing is not None:
        raise DatasetError(f"{folder}/{missing}.lms is missing: {purpose} needs every frame's landmarks; "
                           f"run: {preprocess_hint(Path(dataset_dir))}")
    lms = [face_crop.load_landmarks(folder / f"{int(i)}.lms") for i in frames]
    if min(len(x) for x in lms) < 468:
        raise DatasetError(f"{folder}: {purpose} needs 478-point mediapipe landmarks")
    return np.stack(lms)


def frame_openings(dataset_dir: str | Path, frames: np.ndarray, purpose: str = "the closed-mouth policy") -> np.ndarray:
    """Mouth opening (metrics.mouth_opening) of each of `frames` from `landmarks/<i>.lms` (a DatasetError
    naming `purpose` when they are missing)."""
    return metrics.mouth_opening(mediapipe_landmarks(dataset_dir, frames, purpose))


def closed_mouth_frames(dataset_dir: str | Path, train_frames: np.ndarray) -> np.ndarray:
    """The CLOSED_SHARE of `train_frames` with the smallest mouth opening (at least one)."""
    opening = frame_openings(dataset_dir, train_frames)
    order = np.argsort(np.nan_to_num(opening, nan=np.inf), kind="stable")
    keep = max(1, int(round(CLOSED_SHARE * len(train_frames))))
    return np.sort(train_frames[order[:keep]])


def inner_lip_polygons(dataset_dir: str | Path, n: int, size: ModelSize) -> np.ndarray:
    """Inner-lip polygons `[n, 20, 2]` (metrics.LIP_INNER) of frames 0..n-1 in the pixels of the model's
    interior: `landmarks/<i>.lms` mapped through each frame's crop box (NaN where a box is empty)."""
    lips = mediapipe_landmarks(dataset_dir, range(n), "the inner-mouth weight")[:, list(metrics.LIP_INNER)]
    boxes = np.asarray(face_crop.dataset_crop_boxes(dataset_dir), np.float64)[:n]
    if len(boxes) < n:
        raise DatasetError(f"{dataset_dir}: {len(boxes)} crop boxes for {n} frames; "
                           f"run: {preprocess_hint(Path(dataset_dir))}")
    origin = boxes[:, None, :2]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = size.crop / (boxes[:, None, 2:] - boxes[:, None, :2])
    return (lips.astype(np.float64) - origin) * scale - size.border


def inner_mouth_mask(polygon: np.ndarray, side: int, grow: int = INNER_MOUTH_GROW) -> np.ndarray:
    """float32 `[1, side, side]`: 1 inside the open mouth (the inner-lip `polygon`, grown by `grow` px so
    the teeth's edge against the lips counts), 0 elsewhere and for a closed mouth or no landmarks."""
    import cv2

    inside = metrics.open_mouth_mask((side, side), polygon)
    if inside is None or not inside.any():
        return np.zeros((1, side, side), np.float32)
    kernel = np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)
    return cv2.dilate(inside.astype(np.uint8), kernel)[None].astype(np.float32)


def teeth_frames(polygons: np.ndarray, train_frames: np.ndarray, crops: np.ndarray, size: ModelSize) -> np.ndarray:
    """The TEETH_SHARE of `train_frames` (at least one) whose open mouth shows the largest teeth-bright area
    (metrics.teeth_share x metrics.mouth_area, in the model's interior of `crops`; `polygons` the frames'
    `inner_lip_polygons`), most first. Only the four times as many frames with the widest mouths are scored."""
    polygons = polygons[train_frames]
    area = np.array([metrics.mouth_area(p) for p in polygons])
    keep = max(1, int(round(TEETH_SHARE * len(train_frames))))
    widest = np.argsort(-np.nan_to_num(area, nan=0.0), kind="stable")[:4 * keep]
    b, s = size.border, size.inner
    bright = np.array([metrics.teeth_share(np.asarray(crops[train_frames[k], b:b + s, b:b + s]), polygons[k])
                       * area[k] for k in widest])
    return train_frames[widest[np.argsort(-np.nan_to_num(bright, nan=0.0), kind="stable")[:keep]]]


def frame_poses(dataset_dir: str | Path, n: int) -> np.ndarray:
    """Standardised head pose `[n, 2]` (yaw, roll) per frame from `face_track.npz`."""
    path = Path(dataset_dir) / "face_track.npz"
    if not path.is_file():
        raise DatasetError(f"{path} is missing: the nearest-pose policy needs it; "
                           f"run: {preprocess_hint(Path(dataset_dir))}")
    with np.load(path) as track:
        pose = np.stack([track["yaw"][:n], track["roll"][:n]], axis=1).astype(np.float64)
    pose = np.nan_to_num(pose, nan=0.0)
    return (pose - pose.mean(axis=0)) / (pose.std(axis=0) + 1e-6)


class AvatarDataset(Dataset):
    """U-Net samples of one split: `(image [6, S, S], audio [C, H, W], label [3, S, S])`, float32.

    image = [reference interior, masked target interior] as `face_crop.make_unet_input` builds it
    (reference = crop of a random other training frame), label = the target's interior (S = inner side).
    In the `val` split the reference of frame i is fixed (seeded by i), so metrics are comparable
    between epochs.

    `inner_mouth`: each sample also carries the target's open-mouth mask `[1, S, S]` (`inner_mouth_mask`),
    for a loss that weights the teeth and the inner mouth.

    `teeth`: the image gains a third crop, the teeth reference (`face_crop.make_unet_input`): in `train` a
    frame drawn from `teeth_frames`, in `val` always `teeth_frame` (the first of them), the one inference
    uses.

    `voice_aug` p (whisper mode): a sample's audio window comes, with probability p, from one of the
    dataset's voice variants (`voice_variant_paths`, drawn uniformly) instead of the recorded voice, so
    the mouth learns to follow the words rather than this one voice.

    `context_drop` p: with probability p a sample's audio window keeps only its centre (CONTEXT_KEEP
    frames each side of the target) and takes its outer rows from another training frame's window (both
    frames of a temporal pair from the same shift), so the mouth cannot lean on the surrounding words.
    """

    def __init__(self, dataset_dir: str | Path, size: str | ModelSize = "328", mode: str | None = None,
                 split: str = "train", seed: int = 0, val_fraction: float = VAL_FRACTION,
                 build_cache: bool = True, reference: str = "random", pairs: bool = False,
                 voice_aug: float = 0.0, inner_mouth: bool = False, teeth: bool = False,
                 context_drop: float = 0.0):
        if reference not in REFERENCE_POLICIES:
            raise DatasetError(f"unknown reference policy {reference!r}; choose from {REFERENCE_POLICIES}")
        if not 0.0 <= voice_aug <= 1.0:
            raise DatasetError(f"voice_aug is a probability in [0, 1], got {voice_aug}")
        if not 0.0 <= context_drop <= 1.0:
            raise DatasetError(f"context_drop is a probability in [0, 1], got {context_drop}")
        self.dataset_dir = check_dataset(dataset_dir)
        self.name = self.dataset_dir.name
        self.size = size if isinstance(size, ModelSize) else get_size(size)
        self.mode = mode or detect_mode(self.dataset_dir)
        feat_path = self.dataset_dir / FEATURE_FILES.get(self.mode, f"aud_{self.mode}.npy")
        if not feat_path.is_file():
            raise DatasetError(f"{feat_path} is missing (audio mode {self.mode!r}); "
                               f"run: {preprocess_hint(self.dataset_dir)}")
        self.features = np.load(feat_path).astype(np.float32, copy=False)
        self.cache_path = (ensure_crop_cache(self.dataset_dir, self.size) if build_cache
                           else crop_cache_path(self.dataset_dir, self.size))
        if not self.cache_path.is_file():
            raise DatasetError(f"{self.cache_path} is missing; run: {preprocess_hint(self.dataset_dir)}")
        n_crops = np.load(self.cache_path, mmap_mode="r").shape[0]
        self.n_frames = min(n_crops, len(self.features))
        if abs(n_crops - len(self.features)) > 2:
            log.warning("%s: %d frames but %d audio feature rows; using the first %d", self.name, n_crops,
                        len(self.features), self.n_frames)
        self.split, self.seed = split, seed
        self.frames = dataset_split(self.dataset_dir, self.n_frames, split, val_fraction)
        self.train_frames = (dataset_split(self.dataset_dir, self.n_frames, "train", val_fraction)
                             if split != "all" else self.frames)
        self.epoch = 0
        self._crops: np.ndarray | None = None
        self._member: np.ndarray | None = None  # frame -> in this split (SyncNet negatives)
        self.reference, self.pairs = reference, pairs
        self._closed_pool = (closed_mouth_frames(self.dataset_dir, self.train_frames)
                             if reference == "closed" else None)
        self._poses = frame_poses(self.dataset_dir, self.n_frames) if reference == "nearest" else None
        self.voice_aug = float(voice_aug)
        self.voices = self._load_voices() if self.voice_aug > 0 else []
        self.context_drop = float(context_drop)
        lips = inner_lip_polygons(self.dataset_dir, self.n_frames, self.size) if inner_mouth or teeth else None
        self._lips = lips if inner_mouth else None
        self.teeth_pool = (teeth_frames(lips, self.train_frames, self.crops, self.size)
                           if teeth and lips is not None else None)

    @property
    def teeth_frame(self) -> int | None:
        """The teeth reference of held-out samples and inference: the pool's first (None without one)."""
        return None if self.teeth_pool is None else int(self.teeth_pool[0])

    def _load_voices(self) -> list[np.ndarray]:
        """The voice variants' features (rows checked against the recorded voice's)."""
        paths = voice_variant_paths(self.dataset_dir)
        if self.mode != "whisper" or not paths:
            raise DatasetError(
                f"voice augmentation needs whisper voice variants in {self.dataset_dir} ({VOICE_VARIANTS}); "
                f"run: python data_utils/audio_features.py {self.dataset_dir}/aud.wav "
                f"{self.dataset_dir}/aud_whisper_voice+3.npy --semitones 3 (or, with word timings, "
                f"python data_utils/tts_voice.py {self.dataset_dir})")
        voices = [np.load(p).astype(np.float32, copy=False) for p in paths]
        for path, feats in zip(paths, voices):
            if feats.shape[1:] != self.features.shape[1:] or len(feats) < self.n_frames:
                raise DatasetError(f"{path} has shape {feats.shape}; expected at least "
                                   f"[{self.n_frames}, {', '.join(map(str, self.features.shape[1:]))}]")
        log.info("%s: voice augmentation p=%g over %s", self.name, self.voice_aug, ", ".join(p.name for p in paths))
        return voices

    # the memmap is reopened in each worker process instead of being pickled (that would copy it)
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_crops"] = None
        return state

    @property
    def crops(self) -> np.ndarray:
        if self._crops is None:
            self._crops = np.load(self.cache_path, mmap_mode="r")
        return self._crops

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of `epoch` for plain integer keys (loaders pass (epoch, i) keys)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.frames)

    def rng(self, frame: int, epoch: int | None = None) -> np.random.Generator:
        """The generator for one sample: fixed per frame in `val`, per (epoch, frame) otherwise."""
        epoch = 0 if self.split == "val" else (self.epoch if epoch is None else epoch)
        return np.random.default_rng((self.seed, int(epoch), int(frame)))

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """(epoch, frame) of a loader key: a position, or (epoch, position) from the training sampler."""
        epoch, i = key if isinstance(key, tuple) else (self.epoch, key)
        return int(epoch), int(self.frames[i])

    def reference_for(self, frame: int, rng: np.random.Generator) -> int:
        """The reference frame of `frame` under the dataset's policy (REFERENCE_POLICIES)."""
        if self._closed_pool is not None:
            return self._draw_other(self._closed_pool, frame, rng)
        if self._poses is not None:
            return self._nearest_pose(frame, rng)
        return self._draw_other(self.train_frames, frame, rng)

    def _nearest_pose(self, frame: int, rng: np.random.Generator) -> int:
        """Among NEAREST_CANDIDATES random training frames at least NEAREST_MIN_GAP frames away, the one
        whose head pose (yaw, roll) is closest to `frame`'s."""
        assert self._poses is not None
        pool = self.train_frames
        cands = pool[rng.integers(len(pool), size=NEAREST_CANDIDATES)]
        far = cands[np.abs(cands - frame) >= NEAREST_MIN_GAP]
        cands = far if len(far) else cands
        dist = np.linalg.norm(self._poses[cands] - self._poses[frame], axis=1)
        return int(cands[int(np.argmin(dist))])

    @staticmethod
    def _draw_other(pool: np.ndarray, frame: int, rng: np.random.Generator) -> int:
        """A uniformly drawn frame of `pool` (distinct frames, in any order) other than `frame` (any, when
        there is only one)."""
        at = np.flatnonzero(pool == frame)
        if len(at) and len(pool) > 1:
            k = int(rng.integers(len(pool) - 1))
            return int(pool[k + (k >= at[0])])
        return int(pool[rng.integers(len(pool))])

    def teeth_for(self, frame: int, rng: np.random.Generator) -> int | None:
        """The teeth reference of `frame` (None without one): drawn from the pool in `train`, else the
        inference frame (no draw when off)."""
        if self.teeth_pool is None:
            return None
        if self.split != "train":
            return self.teeth_frame
        return self._draw_other(self.teeth_pool, frame, rng)

    def interior(self, frame: int) -> np.ndarray:
        """uint8 [S, S, 3] BGR interior of a frame's crop."""
        b, s = self.size.border, self.size.inner
        return np.asarray(self.crops[frame, b:b + s, b:b + s])

    def audio(self, frame: int, voice: int | None = None, shift: int | None = None) -> np.ndarray:
        """The network audio window of `frame`: the recorded voice, or voice variant `voice`; with a
        context `shift`, the rows outside the centre come from the window of frame + shift."""
        features = self.features if voice is None else self.voices[voice]
        own = audio_window(features, frame, self.mode)
        if shift is None:
            return own
        lender = int(np.clip(frame + shift, 0, self.n_frames - 1))
        mixed = audio_window(features, lender, self.mode).reshape(WINDOW, -1)
        centre = slice(WINDOW // 2 - CONTEXT_KEEP, WINDOW // 2 + CONTEXT_KEEP + 1)
        mixed[centre] = own.reshape(WINDOW, -1)[centre]
        return mixed.reshape(own.shape)

    def context_for(self, frame: int, rng: np.random.Generator) -> int | None:
        """A sample's context shift under `context_drop`: None (its own context) or the offset of the
        training frame that lends the outer rows (no draw when off)."""
        if self.context_drop <= 0 or rng.random() >= self.context_drop:
            return None
        return self._draw_other(self.train_frames, frame, rng) - frame

    def voice_for(self, rng: np.random.Generator) -> int | None:
        """A sample's voice under `voice_aug`: None (recorded) or a variant's index (no draw when off)."""
        if not self.voices or rng.random() >= self.voice_aug:
            return None
        return int(rng.integers(len(self.voices)))

    def unet_sample(self, frame: int, ref: int, voice: int | None = None, teeth: int | None = None,
                    shift: int | None = None) -> tuple[torch.Tensor, ...]:
        """(image, audio window, label) of `frame` with reference `ref` (and teeth reference `teeth`),
        heard in `voice` with context `shift` (`audio`); with `inner_mouth`, the target's open-mouth mask
        as a fourth tensor."""
        target = np.asarray(self.crops[frame])
        teeth_crop = None if teeth is None else np.asarray(self.crops[teeth])
        image = face_crop.make_unet_input(target, np.asarray(self.crops[ref]), self.size.name, teeth_crop)
        label = self.interior(frame).transpose(2, 0, 1).astype(np.float32) / 255.0
        sample = (torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                  torch.from_numpy(self.audio(frame, voice, shift)), torch.from_numpy(np.ascontiguousarray(label)))
        if self._lips is None:
            return sample
        return sample + (torch.from_numpy(inner_mouth_mask(self._lips[frame], self.size.inner)),)

    def neighbour(self, frame: int) -> int:
        """The next frame when it is in this split, else the previous one (for temporal pairs)."""
        member = self._membership()
        nxt, prev = frame + 1, frame - 1
        if nxt < self.n_frames and member[nxt]:
            return nxt
        return prev if prev >= 0 and member[prev] else frame

    def _membership(self) -> np.ndarray:
        if self._member is None:
            self._member = np.zeros(self.n_frames, dtype=bool)
            self._member[self.frames] = True
        return self._member

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """One sample; with `pairs`, frames t and its neighbour stacked on a new first axis (same
        reference, teeth reference, voice and context shift), for the temporal loss."""
        epoch, frame = self._key(key)
        rng = self.rng(frame, epoch)
        ref = self.reference_for(frame, rng)
        voice = self.voice_for(rng)
        teeth = self.teeth_for(frame, rng)
        shift = self.context_for(frame, rng)
        if not self.pairs:
            return self.unet_sample(frame, ref, voice, teeth, shift)
        first = self.unet_sample(frame, ref, voice, teeth, shift)
        second = self.unet_sample(self.neighbour(frame), ref, voice, teeth, shift)
        return tuple(torch.stack(t) for t in zip(first, second))


class SyncNetDataset(AvatarDataset):
    """SyncNet samples of one split.

    Pairs (default, used for held-out accuracy): `(face [3, S, S], audio [C, H, W], label [])`, float32.
    Balanced: half the pairs are positives (the face's own audio window), half negatives, which are
    either shifted (audio MIN_SHIFT..NEAR_SHIFT frames away) or far (audio from elsewhere in the split).
    In `val` every frame gives two pairs, its positive and a fixed negative (shifted for even, far for
    odd frames of the split), so held-out accuracy is exactly balanced and comparable between epochs.

    Triplets (`triplets=True`, training): `(face, own audio, shifted audio, frame)`; the trainer adds
    the other faces' audio in the batch as far negatives, so one face pass serves 1 positive,
    1 shifted and B - 1 far negatives.
    """

    def __init__(self, *args, triplets: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.triplets = triplets

    def negative_for(self, frame: int, rng: np.random.Generator, shifted: bool | None = None) -> int:
        """The audio frame of a negative pair, from this split, always >= MIN_SHIFT frames away:
        shifted (MIN_SHIFT..NEAR_SHIFT away) or far (anywhere else); half and half unless `shifted`."""
        member = self._membership()
        if shifted is None:
            shifted = bool(rng.random() < 0.5)
        if shifted:
            near = [f for d in range(MIN_SHIFT, NEAR_SHIFT + 1) for f in (frame - d, frame + d)
                    if 0 <= f < self.n_frames and member[f]]
            if near:
                return near[int(rng.integers(len(near)))]
        far = self.frames[np.abs(self.frames - frame) >= MIN_SHIFT]
        if len(far) == 0:  # a split shorter than 2 * MIN_SHIFT: audio from anywhere else in the clip
            every = np.arange(self.n_frames)
            far = every[np.abs(every - frame) >= MIN_SHIFT]
        return int(far[rng.integers(len(far))])

    def face(self, frame: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.interior(frame).transpose(2, 0, 1), dtype=np.float32) / 255.0)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, frame = self._key(key)
        i = key[1] if isinstance(key, tuple) else key
        rng = self.rng(frame, epoch)
        if self.triplets:
            shifted = self.negative_for(frame, rng, shifted=True)
            return (self.face(frame), torch.from_numpy(self.audio(frame)), torch.from_numpy(self.audio(shifted)),
                    torch.tensor(frame))
        if self.split == "val":  # key i -> frame i // 2 with its own audio (even i) or a negative (odd i)
            positive = i % 2 == 0
            audio_frame = frame if positive else self.negative_for(frame, rng, shifted=(i // 2) % 2 == 0)
        else:
            positive = bool(rng.random() < 0.5)
            audio_frame = frame if positive else self.negative_for(frame, rng)
        return self.face(frame), torch.from_numpy(self.audio(audio_frame)), torch.tensor(1.0 if positive else 0.0)

    def __len__(self) -> int:
        return 2 * len(self.frames) if self.split == "val" and not self.triplets else len(self.frames)

    def _key(self, key: int | tuple[int, int]) -> tuple[int, int]:
        if self.split == "val" and not self.triplets and not isinstance(key, tuple):
            return 0, int(self.frames[key // 2])
        return super()._key(key)
