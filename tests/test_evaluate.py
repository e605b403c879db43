"""Evaluation: every metric on constructed cases with a known answer, then the whole command on the
synthetic fixture's small trained model."""
from __future__ import annotations

import functools
import json
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
    # in speech only the pause no longer carries it: one fixed opening for every syllable follows nothing,
    # an opening that tracks the loudness inside speech still does
    speech = ~silent
    assert M.envelope_correlation(opening, env, speech) == 0.0
    following = np.where(silent, 0.01, 0.05 + env)
    assert M.envelope_correlation(following, env, speech) == pytest.approx(1.0)
    assert math.isnan(M.envelope_correlation(following, env, np.zeros(len(env), bool)))
    assert math.isnan(M.closure_share(opening, np.zeros(len(env), bool), closed))
    # the interior leaves out SILENCE_EDGE_MS (3 frames) at each end: a mouth that opens ahead of the
    # next word still counts as closed there, one open in the middle of the pause does not
    import evaluate

    whole, interior = evaluate.silence_masks(segments, len(env))
    assert np.array_equal(whole, silent) and np.flatnonzero(interior).tolist() == list(range(28, 34))
    anticipating = opening.copy()
    anticipating[34:37] = 0.2
    assert M.closure_share(anticipating, whole, closed) == pytest.approx(9 / 12)
    assert M.closure_share(anticipating, interior, closed) == 1.0
    midway = opening.copy()
    midway[30] = 0.2
    assert M.closure_share(midway, interior, closed) == pytest.approx(5 / 6)
    assert not segments_to_mask([(10, 16)], 20, trim=3).any()


# ----------------------------------------------------------------------------------------------
# Inner-mouth detail and the colour step across the paste border


def mouth_image(state: str, size: int = 168) -> tuple[np.ndarray, np.ndarray]:
    """A skin-coloured lower-face crop with lips and a mouth that is `closed`, `open` (dark cavity) or
    `teeth` (open, a band of pale teeth in the upper half); returns (image, inner-lip polygon [20, 2])."""
    img = np.zeros((size, size, 3), np.uint8)
    img[...] = (100, 135, 200)  # skin (BGR)
    angles = np.linspace(0, 2 * np.pi, 20, endpoint=False)
    poly = np.stack([84 + 34 * np.cos(angles), 112 + 16 * np.sin(angles)], 1)
    cv2.ellipse(img, (84, 112), (40, 22), 0, 0, 360, (70, 60, 170), -1)  # lips
    if state != "closed":
        cv2.fillPoly(img, [np.round(poly).astype(np.int32)], (30, 25, 40))  # dark cavity
    if state == "teeth":
        img[98:108, 58:111] = (200, 210, 215)
    return img, poly


def test_teeth_share_shows_missing_teeth_as_a_number():
    with_teeth, poly = mouth_image("teeth")
    dark, _ = mouth_image("open")
    lips_only = mouth_image("closed")[0]
    # a mouth the model smeared into a uniform dark-red blob: no pale pixel left
    smear = with_teeth.copy()
    inside = np.zeros(smear.shape[:2], np.uint8)
    cv2.fillPoly(inside, [np.round(poly).astype(np.int32)], 1)
    smear[inside > 0] = ((dark.astype(np.float32) + lips_only) / 2)[inside > 0].mean(axis=0).astype(np.uint8)
    share = M.teeth_share(with_teeth, poly)
    assert share == pytest.approx(53 * 10 / M.mouth_area(poly), rel=0.15)  # the teeth band's share
    assert M.teeth_share(dark, poly) == 0.0 and M.teeth_share(smear, poly) == 0.0
    closed = poly.copy()
    closed[:, 1] = 112 + 0.05 * (closed[:, 1] - 112)  # a 1-px slit: a closed mouth has no teeth to show
    assert M.teeth_share(with_teeth, closed) == 0.0
    assert math.isnan(M.teeth_share(with_teeth, np.full((20, 2), np.nan)))
    assert M.mouth_area(poly) == pytest.approx(np.pi * 34 * 16, rel=0.05)


