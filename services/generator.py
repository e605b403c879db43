"""Frame generation: one engine for the offline CLI (`inference_328.py`) and the live server.

`LipSyncEngine.load(dataset_dir, checkpoint)` loads an avatar once: the U-Net (PyTorch, or ONNX Runtime
with the model exported next to the checkpoint), its audio-feature mode, the source frames (decoded on
first use and kept as uint8 BGR), the crop boxes, the crop cache and the feathered paste mask. Then
`render(windows, frame_indices)` turns audio windows for output frames i..j into full frames, and
`run(features, frame_indices, sink)` does a whole clip as a pipeline: the calling thread prepares
batch k+1 and runs the U-Net (ORT and torch release the GIL) while one worker thread pastes batch k
back into its frames and hands each to `sink` (e.g. the H.264 encoder). Every buffer is allocated once
(two batch slots, a fixed pool of full-frame buffers), so memory does not grow with the audio length.

Frame order is upstream's ping-pong over the source frames (first frame used is 1), made safe for any
`start_frame`, with an optional `loop_back` that ends the clip where it started.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

import face_crop
from unet_328 import export_onnx, load_unet_checkpoint, read_checkpoint
from utils import audio_input_shape, audio_window, get_size

log = logging.getLogger(__name__)

FRAME_CACHE_BYTES = 4 << 30  # decoded source frames kept in memory (beyond this they are re-decoded)
BLEND_MODES = ("feather", "none")


class EngineError(ValueError):
    """An avatar or checkpoint the engine cannot use, with a readable one-line message."""


# ----------------------------------------------------------------------------------------------
# Frame order


def pingpong_order(n_source: int, n: int, start_frame: int = 0, loop_back: bool = False) -> np.ndarray:
    """Source-frame index for each of `n` output frames: upstream's ping-pong walk (one step per frame,
    turning at both ends, so start 0 gives 1, 2, ..., N-1, N-2, ..., 0, 1, ...). It starts from
    `start_frame` (wrapped into [0, N)) and never leaves [0, N). With `loop_back` the clip walks out
    for the first half and retraces its steps, so the last frame equals the first (an even `n` holds
    the turning frame once)."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n_source <= 0:
        raise ValueError("the avatar has no source frames")
    if n_source == 1:
        return np.zeros(n, dtype=np.int64)
    steps = (n + 1) // 2 if loop_back else n
    out = np.empty(steps, dtype=np.int64)
    idx, stride, last = int(start_frame) % n_source, 1, n_source - 1
    for k in range(steps):
        if idx > last - 1:
            stride = -1
        if idx < 1:
            stride = 1
        idx += stride
        out[k] = idx
    if loop_back:
        out = np.concatenate([out, out[: n - steps][::-1]])
    return out


# ----------------------------------------------------------------------------------------------
# Avatar data: frames, boxes, crops


class FrameStore:
    """Source frames `full_body_img/<i>.jpg`, decoded on first use and kept (uint8 BGR, read-only)
    up to `cache_bytes`; frames past the budget are decoded again each time they are needed."""

    def __init__(self, frame_dir: Path, cache_bytes: int = FRAME_CACHE_BYTES):
        self.dir = Path(frame_dir)
        numbers = sorted(int(p.stem) for p in self.dir.glob("*.jpg") if p.stem.isdigit())
        if not numbers:
            raise EngineError(f"no frames in {self.dir} (expected full_body_img/<i>.jpg)")
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))[:5]
            raise EngineError(f"frames in {self.dir} are not numbered 0..N-1 (missing {missing})")
        self.count = len(numbers)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, np.ndarray] = {}
        self._cached = 0
        self._lock = threading.Lock()
        first = self.get(0)
        self.shape: tuple[int, int, int] = first.shape  # (H, W, 3)

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> np.ndarray:
        """Frame `index` (do not modify it)."""
        frame = self._cache.get(index)
        if frame is not None:
            return frame
        path = self.dir / f"{index}.jpg"
        frame = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if frame is None:
            raise EngineError(f"cannot decode {path}")
        if index and frame.shape != self.shape:
            raise EngineError(f"{path} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is "
                              f"{self.shape[1]}x{self.shape[0]}")
        frame.setflags(write=False)
        with self._lock:
            if index not in self._cache and self._cached + frame.nbytes <= self.cache_bytes:
                self._cache[index] = frame
                self._cached += frame.nbytes
        return frame

    def preload(self, indices: Sequence[int] | None = None) -> None:
        """Decode (and keep, within the budget) these frames now (all when None)."""
        for i in range(self.count) if indices is None else indices:
            self.get(int(i))


