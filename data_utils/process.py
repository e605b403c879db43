"""Preprocessing: a talking-head video becomes a training dataset, with a quality report.

    python data_utils/process.py dataset/NAME/NAME.mp4              # outputs next to the video
    python data_utils/process.py dataset/NAME/NAME.mp4 --force      # redo every stage
    python data_utils/process.py clip.mov --out dataset/NAME --features none

Stages (each recorded in `.stages.json` when complete; a rerun skips complete stages whose inputs and
settings are unchanged, a killed run redoes only the unfinished ones):

1. audio     scan the file: video timeline (first/last timestamp -> N = round(25 x duration) frames),
             audio decoded, downmixed and resampled to 16 kHz, aligned to the first video frame and cut
             or padded to exactly N x 640 samples -> `aud.wav`; level and clipping statistics.
2. frames    decode the video (PyAV, threaded), resample to 25 fps by timestamp (nearest frame), apply
             the rotation metadata; per frame: JPEG `full_body_img/<i>.jpg`, mediapipe face mesh on a
             downscaled copy -> `landmarks/<i>.lms` (478 points, full-frame pixels), smoothed crop box
             -> `crop_boxes.npy`, crops -> `crops_<crop>.npy` (one per model size), per-frame face
             statistics -> `face_track.npz`.
3. features  audio features of the configured mode -> `aud_<mode>.npy` (skipped with `--features none`).
4. report    `report.json` and the printed summary, with warnings and advice.

Every output is written to a temporary name and moved into place when its stage completes, so nothing
half-written survives a failure or a kill as if it were complete. Bad input stops with one line
`error: ...` on stderr and exit code 2. See docs/preprocessing.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
from tqdm import tqdm

from config import settings
from synctalk import audio as audio_io
from synctalk import face as face_crop
from synctalk import features as speech_features
from synctalk.audio import silence_segments, speech_envelope
from synctalk.errors import one_line
from synctalk.fileio import atomic_path, remove_stale_temporaries, write_text_atomic
from synctalk.landmarks import FaceTracker, face_width, head_pose
from synctalk.sizes import SIZE_PRESETS
from synctalk.timing import FPS, SAMPLE_RATE, SAMPLES_PER_FRAME

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("process")

# ---- defaults (CLI and `process_video`) ---------------------------------------------------------------
MIN_SECONDS = 2.0            # shorter input is refused
MAX_MISSING = 0.10           # refuse when the face is missing in more than this share of frames
MAX_SECOND_FACE = 0.20       # refuse when a second face is seen in more than this share of frames
JPEG_QUALITY = 95            # as upstream (cv2's default)
MESH_SIZE = 640              # face mesh runs on a copy whose longest side is at most this (0 = full size)
WORKERS = 2                  # JPEG writer threads
MAX_FACES = 2                # face mesh max_num_faces: 2 notices a second face
CLIP_LEVEL = 0.999           # |sample| at or above this (of full scale) counts as clipped
SILENCE_MIN_S = 1.0          # report/advice: silence wanted at start and end of the recording
RECOMMENDED_SECONDS = 60.0   # advice below this duration
CROP_SIZES = tuple(size.crop for size in SIZE_PRESETS.values())  # crop caches written by default
STAGES = ("audio", "frames", "features", "report")
STAGE_FILE = ".stages.json"
FORMAT_VERSION = 1


class ProcessError(Exception):
    """Bad or unusable input: the message is one readable line (exit code 2)."""


@dataclass
class Options:
    """Every setting of a run (the CLI fills it from argparse)."""

    video: Path
    out: Path
    force: bool = False
    min_seconds: float = MIN_SECONDS
    max_missing: float = MAX_MISSING
    max_second_face: float = MAX_SECOND_FACE
    features: str = "whisper"
    jpeg_quality: int = JPEG_QUALITY
    mesh_size: int = MESH_SIZE
    workers: int = WORKERS
    crop_sizes: tuple[int, ...] = CROP_SIZES
    smooth: bool = True
    min_cutoff: float = face_crop.SMOOTH_MIN_CUTOFF
    beta: float = face_crop.SMOOTH_BETA
    pipeline: bool = True
    progress: bool | None = None  # tqdm: None = only on a terminal


# ----------------------------------------------------------------------------------------------
# Opening and probing


def open_media(path: Path):
    """Open `path` with PyAV and return (container, video stream, audio stream); ProcessError when the file
    is missing, unreadable, or lacks a video or an audio stream."""
    if not path.exists():
        raise ProcessError(f"video not found: {path}")
    if not path.is_file():
        raise ProcessError(f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ProcessError(f"{path} is empty")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProcessError(f"cannot read {path} as a video: {one_line(exc)}") from None
    videos = [s for s in container.streams.video
              if not (int(s.disposition) & int(av.stream.Disposition.attached_pic))]
    if not videos:
        container.close()
        raise ProcessError(f"{path} has no video stream (is it an audio file?)")
    if not container.streams.audio:
        container.close()
        raise ProcessError(f"{path} has no audio stream: the recording must include the voice")
    return container, videos[0], container.streams.audio[0]


def _frame_time(frame, fallback: float) -> float:
    if frame.pts is None or frame.time_base is None:
        return fallback
    return float(frame.pts * frame.time_base)


def _rotation(frame) -> int:
    """The frame's display rotation in degrees counter-clockwise, snapped to 0/90/180/270."""
    try:
        r = int(frame.rotation)
    except Exception:  # no display matrix side data
        return 0
    return int(round(r / 90.0)) % 4 * 90


