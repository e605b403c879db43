"""scripts/voice_match_trial.py: the feature changes it evaluates foreign voices with."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from test_training import run_py

REPO = Path(__file__).resolve().parents[1]


def load_trial():
    spec = importlib.util.spec_from_file_location("voice_match_trial", REPO / "scripts" / "voice_match_trial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_moves_only_the_speaking_frames_onto_the_target_statistics():
    trial = load_trial()
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, (40, 2, 8)).astype(np.float32)
    speaking = np.zeros(40, bool)
    speaking[5:35] = True
    target = (np.full(8, -1.0), np.full(8, 0.5))
    out = trial.matched(features, speaking, target, scale=True)
    mu, sd = trial.speech_stats(out, speaking)
    assert np.allclose(mu, -1.0, atol=1e-4) and np.allclose(sd, 0.5, atol=1e-3)
    assert np.array_equal(out[~speaking], features[~speaking]), "pauses keep their features"
    shifted = trial.matched(features, speaking, target, scale=False)
    assert np.allclose(trial.speech_stats(shifted, speaking)[0], -1.0, atol=1e-4)
    assert np.allclose(trial.speech_stats(shifted, speaking)[1], trial.speech_stats(features, speaking)[1], atol=1e-4)


def test_smoothing_averages_encoder_frames_across_video_frames():
    trial = load_trial()
    features = np.zeros((6, 2, 4), np.float32)
    features[2, 1] = 3.0  # one 50 Hz row: video frame 2's second encoder frame
    out = trial.smoothed(3)(None, np.ones(10, np.float32), features)
    assert out.shape == features.shape and out.dtype == np.float32
    rows = out.reshape(12, 4)[:, 0]
    assert np.allclose(rows, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]), "spread over rows 4..6, frames 2 and 3"
    assert np.array_equal(trial.smoothed(1)(None, np.ones(10, np.float32), features), features)


def test_the_trial_rejects_a_width_below_one():
    res = run_py(["scripts/voice_match_trial.py", "--match", "smooth", "--width", "0", "--", "--name", "x"])
    assert res.returncode == 2 and "--width must be at least 1" in res.stderr