def test_mouth_texture_tells_separate_teeth_from_a_pale_band():
    """The teeth share cannot tell a row of teeth from a uniform pale band (both are bright); the
    inner-mouth texture can: the band's edges run along the mouth, the gaps between teeth across it."""
    band, poly = mouth_image("teeth")
    teeth = band.copy()
    teeth[98:108, 62:111:7] = (60, 50, 70)  # dark gaps every 7 px: separate teeth
    dark, _ = mouth_image("open")
    assert M.teeth_share(teeth, poly) == pytest.approx(M.teeth_share(band, poly), rel=0.2)
    assert M.mouth_texture(teeth, poly) > 3 * M.mouth_texture(band, poly)
    assert M.mouth_texture(band, poly) > M.mouth_texture(dark, poly) == 0.0  # a flat dark gap, lips eroded away
    blurred = cv2.GaussianBlur(teeth, (0, 0), 2.0)  # the same teeth, smeared
    assert M.mouth_texture(blurred, poly) < 0.5 * M.mouth_texture(teeth, poly)
    closed = poly.copy()
    closed[:, 1] = 112 + 0.05 * (closed[:, 1] - 112)
    assert M.mouth_texture(teeth, closed) == 0.0
    assert math.isnan(M.mouth_texture(teeth, np.full((20, 2), np.nan)))


def test_colour_step_fails_a_tinted_lower_face_and_passes_a_clean_paste():
    """A generated crop identical to the real one, pasted with the engine's feathered mask, adds no
    colour step; the same crop with its lower face tinted (as a colour-shifted model output) fails."""
    from synctalk.face import paste_mask

    real = textured(168, 168, seed=5)
    mask = paste_mask(168, 4)
    noisy = np.clip(real.astype(np.int16) + RNG.integers(-2, 3, real.shape), 0, 255).astype(np.uint8)
    clean = M.paste_composite(noisy, real, mask)  # model output = real up to +-2 levels of noise
    tinted_out = noisy.astype(np.int16)
    tinted_out[84:] += np.array([-12, 4, 14], np.int16)  # lower face: warmer, as a colour-shifted output
    tinted = M.paste_composite(np.clip(tinted_out, 0, 255).astype(np.uint8), real, mask)
    ok, bad = M.colour_step_excess(clean, real, mask), M.colour_step_excess(tinted, real, mask)
    assert ok <= M.COLOUR_STEP_MAX < bad
    assert ok < 1.0 and bad > 2 * M.COLOUR_STEP_MAX
    # the raw step of the real crop itself is the face's own shading; the excess removes it
    assert M.colour_step(real, mask) == pytest.approx(M.colour_step(clean, mask), abs=1.0)


# ----------------------------------------------------------------------------------------------
# Cross-reference rendering, baselines and the verdict on constructed cases


class CopyReferenceRunner:
    """A 'U-Net' that outputs its reference input unchanged (channels 0-2)."""

    def run(self, image: np.ndarray, audio: np.ndarray, out: np.ndarray) -> None:
        out[...] = image[:, :3]


class FakeEngine:
    """Just enough of LipSyncEngine for `render_with_reference`: crops of distinct frames and a runner."""

    def __init__(self, n: int = 12, size: str = "small"):
        from synctalk.sizes import get_size

        self.size = get_size(size)
        self.crops = np.stack([textured(self.size.crop, self.size.crop, seed=10 + i) for i in range(n)])
        for i, crop in enumerate(self.crops):  # a mouth opening differently in every frame
            cv2.ellipse(crop, (84, 120), (30, 2 + 2 * i), 0, 0, 360, (40, 30, 60), -1)
        self.runner = CopyReferenceRunner()
        self.batch_size = 4

    def crop(self, index: int) -> np.ndarray:
        return self.crops[index]