def rotate(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display rotation (degrees counter-clockwise, as `VideoFrame.rotation`) to an image."""
    if rotation == 90:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if rotation == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if rotation == 270:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    return image


_FAST_COLORSPACES = {2, 5, 6}  # unspecified, BT.470BG, SMPTE 170M: BT.601, what cv2 converts with


def to_bgr(frame) -> np.ndarray:
    """A decoded PyAV frame as uint8 BGR. 8-bit 4:2:0 video-range BT.601 goes through cv2 (fast); any
    other format through swscale with the frame's own colour space and range."""
    name = frame.format.name
    if (name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0
            and int(frame.colorspace) in _FAST_COLORSPACES and int(frame.color_range) in (0, 1)):
        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2BGR_I420)
    kwargs: dict[str, Any] = {}
    if int(frame.color_range) in (1, 2):
        kwargs["src_color_range"] = int(frame.color_range)
    return frame.to_ndarray(format="bgr24", **kwargs)


@dataclass
class MediaInfo:
    """What the audio scan learns about the input."""

    container: str
    video_codec: str
    audio_codec: str
    width: int  # after rotation
    height: int
    rotation: int
    source_fps: float | None
    sample_aspect_ratio: float
    audio_rate: int
    audio_channels: int
    t_first: float  # first video timestamp (s): frame 0 and audio sample 0 start here
    t_end: float  # end of the last video frame (s)
    n_frames: int  # output frames at 25 fps
    video_packets: int

    @property
    def duration(self) -> float:
        return self.n_frames / FPS


# ----------------------------------------------------------------------------------------------
# Stage 1: audio scan


def _channel_samples(frame) -> np.ndarray:
    """Decoded audio frame as float `[channels, samples]` in [-1, 1] (for level and clipping)."""
    a = frame.to_ndarray()
    fmt = frame.format.name
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        a = a.reshape(-1, channels).T
    if a.dtype == np.int16:
        return a.astype(np.float32) / 32768.0
    if a.dtype == np.int32:
        return a.astype(np.float32) / 2147483648.0
    if a.dtype == np.uint8:
        return (a.astype(np.float32) - 128.0) / 128.0
    if fmt.startswith("s64"):
        return (a / 9.223372036854776e18).astype(np.float32)
    return a.astype(np.float32, copy=False)


@dataclass
class _Scan:
    """What one demux pass gathers: the video timeline from packet timestamps (and the first picture)
    and the audio, resampled to 16 kHz mono, with its level statistics."""

    step: float  # a video packet's duration when it has none
    t_first: float = math.inf
    t_end: float = -math.inf
    n_packets: int = 0
    first: Any = None
    chunks: list = field(default_factory=list)
    audio_start: float | None = None
    peak: float = 0.0
    clipped: int = 0
    total: int = 0
    bad_packets: int = 0

    def video(self, packet) -> None:
        """A video packet: its time span (decoded only until the first picture: size and rotation)."""
        if self.first is None:
            try:
                self.first = next(iter(packet.decode()), None)
            except av.FFmpegError:
                pass
        if packet.pts is None or packet.size == 0:
            return
        self.n_packets += 1
        t = float(packet.pts * packet.time_base)
        dur = float(packet.duration * packet.time_base) if packet.duration else self.step
        self.t_first, self.t_end = min(self.t_first, t), max(self.t_end, t + dur)

    def audio(self, packet, resampler) -> None:
        """An audio packet: decoded, measured and resampled (an undecodable one is counted and skipped)."""
        try:
            frames = packet.decode()
        except av.FFmpegError:
            self.bad_packets += 1
            return
        for frame in frames:
            if self.audio_start is None and frame.pts is not None:
                self.audio_start = float(frame.pts * frame.time_base)
            samples = _channel_samples(frame)
            if samples.size:
                self.peak = max(self.peak, float(np.abs(samples).max()))
                self.clipped += int(np.count_nonzero((np.abs(samples) >= CLIP_LEVEL).any(axis=0)))
                self.total += samples.shape[1]
            self.chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))


def _demux(path: Path, container, vs, aus, step: float, progress: bool | None) -> _Scan:
    """Read every packet once; a read error part-way keeps what was read (with a warning)."""
    scan = _Scan(step)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    bar = tqdm(total=path.stat().st_size, desc="audio", unit="B", unit_scale=True, disable=_no_bar(progress),
               leave=False)
    try:
        for packet in container.demux(vs, aus):
            bar.update(packet.size)
            if packet.stream.index == vs.index:
                scan.video(packet)
            else:
                scan.audio(packet, resampler)
        scan.chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    except av.FFmpegError as exc:
        log.warning("%s: reading stopped early (%s); using what was read", path, one_line(exc))
    finally:
        bar.close()
    if scan.bad_packets:
        log.warning("%s: %d undecodable audio packets skipped", path, scan.bad_packets)
    return scan


def _media_info(path: Path, container, vs, aus, scan: _Scan, rate) -> MediaInfo:
    """The video's geometry and timeline (the stream's duration when the packets carry no timestamps)."""
    first = scan.first
    if first is None:
        try:
            first = next(iter(vs.decode(None)), None)  # flush: decoders with a delay
        except av.FFmpegError:
            first = None
    if first is None:
        raise ProcessError(f"{path}: the video stream has no decodable frame")
    rotation = _rotation(first)
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    t_first, t_end = scan.t_first, scan.t_end
    if scan.n_packets == 0:  # no timestamps on the packets: fall back to the stream's duration
        t_first = float(first.time or 0.0)
        dur = float(vs.duration * vs.time_base) if vs.duration else (
            container.duration / 1e6 if container.duration else 0.0)
        t_end = t_first + dur
    sar = vs.sample_aspect_ratio
    return MediaInfo(
        container=container.format.name, video_codec=vs.codec_context.name, audio_codec=aus.codec_context.name,
        width=int(width), height=int(height), rotation=rotation, source_fps=float(rate) if rate else None,
        sample_aspect_ratio=float(sar) if sar else 1.0, audio_rate=int(aus.rate or 0),
        audio_channels=int(aus.channels or 0), t_first=float(t_first), t_end=float(t_end),
        n_frames=max(int(round((t_end - t_first) * FPS)), 0), video_packets=scan.n_packets)


