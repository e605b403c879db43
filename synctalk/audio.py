"""Audio decoding and writing shared by preprocessing, inference, training and the server.

`load_audio` turns anything PyAV (FFmpeg) can demux and decode -- WAV, MP3, FLAC, OGG/Opus, M4A/AAC,
or the audio track of a video container -- into float32 mono at 16 kHz (or another rate). Channels
are averaged (not FFmpeg's -3 dB downmix), so a centred stereo signal keeps its level. `write_wav`
writes PCM16 atomically. Every failure on bad input is an `AudioError` (a `ValueError`) with one
readable line.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import os
import threading
import warnings
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from synctalk.errors import one_line
from synctalk.fileio import write_bytes_atomic
from synctalk.timing import FPS, SAMPLE_RATE

log = logging.getLogger(__name__)

AudioSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO


class AudioError(ValueError):
    """Input that cannot be turned into audio: missing, empty, undecodable or without an audio stream."""


class AudioTooLong(AudioError):
    """Audio longer than the caller's `max_seconds`: found from the container's metadata before decoding
    when it declares a duration, otherwise while decoding (decoding stops at the limit)."""

    def __init__(self, name: str, duration_s: float | None, limit_s: float):
        self.duration_s, self.limit_s = duration_s, limit_s
        length = f"{duration_s:.1f} s long" if duration_s is not None else "longer than the limit"
        super().__init__(f"{name} is {length}; the limit is {limit_s:g} s")


def _describe(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _open_input(source: AudioSource):
    """PyAV container for a path, a bytes object or a binary file object."""
    import av

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise AudioError(f"audio file not found: {path}")
        if path.is_dir():
            raise AudioError(f"expected an audio file, got a directory: {path}")
        if path.stat().st_size == 0:
            raise AudioError(f"audio file is empty (0 bytes): {path}")
        target: object = str(path)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError("audio data is empty (0 bytes)")
        target = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        target = source
    else:
        raise AudioError(f"cannot read audio from a {type(source).__name__}; give a path, bytes or a file")
    try:
        return av.open(target, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise AudioError(f"cannot decode {_describe(source)}: not a readable audio/video file ({one_line(exc)})") \
            from None


def declared_seconds(container, stream) -> float | None:
    """The duration a container declares for `stream` (or for itself), in seconds; None when unknown."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:  # in AV_TIME_BASE units (microseconds)
        return container.duration / 1_000_000
    return None


