"""The server's text to speech: an ordered fallback chain of engines (`synctalk.tts`) with an LRU
cache in front, its warm-up and its status. `build_tts(settings)` builds the chain the server uses
(`settings.tts.engines`, default Piper then espeak).

Bounds: at most `tts.max_concurrent` syntheses run at once and `tts.max_queued` more wait (past that
`TTSBusy`, which the API answers with 503 + Retry-After); text is spoken in pieces (`FallbackTTS.pieces`:
sentences of at most `synctalk.tts.CHUNK_CHARS` characters, the first of a longer text at most
`FIRST_CHUNK_CHARS`), and a synthesis whose requester has gone stops between pieces
(`SynthesisCancelled`); the cache holds at most `tts.cache_bytes` bytes of audio.

`synthesize_pieces` is the one sentence-wise synthesis: it yields each piece's result as soon as it is
made (the MJPEG route streams frames from the first piece while the rest is synthesised) and caches the
joined result at the end; `synthesize` (whole texts, `/get-tts-audio`) is the same iteration joined, so
both give the same audio for the same text and voice."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from config import Settings, TTSConfig
from synctalk.text import split_sentences
from synctalk.tts import (
    CHUNK_CHARS,
    FIRST_CHUNK_CHARS,
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

__all__ = ["EspeakTTS", "FallbackTTS", "Piece", "PiperTTS", "SynthesisCancelled", "SynthesisSlots", "TTSBusy", "TTSResult",
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


class Piece(NamedTuple):
    """One piece of a text's speech, in order; `last` when no piece follows it."""

    result: TTSResult
    last: bool


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

    @staticmethod
    def pieces(text: str) -> list[str]:
        """The pieces `text` is spoken in: sentences, long ones cut at clauses then words, at most
        `CHUNK_CHARS` characters; a text longer than that holds its first piece to `FIRST_CHUNK_CHARS`,
        so that a streamed text starts soon (a shorter text, such as one sentence of a WebRTC utterance,
        is cut only where it has to be)."""
        first = FIRST_CHUNK_CHARS if len(text) > CHUNK_CHARS else CHUNK_CHARS
        return split_sentences(text, CHUNK_CHARS, first)

    def synthesize(self, text: str, voice: str | None = None,
                   cancelled: Callable[[], bool] | None = None) -> TTSResult:
        """Speak `text` (cached): `synthesize_pieces` joined; `cancelled()` is asked while queued and
        between pieces."""
        pieces = self.synthesize_pieces(text, voice, cancelled)
        while True:
            try:
                next(pieces)
            except StopIteration as end:
                return end.value

    def synthesize_pieces(self, text: str, voice: str | None = None, cancelled: Callable[[], bool] | None = None
                          ) -> Generator[Piece, None, TTSResult]:
        """Speak `text` piece by piece (`pieces`), yielding each piece's result as soon as it is made;
        returns (and caches) the joined result. A cached text comes back whole, as one last piece.
        One synthesis slot is held from the first piece to the last (TTSBusy when none is free and the
        queue is full); `cancelled()` is asked while queued and before each piece (SynthesisCancelled).
        A piece with nothing to speak is skipped; ValueError when no piece has anything."""
        text = check_text(text, self.max_text_chars)
        key = (text, voice)
        cached = self._lookup(key)
        if cached is not None:
            yield Piece(cached, True)
            return cached
        if voice is not None and voice not in self.voices():
            raise ValueError(f"unknown voice {voice!r}; available: {', '.join(self.voices())}")
        texts = self.pieces(text)
        done: list[TTSResult] = []
        with self.slots.hold(cancelled):
            for n, piece in enumerate(texts):
                if cancelled is not None and cancelled():
                    raise SynthesisCancelled("the requester went away during synthesis")
                try:
                    result = self._synthesize_uncached(piece, voice)
                except ValueError as exc:  # nothing speakable in this piece
                    log.info("tts piece %d of %d not spoken: %s", n + 1, len(texts), exc)
                    continue
                done.append(result)
                yield Piece(result, n == len(texts) - 1)
        if not done:
            raise ValueError("the text has nothing to speak")
        joined = done[0] if len(done) == 1 else join_results(done)
        self.last_engine = joined.engine
        self._remember(key, joined)
        return joined

    def _lookup(self, key: tuple[str, str | None]) -> TTSResult | None:
        """The cached result for (text, voice), counted as a hit or a miss."""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                self.last_engine = self._cache[key].engine
                return self._cache[key]
            self.cache_misses += 1
            return None

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