def test_a_reference_copier_scores_high_with_reference_equal_target_and_low_under_cross_reference():
    import evaluate

    eng = FakeEngine()
    targets = np.arange(6, 12)
    windows = np.zeros((6, 1, 1, 1), np.float32)
    same = evaluate.render_with_reference(eng, windows, targets, targets)
    closed = evaluate.render_with_reference(eng, windows, targets, np.full(6, 0))
    shuffled = evaluate.render_with_reference(eng, windows, targets,
                                              evaluate.reference_frames("random", targets, np.arange(6), 0, 0))
    real = eng.crops[targets]
    assert M.video_psnr(same, real) > 45.0  # the real mouth leaked through the reference: "perfect"
    assert M.video_psnr(closed, real) < 25.0 and M.video_psnr(shuffled, real) < 25.0
    # copy-reference baseline = the reference interior on the target's ring: exactly what the copier made
    copy = evaluate.with_interior(real, eng.crops[np.full(6, 0)], eng.size.border)
    assert np.array_equal(copy, closed)


def test_references_come_from_training_frames_and_cuts_are_not_differenced():
    import evaluate

    held, train = np.r_[100:110, 200:205], np.r_[0:90, 120:190]
    random = evaluate.reference_frames("random", held, train, 7, seed=3)
    assert set(random) <= set(train) and len(set(random)) > 5
    assert np.array_equal(random, evaluate.reference_frames("random", held, train, 7, seed=3))  # seeded
    assert set(evaluate.reference_frames("closed", held, train, 7, 0)) == {7}
    assert np.array_equal(evaluate.reference_frames("same", held, train, 7, 0), held)
    assert evaluate.runs_of(held) == [(0, 10), (10, 15)]
    # two steady utterances at different mouth positions: no jitter, although they differ at the cut
    lips = np.zeros((15, 3, 2))
    lips[10:] += 30.0
    assert M.temporal_jitter(evaluate.with_breaks(lips, evaluate.runs_of(held))) == 0.0
    assert M.temporal_jitter(lips) > 0.0


def run_record(policy: str, model: dict, copy: dict) -> dict:
    return {"policy": policy, "diagnostic": False, "description": policy, "model": model, "copy_reference": copy}


def test_a_model_that_outputs_its_reference_is_unusable():
    import evaluate

    same = {"psnr_crop": 24.0, "opening_corr": 0.0}
    v = evaluate.verdict([run_record("closed", same, dict(same)), run_record("random", same, dict(same))])
    assert not v["usable"] and v["line"].startswith("UNUSABLE: ") and "crop PSNR" in v["line"]
    good = evaluate.verdict([run_record("closed", {"psnr_crop": 30.0, "opening_corr": 0.7},
                                        {"psnr_crop": 24.0, "opening_corr": 0.0})])
    assert good["usable"] and good["line"].startswith("OK")
    # beating PSNR alone is not enough: a smear without mouth motion fails on opening correlation
    smear = evaluate.verdict([run_record("random", {"psnr_crop": 30.0, "opening_corr": 0.05},
                                         {"psnr_crop": 24.0, "opening_corr": 0.1})])
    assert not smear["usable"] and "mouth-opening correlation" in smear["line"]
    unmeasured = evaluate.verdict([run_record("closed", {"psnr_crop": 30.0, "opening_corr": None},
                                              {"psnr_crop": 24.0, "opening_corr": None})])
    assert not unmeasured["usable"]
    diagnostic_only = evaluate.verdict([{"policy": "same", "diagnostic": True, "description": "same",
                                         "model": {"psnr_crop": 40.0, "opening_corr": 0.9}}])
    assert not diagnostic_only["usable"]