def _aligned_audio(path: Path, scan: _Scan, info: MediaInfo) -> tuple[np.ndarray, dict]:
    """(the audio with sample 0 at video frame 0, exactly n_frames x 640 samples; its statistics)."""
    audio = np.concatenate(scan.chunks).astype(np.float32) if scan.chunks else np.zeros(0, np.float32)
    if audio.size == 0:
        raise ProcessError(f"{path}: the audio stream has no decodable samples")
    decoded_s = audio.size / SAMPLE_RATE
    start = scan.audio_start if scan.audio_start is not None else info.t_first
    offset = int(round((start - info.t_first) * SAMPLE_RATE))
    if offset > 0:
        audio = np.concatenate([np.zeros(offset, np.float32), audio])
    elif offset < 0:
        audio = audio[-offset:]
    want = info.n_frames * SAMPLES_PER_FRAME
    gap_s = (want - audio.size) / SAMPLE_RATE
    audio = np.pad(audio, (0, max(0, want - audio.size)))[:want]
    stats = {
        "decoded_seconds": round(decoded_s, 3),
        "offset_ms": round(1000.0 * offset / SAMPLE_RATE, 1),  # audio start - video start
        "padded_end_ms": round(1000.0 * max(gap_s, 0.0), 1),
        "peak_dbfs": _db(scan.peak),
        "clipped_share": scan.clipped / scan.total if scan.total else 0.0,
    }
    return audio, stats


def scan_media(path: Path, progress: bool | None = None) -> tuple[MediaInfo, np.ndarray, dict]:
    """One demux pass: the video timeline from packet timestamps (no video decoding, but the first frame
    for size and rotation), and the audio decoded to 16 kHz mono. Returns (info, audio aligned to the
    first video frame and exactly n_frames x 640 samples long, audio statistics)."""
    container, vs, aus = open_media(path)
    try:
        rate = vs.average_rate or vs.guessed_rate
        scan = _demux(path, container, vs, aus, 1.0 / float(rate) if rate else 1.0 / FPS, progress)
        info = _media_info(path, container, vs, aus, scan, rate)
    finally:
        container.close()
    audio, stats = _aligned_audio(path, scan, info)
    return info, audio, stats


