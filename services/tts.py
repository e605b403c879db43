"""The server's text to speech: an ordered fallback chain of engines (`synctalk.tts`) with an LRU
cache in front, its warm-up and its status. `build_tts(settings)` builds the chain the server uses
(`settings.tts.engines`, default Piper then espeak)."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from config import Settings, TTSConfig
from synctalk.tts import EspeakTTS, PiperTTS, TextError, TTSResult, TTSService, TTSUnavailable, check_text

__all__ = ["EspeakTTS", "FallbackTTS", "PiperTTS", "TTSResult", "TTSService", "TTSUnavailable", "TextError",
           "build_tts", "check_text"]

log = logging.getLogger(__name__)


class FallbackTTS(TTSService):
    """Tries engines in order; an engine that fails to load or speak is logged and skipped.
    Results are kept in an LRU cache keyed by (text, voice)."""

    name = "fallback"

    def __init__(self, engines: list[TTSService], cache_entries: int = 32, max_text_chars: int | None = 1000) -> None:
        if not engines:
            raise ValueError("FallbackTTS needs at least one engine")
        self.engines = engines
        self.cache_entries = cache_entries
        self.max_text_chars = max_text_chars
        self._cache: OrderedDict[tuple[str, str | None], TTSResult] = OrderedDict()
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
                "voices": self.voices(), "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}

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

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        text = check_text(text, self.max_text_chars)
        key = (text, voice)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                self.last_engine = self._cache[key].engine
                return self._cache[key]
            self.cache_misses += 1
        result = self._synthesize_uncached(text, voice)
        self.last_engine = result.engine
        if self.cache_entries > 0:
            with self._lock:
                self._cache[key] = result
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_entries:
                    self._cache.popitem(last=False)
        return result

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
    return FallbackTTS(engines, cache_entries=tts.cache_entries, max_text_chars=tts.max_text_chars)