def fake_report(offsets: list, accuracy: float | None = 0.9, usable: bool = True) -> dict:
    """A report dict as evaluate.run writes it, with given cross-driven offsets."""
    import evaluate

    model = {"psnr_crop": 27.0, "opening_corr": 0.6, "sync_offset": 0, "sync_confidence": 5.0}
    copy = {"psnr_crop": 25.0, "opening_corr": 0.0}
    runs = [run_record("closed", model, copy)]
    trusted = accuracy is not None and accuracy >= M.SYNCNET_MIN_ACCURACY
    if not trusted:
        for key in evaluate.SYNC_KEYS:
            model[key] = evaluate.not_measurable(accuracy)
    cross = [{"audio": f"/x/file{i}.wav", "frames": 50,
              "model": {"sync_offset": o if trusted else evaluate.not_measurable(accuracy),
                        "sync_confidence": 3.0 if trusted else evaluate.not_measurable(accuracy),
                        "envelope_corr": 0.4},
              "source_unchanged": {"envelope_corr": 0.1}} for i, o in enumerate(offsets)]
    return {"label": "x@1", "checkpoint": "c", "created": "now", "notes": [],
            "verdict": evaluate.verdict(runs), "split": {"kind": "tail", "held_out_frames": [90, 100]},
            "syncnet": {"path": "s.pth", "accuracy": accuracy, "trusted": trusted,
                        "note": "" if trusted else evaluate.not_measurable(accuracy)},
            "self_reconstruction": {"frames": 10, "runs": runs, "mean_crop": {"psnr_crop": 20.0},
                                    "real": {"opening_corr": 1.0}},
            "cross_driven": cross}


def test_signed_offsets_of_two_files_are_never_averaged():
    import evaluate

    report = fake_report([-13, 15])
    text = evaluate.summary_text(report)
    heads, rows, footer = evaluate.cross_table(report)
    assert len(rows) == 2 and [r[1] for r in rows] == [-13, 15]  # one row per file, signed
    assert "-13" in text and "+15" in text
    assert "mean |offset| over 2 files = 14.0 frames" in text and "absolute" in footer[0]
    cross_part = text[text.index("[cross-driven"):]
    assert not any(t in cross_part.split() for t in ("1.000", "1.0", "1", "+1"))  # (-13 + 15) / 2 is never shown
    page = evaluate.build_html(report, {"self_plot": "", "strip_rows": [], "self_strip": "",
                                        "cross_plots": ["", ""], "cross_strips": ["", ""]})
    assert ">-13<" in page and ">+15<" in page and "mean |offset| over 2 files = 14.0" in page


def test_the_envelope_correlation_at_a_pause_share_is_the_fair_scale_for_a_file():
    rng = np.random.default_rng(1)
    n = 400
    silent = np.zeros(n, bool)
    silent[::4] = True  # a quarter of the frames are pauses: no sound, mouth shut
    env = np.where(silent, 0.0, rng.uniform(0.2, 1.0, n))
    opening = np.where(silent, 0.0, 0.5 * env + rng.normal(0, 0.2, n))  # loosely follows in speech
    whole, speech = M.envelope_correlation(opening, env), M.envelope_correlation(opening, env, ~silent)
    at = functools.partial(M.envelope_correlation_at_pause_share, opening, env, silent)
    assert at(0.25) == pytest.approx(whole) and at(0.0) == pytest.approx(speech)  # every frame / no pause
    assert speech < at(0.05) < at(0.1) < whole < at(0.5), "the more pauses, the higher the same lips score"
    assert at(0.1) == at(0.1), "seeded draws"
    assert math.isnan(at(1.0)) and math.isnan(
        M.envelope_correlation_at_pause_share(opening, env, np.zeros(n, bool), 0.1))
    assert M.envelope_correlation_at_pause_share(opening, env, np.zeros(n, bool), 0.0) == pytest.approx(whole)


def test_the_cross_table_shows_the_real_video_at_each_files_pause_share():
    import evaluate

    report = fake_report([2])
    report["cross_driven"][0]["real"] = {"envelope_corr": 0.302, "pause_share": 0.053}
    heads, rows, _ = evaluate.cross_table(report)
    assert rows[0][heads.index("env. corr, real at this pause share")] == 0.302
    assert rows[0][heads.index("pause share")] == 0.053
    assert rows[0][heads.index("env. corr")] == 0.4 and rows[0][heads.index("env. corr (source unchanged)")] == 0.1
    assert "0.302" in evaluate.summary_text(report)
    del report["cross_driven"][0]["real"]  # a report from before the column
    heads, rows, _ = evaluate.cross_table(report)
    assert rows[0][heads.index("pause share")] is None