def _no_bar(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None shows the bar only on a terminal."""
    return None if progress is None else not progress


def _db(x: float) -> float:
    return round(20.0 * math.log10(x), 2) if x > 0 else -120.0


# ----------------------------------------------------------------------------------------------
# Stage 2: frames


def resample_25fps(frames: Iterator, n_frames: int, t_first: float, step: float) -> Iterator[tuple[int, Any]]:
    """Output frame k (time t_first + k / 25) is the input frame whose timestamp is nearest (ties: the
    earlier one); after the last input frame its picture is held up to `n_frames`. Yields (k, frame);
    one input frame may be yielded several times (slower input) or not at all (faster input)."""
    k, prev, prev_t = 0, None, None
    for frame in frames:
        t = _frame_time(frame, (prev_t + step) if prev_t is not None else t_first)
        if prev is not None:
            t = max(t, prev_t + 1e-6)  # non-increasing timestamps: treat as just after
            mid = 0.5 * (prev_t + t)
            while k < n_frames and t_first + k / FPS <= mid + 1e-9:
                yield k, prev
                k += 1
            if k >= n_frames:
                return
        prev, prev_t = frame, t
    while prev is not None and k < n_frames:
        yield k, prev
        k += 1


def decode_video(container, stream, threads: int = 0) -> Iterator:
    """Decoded frames of `stream` in presentation order; undecodable packets are skipped (and counted in
    the log), a read error ends the stream early."""
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    bad = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError:
                bad += 1
                continue
            yield from frames
    except av.FFmpegError as exc:
        log.warning("video reading stopped early: %s", one_line(exc))
    if bad:
        log.warning("%d undecodable video packets skipped", bad)


def video_frames_25fps(path: Path, info: MediaInfo, threads: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """(k, BGR frame) for k = 0 .. n_frames-1: the video at 25 fps, rotation applied. Consecutive
    repeats of one input frame share the same array (do not modify it)."""
    container, vs, _ = open_media(path)
    try:
        rate = vs.average_rate or vs.guessed_rate
        step = 1.0 / float(rate) if rate else 1.0 / FPS
        last_src, last_img = None, None
        for k, frame in resample_25fps(decode_video(container, vs, threads), info.n_frames, info.t_first, step):
            if frame is not last_src:
                last_src = frame
                img = to_bgr(frame)
                last_img = rotate(img, info.rotation)
                last_img.setflags(write=False)
            yield k, last_img
    finally:
        container.close()


@dataclass
class FaceTrack:
    """Per-frame face data collected while processing (saved as face_track.npz)."""

    n: int
    found: np.ndarray = field(init=False)
    faces: np.ndarray = field(init=False)
    raw_boxes: np.ndarray = field(init=False)
    boxes: np.ndarray = field(init=False)
    shifted: np.ndarray = field(init=False)
    width: np.ndarray = field(init=False)
    roll: np.ndarray = field(init=False)
    yaw: np.ndarray = field(init=False)

    def __post_init__(self):
        n = self.n
        self.found = np.zeros(n, bool)
        self.faces = np.zeros(n, np.uint8)
        self.raw_boxes = np.zeros((n, 4), np.int32)
        self.boxes = np.zeros((n, 4), np.int32)
        self.shifted = np.zeros(n, bool)
        self.width = np.full(n, np.nan, np.float32)
        self.roll = np.full(n, np.nan, np.float32)
        self.yaw = np.full(n, np.nan, np.float32)

    def save(self, path: Path) -> None:
        np.savez(path, found=self.found, faces=self.faces, raw_boxes=self.raw_boxes, boxes=self.boxes,
                 shifted=self.shifted, width=self.width, roll=self.roll, yaw=self.yaw)


class FrameWorker:
    """Everything done per 25-fps frame, given in order: face mesh, landmarks file, smoothed box, crops,
    and (in a thread pool) the JPEG. `error` holds the first failure (a ProcessError stops early)."""

    def __init__(self, tmp: Path, info: MediaInfo, opts: Options):

        self.tmp, self.info, self.opts = tmp, info, opts
        self.n = info.n_frames
        self.w, self.h = info.width, info.height
        self.frames_dir = tmp / "full_body_img"
        self.lms_dir = tmp / "landmarks"
        self.frames_dir.mkdir(parents=True)
        self.lms_dir.mkdir(parents=True)
        self.caches = {size: np.lib.format.open_memmap(tmp / f"crops_{size}.npy", mode="w+", dtype=np.uint8,
                                                       shape=(self.n, size, size, 3))
                       for size in opts.crop_sizes}
        self.track = FaceTrack(self.n)
        self.tracker = FaceTracker(max_faces=MAX_FACES)
        self.face_width, self.head_pose = face_width, head_pose
        self.box_tracker = face_crop.BoxTracker(self.w, self.h, smooth=opts.smooth,
                                                min_cutoff=opts.min_cutoff, beta=opts.beta)
        scale = 1.0
        if opts.mesh_size and max(self.w, self.h) > opts.mesh_size:
            scale = opts.mesh_size / max(self.w, self.h)
        self.mesh_wh = (max(1, int(round(self.w * scale))), max(1, int(round(self.h * scale))))
        self.last_raw: np.ndarray | None = None
        self.pending: list[int] = []  # leading frames before the first face (no box yet)
        self.leading: list[int] = []  # those frames once placed (their crops are cut in `finish`)
        self.missing = 0
        self.second = 0
        self.error: BaseException | None = None
        self.jpeg_params = [cv2.IMWRITE_JPEG_QUALITY, int(opts.jpeg_quality)]

    # -- per frame -------------------------------------------------------------------------------

    def write_jpeg(self, k: int, img: np.ndarray) -> None:
        if not cv2.imwrite(str(self.frames_dir / f"{k}.jpg"), img, self.jpeg_params):
            raise OSError(f"cannot write {self.frames_dir / f'{k}.jpg'}")

    def faces(self, k: int, img: np.ndarray) -> None:
        """Face mesh, landmarks, box and crops of frame k."""
        # bilinear is 5x cheaper than INTER_AREA here; the mesh resamples its face ROI anyway
        small = img if self.mesh_wh == (self.w, self.h) else cv2.resize(img, self.mesh_wh,
                                                                         interpolation=cv2.INTER_LINEAR)
        found = self.tracker(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), self.w, self.h)
        t = self.track
        t.faces[k] = min(found.count, 255)
        if found.count > 1:
            self.second += 1
            if self.second > self.opts.max_second_face * self.n:
                raise ProcessError(
                    f"more than one face: a second face is visible in {self.second} of the first {k + 1} frames "
                    f"(limit {self.opts.max_second_face:.0%} of the video); crop the video so only the speaker "
                    "is in view, or pass --max_second_face")
        if found.main_points is not None:
            raw = np.round(found.main_points, 2)
            t.found[k] = True
            t.width[k] = self.face_width(raw)
            t.roll[k], t.yaw[k] = self.head_pose(raw)
            self.last_raw = raw
            if self.pending:  # leading frames without a face take the first face's landmarks
                for j in self.pending:
                    self._place(j, raw, None)
                self.leading, self.pending = self.pending, []
        else:
            self.missing += 1
            if self.missing > self.opts.max_missing * self.n:
                if self.last_raw is None:
                    raise ProcessError(f"no face found in the first {k + 1} frames ({(k + 1) / FPS:.1f} s): the "
                                       "video must show one face, frontal and well lit")
                raise ProcessError(
                    f"the face is missing in more than {self.opts.max_missing:.0%} of the frames ({self.missing} "
                    f"of {self.n}); cut the parts without the face or pass --max_missing")
            if self.last_raw is None:
                self.pending.append(k)
                return
        self._place(k, self.last_raw, img)

    def _place(self, k: int, raw: np.ndarray, img: np.ndarray | None) -> None:
        """Landmarks file, raw and smoothed box (and the crops when the frame is given) of frame k."""
        (self.lms_dir / f"{k}.lms").write_text(face_crop.format_landmarks(raw))
        t = self.track
        unclamped = face_crop.crop_box_mediapipe(raw)
        t.raw_boxes[k] = face_crop.clamp_box(unclamped, self.w, self.h)
        smoothed = self.box_tracker.smoothed(raw)
        box_free = face_crop.crop_box_mediapipe(smoothed)
        box = face_crop.clamp_box(box_free, self.w, self.h)
        t.boxes[k] = box
        t.shifted[k] = tuple(box) != tuple(box_free)
        if img is not None:
            for size, cache in self.caches.items():
                cache[k] = face_crop.crop_face(img, box, size)

    def finish(self) -> None:
        """Crops of the leading frames that had no face (from their JPEGs, read back), flush the caches."""
        for j in self.leading:
            img = cv2.imread(str(self.frames_dir / f"{j}.jpg"), cv2.IMREAD_COLOR)
            if img is None:
                raise OSError(f"cannot read back {self.frames_dir / f'{j}.jpg'}")
            for size, cache in self.caches.items():
                cache[j] = face_crop.crop_face(img, self.track.boxes[j], size)
        for cache in self.caches.values():
            cache.flush()

    def close(self) -> None:
        self.tracker.close()
        for size in list(self.caches):
            del self.caches[size]


def run_frames(path: Path, info: MediaInfo, tmp: Path, opts: Options) -> FaceTrack:
    """Stage 2 into `tmp`: decode (main thread), faces + crops (one thread, in frame order) and JPEGs
    (a thread pool) run concurrently; with `opts.pipeline` False everything runs in this thread."""

    # the bar first: the face tracker routes stderr through a filter, which is not a terminal
    bar = tqdm(total=info.n_frames, desc="frames", unit="frame", leave=False, disable=_no_bar(opts.progress))
    try:
        worker = FrameWorker(tmp, info, opts)
    except BaseException:
        bar.close()
        raise
    try:
        if not opts.pipeline:
            for k, img in video_frames_25fps(path, info, threads=1):
                worker.write_jpeg(k, img)
                worker.faces(k, img)
                bar.update(1)
        else:
            _run_pipelined(path, info, worker, opts, bar)
        worker.finish()
    finally:
        bar.close()
        worker.close()
    return worker.track


def _run_pipelined(path: Path, info: MediaInfo, worker: FrameWorker, opts: Options, bar) -> None:
    face_q: queue.Queue = queue.Queue(maxsize=8)
    slots = threading.BoundedSemaphore(max(2, 3 * opts.workers))
    done = 0
    lock = threading.Lock()

    def face_loop() -> None:
        nonlocal done
        while True:
            item = face_q.get()
            if item is None:
                return
            if worker.error is not None:
                continue  # drain
            try:
                worker.faces(*item)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                worker.error = exc
            with lock:
                done += 1

    def jpeg(k: int, img: np.ndarray) -> None:
        try:
            worker.write_jpeg(k, img)
        finally:
            slots.release()

    thread = threading.Thread(target=face_loop, name="faces", daemon=True)
    thread.start()
    futures: list[Future] = []
    try:
        with ThreadPoolExecutor(max(1, opts.workers), thread_name_prefix="jpeg") as pool:
            shown = 0
            for k, img in video_frames_25fps(path, info, threads=0):
                if worker.error is not None:
                    break
                slots.acquire()
                futures.append(pool.submit(jpeg, k, img))
                face_q.put((k, img))
                with lock:
                    bar.update(done - shown)
                    shown = done
                if len(futures) > 64:
                    for f in futures[:-16]:
                        f.result()
                    futures = futures[-16:]
            face_q.put(None)
            thread.join()
            for f in futures:
                f.result()
            bar.update(done - shown)
    finally:
        if thread.is_alive():
            face_q.put(None)
            thread.join()
    if worker.error is not None:
        raise worker.error


# ----------------------------------------------------------------------------------------------
# Stage bookkeeping


class Stages:
    """`.stages.json`: per stage its key (input signature + settings + the previous stage's key) and
    result; written atomically."""

    def __init__(self, out: Path, force: bool):
        self.path = out / STAGE_FILE
        self.data: dict = {"version": FORMAT_VERSION, "stages": {}}
        if not force and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == FORMAT_VERSION:
                    self.data = data
            except (OSError, ValueError):
                log.warning("unreadable %s: redoing every stage", self.path)

    @staticmethod
    def digest(key: dict) -> str:
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def done(self, name: str, key: dict) -> dict | None:
        rec = self.data["stages"].get(name)
        return rec if rec and rec.get("key") == self.digest(key) else None

    def mark(self, name: str, key: dict, result: dict, seconds: float) -> None:
        self.data["stages"][name] = {"key": self.digest(key), "result": result, "seconds": round(seconds, 3)}
        write_text_atomic(self.path, json.dumps(self.data, indent=1, default=_json_default))

    def drop_after(self, name: str) -> None:
        """Forget the stages after `name` (their inputs are being redone)."""
        later = STAGES[STAGES.index(name) + 1:]
        for s in later:
            self.data["stages"].pop(s, None)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _replace(src: Path, dst: Path) -> None:
    """Move `src` over `dst` (a file or a folder)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _clean_temps(out: Path) -> None:
    """Remove what a killed earlier run left behind (temporaries, half-moved folders)."""
    remove_stale_temporaries(out)
    for p in out.glob(".tmp_*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in out.glob(".*.old*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Stage 4: report


def _stats(x: np.ndarray, digits: int = 2) -> dict:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {}
    return {"mean": round(float(x.mean()), digits), "median": round(float(np.median(x)), digits),
            "min": round(float(x.min()), digits), "max": round(float(x.max()), digits),
            "p95": round(float(np.percentile(x, 95)), digits)}


def _box_steps(boxes: np.ndarray) -> np.ndarray:
    """Per-step centre change in % of the box side."""
    b = boxes.astype(np.float64)
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2.0, (b[:, 1] + b[:, 3]) / 2.0], axis=1)
    side = (b[:, 2] - b[:, 0]).clip(min=1.0)
    return 100.0 * np.hypot(*np.diff(centre, axis=0).T) / (0.5 * (side[1:] + side[:-1]))


def build_report(out: Path, info: MediaInfo, audio_stats: dict, opts: Options, timings: dict) -> dict:
    """The quality report (dict) from the dataset folder's outputs."""

    tr = np.load(out / "face_track.npz")
    found, faces, boxes, raw_boxes = tr["found"], tr["faces"], tr["boxes"], tr["raw_boxes"]
    n = len(found)
    side = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    steps = _box_steps(boxes) if n > 1 else np.zeros(0)
    centre = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2.0, (boxes[:, 1] + boxes[:, 3]) / 2.0], axis=1)
    spread = 100.0 * float(np.max(centre.std(axis=0))) / max(float(np.median(side)), 1.0)
    missing = np.flatnonzero(~found)
    second = np.flatnonzero(faces > 1)

    audio = audio_io.load_audio(out / "aud.wav")
    env = speech_envelope(audio, SAMPLE_RATE, FPS)
    rms = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) if audio.size else 0.0
    loud = float(np.percentile(env, 95)) if env.size else 0.0
    segments = silence_segments(env, FPS, min_ms=300.0) if loud > 0 else [(0, len(env))]
    lead = segments[0][1] / FPS if segments and segments[0][0] == 0 else 0.0
    trail = (n - segments[-1][0]) / FPS if segments and segments[-1][1] >= len(env) else 0.0
    longest = sorted(segments, key=lambda s: s[0] - s[1])[:5]

    report: dict[str, Any] = {
        "input": {"path": str(opts.video), "container": info.container, "video_codec": info.video_codec,
                  "audio_codec": info.audio_codec, "source_fps": info.source_fps, "rotation": info.rotation,
                  "sample_aspect_ratio": info.sample_aspect_ratio, "audio_rate": info.audio_rate,
                  "audio_channels": info.audio_channels},
        "frames": n, "fps": FPS, "duration_s": round(n / FPS, 3), "frame_size": [info.width, info.height],
        "face": {
            "found_share": round(float(found.mean()), 4) if n else 0.0,
            "frames_without_face": missing[:200].tolist(), "missing_count": int(len(missing)),
            "second_face_frames": int(len(second)), "second_face_share": round(len(second) / max(n, 1), 4),
            "first_second_face_frame": int(second[0]) if len(second) else None,
        },
        "face_size_px": {"box_side": _stats(side, 1), "cheek_width": _stats(tr["width"], 1)},
        "head_motion": {"centre_spread_pct": round(spread, 2), "roll_deg": _stats(tr["roll"], 2),
                        "yaw": _stats(tr["yaw"], 3)},
        "crop_jump": {
            "jitter_pct": round(face_crop.box_jitter(boxes), 3),
            "jitter_unsmoothed_pct": round(face_crop.box_jitter(raw_boxes), 3),
            "step_pct": _stats(steps, 3),
            "boxes_shifted_share": round(float(tr["shifted"].mean()), 4) if n else 0.0,
        },
        "audio": {
            "rms_dbfs": _db(rms), "speech_level_dbfs": _db(loud), **audio_stats,
            "leading_silence_s": round(lead, 2), "trailing_silence_s": round(trail, 2),
            "longest_silences": [{"start_s": round(s / FPS, 2), "end_s": round(e / FPS, 2),
                                  "duration_s": round((e - s) / FPS, 2)} for s, e in longest],
        },
        "outputs": sorted(p.name for p in out.iterdir() if not p.name.startswith(".")),
        "settings": {"features": opts.features, "jpeg_quality": opts.jpeg_quality, "mesh_size": opts.mesh_size,
                     "crop_sizes": list(opts.crop_sizes), "smooth": opts.smooth, "min_cutoff": opts.min_cutoff,
                     "beta": opts.beta},
        "timings_s": timings,
    }
    report["warnings"] = quality_warnings(report)
    return report


