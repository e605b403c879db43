"""TTS engines: Piper output, espeak fallback, voice/text validation, the LRU cache."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from config import settings
from services.tts import EspeakTTS, FallbackTTS, PiperTTS, TTSResult, TTSService, TTSUnavailable, build_tts

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def piper() -> PiperTTS:
    return PiperTTS()


def test_piper_audio_and_alignments(piper: PiperTTS) -> None:
    r = piper.synthesize(TEXT)
    assert r.engine == "piper" and r.voice == "joe" and r.sample_rate == 22050
    assert r.audio.dtype == np.float32 and r.audio.ndim == 1 and np.abs(r.audio).max() <= 1.0
    assert 1.5 < r.duration_s < 5.0  # 9 words
    a16 = r.to_16k()
    assert a16.dtype == np.float32 and abs(len(a16) - r.duration_s * 16000) <= 2
    assert r.alignments and all(e >= s for _, s, e in r.alignments)
    starts = [s for _, s, _ in r.alignments]
    assert starts == sorted(starts) and abs(r.alignments[-1][2] - r.duration_s) < 0.05
    # speech is loud where phonemes are, e.g. the vowel of "fox"
    assert float(np.sqrt(np.mean(r.audio ** 2))) > 0.02


def test_deterministic_piper_when_noise_off() -> None:
    p = PiperTTS(noise_scale=0.0, noise_w_scale=0.0)
    assert np.array_equal(p.synthesize("Hello there.").audio, p.synthesize("Hello there.").audio)


def test_validation(piper: PiperTTS) -> None:
    with pytest.raises(ValueError, match="empty"):
        piper.synthesize("   ")
    with pytest.raises(ValueError, match="unknown voice"):
        piper.synthesize("hi", voice="nobody")
    tts = build_tts(settings)
    with pytest.raises(ValueError, match="unknown voice"):
        tts.synthesize("hi", voice="nobody")
    with pytest.raises(ValueError, match="limit"):
        tts.synthesize("a" * (settings.tts.max_text_chars + 1))


def test_espeak_voices_and_timings() -> None:
    e = EspeakTTS()
    names = e.voices()
    assert names[0] == "en-us" and "en-gb" in names and "en-us+f3" in names
    r = e.synthesize("Hello there.", voice="en-us+f3")
    assert r.engine == "espeak" and r.sample_rate == 22050 and 0.4 < r.duration_s < 3.0
    assert r.alignments and r.alignments[0][1] < 0.1
    other = e.synthesize("Hello there.", voice="en-gb")
    assert not np.array_equal(other.audio[:2000], r.audio[:2000]) or len(other.audio) != len(r.audio)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="Debian espeak-ng command not installed")
def test_espeak_cli_backend() -> None:
    r = EspeakTTS(backend="cli").synthesize("Testing the command line.")
    assert r.alignments is None and r.duration_s > 0.5 and np.abs(r.audio).max() > 0.05


def test_fallback_to_espeak_when_piper_is_broken(caplog: pytest.LogCaptureFixture, tmp_path) -> None:
    cfg = settings.model_copy(deep=True)
    cfg.tts.piper_model_path = tmp_path / "missing.onnx"
    tts = build_tts(cfg)
    with caplog.at_level(logging.WARNING, logger="services.tts"):
        r = tts.synthesize("Fallback works.")
    assert r.engine == "espeak" and r.duration_s > 0.3
    assert any("piper" in rec.getMessage() and "falling back" in rec.getMessage() for rec in caplog.records)
    # a voice only espeak has goes straight to espeak
    assert tts.synthesize("Hello.", voice="en-gb").engine == "espeak"


class Counting(TTSService):
    """Wraps an engine and counts real syntheses."""

    name = "counting"

    def __init__(self, inner: TTSService) -> None:
        self.inner, self.calls = inner, 0

    def voices(self) -> list[str]:
        return self.inner.voices()

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        self.calls += 1
        return self.inner.synthesize(text, voice)


def test_cache_hit_avoids_resynthesis() -> None:
    engine = Counting(EspeakTTS())
    tts = FallbackTTS([engine], cache_entries=2)
    a = tts.synthesize("One.")
    assert tts.synthesize("One.") is a and engine.calls == 1 and tts.cache_hits == 1
    tts.synthesize("One.", voice="en-gb")  # different voice, different entry
    tts.synthesize("Two.")  # evicts the least recently used ("One.", None)
    assert engine.calls == 3
    tts.synthesize("One.")
    assert engine.calls == 4
    no_cache = FallbackTTS([Counting(EspeakTTS())], cache_entries=0)
    no_cache.synthesize("One.")
    no_cache.synthesize("One.")
    assert no_cache.engines[0].calls == 2


def test_all_engines_failing() -> None:
    class Broken(TTSService):
        name = "broken"

        def voices(self) -> list[str]:
            return ["x"]

        def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
            raise TTSUnavailable("model missing")

    with pytest.raises(TTSUnavailable, match="every TTS engine failed"):
        FallbackTTS([Broken(), Broken()]).synthesize("hello")