def test_the_cross_table_gives_the_real_videos_envelope_figures_for_scale():
    import evaluate

    report = fake_report([2])
    assert evaluate.cross_table(report)[2] == []  # no real envelope figures, no line
    report["self_reconstruction"]["real"].update(envelope_corr=0.5514, envelope_corr_speech=0.331,
                                                 closure_in_silence=0.9)
    _, rows, footer = evaluate.cross_table(report)
    assert len(rows) == 1
    assert footer == ["for scale, the real video on its held-out frames: env. corr 0.551, in speech 0.331, "
                      "closed in silence 0.900"]
    assert footer[0] in evaluate.summary_text(report)


def test_a_compared_checkpoint_of_the_same_epoch_gets_a_column_of_its_own():
    import evaluate

    report = fake_report([2])
    report.update(name="x", checkpoint="checkpoint/x_new/1.pth")
    report["compare"] = dict(fake_report([1]), name="x", checkpoint="demo/checkpoint/demo/1.pth")
    evaluate.distinct_labels(report)
    assert (report["label"], report["compare"]["label"]) == ("x@x_new/1", "x@demo/1")
    assert evaluate.run_columns(report)[:2] == ["x@x_new/1", "x@demo/1"]
    report["compare"].update(label="y@1")
    evaluate.distinct_labels(report)  # labels that differ already stay as they are
    assert report["compare"]["label"] == "y@1"
    report.update(label="x@1")
    report["compare"].update(label="x@1", checkpoint="old/checkpoint/x_new/1.pth")  # same folder name too
    evaluate.distinct_labels(report)
    assert (report["label"], report["compare"]["label"]) == ("x@checkpoint/x_new/1.pth",
                                                             "x@old/checkpoint/x_new/1.pth")


def test_a_chance_level_syncnet_makes_sync_numbers_not_measurable():
    import evaluate

    report = fake_report([-13, 15], accuracy=0.54)
    text = evaluate.summary_text(report)
    assert "not measurable (SyncNet accuracy 0.54)" in text
    assert "SyncNet held-out accuracy 0.540" in text
    _, rows, footer = evaluate.cross_table(report)
    assert all(r[1] == "not measurable (SyncNet accuracy 0.54)" for r in rows) and not footer
    assert "-13" not in text and "+15" not in text

    class Judge:  # sync_values on an avatar whose SyncNet is at chance: text, and no embedding is computed
        accuracy, trusted = 0.54, False

    av = type("Av", (), {"sync": Judge(), "judge": None})()
    vals = evaluate.sync_values(np.zeros((30, 4)), av, np.zeros((30, 8)), np.arange(30), [(0, 30)])
    assert vals == {k: "not measurable (SyncNet accuracy 0.54)" for k in evaluate.SYNC_KEYS}
    assert evaluate.sync_status(None)["trusted"] is False


def test_the_summary_names_split_reference_policy_and_syncnet_accuracy():
    import evaluate

    report = fake_report([2], accuracy=0.81)
    report["split"] = {"kind": "utterances", "held_out": [{"name": "bbaf2n", "start": 0, "end": 75}],
                       "training_utterances": 9}
    lines = evaluate.summary_text(report).splitlines()
    assert lines[0] == report["verdict"]["line"]
    assert "bbaf2n (0-74)" in lines[1] and "whole utterances" in lines[1]
    assert lines[2].startswith("reference policy: closed") and "0.810" in lines[3]
    bad = fake_report([2])
    bad["self_reconstruction"]["runs"][0]["model"]["psnr_crop"] = 25.0  # = copy-reference
    bad["verdict"] = evaluate.verdict(bad["self_reconstruction"]["runs"])
    assert evaluate.summary_text(bad).startswith("UNUSABLE: ")


# ----------------------------------------------------------------------------------------------
# Held-out split by utterance


def test_utterance_split_holds_out_whole_utterances_with_a_guard():
    from synctalk.dataset import GUARD, DatasetError, utterance_split

    utts = [{"name": f"u{i}", "start": 75 * i, "end": 75 * (i + 1)} for i in range(10)]
    val = utterance_split(750, utts, ["u2", "u7"], "val")
    train = utterance_split(750, utts, ["u2", "u7"], "train")
    assert np.array_equal(val, np.r_[150:225, 525:600])
    assert not set(train) & set(range(150 - GUARD, 225 + GUARD)) and not set(train) & set(range(525 - GUARD, 600 + GUARD))
    assert len(train) == 750 - 150 - 4 * GUARD
    with pytest.raises(DatasetError):
        utterance_split(100, utts, ["u7"], "val")  # held-out utterance beyond the frames


