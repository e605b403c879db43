"""Dubbed voice variants: word timings in utterances.json, GRID's alignments, data_utils/tts_voice.py."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from conftest import REPO
from test_training import fabricate_dataset, run_py

from synctalk.audio import load_audio, speech_envelope, write_wav
from synctalk.dataset import AvatarDataset, DatasetError, aligned_words
from synctalk.timing import FPS, SAMPLE_RATE


def write_words(d, words_per_utterance: list[list]) -> None:
    utts = [{"name": f"u{k}", "start": 20 * k, "end": 20 * (k + 1), "words": w}
            for k, w in enumerate(words_per_utterance)]
    (d / "utterances.json").write_text(json.dumps({"utterances": utts, "held_out": []}))


def test_aligned_words_reads_sorts_and_refuses(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        aligned_words(tmp_path)
    write_words(tmp_path, [[[0.9, 1.2, "blue"]], [[0.1, 0.4, "bin"]]])
    assert aligned_words(tmp_path) == [(0.1, 0.4, "bin"), (0.9, 1.2, "blue")]
    write_words(tmp_path, [[], []])
    with pytest.raises(DatasetError, match="no words"):
        aligned_words(tmp_path)
    write_words(tmp_path, [[[0.5, 0.4, "bin"]]])
    with pytest.raises(DatasetError, match="start < end"):
        aligned_words(tmp_path)
    write_words(tmp_path, [[[0.5, "bin"]]])
    with pytest.raises(DatasetError, match="malformed"):
        aligned_words(tmp_path)


def test_grid_alignment_words_in_seconds_of_the_track(tmp_path):
    spec = importlib.util.spec_from_file_location("grid_s1_dataset", REPO / "scripts" / "grid_s1_dataset.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)

    (tmp_path / "align").mkdir()
    (tmp_path / "align" / "bbaf2n.align").write_text(
        "0 23750 sil\n23750 29500 bin\n29500 34000 blue\n34000 34500 sp\n34500 41000 f\n53000 74500 sil\n")
    # the clip starts at frame 75 (3 s) of the track; GRID times are in 1/25000 s
    assert grid.aligned_words(tmp_path, "bbaf2n", 75) == [[3.95, 4.18, "bin"], [4.18, 4.36, "blue"], [4.38, 4.64, "f"]]
    assert grid.aligned_words(tmp_path, "missing", 0) == []


def test_cli_dubs_the_words_in_a_tts_voice(tmp_path):
    d = fabricate_dataset(tmp_path, n=60)  # 2.4 s of audio
    write_words(d, [[[0.2, 0.6, "one"], [0.6, 1.0, "two"]], [[1.5, 2.1, "three"]]])
    t = np.arange(60 * SAMPLE_RATE // FPS) / SAMPLE_RATE  # the "recording": a voice-like tone in the word spans
    said = ((t >= 0.2) & (t < 1.0)) | ((t >= 1.5) & (t < 2.1))
    write_wav(d / "aud.wav", (0.3 * np.sin(2 * np.pi * 150 * t) * said).astype(np.float32))
    done = run_py(["data_utils/tts_voice.py", str(d), "--engine", "espeak"])
    assert done.returncode == 0, done.stderr
    corr = float(done.stderr.split("loudness envelope correlates ")[1].split()[0])
    assert corr > 0.6, done.stderr  # loud where the recording is
    wav, feats = d / "aud_voice_espeak.wav", d / "aud_whisper_voice_espeak.npy"
    assert wav.is_file() and feats.is_file()
    audio = load_audio(str(wav))
    assert len(audio) == 60 * SAMPLE_RATE // FPS
    env = speech_envelope(audio)
    loud = env > 0.1 * env.max()
    spoken = np.zeros(60, bool)
    spoken[5:25] = spoken[38:52] = True  # 0.2-1.0 s and 1.5-2.1 s, a frame at each edge left out; stops inside words dip
    assert loud[spoken].mean() > 0.8 and not loud[:4].any() and not loud[27:37].any() and not loud[54:].any()
    variant = np.load(feats)
    assert variant.shape == np.load(d / "aud_whisper.npy").shape[:1] + (2, 384)
    ds = AvatarDataset(d, "small", voice_aug=1.0)  # the training draws from it
    assert len(ds.voices) == 1 and ds.voices[0].shape == variant.shape
    # bad input: one error line, exit 2, nothing written
    (d / "utterances.json").unlink()
    failed = run_py(["data_utils/tts_voice.py", str(d), "--engine", "espeak", "--tag", "second", "-q"])
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1
    assert not (d / "aud_whisper_voice_second.npy").exists()
    failed = run_py(["data_utils/tts_voice.py", str(d), "--tag", "../up"])
    assert failed.returncode == 2 and "--tag" in failed.stderr
