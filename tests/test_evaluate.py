"""Evaluation: every metric on constructed cases with a known answer, then the whole command on the
synthetic fixture's small trained model."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from synctalk import metrics as M
from synctalk.audio import segments_to_mask, silence_segments, speech_envelope

RNG = np.random.default_rng(0)


def textured(h: int = 96, w: int = 96, seed: int = 1) -> np.ndarray:
    """A smooth, face-like textured BGR image (low-pass noise plus a gradient)."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.uniform(0, 255, (h, w, 3)).astype(np.float32), (0, 0), 2.0)
    ramp = np.linspace(60, 160, w, dtype=np.float32)[None, :, None]
    return np.clip(0.5 * noise + ramp, 0, 255).astype(np.uint8)


def fake_landmarks(openings: np.ndarray, eye_dist: float = 100.0) -> np.ndarray:
    """478-point landmark sets with every lip point on a small ellipse and the inner-lip gap
    13-14 = opening * eye_dist."""
    n = len(openings)
    lm = np.zeros((n, 478, 2))
    lm[:, M.EYE_OUTER_L] = (50.0, 50.0)
    lm[:, M.EYE_OUTER_R] = (50.0 + eye_dist, 50.0)
    angles = np.linspace(0, 2 * np.pi, len(M.LIP_POINTS), endpoint=False)
    for j, idx in enumerate(M.LIP_POINTS):
        lm[:, idx, 0] = 100 + 20 * np.cos(angles[j])
        lm[:, idx, 1] = 150 + (5 + 50 * openings) * np.sin(angles[j])
    lm[:, M.INNER_UPPER] = np.stack([np.full(n, 100.0), 150 - 0.5 * openings * eye_dist], 1)
    lm[:, M.INNER_LOWER] = np.stack([np.full(n, 100.0), 150 + 0.5 * openings * eye_dist], 1)
    return lm


# ----------------------------------------------------------------------------------------------
# Pixel fidelity


def test_psnr_identical_is_cap_and_known_offset():
    img = textured()
    assert M.psnr(img, img) == M.PSNR_CAP
    shifted = img.astype(np.float64) + 10.0  # MSE = 100 exactly (no clipping: values <= 245 stay)
    expect = 10 * math.log10(255.0 ** 2 / 100.0)
    assert M.psnr(img.astype(np.float64), shifted) == pytest.approx(expect, abs=1e-9)
    video = np.stack([img, img])
    assert M.video_psnr(video, video) == M.PSNR_CAP