def test_dataset_split_reads_utterances_json(tmp_path):
    import json

    from synctalk.dataset import DatasetError, dataset_split, describe_split

    utts = [{"name": f"u{i}", "start": 20 * i, "end": 20 * (i + 1)} for i in range(10)]
    (tmp_path / "utterances.json").write_text(json.dumps({"utterances": utts, "held_out": ["u3"]}))
    assert np.array_equal(dataset_split(tmp_path, 200, "val"), np.arange(60, 80))
    desc = describe_split(tmp_path, 200)
    assert desc["kind"] == "utterances" and desc["held_out"] == [utts[3]] and desc["training_utterances"] == 9
    (tmp_path / "utterances.json").write_text(json.dumps({"utterances": utts, "held_out": ["nope"]}))
    with pytest.raises(DatasetError, match="nope"):
        dataset_split(tmp_path, 200, "val")


# ----------------------------------------------------------------------------------------------
# SyncNet trust in training, progress lines, the preprocessing warning


def test_train_328_refuses_a_chance_level_syncnet(tmp_path, caplog):
    import torch

    import train_328
    from syncnet_328 import build_syncnet
    from synctalk.trainkit import TrainError
    from unet_328 import save_checkpoint

    path = tmp_path / "best.pth"
    meta = {"kind": "syncnet", "mode": "whisper", "size": "small", "accuracy": 0.54}
    save_checkpoint(path, build_syncnet("whisper", "small").state_dict(), meta)
    with caplog.at_level("WARNING", logger="train_328"):
        net, head = train_328.load_frozen_syncnet(str(path), "whisper", "small", torch.device("cpu"))
    assert net is None and head is None
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "0.540" in warnings[0].getMessage() and "WITHOUT" in warnings[0].getMessage()
    with pytest.raises(TrainError, match="below 0.65"):
        train_328.load_frozen_syncnet(str(path), "whisper", "small", torch.device("cpu"), require=True)
    save_checkpoint(path, build_syncnet("whisper", "small").state_dict(), dict(meta, accuracy=0.8))
    net, head = train_328.load_frozen_syncnet(str(path), "whisper", "small", torch.device("cpu"), require=True)
    assert net is not None and head == (1.0, 0.0)
    assert train_328.build_parser().parse_args(["--dataset_dir", "d", "--save_dir", "s",
                                                "--require_syncnet"]).require_syncnet


def test_syncnet_trainer_warns_when_it_never_beat_chance(caplog):
    from synctalk.train_syncnet import warn_if_chance

    with caplog.at_level("WARNING", logger="syncnet_328"):
        assert warn_if_chance(0.54) and not warn_if_chance(0.8)
    assert sum("never beat chance" in r.getMessage() for r in caplog.records) == 1


def test_progress_line_at_least_every_30_seconds_when_not_a_terminal():
    import io

    from synctalk.trainkit import ProgressLine

    now = [0.0]
    out = io.StringIO()  # not a terminal
    prog = ProgressLine(100, "train_328", stream=out, clock=lambda: now[0])
    lines = []
    for step in range(1, 101):
        now[0] += 1.0  # 1 s per step of 8 samples
        if prog.due(step):
            lines.append(prog.emit(step, 8 * step, 0.25))
    assert len(lines) == 4  # at 30, 60, 90 s and the last step
    assert lines[0] == "train_328: step 30/100 (30 %), 8.0 samples/s, ETA 1m10s, loss 0.2500"
    assert out.getvalue().count("\n") == 4

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert not ProgressLine(10, stream=Tty()).enabled  # tqdm draws its bar there