# ----------------------------------------------------------------------------------------------
# Backends: run the U-Net on a batch of float32 inputs into a preallocated float32 output


def onnx_model_path(checkpoint: str | Path) -> Path:
    """Where the ONNX export of a checkpoint is cached: `<checkpoint without suffix>.onnx`."""
    return Path(checkpoint).with_suffix(".onnx")


def ensure_onnx(checkpoint: str | Path, force: bool = False) -> Path:
    """The ONNX model of `checkpoint`, exported (dynamic batch) when missing, older than the checkpoint
    or `force`d. Falls back to a per-user cache folder when the checkpoint folder is read-only."""
    checkpoint = Path(checkpoint)
    path = onnx_model_path(checkpoint)
    if not os.access(path.parent, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synctalk2d" / "onnx"
        stat = checkpoint.stat()
        path = cache / f"{checkpoint.parent.name}_{checkpoint.stem}_{stat.st_size}_{int(stat.st_mtime)}.onnx"
    fresh = path.is_file() and path.stat().st_mtime >= checkpoint.stat().st_mtime
    if fresh and not force:
        return path
    model, _ = load_unet_checkpoint(checkpoint)
    start = time.perf_counter()
    export_onnx(model, path)
    log.info("exported %s to %s in %.1f s", checkpoint, path, time.perf_counter() - start)
    return path


class _OrtRunner:
    """ONNX Runtime session (CPU, or the CUDA provider when asked for and available)."""

    def __init__(self, onnx_path: Path, device: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared cores: don't spin
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                dev_id = int(device.split(":")[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev_id}))
            else:
                log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu); running on CPU")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        self.dtype = "float32"

    def run(self, image: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        if self.device == "cpu":  # bind the preallocated buffers: no per-batch allocations
            binding = self.session.io_binding()
            binding.bind_cpu_input("image", image)
            binding.bind_cpu_input("audio", audio)
            binding.bind_output("pred", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            self.session.run_with_iobinding(binding)
        else:
            out[...] = self.session.run(["pred"], {"image": image, "audio": audio})[0]


class _TorchRunner:
    """PyTorch eager: CUDA in float16/bfloat16/float32, or CPU (float32)."""

    def __init__(self, model, device: str, dtype: str, threads: int):
        import torch

        self.torch = torch
        if device == "cpu":
            torch.set_num_threads(threads)  # process-wide, as every torch CPU setting
            if dtype != "float32":
                log.info("dtype %s ignored on CPU; using float32", dtype)
                dtype = "float32"
        self.dtype = dtype
        self.device = device
        self.tdtype = getattr(torch, dtype)
        self.model = model.to(device=device, dtype=self.tdtype).eval()

    def run(self, image: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(image).to(self.device, self.tdtype, non_blocking=True)
            a = torch.from_numpy(audio).to(self.device, self.tdtype, non_blocking=True)
            pred = self.model(x, a)
            torch.from_numpy(out).copy_(pred.float())  # .copy_ syncs and moves to the CPU buffer


# ----------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Slot:
    """Per-batch buffers (allocated once): network input, audio windows, prediction, uint8 crops."""

    image: np.ndarray  # [B, 6, S, S] float32
    audio: np.ndarray  # [B, C, H, W] float32
    pred: np.ndarray  # [B, 3, S, S] float32
    crops: np.ndarray  # [B, crop, crop, 3] uint8: source crop with the generated interior


class LipSyncEngine:
    """One avatar ready to generate frames. Build with `LipSyncEngine.load(...)`."""

    def __init__(self, dataset_dir: Path, checkpoint_path: Path, runner, meta: dict, frames: FrameStore,
                 boxes: np.ndarray, crops: np.ndarray | None, batch_size: int, blend: str,
                 color_match: bool, ave_checkpoint: Path | None):
        self.dataset_dir = dataset_dir
        self.checkpoint_path = checkpoint_path
        self.runner = runner
        self.meta = meta
        self.mode: str = meta["mode"]
        self.size = get_size(meta["size"])
        self.frames = frames
        self.boxes = boxes
        self._crop_cache = crops
        self.batch_size = batch_size
        self.blend = blend
        self.color_match = color_match
        self.ave_checkpoint = ave_checkpoint
        self.paste_mask = face_crop.paste_mask(self.size.crop, self.size.border)
        self._slots = [self._new_slot(), self._new_slot()]
        self._lock = threading.Lock()  # one render/run at a time (they share the slots)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, dataset_dir: str | Path, checkpoint_path: str | Path, backend: str | None = None,
             device: str | None = None, dtype: str | None = None, batch_size: int | None = None,
             threads: int | None = None, blend: str = "feather", color_match: bool = False,
             ave_checkpoint: str | Path | None = None, frame_cache_bytes: int = FRAME_CACHE_BYTES,
             ) -> LipSyncEngine:
        """Load an avatar: dataset folder (frames, crop boxes, crop cache) + U-Net checkpoint.
        Unset options come from `config.settings.models`. Raises EngineError / CheckpointError."""
        from config import settings

        cfg = settings.models
        backend = backend or cfg.backend
        device = device or cfg.resolved_device()
        device = cfg.resolved_device() if device == "auto" else device
        dtype = dtype or cfg.dtype
        batch_size = int(batch_size or cfg.batch_size)
        threads = int(threads or cfg.threads)
        ave_checkpoint = ave_checkpoint if ave_checkpoint is not None else cfg.ave_checkpoint
        if backend not in ("onnx", "torch"):
            raise EngineError(f"unknown backend {backend!r}; choose onnx or torch")
        if blend not in BLEND_MODES:
            raise EngineError(f"unknown blend {blend!r}; choose one of {BLEND_MODES}")
        dataset_dir, checkpoint_path = Path(dataset_dir), Path(checkpoint_path)
        if not dataset_dir.is_dir():
            raise EngineError(f"dataset folder not found: {dataset_dir}")

        _, meta = read_checkpoint(checkpoint_path)  # fast failure + meta before the heavier work
        if backend == "onnx":
            onnx_path = ensure_onnx(checkpoint_path)
            meta.setdefault("mode", "ave")
            meta.setdefault("size", "328")
            runner = _OrtRunner(onnx_path, device, threads)
        else:
            model, meta = load_unet_checkpoint(checkpoint_path)
            runner = _TorchRunner(model, device, dtype, threads)
        size = get_size(meta["size"])

        frames = FrameStore(dataset_dir / "full_body_img", frame_cache_bytes)
        try:
            boxes = np.asarray(face_crop.dataset_crop_boxes(dataset_dir), dtype=np.int64)
        except (OSError, ValueError) as exc:  # no crop_boxes.npy and no landmarks, or a bad file
            raise EngineError(f"no crop boxes for {dataset_dir}: {exc}") from None
        if len(boxes) < len(frames):
            log.warning("%d crop boxes for %d frames: using the first %d frames",
                        len(boxes), len(frames), len(boxes))
            frames.count = len(boxes)
        crops = None
        cache = dataset_dir / f"crops_{size.crop}.npy"
        if cache.is_file():
            crops = np.load(cache, mmap_mode="r")
            if crops.ndim != 4 or crops.shape[1:] != (size.crop, size.crop, 3) or len(crops) < len(frames):
                raise EngineError(f"{cache} has shape {crops.shape}, expected "
                                  f"[{len(frames)}, {size.crop}, {size.crop}, 3]")
        else:
            log.info("no %s: cropping from the frames on the fly", cache.name)
        engine = cls(dataset_dir, checkpoint_path, runner, meta, frames, boxes, crops, batch_size, blend,
                     color_match, Path(ave_checkpoint) if ave_checkpoint else None)
        log.info("loaded avatar %s: %d frames %dx%d, %s mode, size %s, backend %s on %s, batch %d",
                 dataset_dir.name, len(frames), frames.shape[1], frames.shape[0], engine.mode,
                 size.name, backend, runner.device, batch_size)
        return engine

    def _new_slot(self) -> _Slot:
        b, s, c = self.batch_size, self.size.inner, self.size.crop
        return _Slot(np.zeros((b, 6, s, s), np.float32), np.zeros((b, *audio_input_shape(self.mode)), np.float32),
                     np.zeros((b, 3, s, s), np.float32), np.zeros((b, c, c, 3), np.uint8))

    def describe(self) -> dict:
        """A JSON-able summary (for logs and the server's /models)."""
        return {"dataset": str(self.dataset_dir), "checkpoint": str(self.checkpoint_path),
                "mode": self.mode, "size": self.size.name, "frames": len(self.frames),
                "frame_size": [self.frames.shape[1], self.frames.shape[0]],
                "backend": "onnx" if isinstance(self.runner, _OrtRunner) else "torch",
                "device": self.runner.device, "dtype": self.runner.dtype, "batch_size": self.batch_size,
                "blend": self.blend, "color_match": self.color_match}

    # -- inputs ---------------------------------------------------------------------------------

    @property
    def n_frames(self) -> int:
        """Number of source frames."""
        return len(self.frames)

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """(H, W, 3) of the source and output frames."""
        return self.frames.shape

    def frame_order(self, n: int, start_frame: int = 0, loop_back: bool = False) -> np.ndarray:
        """Source frame for each of `n` output frames (see `pingpong_order`)."""
        return pingpong_order(self.n_frames, n, start_frame, loop_back)

    def features(self, audio16k: np.ndarray) -> np.ndarray:
        """Per-video-frame audio features of 16 kHz mono audio in this checkpoint's mode."""
        import speech_features

        device = "cuda" if self.runner.device.startswith("cuda") else "cpu"
        return speech_features.extract_features(audio16k, self.mode, device=device,
                                                ave_checkpoint=self.ave_checkpoint)

    def audio_windows(self, features: np.ndarray, indices: Sequence[int],
                      out: np.ndarray | None = None) -> np.ndarray:
        """Network audio inputs [len(indices), C, H, W] for output frames `indices`."""
        out = np.empty((len(indices), *audio_input_shape(self.mode)), np.float32) if out is None else out
        for k, i in enumerate(indices):
            out[k] = audio_window(features, int(i), self.mode)
        return out

    def crop(self, index: int) -> np.ndarray:
        """Source crop of frame `index` at crop size (uint8 BGR), from the cache or cut on the fly."""
        if self._crop_cache is not None:
            return self._crop_cache[index]
        return face_crop.crop_face(self.frames.get(index), self.boxes[index], self.size.crop)

    def _prepare(self, slot: _Slot, frame_indices: Sequence[int]) -> int:
        """Fill slot.image [:b] with (reference, masked) inputs and slot.crops with the source crops."""
        b = len(frame_indices)
        for k, fi in enumerate(frame_indices):
            crop = slot.crops[k]
            crop[...] = self.crop(int(fi))
            # at inference the reference is the frame's own crop (upstream 6.2)
            slot.image[k] = face_crop.make_unet_input(crop, crop, self.size.name)
        return b

    # -- generation -----------------------------------------------------------------------------

    def _infer(self, slot: _Slot, b: int) -> None:
        """U-Net on slot.image/audio [:b]; writes the generated interior into slot.crops [:b]."""
        self.runner.run(slot.image[:b], slot.audio[:b], slot.pred[:b])
        s, bd = self.size.inner, self.size.border
        for k in range(b):  # [3, S, S] float in [0, 1] -> rounded uint8 HWC inside the crop ring
            hwc = slot.pred[k].transpose(1, 2, 0)
            np.copyto(slot.crops[k, bd:bd + s, bd:bd + s], hwc * 255.0 + 0.5, casting="unsafe")

    def _paste(self, crop_pred: np.ndarray, index: int, out: np.ndarray) -> np.ndarray:
        """Full frame `index` with `crop_pred` pasted back, written into `out`."""
        np.copyto(out, self.frames.get(index))
        if self.blend == "none":
            return face_crop.paste_back(out, crop_pred, self.boxes[index], None)
        return face_crop.paste_back(out, crop_pred, self.boxes[index], self.paste_mask,
                                    color_match=self.color_match,
                                    crop_orig=self.crop(index) if self.color_match else None)

    def render_crops(self, windows: np.ndarray, frame_indices: Sequence[int]) -> np.ndarray:
        """Generated crops (uint8 BGR [B, crop, crop, 3]; the border ring is the source's) for audio
        `windows` [B, C, H, W] on source frames `frame_indices` (no paste-back)."""
        frame_indices = np.asarray(frame_indices, dtype=np.int64)
        if len(windows) != len(frame_indices):
            raise ValueError(f"{len(windows)} audio windows for {len(frame_indices)} frames")
        out = np.empty((len(frame_indices), self.size.crop, self.size.crop, 3), np.uint8)
        with self._lock:
            slot = self._slots[0]
            for s in range(0, len(frame_indices), self.batch_size):
                b = self._prepare(slot, frame_indices[s:s + self.batch_size])
                slot.audio[:b] = windows[s:s + b]
                self._infer(slot, b)
                out[s:s + b] = slot.crops[:b]
        return out

    def render(self, windows: np.ndarray, frame_indices: Sequence[int],
               out: Sequence[np.ndarray] | np.ndarray | None = None) -> list[np.ndarray]:
        """Full frames (uint8 BGR) for audio `windows` [B, C, H, W] on source frames `frame_indices`,
        written into `out` (B preallocated frames) when given, else into new arrays."""
        frame_indices = np.asarray(frame_indices, dtype=np.int64)
        if len(windows) != len(frame_indices):
            raise ValueError(f"{len(windows)} audio windows for {len(frame_indices)} frames")
        if out is None:
            out = [np.empty(self.frame_shape, np.uint8) for _ in frame_indices]
        elif len(out) != len(frame_indices):
            raise ValueError(f"{len(out)} output buffers for {len(frame_indices)} frames")
        with self._lock:
            slot = self._slots[0]
            for s in range(0, len(frame_indices), self.batch_size):
                idx = frame_indices[s:s + self.batch_size]
                b = self._prepare(slot, idx)
                slot.audio[:b] = windows[s:s + b]
                self._infer(slot, b)
                for k in range(b):
                    self._paste(slot.crops[k], int(idx[k]), out[s + k])
        return list(out)

    def run(self, features: np.ndarray, frame_indices: Sequence[int], sink: Callable[[np.ndarray], None],
            first_frame: int = 0, progress: Callable[[int], None] | None = None) -> int:
        """Generate output frames first_frame, first_frame+1, ... on source frames `frame_indices`
        (audio windows taken from per-frame `features`) and call `sink(frame)` for each, in order, from
        one worker thread; `frame` is a pooled buffer, valid only during the call. The U-Net runs on
        the calling thread while the worker pastes and sinks the previous batch. Returns the count."""
        frame_indices = np.asarray(frame_indices, dtype=np.int64)
        n = len(frame_indices)
        pool = [np.empty(self.frame_shape, np.uint8) for _ in range(2)]

        def finish(slot: _Slot, idx: np.ndarray) -> None:
            for k, fi in enumerate(idx):
                frame = pool[k % 2]
                self._paste(slot.crops[k], int(fi), frame)
                sink(frame)
            if progress is not None:
                progress(len(idx))

        with self._lock, ThreadPoolExecutor(1, thread_name_prefix="paste") as worker:
            pending = None
            try:
                for k, s in enumerate(range(0, n, self.batch_size)):
                    slot = self._slots[k % 2]  # its previous batch (k-2) finished: see the wait below
                    idx = frame_indices[s:s + self.batch_size]
                    b = self._prepare(slot, idx)
                    self.audio_windows(features, range(first_frame + s, first_frame + s + b), slot.audio[:b])
                    self._infer(slot, b)
                    if pending is not None:
                        pending.result()
                    pending = worker.submit(finish, slot, idx)
                if pending is not None:
                    pending.result()
                    pending = None
            finally:
                if pending is not None:  # an error upstream: let the worker finish before unwinding
                    pending.exception()
        return n

    def iter_frames(self, features: np.ndarray, frame_indices: Sequence[int], first_frame: int = 0,
                    max_queue: int | None = None) -> Iterator[np.ndarray]:
        """`run` as an iterator of frame copies (a bounded queue keeps memory fixed); closing the
        iterator early stops generation after the current batch."""
        q: queue.Queue = queue.Queue(maxsize=max_queue or 2 * self.batch_size)
        stop = threading.Event()
        done = object()

        def sink(frame: np.ndarray) -> None:
            if stop.is_set():
                raise _Stopped
            q.put(frame.copy())

        def produce() -> None:
            try:
                self.run(features, frame_indices, sink, first_frame)
                q.put(done)
            except _Stopped:
                q.put(done)
            except BaseException as exc:  # handed to the consumer
                q.put(exc)

        thread = threading.Thread(target=produce, name="engine-run", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()


class _Stopped(Exception):
    """Raised inside the sink when an `iter_frames` consumer went away."""


# ----------------------------------------------------------------------------------------------
# Server services (issue 8): FrameGenerationService / EnhancedFrameGenerationService build on
# LipSyncEngine above (load once via services.models.ModelService, then render/run per request).


class FrameGenerationService:
    """Audio -> features -> frames -> JPEG bytes for the server, a few frames at a time, on one loaded
    `LipSyncEngine`. This base service animates a single template frame (source frame `template`);
    `EnhancedFrameGenerationService` can stand in for it wherever it is used.

    `job(audio16k)` returns a `FrameJob`: each blocking `next_batch()` computes just enough features
    (the streaming Whisper routine, so the first frame does not wait for the whole utterance), renders
    the next batch and JPEG-encodes it. Output frame i is the mouth for audio [40 i, 40 i + 40) ms, the
    training indexing, and there are round(25 x duration) frames.
    """

    fps = 25  # one output frame per feature row (40 ms)

    def __init__(self, engine: LipSyncEngine, batch_size: int | None = None, jpeg_quality: int = 85,
                 stats=None, template: int = 0, first_batch: int = 2):
        import simplejpeg  # noqa: F401  (fail here, not mid-stream)

        self.engine = engine
        self.batch_size = max(1, int(batch_size or engine.batch_size))
        self.first_batch = max(1, min(int(first_batch), self.batch_size))  # small: an early first frame
        self.jpeg_quality = int(jpeg_quality)
        self.stats = stats  # services.streaming.StreamStats (frames_generated), optional
        self.template = int(template) % engine.n_frames

    def frame_order(self, n: int) -> np.ndarray:
        """Source frame for each of `n` output frames: the template frame throughout."""
        return np.full(n, self.template, dtype=np.int64)

    def encode(self, frame: np.ndarray) -> bytes:
        """JPEG bytes of a BGR frame (simplejpeg, 4:2:0 chroma)."""
        import simplejpeg

        return simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=self.jpeg_quality,
                                      colorspace="BGR", colorsubsampling="420")

    def still(self) -> bytes:
        """JPEG of the template source frame (no generation)."""
        return self.encode(self.engine.frames.get(self.template))

    def job(self, audio16k: np.ndarray, on_frame: Callable[[int, bytes], None] | None = None) -> FrameJob:
        """A generation job for 16 kHz mono float audio; `on_frame(i, jpeg)` sees every frame."""
        return FrameJob(self, audio16k, on_frame)


class EnhancedFrameGenerationService(FrameGenerationService):
    """Moves through the source frames (upstream's ping-pong walk with `loop_back`, so a clip ends on
    the frame it started from and hands over smoothly to the still or idle picture); the mouth is
    blended in with the engine's feathered paste mask, as in the base service."""

    def frame_order(self, n: int) -> np.ndarray:
        """Ping-pong source order from the template frame, walking back to it by the end."""
        return self.engine.frame_order(n, start_frame=self.template, loop_back=True)


class FeatureFeed:
    """Per-frame features of a known clip. Whisper mode runs `speech_features.StreamingFeatures` one
    hop at a time, only as far as asked, so rows for the first frames exist long before the last ones
    (the windows are the ones `extract_features` uses, so the frames equal the offline CLI's). Other
    modes (ave) are computed in one call up front."""

    def __init__(self, engine: LipSyncEngine, audio16k: np.ndarray):
        import speech_features

        self.engine = engine
        self.audio = np.ascontiguousarray(np.asarray(audio16k, dtype=np.float32).reshape(-1))
        self._stream = None
        self.features: np.ndarray | None = None
        if engine.mode == "whisper":
            encoder = speech_features.load_whisper_encoder(device=engine.describe()["device"])
            self._stream = speech_features.StreamingFeatures(encoder)
            self.total = self._stream.n_frames(len(self.audio))
            self._rows = np.zeros((self.total, *self._stream.empty().shape[1:]), np.float32)
            self._count = self._pushed = 0
            self._flushed = False
        else:
            self.features = engine.features(self.audio)
            self.total = len(self.features)

    def ensure(self, k: int, cancel: threading.Event | None = None) -> np.ndarray:
        """Features with at least min(k, total) rows (stops early when `cancel` is set)."""
        if self._stream is None:
            return self.features
        k = min(k, self.total)
        while self._count < k and not (cancel is not None and cancel.is_set()):
            if self._pushed < len(self.audio):
                chunk = self.audio[self._pushed: self._pushed + self._stream.hop]
                self._pushed += len(chunk)
                new = self._stream.push(chunk)
            elif not self._flushed:
                new = self._stream.flush()  # silence-padded tail: the last frames
                self._flushed = True
            else:
                raise RuntimeError(f"feature stream ended at {self._count} of {self.total} frames")
            new = new[: self.total - self._count]
            self._rows[self._count: self._count + len(new)] = new
            self._count += len(new)
        return self._rows[: self._count]


class FrameJob:
    """One stream's generation state (a `services.streaming.FrameSource`): blocking `next_batch()`
    calls return JPEG batches in frame order until `total` frames are out or `cancel` is set."""

    def __init__(self, service: FrameGenerationService, audio16k: np.ndarray,
                 on_frame: Callable[[int, bytes], None] | None = None):
        self.service = service
        self.feed = FeatureFeed(service.engine, audio16k)
        self.total = self.feed.total
        self.order = service.frame_order(self.total)
        self.cancel = threading.Event()
        self.on_frame = on_frame
        self.next_frame = 0

    def next_batch(self) -> list[bytes] | None:
        """The next frames as JPEG bytes, or None when finished or cancelled."""
        svc, start = self.service, self.next_frame
        if self.cancel.is_set() or start >= self.total:
            return None
        end = min(self.total, start + (svc.first_batch if start == 0 else svc.batch_size))
        # frame i's window reads feature rows [i - 8, i + 8): rows up to end + 7 must exist
        features = self.feed.ensure(end + 7, self.cancel)
        if self.cancel.is_set():
            return None
        windows = svc.engine.audio_windows(features, range(start, end))
        frames = svc.engine.render(windows, self.order[start:end])
        jpegs = [svc.encode(f) for f in frames]
        if svc.stats is not None:
            svc.stats.add(frames_generated=len(jpegs))
        if self.on_frame is not None:
            for k, jpeg in enumerate(jpegs):
                self.on_frame(start + k, jpeg)
        self.next_frame = end
        return jpegs
