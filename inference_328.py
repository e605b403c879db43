"""Offline inference: make an avatar say an audio file, written as an H.264 + AAC mp4 at 25 fps.

    python inference_328.py --name NAME --audio_path speech.wav [--checkpoint N|PATH] [--output out.mp4]
        [--backend onnx|torch] [--start_frame N] [--loop_back] [--blend feather|none] [--no-color_match]
        [--batch_size 8] [--dataset_root dataset] [--checkpoint_root checkpoint]
    python inference_328.py --name NAME --export-onnx      # write <checkpoint>.onnx and exit

The audio may be any format and rate PyAV decodes (a video file's first audio track too). The output has
round(25 x duration) frames; its audio is the input's own samples re-encoded to AAC at their original
rate (no resampling, so the track is the input's), re-chunked to the AAC frame size; the audio is encoded
first, so an audio problem is reported before any frame is rendered. Frames stream from the engine into
the encoder (nothing on disk but the mp4, written to a temp file and renamed). Default output:
`result/<name>_<audio stem>_<checkpoint stem>.mp4`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from tqdm import tqdm

from config import auto_device, settings
from synctalk import audio as audio_io
from synctalk.avatar import AvatarError, AvatarRegistry, AvatarRoot
from synctalk.engine import EngineError, LipSyncEngine, ensure_onnx
from synctalk.errors import one_line
from synctalk.timing import FPS, frames_for_samples
from unet_328 import CheckpointError

log = logging.getLogger("inference")

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


class InferenceError(Exception):
    """A bad input (avatar, audio, checkpoint) reported as one `error:` line with exit code 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # defaults
    dataset_root = settings.paths.dataset_root
    checkpoint_root = settings.paths.checkpoint_root
    result_dir = settings.paths.result_dir
    backend = settings.models.backend
    batch_size = settings.models.batch_size
    device = settings.models.device
    threads = settings.models.threads
    crf = 20  # upstream's mux quality

    p = argparse.ArgumentParser(description="Lip-sync an avatar to an audio file (mp4 out).")
    p.add_argument("--name", required=True, help="avatar name: dataset/<name>/ and checkpoint/<name>/, or the bundled demo")
    p.add_argument("--audio_path", help="driving audio (any format PyAV decodes)")
    p.add_argument("--checkpoint", help="epoch number in checkpoint/<name>/ or a .pth path (default: latest)")
    p.add_argument("--output", help="output mp4 (default: result/<name>_<audio stem>_<ckpt>.mp4)")
    p.add_argument("--backend", choices=["onnx", "torch"], default=backend)
    p.add_argument("--device", default=device, help="auto, cpu, cuda[:N] or mps")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=settings.models.dtype,
                   help="torch backend on CUDA (default %(default)s)")
    p.add_argument("--threads", type=int, default=threads, help="intra-op threads of the U-Net backend")
    p.add_argument("--start_frame", type=int, default=0, help="source frame the ping-pong starts from")
    p.add_argument("--loop_back", action="store_true", help="end the clip on the frame it started from")
    p.add_argument("--blend", choices=["feather", "none"], default="feather",
                   help="feathered mouth/jaw paste (default) or upstream's hard rectangle")
    p.add_argument("--color_match", action=argparse.BooleanOptionalAction, default=settings.models.color_match,
                   help="match the generated face's low-frequency colour to the frame's outside the mouth "
                        "(default %(default)s)")
    p.add_argument("--batch_size", type=int, default=batch_size)
    p.add_argument("--crf", type=int, default=crf, help="H.264 quality (lower is better)")
    p.add_argument("--dataset_root", type=Path, default=dataset_root)
    p.add_argument("--checkpoint_root", type=Path, default=checkpoint_root)
    p.add_argument("--result_dir", type=Path, default=result_dir)
    p.add_argument("--export-onnx", dest="export_onnx", action="store_true",
                   help="(re)write <checkpoint>.onnx and exit (continues when --audio_path is given)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.audio_path and not args.export_onnx:
        p.error("--audio_path is required (unless --export-onnx)")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------
# Inputs


def load_audio_16k(path: str) -> np.ndarray:
    """16 kHz mono float32 of an audio file, or InferenceError (missing, unreadable or empty)."""

    if not Path(path).is_file():
        raise InferenceError(f"audio file not found: {path}")
    try:
        audio = audio_io.load_audio(path, sr=16000)
    except ValueError as exc:  # audio_io.AudioError: already one readable line naming the file
        raise InferenceError(one_line(exc)) from None
    except Exception as exc:  # any other decoder failure becomes one readable line too
        raise InferenceError(f"cannot read audio {path}: {one_line(exc)}") from None
    if audio.size < 16000 // FPS:
        raise InferenceError(f"audio {path} is empty (need at least one 40 ms frame of sound)")
    return np.asarray(audio, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Output


class Mp4Writer:
    """H.264 (yuv420p, 25 fps) + AAC mp4 written to a temp file; `commit()` renames it into place.
    Both streams are declared up front (the mp4 header is written at the first packet)."""

    def __init__(self, path: Path, width: int, height: int, audio_path: str, crf: int = 20,
                 threads: int = 0):
        """`threads`: x264's threads (0 = x264's own choice, about 1.5 per core)."""
        self.path = path
        self.tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.mp4")
        self.audio_path = audio_path
        with av.open(audio_path) as src:
            ctx = src.streams.audio[0].codec_context
            rate, channels = ctx.sample_rate, ctx.channels
        self.audio_rate = rate if rate in AAC_RATES else min(AAC_RATES, key=lambda r: abs(r - rate))
        self.audio_layout = "mono" if channels == 1 else "stereo"
        # yuv420p needs even sides: drop a last odd row/column
        self.width, self.height = width - width % 2, height - height % 2
        self.container = av.open(str(self.tmp), "w", format="mp4", options={"movflags": "+faststart"})
        self.video = self.container.add_stream("libx264", rate=FPS)
        self.video.width, self.video.height, self.video.pix_fmt = self.width, self.height, "yuv420p"
        self.video.codec_context.time_base = Fraction(1, FPS)
        self.video.options = {"crf": str(crf), "preset": "veryfast", "threads": str(max(0, int(threads)))}
        self.audio = self.container.add_stream("aac", rate=self.audio_rate)
        self.audio.layout = self.audio_layout
        self.frames = 0

    def write_frame(self, frame: np.ndarray) -> None:
        """Encode one BGR uint8 frame (called from the engine's worker thread)."""
        if frame.shape[0] != self.height or frame.shape[1] != self.width:
            frame = np.ascontiguousarray(frame[: self.height, : self.width])
        vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
        vf.pts = self.frames
        self.frames += 1
        self.container.mux(self.video.encode(vf))

    def write_audio(self) -> float:
        """Re-encode the audio file's first track to AAC at its own rate (mono or stereo); seconds.

        Decoded frames come in the decoder's sizes (mp3: 47 samples after the decoder delay, then 1,152);
        an `av.AudioFifo` re-chunks them to the encoder's frame size (AAC: 1,024) and each chunk gets the
        next sample count as its timestamp, so packet timestamps never go backwards."""
        resampler = av.AudioResampler(format="fltp", layout=self.audio_layout, rate=self.audio_rate)
        frame_size = self.audio.codec_context.frame_size or 1024
        fifo = av.AudioFifo()
        samples = 0

        def drain(partial: bool) -> None:
            nonlocal samples
            while (fr := fifo.read(frame_size, partial=partial)) is not None:
                fr.pts = samples  # explicit pts: the encoder's priming then becomes an edit list
                fr.time_base = Fraction(1, self.audio_rate)
                samples += fr.samples
                self.container.mux(self.audio.encode(fr))

        def push(frames: list) -> None:
            for fr in frames:
                fr.pts = None  # the fifo keeps no input timing; drain() numbers the samples itself
                fifo.write(fr)
            drain(partial=False)

        with av.open(self.audio_path) as src:
            for frame in src.decode(src.streams.audio[0]):
                frame.pts = None
                push(resampler.resample(frame))
        push(resampler.resample(None))
        drain(partial=True)
        self.container.mux(self.audio.encode(None))
        if samples == 0:
            raise InferenceError(f"audio {self.audio_path} decodes to no samples")
        return samples / self.audio_rate

    def commit(self) -> Path:
        self.container.mux(self.video.encode(None))
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # already broken; the temp file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------


def write_audio_first(writer: Mp4Writer, audio_path: str) -> float:
    """Encode the audio track before any frame is rendered, so an audio problem costs seconds, not the
    whole render; a codec or muxer failure becomes an InferenceError naming the file."""
    try:
        return writer.write_audio()
    except InferenceError:
        raise
    except (av.error.FFmpegError, ValueError) as exc:
        raise InferenceError(f"cannot encode the audio of {audio_path} to AAC: {exc}") from None


def encoder_threads(device: str, unet_threads: int) -> int:
    """x264 threads beside the U-Net: on the CPU the cores its `unet_threads` leave free (at least one), so
    encoder and U-Net don't preempt each other's threads; 0 (x264's own choice) when the U-Net runs on
    an accelerator."""
    if device != "cpu":
        return 0
    return max(1, (os.cpu_count() or 1) - max(1, unet_threads))


def run(args: argparse.Namespace) -> tuple[Path | None, int, float]:
    """Do the work; returns (output path or None for export-only, frames, seconds)."""
    # cheap checks first: a bad name, checkpoint or audio file is reported before torch is imported
    registry = AvatarRegistry([AvatarRoot(args.dataset_root, args.checkpoint_root, "user"),
                               *settings.paths.avatar_roots()[1:]])
    try:
        avatar = registry.find(args.name, args.checkpoint)
    except AvatarError as exc:
        raise InferenceError(str(exc)) from None
    dataset_dir, checkpoint = avatar.dataset_dir, avatar.checkpoint_path
    audio = load_audio_16k(args.audio_path) if args.audio_path else None
    device = auto_device() if args.device == "auto" else args.device
    try:
        if args.export_onnx:
            print(ensure_onnx(checkpoint, force=True))
            if audio is None:
                return None, 0, 0.0
        if audio is None:  # parse_args asks for --audio_path unless --export-onnx
            raise InferenceError("--audio_path is required")
        engine = LipSyncEngine.load(dataset_dir, checkpoint, backend=args.backend, device=device,
                                    dtype=args.dtype, batch_size=args.batch_size, threads=args.threads,
                                    blend=args.blend, color_match=args.color_match,
                                    speech_gate=settings.speech_gate(),
                                    ave_checkpoint=settings.models.ave_checkpoint,
                                    feature_config=settings.audio.feature_config())
    except (EngineError, CheckpointError) as exc:
        raise InferenceError(str(exc)) from None

    start = time.perf_counter()
    try:
        features = engine.features(audio)
    except ValueError as exc:  # e.g. ave mode without the AVE checkpoint
        raise InferenceError(str(exc)) from None
    n = frames_for_samples(len(audio))
    order = engine.frame_order(n, args.start_frame, args.loop_back)
    speaking = engine.speaking(audio, len(features))  # pauses: the model's silent mouth (docs/inference.md)
    features = engine.gate(features, speaking)

    out = Path(args.output) if args.output else (
        args.result_dir / f"{args.name}_{Path(args.audio_path).stem}_{checkpoint.stem}.mp4")
    out.parent.mkdir(parents=True, exist_ok=True)
    h, w = engine.frame_shape[:2]
    writer = Mp4Writer(out, w, h, args.audio_path, args.crf, encoder_threads(engine.device, args.threads))
    try:
        write_audio_first(writer, args.audio_path)
        with tqdm(total=n, unit="frame", desc=args.name, disable=None) as bar:
            engine.run(features, order, writer.write_frame, progress=bar.update, speaking=speaking)
        writer.commit()
    except EngineError as exc:  # e.g. a source frame that no longer decodes
        writer.abort()
        raise InferenceError(str(exc)) from None
    except BaseException:
        writer.abort()
        raise
    return out, n, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        out, n, seconds = run(args)
    except InferenceError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    if out is not None:
        print(out)
        print(f"{n} frames in {seconds:.1f} s: {n / max(seconds, 1e-9):.1f} frames/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
