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
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from synctalk import face as face_crop
from synctalk.audio import SpeechGate
from synctalk.face import BLEND_MODES, Paster
from synctalk.features import FILE_BATCH, FeatureConfig, extract_features
from synctalk.sizes import audio_input_shape, audio_window, get_size
from synctalk.timing import SAMPLE_RATE
from unet_328 import export_onnx, load_unet_checkpoint, read_checkpoint

log = logging.getLogger(__name__)

FRAME_CACHE_BYTES = 4 << 30  # decoded source frames kept in memory (beyond this they are re-decoded)


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


def pingpong_step(pos: int, direction: int, n: int) -> tuple[int, int]:
    """One step of the same ping-pong walk over [0, n), for callers that walk frame by frame (the
    live timeline): 0, 1, ..., n-1, n-2, ..., 0, 1, ... (no frame is repeated at the turns). Returns
    the new (position, direction)."""
    if n <= 1:
        return 0, 1
    nxt = pos + direction
    if nxt >= n:
        return n - 2, -1
    if nxt < 0:
        return 1, 1
    return nxt, direction


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

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded frames kept in memory."""
        return self._cached

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

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared cores: don't spin
        providers: list[str | tuple[str, dict[str, int]]] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in ort.get_available_providers():
                dev_id = int(device.split(":")[1]) if ":" in device else 0
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev_id}))
            else:
                log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu); running on CPU")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.model_bytes = 2 * onnx_path.stat().st_size  # weights + the session's prepacked copies
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
        import torch  # the ONNX path never needs torch at run time

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
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

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


IDLE_MODES = ("recorded", "rendered")  # what the idle loop shows (see LipSyncEngine.idle_frame)


class LipSyncEngine:
    """One avatar ready to generate frames. Build with `LipSyncEngine.load(...)`."""

    def __init__(self, dataset_dir: Path, checkpoint_path: Path, runner, meta: dict, frames: FrameStore,
                 boxes: np.ndarray, crops: np.ndarray | None, batch_size: int, blend: str,
                 color_match: bool, ave_checkpoint: Path | None, feature_config: FeatureConfig,
                 idle: str = "recorded", speech_gate: SpeechGate | None = None):
        if idle not in IDLE_MODES:
            raise EngineError(f"unknown idle mode {idle!r}; choose one of {IDLE_MODES}")
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
        self.paster = Paster(self.size, blend, color_match)
        self.feature_config = feature_config
        self._slots = [self._new_slot(), self._new_slot()]
        self._lock = threading.Lock()  # one render/run at a time (they share the slots)
        self.idle = idle
        self._idle_crops: dict[int, np.ndarray] = {}  # idle="rendered": frame -> silent-mouth crop
        self._silence: np.ndarray | None = None
        self._silence_window: np.ndarray | None = None
        self.speech_gate = speech_gate  # `gate`: pauses get the model's silent mouth (None: off)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, dataset_dir: str | Path, checkpoint_path: str | Path, backend: str = "onnx",
             device: str = "cpu", dtype: str = "float32", batch_size: int = 8, threads: int = 1,
             blend: str = "feather", color_match: bool = True, ave_checkpoint: str | Path | None = None,
             frame_cache_bytes: int = FRAME_CACHE_BYTES, feature_config: FeatureConfig | None = None,
             idle: str = "recorded", speech_gate: SpeechGate | None = None) -> LipSyncEngine:
        """Load an avatar: dataset folder (frames, crop boxes, crop cache) + U-Net checkpoint. Every
        option is an argument (the server and CLIs pass their settings). Raises EngineError /
        CheckpointError."""
        batch_size, threads = int(batch_size), int(threads)
        feature_config = feature_config or FeatureConfig()
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
            runner: _OrtRunner | _TorchRunner = _OrtRunner(onnx_path, device, threads)
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
                     color_match, Path(ave_checkpoint) if ave_checkpoint else None, feature_config, idle,
                     speech_gate)
        log.info("loaded avatar %s: %d frames %dx%d, %s mode, size %s, backend %s on %s, batch %d",
                 dataset_dir.name, len(frames), frames.shape[1], frames.shape[0], engine.mode,
                 size.name, backend, runner.device, batch_size)
        return engine

    def _new_slot(self) -> _Slot:
        b, s, c = self.batch_size, self.size.inner, self.size.crop
        return _Slot(np.zeros((b, 6, s, s), np.float32), np.zeros((b, *audio_input_shape(self.mode)), np.float32),
                     np.zeros((b, 3, s, s), np.float32), np.zeros((b, c, c, 3), np.uint8))

    def memory_bytes(self) -> int:
        """What this avatar holds in memory: decoded source frames, the crop cache and the U-Net."""
        crops = int(self._crop_cache.nbytes) if self._crop_cache is not None else 0
        idle = sum(int(c.nbytes) for c in list(self._idle_crops.values()))
        return int(self.frames.cached_bytes) + crops + idle + self.runner.model_bytes

    def describe(self) -> dict:
        """A JSON-able summary (for logs and the server's /models)."""
        return {"dataset": str(self.dataset_dir), "checkpoint": str(self.checkpoint_path),
                "mode": self.mode, "size": self.size.name, "frames": len(self.frames),
                "frame_size": [self.frames.shape[1], self.frames.shape[0]],
                "backend": "onnx" if isinstance(self.runner, _OrtRunner) else "torch",
                "device": self.device, "dtype": self.runner.dtype, "batch_size": self.batch_size,
                "blend": self.blend, "color_match": self.color_match,
                "speech_gate": None if self.speech_gate is None else vars(self.speech_gate)}

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
        """Per-video-frame audio features of 16 kHz mono audio in this checkpoint's mode (a whole file:
        `FILE_BATCH` windows per encoder call, as the dataset's features were made)."""
        return extract_features(audio16k, self.mode, device=self.feature_device, batch_size=FILE_BATCH,
                                ave_checkpoint=self.ave_checkpoint, config=self.feature_config)

    @property
    def device(self) -> str:
        """Where the U-Net runs: "cpu", "cuda" (or "cuda:N"), "mps"."""
        return self.runner.device

    @property
    def feature_device(self) -> str:
        """Where this engine's audio features run: CUDA when the U-Net runs there, else the CPU."""
        return "cuda" if self.device.startswith("cuda") else "cpu"

    def audio_windows(self, features: np.ndarray, indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None,
                      speaking: np.ndarray | None = None) -> np.ndarray:
        """Network audio inputs [len(indices), C, H, W] for output frames `indices`; a frame that
        `speaking` (per frame, see `speaking`) marks as a pause gets the window of silence."""
        out = np.empty((len(indices), *audio_input_shape(self.mode)), np.float32) if out is None else out
        for k, i in enumerate(indices):
            if speaking is not None and int(i) < len(speaking) and not speaking[int(i)]:
                out[k] = self.silence_window()[0]
            else:
                out[k] = audio_window(features, int(i), self.mode)
        return out

    def crop(self, index: int) -> np.ndarray:
        """Source crop of frame `index` at crop size (uint8 BGR), from the cache or cut on the fly."""
        if self._crop_cache is not None:
            return self._crop_cache[index]
        return face_crop.crop_face(self.frames.get(index), self.boxes[index], self.size.crop)

    def _prepare(self, slot: _Slot, frame_indices: Sequence[int] | np.ndarray) -> int:
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

    def paste(self, crop_pred: np.ndarray, index: int, out: np.ndarray) -> np.ndarray:
        """Full frame `index` with `crop_pred` pasted back (the engine's `Paster`), written into `out`."""
        np.copyto(out, self.frames.get(index))
        return self.paster(out, crop_pred, self.boxes[index],
                           self.crop(index) if self.paster.color_match else None)

    def render_crops(self, windows: np.ndarray, frame_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Generated crops (uint8 BGR [B, crop, crop, 3]; the border ring is the source's) for audio
        `windows` [B, C, H, W] on source frames `frame_indices` (no paste-back)."""
        indices = np.asarray(frame_indices, dtype=np.int64)
        if len(windows) != len(indices):
            raise ValueError(f"{len(windows)} audio windows for {len(indices)} frames")
        out = np.empty((len(indices), self.size.crop, self.size.crop, 3), np.uint8)
        with self._lock:
            slot = self._slots[0]
            for s in range(0, len(indices), self.batch_size):
                b = self._prepare(slot, indices[s:s + self.batch_size])
                slot.audio[:b] = windows[s:s + b]
                self._infer(slot, b)
                out[s:s + b] = slot.crops[:b]
        return out

    def _silence_features(self) -> np.ndarray:
        """Features of 2 s of digital silence through this checkpoint's feature routine (computed once)."""
        if self._silence is None:
            self._silence = self.features(np.zeros(2 * SAMPLE_RATE, np.float32))
        return self._silence

    def silence_window(self) -> np.ndarray:
        """The network audio input `[1, C, H, W]` of silence (the middle of 2 s of digital silence)."""
        if self._silence_window is None:
            feats = self._silence_features()
            self._silence_window = self.audio_windows(feats, [len(feats) // 2])
        return self._silence_window

    def speaking(self, audio16k: np.ndarray, n_frames: int, first_frame: int = 0) -> np.ndarray | None:
        """Bool `[n_frames]`: whether frames `first_frame`, `first_frame + 1`, ... of `audio16k` are speech
        under the engine's `speech_gate` (None without a gate or outside whisper mode: all speech)."""
        if self.speech_gate is None or self.mode != "whisper":
            return None
        return self.speech_gate.speaking_at(audio16k, n_frames, first_frame)

    def gate(self, features: np.ndarray, speaking: np.ndarray | None) -> np.ndarray:
        """`features` with the rows of pause frames (`speaking` False, from `speaking`) replaced by the row
        of digital silence (a copy; unchanged when `speaking` is None or all True). With `audio_windows`'
        `speaking`, pause frames then render the model's silent mouth and the speech frames beside a pause
        see silence, not the pause's own sound, in their windows."""
        if speaking is None or speaking.all():
            return features
        feats = self._silence_features()
        out = np.array(features, copy=True)
        out[:len(speaking)][~np.asarray(speaking, bool)[:len(out)]] = feats[len(feats) // 2]
        return out

    def idle_frame(self, index: int) -> np.ndarray:
        """Source frame `index` as the idle loop shows it: as recorded (`idle="recorded"`, read-only), or
        with the mouth the model renders for silence (`idle="rendered"`, for avatars recorded while talking;
        each frame's crop is rendered once and kept)."""
        if self.idle == "recorded":
            return self.frames.get(int(index))
        crop = self._idle_crops.get(int(index))
        if crop is None:
            crop = self.render_crops(self.silence_window(), [int(index)])[0]
            self._idle_crops[int(index)] = crop
        return self.paste(crop, int(index), np.empty(self.frame_shape, np.uint8))

    def render(self, windows: np.ndarray, frame_indices: Sequence[int] | np.ndarray,
               out: Sequence[np.ndarray] | np.ndarray | None = None) -> list[np.ndarray]:
        """Full frames (uint8 BGR) for audio `windows` [B, C, H, W] on source frames `frame_indices`,
        written into `out` (B preallocated frames) when given, else into new arrays."""
        indices = np.asarray(frame_indices, dtype=np.int64)
        if len(windows) != len(indices):
            raise ValueError(f"{len(windows)} audio windows for {len(indices)} frames")
        if out is None:
            out = [np.empty(self.frame_shape, np.uint8) for _ in indices]
        elif len(out) != len(indices):
            raise ValueError(f"{len(out)} output buffers for {len(indices)} frames")
        with self._lock:
            slot = self._slots[0]
            for s in range(0, len(indices), self.batch_size):
                idx = indices[s:s + self.batch_size]
                b = self._prepare(slot, idx)
                slot.audio[:b] = windows[s:s + b]
                self._infer(slot, b)
                for k in range(b):
                    self.paste(slot.crops[k], int(idx[k]), out[s + k])
        return list(out)

    def run(self, features: np.ndarray, frame_indices: Sequence[int] | np.ndarray, sink: Callable[[np.ndarray], None],
            first_frame: int = 0, progress: Callable[[int], None] | None = None,
            speaking: np.ndarray | None = None) -> int:
        """Generate output frames first_frame, first_frame+1, ... on source frames `frame_indices`
        (audio windows taken from per-frame `features`) and call `sink(frame)` for each, in order, from
        one worker thread; `frame` is a pooled buffer, valid only during the call. The U-Net runs on
        the calling thread while the worker pastes and sinks the previous batch; `speaking` marks pause
        frames (`audio_windows`). Returns the count."""
        indices = np.asarray(frame_indices, dtype=np.int64)
        n = len(indices)
        pool = [np.empty(self.frame_shape, np.uint8) for _ in range(2)]

        def finish(slot: _Slot, idx: np.ndarray) -> None:
            for k, fi in enumerate(idx):
                frame = pool[k % 2]
                self.paste(slot.crops[k], int(fi), frame)
                sink(frame)
            if progress is not None:
                progress(len(idx))

        with self._lock, ThreadPoolExecutor(1, thread_name_prefix="paste") as worker:
            pending = None
            try:
                for k, s in enumerate(range(0, n, self.batch_size)):
                    slot = self._slots[k % 2]  # its previous batch (k-2) finished: see the wait below
                    idx = indices[s:s + self.batch_size]
                    b = self._prepare(slot, idx)
                    self.audio_windows(features, range(first_frame + s, first_frame + s + b), slot.audio[:b],
                                       speaking)
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



