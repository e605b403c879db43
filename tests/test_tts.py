"""TTS engines: Piper output, espeak fallback, voice/text validation, the LRU cache."""
from __future__ import annotations

import logging
import shutil
import threading
import time

import numpy as np
import pytest

from config import settings
from services.tts import (
    EspeakTTS,
    FallbackTTS,
    PiperTTS,
    SynthesisCancelled,
    SynthesisSlots,
    TTSBusy,
    TTSResult,
    TTSService,
    TTSUnavailable,
    build_tts,
)
from synctalk.text import split_sentences
from synctalk.tts import CHUNK_CHARS, FIRST_CHUNK_CHARS

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
    one = EspeakTTS().synthesize("One.")
    tts = FallbackTTS([engine], cache_bytes=2 * one.audio.nbytes + 1000)  # room for about two results
    a = tts.synthesize("One.")
    assert tts.synthesize("One.") is a and engine.calls == 1 and tts.cache_hits == 1
    tts.synthesize("One.", voice="en-gb")  # different voice, different entry
    tts.synthesize("Two.")  # evicts the least recently used ("One.", None)
    assert engine.calls == 3
    tts.synthesize("One.")
    assert engine.calls == 4
    no_cache = FallbackTTS([Counting(EspeakTTS())], cache_bytes=0)
    no_cache.synthesize("One.")
    no_cache.synthesize("One.")
    assert no_cache.engines[0].calls == 2


# ----------------------------------------------------------------------------------------------
# issue 21: bounded synthesis (slots, pieces, cancellation, cache bytes)


class Silent(TTSService):
    """A fast fake engine: 0.1 s of silence per character at 16 kHz; records the texts it was given."""

    name = "silent"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.texts: list[str] = []
        self.delay_s = delay_s

    def voices(self) -> list[str]:
        return ["x"]

    def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
        self.texts.append(text)
        time.sleep(self.delay_s)
        return TTSResult(np.zeros(1600 * len(text), np.float32), 16000, None, self.name, "x")


def test_cache_is_bounded_in_bytes_not_entries() -> None:
    tts = FallbackTTS([Silent()], cache_bytes=100_000)
    for i in range(40):
        tts.synthesize("word" * (1 + i % 3))  # 25.6 to 76.8 kB of audio each
        tts.synthesize(f"text number {i}")
        assert tts.status()["cache_bytes"] <= 100_000
    huge = tts.synthesize("x" * 900)  # 576 kB: larger than the whole cache, never kept
    assert huge.audio.nbytes > 100_000 and tts.status()["cache_bytes"] <= 100_000


def test_long_unpunctuated_text_is_spoken_in_pieces() -> None:
    text = " ".join(f"word{i}" for i in range(300))  # about 2,000 characters, no punctuation
    pieces = split_sentences(text, CHUNK_CHARS, CHUNK_CHARS)
    assert len(pieces) > 1 and all(len(p) <= CHUNK_CHARS for p in pieces)
    assert " ".join(pieces) == text
    hard = split_sentences("x" * 450, CHUNK_CHARS, CHUNK_CHARS)  # not even a space: cut hard
    assert len(hard) == 3 and all(len(p) <= CHUNK_CHARS for p in hard) and "".join(hard) == "x" * 450
    assert split_sentences("First one. Second one.", 15, 15) == ["First one.", "Second one."]
    engine = Silent()
    result = FallbackTTS([engine], max_text_chars=None).synthesize(text)
    spoken = FallbackTTS.pieces(text)  # the chain's rule: a short first piece, then up to CHUNK_CHARS
    assert engine.texts == spoken and len(spoken[0]) <= FIRST_CHUNK_CHARS and " ".join(spoken) == text
    assert all(len(t) <= CHUNK_CHARS for t in engine.texts)
    assert len(result.audio) == 1600 * sum(len(p) for p in spoken)