def load_audio(source: AudioSource, sr: int = SAMPLE_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Decode the first audio stream of `source` (path, bytes or binary file) to float32 mono at `sr` Hz.

    Channels are averaged; the result is 1-D and C-contiguous. Raises `AudioError` (a ValueError) when
    the input is missing, empty, undecodable, has no audio stream or decodes to zero samples, and
    `AudioTooLong` when `max_seconds` is given and the audio is longer (checked from the container's
    declared duration before decoding, and on the decoded samples while decoding).
    """
    import av

    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    name = _describe(source)
    container = _open_input(source)
    try:
        if not container.streams.audio:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise AudioError(f"{name} has no audio stream (streams: {', '.join(kinds)})")
        stream = container.streams.audio[0]
        declared = declared_seconds(container, stream) if max_seconds is not None else None
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise AudioTooLong(name, declared, max_seconds)
        resampler = None
        chunks: list[np.ndarray] = []
        decoded_s = 0.0
        try:
            for frame in container.decode(stream):
                decoded_s += frame.samples / (frame.sample_rate or sr)
                if max_seconds is not None and decoded_s > max_seconds:
                    raise AudioTooLong(name, None, max_seconds)
                if resampler is None:  # keep the source layout: channels are averaged below
                    resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sr)
                chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
            if resampler is not None:
                chunks.extend(out.to_ndarray() for out in resampler.resample(None))
        except av.FFmpegError as exc:
            if not chunks:
                raise AudioError(f"cannot decode the audio of {name}: {one_line(exc)}") from None
            log.warning("audio of %s is truncated after a decode error: %s", name, one_line(exc))
    finally:
        container.close()
    if not chunks:
        raise AudioError(f"{name} contains no audio samples")
    audio = np.concatenate(chunks, axis=1).mean(axis=0, dtype=np.float32)
    if audio.size == 0:
        raise AudioError(f"{name} contains no audio samples")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name} decodes to non-finite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def to_float32(pcm: np.ndarray) -> np.ndarray:
    """PCM samples as float32 in [-1, 1]: int16 is scaled by 1/32768, floats pass through, 2-D
    [samples, channels] is averaged to mono."""
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        pcm = pcm.astype(np.float32) / 32768.0
    elif pcm.dtype == np.int32:
        pcm = pcm.astype(np.float32) / 2147483648.0
    elif pcm.dtype.kind == "f":
        pcm = pcm.astype(np.float32, copy=False)
    else:
        raise ValueError(f"unsupported PCM dtype {pcm.dtype}; use float32 or int16")
    if pcm.ndim == 2:
        pcm = pcm.mean(axis=1, dtype=np.float32)
    elif pcm.ndim != 1:
        raise ValueError(f"PCM must be 1-D (mono) or [samples, channels], got shape {pcm.shape}")
    return pcm


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 mono audio with soxr (high quality); identity when the rates match."""
    audio = to_float32(audio)
    if sr_in == sr_out:
        return audio
    import soxr

    return soxr.resample(audio, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def shift_voice(audio: np.ndarray, semitones: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """`audio` (float32 mono) with pitch and formants moved together by `semitones`, same length and
    timing (librosa's time-stretch + resample): another, higher or lower, voice saying the same words
    (the training's voice augmentation, docs/training-guide.md)."""
    audio = to_float32(audio)
    if semitones == 0 or audio.size == 0:
        return audio.copy()
    import librosa

    shifted = librosa.effects.pitch_shift(audio, sr=sr, n_steps=float(semitones), res_type="soxr_hq")
    return np.asarray(shifted[: audio.size], np.float32)


def dub_words(words: list[tuple[float, float, np.ndarray]], n_samples: int, sr: int = SAMPLE_RATE,
              top_db: float = 40.0, fade_ms: float = 5.0) -> np.ndarray:
    """A silent track of `n_samples` with each (start_s, end_s, audio) word's audio (float32 mono at `sr`,
    its leading and trailing silence trimmed at `top_db`) time-stretched, pitch kept, to fill its span and
    faded in and out over `fade_ms`: another voice saying the recorded words at the recorded times (the
    training's dubbed voice variants, `data_utils/tts_voice.py`). Words shorter than 32 ms after trimming
    are left silent."""
    import librosa

    track = np.zeros(int(n_samples), np.float32)
    fade = max(1, int(sr * fade_ms / 1000))
    for start, end, audio in words:
        a, b = max(0, int(round(start * sr))), min(len(track), int(round(end * sr)))
        y = to_float32(audio)
        if y.size:
            y, _ = librosa.effects.trim(y, top_db=top_db, frame_length=512, hop_length=128)
        if b - a < 2 * fade or y.size < int(0.032 * sr):
            continue
        y = librosa.effects.time_stretch(y, rate=y.size / (b - a), n_fft=512, hop_length=128)
        y = np.pad(y, (0, max(0, b - a - y.size)))[: b - a].astype(np.float32)
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        y[:fade] *= ramp
        y[-fade:] *= ramp[::-1]
        track[a:b] = y
    return track


class StreamResampler:
    """`resample` for audio that arrives in chunks: the concatenated output equals `resample` of the
    concatenated input sample for sample (the same soxr HQ filter, run as a stream); the filter holds a
    few milliseconds back until the next chunk or the last one (`last=True`)."""

    def __init__(self, sr_in: int, sr_out: int):
        self.sr_in, self.sr_out = int(sr_in), int(sr_out)
        self._stream = None
        if self.sr_in != self.sr_out:
            import soxr

            self._stream = soxr.ResampleStream(self.sr_in, self.sr_out, 1, dtype="float32", quality="HQ")

    def push(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        """The resampled samples ready after `audio` (float32 mono); `last` ends the stream."""
        audio = to_float32(audio)
        if self._stream is None:
            return audio
        return np.asarray(self._stream.resample_chunk(audio, last=last), np.float32)


def wav_bytes(audio: np.ndarray, sr: int = SAMPLE_RATE) -> bytes:
    """Mono (1-D) or [samples, channels] audio as a PCM16 WAV file in memory. Float input is clipped
    to [-1, 1] and rounded; int16 is written as is."""
    audio = np.asarray(audio)
    if audio.ndim not in (1, 2):
        raise ValueError(f"audio must be 1-D or [samples, channels], got shape {audio.shape}")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    if audio.dtype == np.int16:
        pcm = audio
    elif audio.dtype.kind == "f":
        if not np.isfinite(audio).all():
            raise ValueError("audio contains NaN or infinite samples")
        pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    else:
        raise ValueError(f"unsupported audio dtype {audio.dtype}; use float or int16")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        wf.setsampwidth(2)
        wf.setframerate(int(sr))
        wf.writeframes(np.ascontiguousarray(pcm).astype("<i2").tobytes())
    return buf.getvalue()


def write_wav(path: str | os.PathLike, audio: np.ndarray, sr: int = SAMPLE_RATE) -> Path:
    """`wav_bytes` written atomically (temp file + rename); returns the path."""
    return write_bytes_atomic(path, wav_bytes(audio, sr))


# ----------------------------------------------------------------------------------------------
# Speech activity: per-frame envelope and silences (relative to the loud level of the clip)


def envelope_frames(n_samples: int, sr: int = SAMPLE_RATE, fps: float = FPS) -> int:
    """Video frames `speech_envelope` gives for `n_samples` of audio (a trailing partial frame counts if it
    holds at least half a frame)."""
    return int(n_samples / (sr / fps) + 0.5)


def speech_envelope(audio: np.ndarray, sr: int = SAMPLE_RATE, fps: float = FPS) -> np.ndarray:
    """RMS amplitude of the audio per video frame: entry i covers samples [i sr/fps, (i+1) sr/fps), over
    `envelope_frames` frames."""
    x = np.asarray(audio, np.float64).reshape(-1)
    hop = sr / fps
    n = envelope_frames(len(x), sr, fps)
    env = np.zeros(n)
    for i in range(n):
        seg = x[int(round(i * hop)):int(round((i + 1) * hop))]
        env[i] = math.sqrt(float(np.mean(seg * seg))) if len(seg) else 0.0
    return env


def silence_mask(envelope: np.ndarray, threshold_db: float = -35.0, ref_percentile: float = 95.0) -> np.ndarray:
    """Frames quieter than `threshold_db` below the loud level (the `ref_percentile` of the envelope)."""
    env = np.asarray(envelope, np.float64)
    ref = float(np.percentile(env, ref_percentile)) if len(env) else 0.0
    if ref <= 0:
        return np.ones(len(env), bool)
    return env < ref * 10.0 ** (threshold_db / 20.0)


def silence_segments(envelope: np.ndarray, fps: float = FPS, min_ms: float = 300.0,
                     threshold_db: float = -35.0) -> list[tuple[int, int]]:
    """Runs of silent frames lasting at least `min_ms`: a list of (start, end) frame indices, end
    exclusive."""
    return long_runs(silence_mask(envelope, threshold_db), fps, min_ms)


def long_runs(mask: np.ndarray, fps: float = FPS, min_ms: float = 300.0) -> list[tuple[int, int]]:
    """Runs of True in a per-frame mask lasting at least `min_ms`: (start, end) frame indices, end
    exclusive."""
    segments, start = [], None
    for i, q in enumerate(list(np.asarray(mask, bool)) + [False]):
        if q and start is None:
            start = i
        elif not q and start is not None:
            if (i - start) * 1000.0 / fps >= min_ms - 1e-9:
                segments.append((start, i))
            start = None
    return segments


def segments_to_mask(segments: Sequence[tuple[int, int]], n: int, trim: int = 0) -> np.ndarray:
    """Boolean `[n]` mask of the frames inside the (start, end) segments, each less `trim` frames at
    both ends (a segment of at most 2 x `trim` frames then marks none)."""
    mask = np.zeros(n, bool)
    for s, e in segments:
        mask[max(s + trim, 0):min(e - trim, n)] = True
    return mask


# ----------------------------------------------------------------------------------------------
# Speech gate (the live path's, the offline CLI's, /generate's and evaluation's)


VADS = ("energy", "silero")
SILERO_WARMUP_FRAMES = 25  # audio before the first asked-for frame that Silero's recurrent state hears first


@dataclass(frozen=True)
class SpeechGate:
    """Speech vs silence per 40 ms frame. `vad="energy"`: a frame is voiced above `threshold_db` dBFS (fine
    for synthetic speech, whose pauses are digital silence; a room's noise floor is often above it);
    `vad="silero"`: above that level and the Silero VAD's speech probability (the `silero-vad` package's
    bundled ONNX model) above `vad_threshold`, so room noise and breaths are pauses too. Speech lasts
    `hangover_ms` past the last voiced frame (short pauses between words keep the lips going) and starts
    `preroll_ms` before the first (it reads that much audio past a frame; frames near the end of the
    audio given get the preroll of what there is)."""

    threshold_db: float = -45.0
    hangover_ms: int = 240
    vad: str = "energy"
    vad_threshold: float = 0.5
    preroll_ms: int = 0

    def __post_init__(self) -> None:
        if self.vad not in VADS:
            raise ValueError(f"unknown voice activity detector {self.vad!r} (one of {', '.join(VADS)})")

    @property
    def hangover_frames(self) -> int:
        return int(round(self.hangover_ms * FPS / 1000))

    @property
    def preroll_frames(self) -> int:
        return int(round(self.preroll_ms * FPS / 1000))

    @property
    def context_frames(self) -> int:
        """Frames of audio before the first asked-for one that `speaking` looks at (hangover, warm-up)."""
        return self.hangover_frames + (SILERO_WARMUP_FRAMES if self.vad == "silero" else 0)

    def voiced(self, audio16k: np.ndarray) -> np.ndarray:
        """Bool per 40 ms frame of `audio16k` (a last partial frame measured on what there is)."""
        probs = silero_speech_prob(audio16k) if self.vad == "silero" else None
        return voiced_frames(frame_levels_with_tail(audio16k), self.threshold_db, probs, self.vad_threshold)

    def speaking(self, audio16k: np.ndarray, n_frames: int) -> np.ndarray:
        """Bool `[n_frames]`: frame a of `audio16k` is speech under this gate (frames past the end of the
        audio are silent unless the hangover reaches them). Audio past frame `n_frames` is read only for the
        preroll."""
        frame = SAMPLE_RATE // FPS
        pcm = np.asarray(audio16k, np.float32).reshape(-1)[: (max(0, n_frames) + self.preroll_frames) * frame]
        return spread_speech(self.voiced(pcm), n_frames, self.hangover_frames, self.preroll_frames)

    def speaking_at(self, audio16k: np.ndarray, n_frames: int, first_frame: int = 0) -> np.ndarray:
        """`speaking` for frames `first_frame`, `first_frame + 1`, ... of `audio16k`, reading only the
        `context_frames` before them (hangover, VAD warm-up): how streaming callers ask, a few at a time."""
        frame = SAMPLE_RATE // FPS
        start = max(0, first_frame - self.context_frames)
        audio = np.asarray(audio16k, np.float32).reshape(-1)[start * frame:]
        return self.speaking(audio, first_frame - start + int(n_frames))[first_frame - start:]


def voiced_frames(levels_db: np.ndarray, threshold_db: float, probs: np.ndarray | None = None,
                  vad_threshold: float = 0.5) -> np.ndarray:
    """The voiced rule of every speech gate, per frame: louder than `threshold_db` dBFS and, given Silero
    VAD probabilities `probs` (one per frame), more likely speech than `vad_threshold` too (both: the VAD's
    own state runs on into short digital silences, and a room's noise floor can be loud)."""
    loud = np.asarray(levels_db, np.float64) > threshold_db
    if probs is None:
        return loud
    return loud & (np.asarray(probs, np.float64) > vad_threshold)


def frame_levels_db(pcm: np.ndarray, frame: int = SAMPLE_RATE // FPS) -> np.ndarray:
    """RMS level in dBFS of each whole `frame`-sample block of `pcm` (a partial tail is left out)."""
    n = len(pcm) // frame
    blocks = np.asarray(pcm[: n * frame], np.float64).reshape(n, frame)
    return 20.0 * np.log10(np.maximum(np.sqrt(np.mean(blocks * blocks, axis=1)), 1e-10))


def frame_levels_with_tail(audio16k: np.ndarray) -> np.ndarray:
    """`frame_levels_db` per 40 ms frame, a last partial frame measured on its own samples."""
    frame = SAMPLE_RATE // FPS
    pcm = np.asarray(audio16k, np.float32).reshape(-1)
    levels = frame_levels_db(pcm, frame)
    if len(pcm) % frame:
        tail = pcm[len(levels) * frame:]
        levels = np.append(levels, frame_levels_db(tail, len(tail))[0])
    return levels


def spread_speech(voiced: np.ndarray, n_frames: int, hangover: int, preroll: int = 0) -> np.ndarray:
    """Bool `[n_frames]`: frame a is speech when one of frames [a - hangover, a + preroll] of `voiced`
    is (frames past `voiced`'s end count as unvoiced)."""
    if n_frames <= 0:
        return np.zeros(0, bool)
    v = np.zeros(n_frames + preroll, np.int32)
    m = min(len(voiced), len(v))
    v[:m] = np.asarray(voiced[:m], bool)
    # any voiced frame in [a - hangover, a + preroll]: a running count over hangover + preroll + 1 frames
    counts = np.convolve(v, np.ones(hangover + preroll + 1, np.int32))[preroll: preroll + n_frames]
    return counts > 0


def speaking_frames(audio16k: np.ndarray, n_frames: int, threshold_db: float, hangover: int) -> np.ndarray:
    """Bool `[n_frames]`: video frame a is speech when the RMS of its 40 ms of audio, or of one of the
    `hangover` frames before it, is above `threshold_db` dBFS (the live path's `LiveGate` level rule); frames
    past the end of the audio are silent (a last partial frame is measured on what there is)."""
    frame = SAMPLE_RATE // FPS
    pcm = np.asarray(audio16k, np.float32).reshape(-1)[: max(0, n_frames) * frame]
    return spread_speech(frame_levels_with_tail(pcm) > threshold_db, n_frames, hangover)


SILERO_WINDOW = 512  # samples per Silero VAD step at 16 kHz


def load_silero() -> Any:
    """A fresh Silero VAD (ONNX, from the `silero-vad` package, with its own recurrent state). The package
    locates its model through a deprecated `importlib.resources` call; that warning is not ours to show."""
    from silero_vad import load_silero_vad

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="silero_vad")
        return load_silero_vad(onnx=True)


@functools.lru_cache(maxsize=1)
def _silero() -> tuple[Any, threading.Lock]:
    """The shared Silero VAD (loaded once) and the lock its state needs."""
    return load_silero(), threading.Lock()


def frame_windows(frame: int) -> tuple[int, int]:
    """(first, last) Silero step overlapping 40 ms frame `frame` of a stream that starts at step 0."""
    size = SAMPLE_RATE // FPS
    return frame * size // SILERO_WINDOW, ((frame + 1) * size - 1) // SILERO_WINDOW


class SileroStream:
    """Silero VAD speech probability per 40 ms frame of one audio stream fed in any chunking: the same
    512-sample steps from sample 0 and the same rule as `silero_speech_prob` over the whole stream (the
    highest step overlapping the frame), so the result never depends on the chunking. It holds its own
    model and recurrent state (one per stream)."""

    def __init__(self) -> None:
        self.model = load_silero()
        self.frames = 0  # frames decided so far
        self.samples = 0
        self._pending = np.zeros(0, np.float32)
        self._steps: list[float] = []  # step probabilities from step `_first` on
        self._first = 0

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Probabilities of the frames this chunk completes (a frame waits for the step past its end)."""
        pcm = np.asarray(pcm, np.float32).reshape(-1)
        self.samples += len(pcm)
        buf = np.concatenate([self._pending, pcm])
        n = len(buf) // SILERO_WINDOW
        for i in range(n):
            self._step(buf[i * SILERO_WINDOW:(i + 1) * SILERO_WINDOW])
        self._pending = buf[n * SILERO_WINDOW:]
        return self._decide()

    def finish(self) -> np.ndarray:
        """The end of the stream: the last partial step (zero-padded, as `silero_speech_prob` pads) and the
        probabilities of the frames not yet decided, the last partial frame included."""
        if len(self._pending):
            tail = np.zeros(SILERO_WINDOW, np.float32)
            tail[: len(self._pending)] = self._pending
            self._step(tail)
            self._pending = np.zeros(0, np.float32)
        return self._decide(limit=-(-self.samples // (SAMPLE_RATE // FPS)))

    def _step(self, window: np.ndarray) -> None:
        import torch

        self._steps.append(float(self.model(torch.from_numpy(np.ascontiguousarray(window)), SAMPLE_RATE)))

    def _decide(self, limit: int | None = None) -> np.ndarray:
        """Frames whose steps are all in (with `limit`: every frame below it, on the steps there are)."""
        out, steps_done = [], self._first + len(self._steps)
        while limit is None or self.frames < limit:
            first, last = frame_windows(self.frames)
            last = min(last, steps_done - 1) if limit is not None else last
            if last >= steps_done or last < first:
                break
            out.append(max(self._steps[first - self._first:last - self._first + 1]))
            self.frames += 1
        keep = frame_windows(self.frames)[0]  # steps before the next frame's first are no longer needed
        del self._steps[: max(0, keep - self._first)]
        self._first = max(self._first, keep)
        return np.asarray(out, np.float32)


def silero_speech_prob(audio16k: np.ndarray) -> np.ndarray:
    """Silero VAD speech probability per 40 ms frame of `audio16k` (16 kHz mono): the highest of the
    512-sample steps that overlap the frame; the state starts fresh at the first sample."""
    import torch

    frame = SAMPLE_RATE // FPS
    pcm = np.asarray(audio16k, np.float32).reshape(-1)
    n_frames = -(-len(pcm) // frame)
    if n_frames == 0:
        return np.zeros(0, np.float32)
    padded = np.zeros(max(SILERO_WINDOW, len(pcm)), np.float32)
    padded[: len(pcm)] = pcm
    model, lock = _silero()
    with lock:
        steps = model.audio_forward(torch.from_numpy(padded)[None], SAMPLE_RATE)[0].numpy()
    spans = (frame_windows(f) for f in range(n_frames))
    return np.array([steps[a:min(b, len(steps) - 1) + 1].max() for a, b in spans], np.float32)