def test_progress_line_under_a_cpu_budget_counts_down_the_budget():
    import io

    from synctalk.trainkit import CpuBudget, ProgressLine

    now, out = [0.0], io.StringIO()
    budget = CpuBudget(200.0, used=50.0)  # a resumed run: a quarter already spent
    prog = ProgressLine(10**6, "train_328", stream=out, clock=lambda: now[0], budget=budget, start_step=100)
    now[0], budget.used = 60.0, 80.0  # 30 CPU s in 60 s of wall time: 120 CPU s left = 240 s
    assert prog.emit(160, 480, 0.5) == ("train_328: step 160 (40 % of the CPU budget), 8.0 samples/s, "
                                        "ETA 4m00s, loss 0.5000")
    short = ProgressLine(120, "train_328", stream=out, clock=lambda: now[0], budget=CpuBudget(1e6))
    now[0] = 120.0  # the step limit comes first: the usual line
    assert short.emit(60, 480, 0.5).startswith("train_328: step 60/120 (50 %), 8.0 samples/s, ETA 1m00s")


def test_face_small_warning_names_the_crop_in_use():
    from data_utils.process import quality_warnings

    def report(side, crops):
        return {"duration_s": 300.0, "face_size_px": {"box_side": {"median": side}},
                "settings": {"crop_sizes": crops}, "face": {"missing_count": 0, "second_face_frames": 0},
                "head_motion": {"roll_deg": {}, "yaw": {}, "centre_spread_pct": 0.0},
                "crop_jump": {"step_pct": {}, "boxes_shifted_share": 0.0},
                "audio": {"leading_silence_s": 5.0, "trailing_silence_s": 5.0, "clipped_share": 0.0,
                          "peak_dbfs": -3.0, "speech_level_dbfs": -20.0, "padded_end_ms": 0.0},
                "input": {"sample_aspect_ratio": 1.0}}

    def small(r):
        return [w for w in quality_warnings(r) if w["code"] == "face_small"]

    w = small(report(200.0, [168]))
    assert not w  # 200 px is enough for a 168-px crop
    w = small(report(150.0, [168]))
    assert len(w) == 1 and "168 px" in w[0]["message"] and "328" not in w[0]["message"]
    w = small(report(200.0, [328, 168]))
    assert len(w) == 1 and "328 px" in w[0]["message"]


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
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--name", "x", "--references", "same"])  # leaks the answer alone


def test_oracle_and_reference_copier_on_the_fixture(fixture_avatar, tmp_path, monkeypatch, capsys):
    """Wiring on a real engine: (1) when the 'generated' crops are the real ones every pairwise number is
    perfect and the verdict is OK; (2) a model that outputs its reference input unchanged equals the
    copy-reference baseline under cross-reference, is flagged UNUSABLE, and --strict exits non-zero."""
    import evaluate

    def oracle(av, features, rows, targets, refs, speaking=None):
        return np.stack([av.crop_of(int(i)) for i in targets])

    monkeypatch.setattr(evaluate, "render_crops", oracle)
    args = evaluate.build_parser().parse_args(_args(fixture_avatar, tmp_path, "--max_frames", "32"))
    report, out_dir = evaluate.run(args)
    sr = report["self_reconstruction"]
    assert [r["policy"] for r in sr["runs"]] == ["closed", "random", "same"]
    for run in sr["runs"]:
        model = run["model"]
        assert model["psnr_crop"] == M.PSNR_CAP and model["ssim_crop"] == pytest.approx(1.0, abs=1e-6)
        assert model["face_found"] > 0.9, "mediapipe must find the synthetic face"
        # pasting the real crop back resamples it once: landmarks move by a fraction of a pixel
        assert model["lmd"] < 1.0 and model["opening_corr"] > 0.9
        assert model["colour_step_excess"] == pytest.approx(0.0, abs=1e-6) and model["colour_step_pass"]
        assert model["sharpness_ratio"] == pytest.approx(1.0)
    assert sr["runs"][0]["copy_reference"]["psnr_crop"] < 40.0
    assert report["verdict"]["usable"], report["verdict"]
    assert report["split"]["kind"] == "tail" and report["syncnet"]["accuracy"] is not None
    page = (out_dir / "report.html").read_text()
    assert report["verdict"]["line"] in page and "copy-reference" in page

    def copier(av, features, rows, targets, refs, speaking=None):
        crops = np.stack([av.crop_of(int(i)) for i in targets])
        return evaluate.with_interior(crops, np.stack([av.crop_of(int(r)) for r in refs]), av.engine.size.border)

    monkeypatch.setattr(evaluate, "render_crops", copier)
    rc = evaluate.main(_args(fixture_avatar, tmp_path, "--max_frames", "32", "--strict", "--audio"))
    out = capsys.readouterr().out
    assert rc == evaluate.EXIT_UNUSABLE
    assert out.startswith("UNUSABLE: ")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["verdict"]["usable"] is False and report["verdict"]["line"].startswith("UNUSABLE")
    same = report["self_reconstruction"]["runs"][2]["model"]
    assert same["psnr_crop"] == M.PSNR_CAP  # reference = target: the copier looks perfect
    assert "UNUSABLE" in (tmp_path / "eval" / "report.html").read_text()