def quality_warnings(r: dict) -> list[dict]:
    """Warnings with advice from a report dict (each: code, message, advice)."""
    out: list[dict] = []

    def warn(code: str, message: str, advice: str) -> None:
        out.append({"code": code, "message": message, "advice": advice})

    if r["duration_s"] < RECOMMENDED_SECONDS:
        warn("short_recording", f"only {r['duration_s']:.1f} s of video",
             "record 3 to 5 minutes of natural speech for a good avatar")
    side = r["face_size_px"]["box_side"].get("median", 0.0)
    crop = max(r.get("settings", {}).get("crop_sizes") or CROP_SIZES)  # the largest crop side in use
    if side and side < crop:
        warn("face_small", f"the face crop box is {side:.0f} px wide and is enlarged to the {crop} px crop in "
             "use, so it will look soft",
             f"move closer to the camera or record at a higher resolution (the box should be {crop} px or more)")
    f = r["face"]
    if f["missing_count"]:
        warn("face_missing", f"no face found in {f['missing_count']} frames (listed in report.json)",
             "those frames reuse the nearest landmarks; cut them out if the face is hidden there")
    if f["second_face_frames"]:
        warn("second_face", f"a second face is visible in {f['second_face_frames']} frames "
             f"(first at {f['first_second_face_frame'] / FPS:.1f} s)",
             "crop the video or record with only the speaker in view")
    hm, cj = r["head_motion"], r["crop_jump"]
    roll = r["head_motion"]["roll_deg"]
    yaw = r["head_motion"]["yaw"]
    reasons = []
    if cj["step_pct"].get("p95", 0.0) > 3.0:
        reasons.append(f"the crop moves {cj['step_pct']['p95']:.1f} % of its size per frame (p95)")
    if hm["centre_spread_pct"] > 15.0:
        reasons.append(f"the face wanders over {hm['centre_spread_pct']:.0f} % of the crop size (std)")
    if roll and max(abs(roll["min"]), abs(roll["max"])) > 15.0:
        reasons.append(f"the head tilts up to {max(abs(roll['min']), abs(roll['max'])):.0f} degrees")
    if yaw and max(abs(yaw["min"]), abs(yaw["max"])) > 0.15:
        reasons.append("the head turns away from the camera")
    if reasons:
        warn("head_motion", "too much head motion: " + "; ".join(reasons),
             "keep the head still and facing the camera; use a tripod")
    if cj["boxes_shifted_share"] > 0.05:
        warn("face_at_edge", f"the crop box touches the frame edge in {cj['boxes_shifted_share']:.0%} of frames "
             "and was shifted inside", "centre the face with some space below the chin")
    a = r["audio"]
    if a["leading_silence_s"] < SILENCE_MIN_S or a["trailing_silence_s"] < SILENCE_MIN_S:
        warn("no_silence", f"silence at the start {a['leading_silence_s']:.1f} s and at the end "
             f"{a['trailing_silence_s']:.1f} s", "start and end the recording with a few seconds (ideally 5 s) of "
             "silence with the mouth closed, so the model learns a resting mouth")
    if a["clipped_share"] > 1e-4:
        warn("clipped_audio", f"the audio is clipped in {100 * a['clipped_share']:.2f} % of the samples "
             f"(peak {a['peak_dbfs']:.1f} dBFS)", "lower the microphone gain and record again")
    if a["speech_level_dbfs"] < -40.0:
        warn("quiet_audio", f"the speech level is only {a['speech_level_dbfs']:.0f} dBFS",
             "raise the microphone gain or speak closer to the microphone")
    if a["padded_end_ms"] > 1000.0 / FPS:
        warn("audio_short", f"the audio ends {a['padded_end_ms']:.0f} ms before the video (padded with silence)",
             "check the recording: audio and video should have the same length")
    if abs(r["input"]["sample_aspect_ratio"] - 1.0) > 0.05:
        warn("non_square_pixels", f"the video has non-square pixels (aspect {r['input']['sample_aspect_ratio']:.2f})",
             "faces look stretched to the model; export the video with square pixels")
    return out