def test_ssim_identical_is_one_and_noise_lowers_it():
    img = np.stack([textured(seed=s) for s in range(3)])
    assert M.ssim(img, img) == pytest.approx(1.0, abs=1e-6)
    noisy = np.clip(img.astype(np.int16) + RNG.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
    assert M.ssim(img, noisy) < 0.8
    with pytest.raises(ValueError):
        M.ssim(img, img[:, :50])


# ----------------------------------------------------------------------------------------------
# Landmarks


def test_lip_points_match_mediapipe_lips():
    connections = pytest.importorskip("mediapipe.python.solutions.face_mesh_connections")
    lips = sorted({i for edge in connections.FACEMESH_LIPS for i in edge})
    assert sorted(M.LIP_POINTS) == lips


def test_landmark_distance_ignores_translation_and_measures_shape():
    lm = M.lip_points(fake_landmarks(np.linspace(0, 0.3, 10)))
    assert M.landmark_distance(lm, lm) == 0.0
    assert M.landmark_distance(lm + np.array([7.0, -3.0]), lm) == pytest.approx(0.0, abs=1e-9)
    moved = lm.copy()
    moved[:, 0, 0] += 40.0  # one of 40 points moves 40 px; the centroid moves 1 px
    # that point is 39 px off, the other 39 are 1 px off: (39 + 39) / 40
    assert M.landmark_distance(moved, lm) == pytest.approx(78.0 / 40.0)
    lm_nan = lm.copy()
    lm_nan[3] = np.nan  # a frame without a face is skipped
    assert M.landmark_distance(lm_nan, lm) == 0.0


def test_to_crop_coords_maps_box_to_crop_pixels():
    pts = np.array([[[100.0, 200.0], [150.0, 250.0]]])
    boxes = np.array([[100, 200, 200, 300]])
    assert np.allclose(M.to_crop_coords(pts, boxes, 168), [[[0, 0], [84, 84]]])


def test_mouth_opening_and_correlation():
    t = np.arange(100)
    openings = 0.15 + 0.1 * np.sin(t / 4.0)
    lm = fake_landmarks(openings)
    assert np.allclose(M.mouth_opening(lm), openings)
    assert np.allclose(M.mouth_opening(fake_landmarks(openings, eye_dist=250.0)), openings)  # scale free
    real = M.mouth_opening(lm)
    assert M.opening_correlation(real, real) == pytest.approx(1.0)
    frozen = np.full(100, 0.02)  # mouth frozen closed
    assert M.opening_correlation(frozen, real) == 0.0
    frozen_noisy = frozen + RNG.normal(0, 1e-3, 100)
    assert abs(M.opening_correlation(frozen_noisy, real)) < 0.3
    assert M.opening_correlation(real[::-1], real) < 0.5


def test_temporal_jitter_known_values():
    n = 20
    linear = np.zeros((n, 3, 2))
    linear[:, :, 0] = np.arange(n)[:, None] * 2.0  # constant velocity: no jitter
    assert M.temporal_jitter(linear) == 0.0
    shaky = np.zeros((n, 3, 2))
    shaky[:, :, 1] = ((-1.0) ** np.arange(n))[:, None]  # +-1 px every frame: |second difference| = 4
    assert M.temporal_jitter(shaky) == pytest.approx(4.0)
    assert M.jitter_ratio(shaky, shaky) == pytest.approx(1.0)
    assert M.jitter_ratio(shaky * 0.5, shaky) == pytest.approx(0.5)
    assert math.isnan(M.jitter_ratio(shaky, linear))  # real video with zero jitter: undefined


# ----------------------------------------------------------------------------------------------
# Sharpness and seam


def test_sharpness_ratio_blur_is_below_one():
    regions = [np.clip(textured(48, 64, seed=s).astype(np.int16) + RNG.integers(-20, 21, (48, 64, 3)), 0, 255)
               .astype(np.uint8) for s in range(4)]  # with fine detail, as teeth and lip edges
    assert M.sharpness_ratio(regions, regions) == pytest.approx(1.0)
    blurred = [cv2.GaussianBlur(r, (0, 0), 2.0) for r in regions]
    assert M.sharpness_ratio(blurred, regions) < 0.5
    box = M.mouth_box(np.array([[10.0, 20.0], [30.0, 30.0]]), (40, 40), margin=0.5)
    assert box == (0, 15, 40, 36)


def test_seam_score_hard_paste_is_worse_than_blended():
    frame = textured(160, 160, seed=3)
    box = (40, 40, 120, 120)
    patch = np.clip(frame[40:120, 40:120].astype(np.int16) + 30, 0, 255).astype(np.float32)
    hard = frame.copy()
    hard[40:120, 40:120] = patch.astype(np.uint8)
    # feathered paste: weight ramps 0 -> 1 over the outer 10 px of the box
    d = np.minimum.reduce(np.meshgrid(np.arange(80), np.arange(80), indexing="ij")
                          + np.meshgrid(np.arange(79, -1, -1), np.arange(79, -1, -1), indexing="ij"))
    alpha = np.clip(d / 10.0, 0, 1)[..., None]
    blended = frame.copy().astype(np.float32)
    blended[40:120, 40:120] = alpha * patch + (1 - alpha) * blended[40:120, 40:120]
    blended = blended.astype(np.uint8)
    # the seam zone reaches 12 px inside the box, past the 10-px feather
    s_plain, s_hard, s_blend = (M.seam_score(f, box, depth=12) for f in (frame, hard, blended))
    assert s_hard > 2.0 * s_blend
    assert s_hard > 2.5 * s_plain
    assert 0.8 < s_plain < 1.5  # an untouched frame has no seam
    assert M.seam_score(hard, box, depth=3) > 2.5 * M.seam_score(frame, box, depth=3)
    assert math.isnan(M.seam_score(frame, (0, 0, 160, 160)))  # no edge inside the image


# ----------------------------------------------------------------------------------------------
# SyncNet offset / confidence


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_sync_identical_embeddings_are_perfect():
    emb = unit(RNG.normal(size=(60, 32)))
    scores = M.sync_scores(M.sync_distances(emb, emb, vshift=15))
    assert scores["offset"] == 0
    assert scores["min_dist"] == pytest.approx(0.0, abs=1e-12)
    assert scores["confidence"] > 1.0  # unrelated unit vectors are ~sqrt(2) apart


@pytest.mark.parametrize("shift", [5, -5])
def test_sync_offset_of_shifted_embeddings(shift):
    """Video frame t shows what audio frame t - shift says (audio ahead of the picture by `shift`)."""
    n = 80
    audio = unit(RNG.normal(size=(n + 20, 32)))
    video = unit(np.roll(audio, shift, axis=0) + 0.1 * RNG.normal(size=audio.shape))[10:10 + n]
    audio = audio[10:10 + n]
    mdist = M.sync_distances(video, audio, vshift=15)
    assert mdist.shape == (31,)
    scores = M.sync_scores(mdist)
    assert abs(scores["offset"] - shift) <= 1
    assert scores["confidence"] > 0.5


def test_sync_offset_of_audio_shifted_by_five_frames():
    """A toy audio-visual pair: the mouth follows a smooth random 'speech' signal; the audio track is
    that signal moved 5 frames earlier. Embeddings are normalised 5-frame windows of each stream (a
    stand-in for SyncNet's towers); the offset search must find 5."""
    n = 120
    speech = np.convolve(RNG.normal(size=n + 40), np.ones(3) / 3, mode="same")
    mouth, sound = speech[20:20 + n], speech[25:25 + n]  # sound[t] = mouth[t + 5]: audio runs 5 ahead

    def embed(x):
        pad = np.pad(x, 2, mode="edge")
        win = np.stack([pad[i:i + 5] for i in range(n)])
        return unit(win - win.mean(axis=1, keepdims=True) + 1e-9)

    scores = M.sync_scores(M.sync_distances(embed(mouth), embed(sound), vshift=15))
    assert abs(scores["offset"] - 5) <= 1
    aligned = M.sync_scores(M.sync_distances(embed(mouth), embed(mouth), vshift=15))
    assert aligned["offset"] == 0 and aligned["confidence"] > scores["confidence"] - 0.5


# ----------------------------------------------------------------------------------------------
# Audio envelope, silences, closure


def test_envelope_silences_and_closure():
    sr, fps = 16000, 25
    tone = lambda s: 0.5 * np.sin(2 * np.pi * 220 * np.arange(int(s * sr)) / sr)  # noqa: E731
    quiet = lambda s: np.zeros(int(s * sr))  # noqa: E731
    audio = np.concatenate([tone(1.0), quiet(0.5), tone(1.0), quiet(0.2), tone(0.6)])
    env = speech_envelope(audio, sr, fps)
    assert len(env) == 83  # 3.3 s at 25 fps
    assert env[5] == pytest.approx(0.5 / math.sqrt(2), rel=5e-3)
    segments = silence_segments(env, fps, min_ms=300)
    assert segments == [(25, 37)]  # the 0.5 s pause; the 0.2 s one is too short
    silent = segments_to_mask(segments, len(env))
    opening = np.where(silent, 0.01, 0.2)
    closed = M.closed_mouth_threshold(opening)
    assert closed == pytest.approx(0.01 + 0.15 * 0.19)
    assert M.closure_share(opening, silent, closed) == 1.0
    open_always = np.full(len(env), 0.2)
    assert M.closure_share(open_always, silent, closed) == 0.0
    assert M.envelope_correlation(opening, env) > 0.8  # mouth closed where the sound stops
    assert math.isnan(M.closure_share(opening, np.zeros(len(env), bool), closed))


# ----------------------------------------------------------------------------------------------
# The command on the synthetic fixture avatar


def _args(fx, tmp_path, *extra):
    args = ["--name", fx.name, "--dataset_root", str(fx.dataset_root), "--checkpoint_root",
            str(fx.checkpoint_root), "--syncnet_root", str(fx.syncnet_root),
            "--out", str(tmp_path / "eval"), "--backend", "torch", "--device", "cpu"]
    return args + list(extra)


def test_cli_errors_are_one_line(tmp_path, capsys):
    import evaluate

    rc = evaluate.main(["--name", "no_such_avatar", "--dataset_root", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: unknown avatar 'no_such_avatar'; available:") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    rc = evaluate.main(["--name", "x", "--audio", str(tmp_path / "missing.wav")])
    assert rc == 2 and "audio file not found" in capsys.readouterr().err


def test_oracle_engine_scores_perfectly(fixture_avatar, tmp_path, monkeypatch):
    """Wiring check: when the 'generated' frames are the real ones, every pairwise number is perfect
    and every model number equals the real video's."""
    import evaluate

    def oracle(av, features, rows, frames):
        return ([av.frame(int(i)).copy() for i in frames],
                np.stack([np.asarray(av.engine.crop(int(i))) for i in frames]))

    monkeypatch.setattr(evaluate, "render", oracle)
    args = evaluate.build_parser().parse_args(_args(fixture_avatar, tmp_path, "--max_frames", "40"))
    report, _ = evaluate.run(args)
    sr = report["self_reconstruction"]
    model, real = sr["model"], sr["real"]
    assert model["psnr_crop"] == M.PSNR_CAP and model["psnr_full"] == M.PSNR_CAP
    assert model["ssim_crop"] == pytest.approx(1.0, abs=1e-6)
    assert model["face_found"] > 0.9, "mediapipe must find the synthetic face"
    assert model["lmd"] == pytest.approx(0.0, abs=1e-9)
    assert model["opening_corr"] == pytest.approx(1.0)
    assert model["sharpness_ratio"] == pytest.approx(1.0)
    assert model["jitter_ratio"] == pytest.approx(1.0)
    for key in ("seam", "envelope_corr", "closure_in_silence", "sync_offset", "sync_confidence"):
        if key in real:
            assert model[key] == pytest.approx(real[key]), key


@pytest.mark.slow
def test_evaluate_command_on_fixture_model(fixture_avatar, tmp_path):
    """The whole command on the fixture's trained small model: both files, a summary, sane numbers."""
    import json
    import subprocess
    import sys

    from conftest import MEDIA, REPO

    audio = MEDIA / "audio" / "sadtalker_RD_Radio31_000.wav"
    extra = ["--max_frames", "60"] + (["--audio", str(audio)] if audio.exists() else [])
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *_args(fixture_avatar, tmp_path, *extra)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PSNR face crop" in proc.stdout and "real video" in proc.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "data:image/jpeg;base64," in page
    model = report["self_reconstruction"]["model"]
    assert 10.0 < model["psnr_crop"] < M.PSNR_CAP
    assert 0.0 < model["ssim_crop"] < 1.0
    assert model["psnr_full"] > model["psnr_crop"]  # only the crop region differs
    if audio.exists():
        assert len(report["cross_driven"]) == 1 and report["cross_driven"][0]["frames"] == 60
