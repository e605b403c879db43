"""The server's text to speech: an ordered fallback chain of engines (`synctalk.tts`) with an LRU
cache in front, its warm-up and its status. `build_tts(settings)` builds the chain the server uses
(`settings.tts.engines`, default Piper then espeak).

Bounds: at most `tts.max_concurrent` syntheses run at once and `tts.max_queued` more wait (past that
`TTSBusy`, which the API answers with 503 + Retry-After); text is spoken in pieces of at most
`synctalk.tts.CHUNK_CHARS` characters, and a synthesis whose requester has gone stops between pieces
(`SynthesisCancelled`); the cache holds at most `tts.cache_bytes` bytes of audio."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from config import Settings, TTSConfig
from synctalk.text import split_sentences
from synctalk.tts import (
    CHUNK_CHARS,
    EspeakTTS,
    PiperTTS,
    TextError,
    TTSResult,
    TTSService,
    TTSUnavailable,
    check_text,
    estimate_speech_seconds,
    join_results,
)

__all__ = ["EspeakTTS", "FallbackTTS", "PiperTTS", "SynthesisCancelled", "SynthesisSlots", "TTSBusy", "TTSResult",
           "TTSService", "TTSUnavailable", "TextError", "build_tts", "check_text", "estimate_speech_seconds"]

log = logging.getLogger(__name__)


class TTSBusy(TTSUnavailable):
    """Every synthesis slot is taken and the queue is full; `retry_after_s` is a hint for the client."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SynthesisCancelled(Exception):
    """The requester went away; the synthesis stopped between pieces."""


class SynthesisSlots:
    """At most `concurrent` holders at once and `queued` more waiting; a caller past both gets TTSBusy at
    once instead of waiting (a thread-side semaphore: syntheses run in worker threads)."""

    def __init__(self, concurrent: int = 1, queued: int = 4) -> None:
        self.concurrent, self.queued = concurrent, queued
        self._semaphore = threading.BoundedSemaphore(concurrent)
        self._lock = threading.Lock()
        self.admitted = 0  # running + waiting
        self.refused = 0

    @contextmanager
    def hold(self, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
        """Run the block in a slot; TTSBusy when none is free and the queue is full, SynthesisCancelled
        when `cancelled()` turns true while waiting."""
        with self._lock:
            if self.admitted >= self.concurrent + self.queued:
                self.refused += 1
                raise TTSBusy(f"text to speech is busy ({self.concurrent} running, {self.queued} queued); "
                              "try again shortly")
            self.admitted += 1
        try:
            while not self._semaphore.acquire(timeout=0.1):
                if cancelled is not None and cancelled():
                    raise SynthesisCancelled("the requester went away while queued")
            try:
                yield
            finally:
                self._semaphore.release()
        finally:
            with self._lock:
                self.admitted -= 1


class FallbackTTS(TTSService):
    """Tries engines in order; an engine that fails to load or speak is logged and skipped.
    Results are kept in an LRU cache keyed by (text, voice) holding at most `cache_bytes` of audio;
    uncached syntheses go through `slots` and are spoken in pieces (`synctalk.text.split_sentences`)."""

    name = "fallback"

    def __init__(self, engines: list[TTSService], cache_bytes: int = 64 * 1024 * 1024,
                 max_text_chars: int | None = 1000, slots: SynthesisSlots | None = None) -> None:
        if not engines:
            raise ValueError("FallbackTTS needs at least one engine")
        self.engines = engines
        self.cache_bytes = cache_bytes
        self.max_text_chars = max_text_chars
        self.slots = slots or SynthesisSlots()
        self._cache: OrderedDict[tuple[str, str | None], TTSResult] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self.last_engine: str | None = None

    def warm_up(self) -> None:
        """Load every engine's voices now rather than in the first request (failures are only logged:
        the chain falls back per request)."""
        for engine in self.engines:
            try:
                engine.voices()
                if isinstance(engine, PiperTTS):
                    engine.load()
            except Exception as exc:  # a broken engine is skipped by the fallback chain later
                log.warning("tts engine %s not available: %s", engine.name, exc)

    def status(self) -> dict[str, Any]:
        """What /health reports about the chain (no synthesis)."""
        return {"engines": [e.name for e in self.engines], "last_engine": self.last_engine,
                "voices": self.voices(), "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
                "cache_bytes": self._cached_bytes, "busy_refusals": self.slots.refused}

    def _engine_voices(self, engine: TTSService) -> list[str] | None:
        try:
            return engine.voices()
        except Exception as exc:
            log.warning("tts engine %s unavailable: %s", engine.name, exc)
            return None

    def voices(self) -> list[str]:
        names: list[str] = []
        for engine in self.engines:
            for v in self._engine_voices(engine) or []:
                if v not in names:
                    names.append(v)
        return names

    def synthesize(self, text: str, voice: str | None = None,
                   cancelled: Callable[[], bool] | None = None) -> TTSResult:
        """Speak `text` (cached); `cancelled()` is asked while queued and between pieces."""
        text = check_text(text, self.max_text_chars)
        key = (text, voice)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                self.last_engine = self._cache[key].engine
                return self._cache[key]
            self.cache_misses += 1
        with self.slots.hold(cancelled):
            pieces = []
            for piece in split_sentences(text, CHUNK_CHARS, CHUNK_CHARS):
                if cancelled is not None and cancelled():
                    raise SynthesisCancelled("the requester went away during synthesis")
                pieces.append(self._synthesize_uncached(piece, voice))
        result = join_results(pieces)
        self.last_engine = result.engine
        self._remember(key, result)
        return result

    def _remember(self, key: tuple[str, str | None], result: TTSResult) -> None:
        """Cache `result`, evicting least recently used results until the audio fits in `cache_bytes`."""
        size = int(result.audio.nbytes)
        if size > self.cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(key, None)
            self._cached_bytes -= int(old.audio.nbytes) if old is not None else 0
            self._cache[key] = result
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= int(evicted.audio.nbytes)

    def _synthesize_uncached(self, text: str, voice: str | None) -> TTSResult:
        known_anywhere = voice is None
        errors: list[str] = []
        for engine in self.engines:
            names = self._engine_voices(engine)
            if names is None:
                errors.append(f"{engine.name}: not available")
                continue
            if voice is not None and voice not in names:
                continue
            known_anywhere = True
            try:
                return engine.synthesize(text, voice)
            except ValueError:
                raise
            except Exception as exc:
                log.warning("tts engine %s failed (%s); falling back", engine.name, exc)
                errors.append(f"{engine.name}: {exc}")
        if not known_anywhere:
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        raise TTSUnavailable("every TTS engine failed: " + "; ".join(errors))


_ENGINE_FACTORIES: dict[str, Callable[[TTSConfig], TTSService]] = {
    "piper": lambda tts: PiperTTS(tts.piper_model_path, tts.piper_config_path, tts.default_voice, tts.max_text_chars),
    "espeak": lambda tts: EspeakTTS(tts.espeak_voice, max_text_chars=tts.max_text_chars),
}


def build_tts(settings: Settings) -> FallbackTTS:
    """The TTS chain configured by `settings.tts` (engines in order, cache size, text limit)."""
    tts = settings.tts
    engines = [_ENGINE_FACTORIES[name](tts) for name in tts.engines]
    return FallbackTTS(engines, cache_bytes=tts.cache_bytes, max_text_chars=tts.max_text_chars,
                       slots=SynthesisSlots(tts.max_concurrent, tts.max_queued))