def test_pieces_stream_in_order_and_join_to_the_whole_text() -> None:
    """`synthesize_pieces` yields each piece as it is made (one slot held throughout), caches the joined
    result at the end, and a cached text comes back whole as one last piece."""
    engine = Silent()
    tts = FallbackTTS([engine], max_text_chars=None, slots=SynthesisSlots(concurrent=1, queued=0))
    text = "One short sentence. " + " ".join(["A longer sentence that goes on"] * 12) + ". The end."
    pieces = tts.synthesize_pieces(text)
    first = next(pieces)
    assert engine.texts == [FallbackTTS.pieces(text)[0]] and not first.last
    with pytest.raises(TTSBusy):  # the slot is still held between pieces
        tts.synthesize("Another text.")
    rest = list(pieces)
    assert rest[-1].last and not any(p.last for p in rest[:-1])
    assert engine.texts == FallbackTTS.pieces(text) and tts.slots.admitted == 0
    whole = tts.synthesize(text)  # cached: the pieces joined
    assert np.array_equal(whole.audio, np.concatenate([p.result.audio for p in [first, *rest]]))
    again = list(tts.synthesize_pieces(text))
    assert len(again) == 1 and again[0].last and again[0].result is whole
    abandoned = tts.synthesize_pieces("First. Second. Third.")
    next(abandoned)
    abandoned.close()  # a consumer that stops early gives the slot back
    assert tts.slots.admitted == 0


def test_synthesis_slots_refuse_past_the_queue_with_busy() -> None:
    engine = Silent(delay_s=0.5)
    tts = FallbackTTS([engine], slots=SynthesisSlots(concurrent=1, queued=1))
    outcomes: list[str] = []

    def speak(i: int) -> None:
        try:
            tts.synthesize(f"text {i}")
            outcomes.append("ok")
        except TTSBusy as exc:
            outcomes.append(f"busy {exc.retry_after_s}")

    threads = [threading.Thread(target=speak, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["busy 2", "busy 2", "ok", "ok"]
    assert tts.slots.admitted == 0 and tts.status()["busy_refusals"] == 2


def test_synthesis_stops_when_the_requester_is_gone() -> None:
    engine = Silent()
    tts = FallbackTTS([engine], max_text_chars=None)
    asked = []

    def gone_after_two() -> bool:
        asked.append(True)
        return len(asked) > 2

    with pytest.raises(SynthesisCancelled):
        tts.synthesize(" ".join(["word"] * 400), cancelled=gone_after_two)
    assert len(engine.texts) == 2  # 10 pieces, stopped after the second
    assert tts.slots.admitted == 0 and tts.status()["cache_bytes"] == 0


def test_all_engines_failing() -> None:
    class Broken(TTSService):
        name = "broken"

        def voices(self) -> list[str]:
            return ["x"]

        def synthesize(self, text: str, voice: str | None = None) -> TTSResult:
            raise TTSUnavailable("model missing")

    with pytest.raises(TTSUnavailable, match="every TTS engine failed"):
        FallbackTTS([Broken(), Broken()]).synthesize("hello")


def test_pieces_resampled_as_they_come_equal_the_joined_result_at_16k() -> None:
    """`Speech16kStream` (the streamed /generate path) gives exactly `join_results(...).to_16k()` (the
    whole-text path), so both make the same frames; a piece at another rate is handled as join does."""
    from synctalk.tts import Speech16kStream, join_results

    rng = np.random.default_rng(1)
    pieces = [TTSResult((0.3 * rng.standard_normal(n)).astype(np.float32), sr, None, "x", "x")
              for n, sr in ((22050, 22050), (9001, 22050), (16000, 16000), (30123, 22050))]
    stream = Speech16kStream()
    out = np.concatenate([stream.push(p) for p in pieces] + [stream.end()])
    whole = join_results(pieces).to_16k()
    assert out.shape == whole.shape and np.array_equal(out, whole)