def print_report(out: Path, r: dict) -> None:
    """The human-readable summary on stdout."""
    f, cj, a = r["face"], r["crop_jump"], r["audio"]
    side = r["face_size_px"]["box_side"]
    lines = [
        f"{out}: {r['frames']} frames ({r['duration_s']:.2f} s at {FPS} fps), "
        f"{r['frame_size'][0]}x{r['frame_size'][1]}",
        f"  face: found in {100 * f['found_share']:.1f} % of frames, crop box {side.get('median', 0):.0f} px "
        f"(min {side.get('min', 0):.0f}), second face in {f['second_face_frames']} frames",
        f"  crop jitter {cj['jitter_pct']:.2f} % of the box per frame ({cj['jitter_unsmoothed_pct']:.2f} % "
        f"unsmoothed), head spread {r['head_motion']['centre_spread_pct']:.1f} %",
        f"  audio: speech {a['speech_level_dbfs']:.1f} dBFS, peak {a['peak_dbfs']:.1f} dBFS, clipped "
        f"{100 * a['clipped_share']:.3f} %, silence {a['leading_silence_s']:.1f} s at start / "
        f"{a['trailing_silence_s']:.1f} s at end",
    ]
    for w in r["warnings"]:
        lines.append(f"  warning ({w['code']}): {w['message']}; {w['advice']}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------
# Driver


def _info_from(rec: dict) -> MediaInfo:
    return MediaInfo(**rec["info"])


def _check_inputs(opts: Options) -> None:
    """Fail before the long stages: a missing video, AVE features without the AVE encoder."""
    if not opts.video.exists():
        raise ProcessError(f"video not found: {opts.video}")
    if opts.features == "ave":
        ckpt = settings.models.ave_checkpoint
        if ckpt is None or not Path(ckpt).is_file():
            raise ProcessError("--features ave needs upstream's AVE audio encoder: set SYNCTALK_MODELS__AVE_CHECKPOINT "
                               "to its .pth file (or use --features whisper)")


def _check_length(opts: Options, info: MediaInfo) -> None:
    if info.n_frames / FPS < opts.min_seconds:
        raise ProcessError(f"{opts.video} is too short: {info.n_frames / FPS:.2f} s of video, at least "
                           f"{opts.min_seconds:g} s needed (--min_seconds)")


def _audio_stage(opts: Options, stages: Stages, key: dict, timings: dict) -> tuple[MediaInfo, dict]:
    """Stage 1: the timeline and aud.wav (skipped when done before); (media info, audio statistics)."""
    rec = stages.done("audio", key)
    if rec is None or not (opts.out / "aud.wav").is_file():
        stages.drop_after("audio")
        t0 = time.perf_counter()
        info, audio, audio_stats = scan_media(opts.video, opts.progress)
        _check_length(opts, info)
        audio_io.write_wav(opts.out / "aud.wav", audio, SAMPLE_RATE)
        rec = {"result": {"info": info.__dict__, "audio": audio_stats}}
        timings["audio"] = time.perf_counter() - t0
        stages.mark("audio", key, rec["result"], timings["audio"])
        log.info("audio: %d frames (%.2f s), %d x %d, rotation %d", info.n_frames, info.duration, info.width,
                 info.height, info.rotation)
    else:
        log.info("audio: done before, skipped (--force redoes it)")
    info = _info_from(rec["result"])
    _check_length(opts, info)
    return info, rec["result"]["audio"]


def _frames_stage(opts: Options, stages: Stages, info: MediaInfo, key: dict, timings: dict) -> None:
    """Stage 2: frames, face track, crop boxes and crop caches, built in a temp folder and moved in."""
    out = opts.out
    outputs = ["full_body_img", "landmarks", "crop_boxes.npy", "face_track.npz",
               *[f"crops_{s}.npy" for s in opts.crop_sizes]]
    if stages.done("frames", key) is not None and all((out / p).exists() for p in outputs):
        log.info("frames: done before, skipped")
        return
    stages.drop_after("frames")
    t0 = time.perf_counter()
    tmp = out / f".tmp_frames{os.getpid()}"
    try:
        track = run_frames(opts.video, info, tmp, opts)
        if not track.found.any():
            raise ProcessError(f"no face found in {opts.video}: the video must show one face, frontal and well lit")
        np.save(tmp / "crop_boxes.npy", track.boxes.astype(np.int32))
        track.save(tmp / "face_track.npz")
        for name in outputs:
            _replace(tmp / name, out / name)
        now = time.time()
        for s in opts.crop_sizes:  # caches newer than crop_boxes.npy (datasets checks the mtimes)
            os.utime(out / f"crops_{s}.npy", (now + 1, now + 1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    timings["frames"] = time.perf_counter() - t0
    stages.mark("frames", key, {"frames": info.n_frames, "fps": round(info.n_frames / timings["frames"], 2)},
                timings["frames"])


def _features_stage(opts: Options, stages: Stages, info: MediaInfo, key: dict, timings: dict) -> None:
    """Stage 3: the audio features of aud.wav (none with --features none)."""
    feat_file = opts.out / f"aud_{opts.features}.npy"
    if opts.features == "none":
        return
    if stages.done("features", key) is not None and feat_file.is_file():
        log.info("features: done before, skipped")
        return
    stages.drop_after("features")
    t0 = time.perf_counter()
    write_features(opts.out, info.n_frames, opts.features,
                   progress=sys.stderr.isatty() if opts.progress is None else opts.progress)
    timings["features"] = time.perf_counter() - t0
    stages.mark("features", key, {"file": feat_file.name}, timings["features"])


def process_video(opts: Options) -> dict:
    """Run (or resume) every stage; returns the report dict. Raises ProcessError on bad input."""
    _check_inputs(opts)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    _clean_temps(out)
    stages = Stages(out, opts.force)
    st = opts.video.stat()
    key: dict[str, Any] = {"input": [str(opts.video.resolve()), st.st_size, st.st_mtime_ns],
                           "version": FORMAT_VERSION}
    timings: dict[str, float] = {}
    key_audio = dict(key, stage="audio")
    info, audio_stats = _audio_stage(opts, stages, key_audio, timings)
    key_frames = dict(key_audio, stage="frames", mesh_size=opts.mesh_size, jpeg=opts.jpeg_quality,
                      crops=list(opts.crop_sizes), smooth=[opts.smooth, opts.min_cutoff, opts.beta])
    _frames_stage(opts, stages, info, key_frames, timings)
    key_feat = dict(key_frames, stage="features", mode=opts.features)
    _features_stage(opts, stages, info, key_feat, timings)
    # 4. report (cheap: always rebuilt, so it lists the current outputs)
    t0 = time.perf_counter()
    for name, rec_s in stages.data["stages"].items():
        timings.setdefault(name, rec_s.get("seconds", 0.0))
    report = build_report(out, info, audio_stats, opts, {k: round(v, 3) for k, v in timings.items()})
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, default=_json_default))
    stages.mark("report", dict(key_feat, stage="report"), {"warnings": len(report["warnings"])},
                time.perf_counter() - t0)
    return report


def write_features(out: Path, n_frames: int, mode: str, progress: bool = False) -> Path:
    """`aud_<mode>.npy` from `aud.wav` (whisper: one row per video frame), with the configured
    feature settings and AVE checkpoint."""
    audio = audio_io.load_audio(out / "aud.wav")
    try:
        # offline, so the encoder runs on batches of windows (5x less CPU than one window per call)
        feats = np.asarray(speech_features.extract_features(
            audio, mode, batch_size=speech_features.FILE_BATCH, progress=progress, config=settings.audio.feature_config(),
            ave_checkpoint=settings.models.ave_checkpoint), dtype=np.float32)
    except (ValueError, FileNotFoundError) as exc:
        raise ProcessError(f"audio features ({mode}): {one_line(exc)}") from None
    if mode == "whisper" and len(feats) != n_frames:
        log.warning("whisper features have %d rows for %d frames: adjusting", len(feats), n_frames)
        feats = feats[:n_frames] if len(feats) > n_frames else np.concatenate(
            [feats, np.repeat(feats[-1:], n_frames - len(feats), axis=0)])
    path = out / f"aud_{mode}.npy"
    with atomic_path(path) as tmp:
        np.save(tmp, feats)
    return path


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:

    d = Options(video=Path("."), out=Path("."), features=settings.audio.feature_mode)
    p = argparse.ArgumentParser(description="Turn a talking-head video into a training dataset (see "
                                            "docs/preprocessing.md).")
    p.add_argument("video", type=Path, help="the recording, e.g. dataset/NAME/NAME.mp4")
    p.add_argument("--out", type=Path, default=None, help="dataset folder (default: the video's folder)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--min_seconds", type=float, default=d.min_seconds, help="refuse shorter videos")
    p.add_argument("--max_missing", type=float, default=d.max_missing,
                   help="refuse when the face is missing in more than this share of frames")
    p.add_argument("--max_second_face", type=float, default=d.max_second_face,
                   help="refuse when a second face is visible in more than this share of frames")
    p.add_argument("--features", choices=("whisper", "ave", "none"), default=d.features,
                   help="audio features to compute (default: settings.audio.feature_mode)")
    p.add_argument("--jpeg_quality", type=int, default=d.jpeg_quality, help="JPEG quality of full_body_img")
    p.add_argument("--mesh_size", type=int, default=d.mesh_size,
                   help="longest side of the copy the face mesh runs on (0 = full size)")
    p.add_argument("--crop_sizes", type=str, default=",".join(map(str, d.crop_sizes)),
                   help="crop caches to write, comma separated (crops_<size>.npy)")
    p.add_argument("--workers", type=int, default=d.workers, help="JPEG writer threads")
    p.add_argument("--no_smooth", action="store_true", help="no temporal smoothing of the crop box")
    p.add_argument("--min_cutoff", type=float, default=d.min_cutoff, help="One-Euro cut-off at rest (Hz)")
    p.add_argument("--beta", type=float, default=d.beta, help="One-Euro speed coefficient")
    p.add_argument("--no_pipeline", action="store_true", help="run every step in one thread (for comparison)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    return p


def parse_options(argv: list[str] | None = None) -> Options:
    args = build_parser().parse_args(argv)
    try:
        crops = tuple(int(s) for s in args.crop_sizes.split(",") if s.strip())
    except ValueError:
        raise ProcessError(f"--crop_sizes must be integers separated by commas, got {args.crop_sizes!r}") from None
    if not crops or min(crops) < 16:
        raise ProcessError(f"--crop_sizes needs sizes of at least 16 px, got {args.crop_sizes!r}")
    for name in ("max_missing", "max_second_face"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ProcessError(f"--{name} must be a share between 0 and 1")
    if not 1 <= args.jpeg_quality <= 100:
        raise ProcessError("--jpeg_quality must be between 1 and 100")
    return Options(video=args.video, out=args.out if args.out is not None else args.video.parent,
                   force=args.force, min_seconds=args.min_seconds, max_missing=args.max_missing,
                   max_second_face=args.max_second_face, features=args.features, jpeg_quality=args.jpeg_quality,
                   mesh_size=max(0, args.mesh_size), workers=max(1, args.workers), crop_sizes=crops,
                   smooth=not args.no_smooth, min_cutoff=args.min_cutoff, beta=args.beta,
                   pipeline=not args.no_pipeline, progress=False if args.quiet else None)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 on success, 2 on bad input (one `error:` line on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        opts = parse_options(argv)
        if opts.progress is False:
            logging.getLogger().setLevel(logging.WARNING)
        report = process_video(opts)
    except ProcessError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print_report(opts.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