@pytest.mark.slow
def test_evaluate_command_on_fixture_model(fixture_avatar, tmp_path):
    """The whole command on the fixture's trained small model: both files, a summary, sane numbers."""
    import subprocess
    import sys

    from conftest import MEDIA, REPO

    audio = MEDIA / "audio" / "sadtalker_RD_Radio31_000.wav"
    extra = ["--max_frames", "60"] + (["--audio", str(audio)] if audio.exists() else [])
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *_args(fixture_avatar, tmp_path, *extra)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(("OK", "UNUSABLE: ")) and "PSNR face crop" in proc.stdout
    assert "copy-reference" in proc.stdout and "real video" in proc.stdout
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 1 and "data:image/jpeg;base64," in page
    model = report["self_reconstruction"]["runs"][0]["model"]
    assert 10.0 < model["psnr_crop"] < M.PSNR_CAP
    assert 0.0 < model["ssim_crop"] < 1.0
    assert model["psnr_full"] > model["psnr_crop"]  # only the crop region differs
    if audio.exists():
        assert len(report["cross_driven"]) == 1 and report["cross_driven"][0]["frames"] == 60


def test_the_real_envelope_scale_script_reports_the_recordings_own_figures(tmp_path):
    """`scripts/real_envelope_scale.py` on a dataset whose mouth opens with the tone's loudness and shuts
    in its trailing silence: the figures rise with the pause share, share 0 is the speech-only figure."""
    from test_training import fabricate_dataset, run_py

    from synctalk.face import format_landmarks

    n = 120
    d = fabricate_dataset(tmp_path, n=n, trailing_silence=40)
    rng = np.random.default_rng(3)
    loud = np.load(d / "aud_whisper.npy")[:, 0, 0]  # the opening times a fixed pattern entry, plus noise
    (d / "landmarks").mkdir()
    for i in range(n):
        points = np.full((478, 2), 100.0)
        points[[M.EYE_OUTER_L, M.EYE_OUTER_R]] = [[50.0, 80.0], [150.0, 80.0]]
        gap = 0.0 if i >= n - 40 else 2.0 + 20.0 * abs(loud[i]) + rng.normal(0, 1.0)
        points[M.INNER_UPPER], points[M.INNER_LOWER] = [100.0, 150.0], [100.0, 150.0 + max(gap, 0.0)]
        (d / "landmarks" / f"{i}.lms").write_text(format_landmarks(points))
    res = run_py(["scripts/real_envelope_scale.py", str(d), "--shares", "0", "0.1", "0.3"])
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["frames"] == n and 0.3 < out["pause_share"] < 0.36 and not out["held_out"]
    at = out["at_share"]
    assert at["0"] == out["speech"] and at["0"] < at["0.1"] < at["0.3"] < out["whole"]
    bad = run_py(["scripts/real_envelope_scale.py", str(d), "--shares", "1"])
    assert bad.returncode == 2 and "--shares must be in [0, 1)" in bad.stderr
    missing = run_py(["scripts/real_envelope_scale.py", str(tmp_path / "nothing")])
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
