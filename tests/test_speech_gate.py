"""The speech gate's voice activity: hangover and preroll, the Silero VAD against room noise (TTS speech
with noise under it; real GRID recordings with their word alignments), chunked calls as the engine makes
them, and the settings that build it."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import MEDIA, REPO, need_shared

from synctalk.audio import SpeechGate, speaking_frames, spread_speech
from synctalk.timing import FPS, SAMPLE_RATE

FRAME = SAMPLE_RATE // FPS


def test_spread_speech_holds_after_and_starts_before_the_voiced_frames():
    voiced = np.zeros(12, bool)
    voiced[[4, 5]] = True
    np.testing.assert_array_equal(np.flatnonzero(spread_speech(voiced, 12, 0, 0)), [4, 5])
    np.testing.assert_array_equal(np.flatnonzero(spread_speech(voiced, 12, 2, 0)), [4, 5, 6, 7])
    np.testing.assert_array_equal(np.flatnonzero(spread_speech(voiced, 12, 2, 3)), [1, 2, 3, 4, 5, 6, 7])
    # frames past `voiced`'s end are unvoiced; the hangover reaches into them
    np.testing.assert_array_equal(np.flatnonzero(spread_speech(voiced[:6], 9, 1, 0)), [4, 5, 6])
    assert spread_speech(voiced, 0, 2, 2).shape == (0,)


def noisy_speech(mic_wav, level_db: float = -35.0) -> tuple[np.ndarray, np.ndarray]:
    """(the live tests' TTS speech with long pauses plus white room noise at `level_db` dBFS, the frames
    that are speech in the clean clip)."""
    _, clean = mic_wav
    noise = np.random.default_rng(0).standard_normal(len(clean)).astype(np.float32) * 10 ** (level_db / 20)
    n = len(clean) // FRAME
    return clean + noise, speaking_frames(clean, n, -45.0, 0)


def away_from(mask: np.ndarray, frames: int) -> np.ndarray:
    """Frames at least `frames` away from every True frame of `mask`."""
    near = np.convolve(mask.astype(np.int32), np.ones(2 * frames + 1, np.int32), mode="same") > 0
    return ~near


def test_silero_gate_hears_the_words_not_the_room_noise(mic_wav):
    audio, speech = noisy_speech(mic_wav)
    n = len(speech)
    pauses = away_from(speech, 8)  # more than 0.3 s from any word
    assert pauses.sum() > 100
    level = SpeechGate(-45.0, 80).speaking(audio, n)
    assert level[pauses].mean() > 0.99  # the noise floor is above the level rule's threshold: all "speech"
    vad = SpeechGate(-45.0, 80, "silero", 0.5, 80).speaking(audio, n)
    assert vad[pauses].mean() < 0.05, vad[pauses].mean()
    assert vad[speech].mean() > 0.85, vad[speech].mean()
    _, clean = mic_wav  # digital-silence pauses: no speech beyond the level rule's (the VAD's state lingers)
    level_spread = spread_speech(speaking_frames(clean, n, -45.0, 0), n, 2, 2)
    assert not (SpeechGate(-45.0, 80, "silero", 0.5, 80).speaking(clean, n) & ~level_spread).any()


def test_silero_gate_follows_the_aligned_silences_of_real_recordings():
    """Two GRID clips (a real room, its noise floor near -35 dBFS): frames inside the alignments' silences
    (more than 0.2 s from a word) are pauses, the words are speech."""
    source = need_shared(MEDIA / "video" / "grid-s1")
    spec = importlib.util.spec_from_file_location("grid_s1_dataset", REPO / "scripts" / "grid_s1_dataset.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    gate = SpeechGate(-45.0, 80, "silero", 0.5, 80)
    quiet, said = [], []
    for name in grid.clip_names(source)[:2]:
        _, audio = grid.decode_clip(source / "video" / f"{name}.mpg")
        n = len(audio) // FRAME
        silent = np.zeros(n, bool)
        for a, b in grid.aligned_silences(source, name, 0, n):
            silent[a:b] = True
        got = gate.speaking(audio, n)
        quiet.append(got[away_from(~silent, 5)])
        said.append(got[~silent])
        assert SpeechGate(-45.0, 80).speaking(audio, n)[silent].mean() > 0.9  # the level rule: all speech
    assert np.concatenate(quiet).mean() < 0.1
    assert np.concatenate(said).mean() > 0.85


def test_engine_speaking_in_chunks_agrees_with_the_whole_clip(mic_wav):
    """The streaming feed asks for a few frames at a time; the VAD's warm-up keeps those answers close to
    one pass over the whole clip."""
    audio, _ = noisy_speech(mic_wav)
    gate = SpeechGate(-45.0, 80, "silero", 0.5, 80)
    n = len(audio) // FRAME
    whole = gate.speaking(audio, n)
    chunked = np.concatenate([gate.speaking_at(audio, min(13, n - first), first) for first in range(0, n, 13)])
    assert chunked.shape == whole.shape and (chunked == whole).mean() > 0.97


def test_settings_build_the_gate_and_refuse_an_unknown_detector():
    from config import Settings

    gate = Settings().speech_gate()
    assert gate is not None and gate.vad == "silero" and gate.preroll_frames == 0 and gate.hangover_frames == 2
    assert Settings(audio={"speech_vad": "energy"}).speech_gate().vad == "energy"
    assert Settings(audio={"silence_gate": False}).speech_gate() is None
    with pytest.raises(ValueError, match="voice activity"):
        SpeechGate(vad="webrtc")
    with pytest.raises(ValueError):
        Settings(audio={"speech_vad": "webrtc"})


def test_check_script_scores_the_gates_against_aligned_silences(mic_wav, tmp_path):
    """`scripts/speech_gate_check.py` on a dataset whose track is noisy TTS speech and whose utterances.json
    marks the clean clip's long pauses: the level rule calls them speech, the configured VAD gate does not."""
    import json

    from test_training import run_py

    from synctalk.audio import long_runs, write_wav

    audio, speech = noisy_speech(mic_wav)
    write_wav(tmp_path / "aud.wav", audio)
    silences = [[a, b] for a, b in long_runs(~speech, FPS, 300.0)]
    utts = {"utterances": [{"name": "u", "start": 0, "end": len(speech), "silences": silences}], "held_out": []}
    (tmp_path / "utterances.json").write_text(json.dumps(utts))
    res = run_py(["scripts/speech_gate_check.py", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-1500:]
    rows = {r["gate"]: r for r in map(json.loads, res.stdout.splitlines())}
    assert rows["level"]["silences_called_speech"] > 0.99 and rows["configured"]["vad"] == "silero"
    assert rows["configured"]["silences_called_speech"] < 0.2 and rows["configured"]["words_called_pause"] < 0.15
    assert rows["configured"]["chunked_agreement"] > 0.95
    (tmp_path / "utterances.json").unlink()
    res = run_py(["scripts/speech_gate_check.py", str(tmp_path)])
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error:")
