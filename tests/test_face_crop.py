"""Crop geometry (face_crop.py): box rules, clamping, crop/resize rule, mask, U-Net input, smoothing and the
dataset readers. Pure numpy, no media."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from synctalk import face as fc


def mp_face(cx=200.0, top=150.0, width=120.0, chin=250.0, n=478) -> np.ndarray:
    """478 landmarks with the box-defining points placed explicitly (the rest at the face centre)."""
    p = np.full((n, 2), (cx, top + 30.0))
    p[fc.MP_CHEEK_LEFT] = (cx - width / 2, top - 20)
    p[fc.MP_CHEEK_RIGHT] = (cx + width / 2, top - 20)
    p[fc.MP_NASION] = (cx, top - 30)
    p[fc.MP_SUBNASALE] = (cx, top + 30)
    p[fc.MP_CHIN] = (cx, chin)
    return p


# ----------------------------------------------------------------------------------------------
# box rules


def test_mediapipe_box_is_cheek_wide_square_from_mid_nose():
    box = fc.crop_box_mediapipe(mp_face(cx=200, top=150, width=120, chin=250))
    # top = (120 + 180) / 2 = 150; side = max(120, 1.25 * (250 - 150)) = 125 -> chin rule wins here
    assert box == (138, 150, 263, 275)
    box = fc.crop_box_mediapipe(mp_face(cx=200, top=150, width=160, chin=250))
    assert box == (120, 150, 280, 310)  # cheek width 160 wins
    x1, y1, x2, y2 = box
    assert x2 - x1 == y2 - y1 and y2 > 250  # square, reaches below the chin


def test_mediapipe_box_uses_the_cheek_distance_under_roll():
    p = mp_face(width=100, chin=170)
    p[fc.MP_CHEEK_RIGHT, 1] += 60.0  # head rolled: the cheek line is tilted, |d| = sqrt(100^2 + 60^2)
    x1, y1, x2, y2 = fc.crop_box_mediapipe(p)
    assert x2 - x1 == round(np.hypot(100, 60))


def test_upstream_box_follows_the_spec():
    p = np.zeros((110, 2))
    p[1] = (100.7, 0)
    p[31] = (300.2, 0)
    p[52] = (0, 180.9)
    # ints first (upstream casts to int32): xmin 100, xmax 300, ymin 180, W 200
    assert fc.crop_box_upstream(p) == (100, 180, 300, 380)


def test_clamp_shifts_inside_and_shrinks_only_when_larger_than_the_frame():
    assert fc.clamp_box((10, 20, 110, 120), 640, 480) == (10, 20, 110, 120)
    assert fc.clamp_box((-30, 400, 70, 500), 640, 480) == (0, 380, 100, 480)  # shifted right and up
    assert fc.clamp_box((600, -5, 700, 95), 640, 480) == (540, 0, 640, 100)
    # 600 px > 480: shrunk about its centre (400, 300) to 480, then shifted up into the frame
    assert fc.clamp_box((100, 0, 700, 600), 640, 480) == (160, 0, 640, 480)
    rng = np.random.default_rng(0)
    for _ in range(500):
        w, h = rng.integers(50, 400, 2)
        x, y = rng.integers(-300, 500, 2)
        s = int(rng.integers(1, 600))
        x1, y1, x2, y2 = fc.clamp_box((x, y, x + s, y + s), w, h)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and x2 - x1 == y2 - y1 == min(s, w, h)


# ----------------------------------------------------------------------------------------------
# crop, mask, input


def test_crop_face_resize_rule_and_padding():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)
    big = (50, 20, 250, 220)  # 200 px -> 168: shrink -> INTER_AREA
    np.testing.assert_array_equal(fc.crop_face(frame, big, 168),
                                  cv2.resize(frame[20:220, 50:250], (168, 168), interpolation=cv2.INTER_AREA))
    small = (50, 20, 150, 120)  # 100 px -> 168: enlarge -> INTER_CUBIC
    np.testing.assert_array_equal(fc.crop_face(frame, small, 168),
                                  cv2.resize(frame[20:120, 50:150], (168, 168), interpolation=cv2.INTER_CUBIC))
    exact = fc.crop_face(frame, (0, 0, 168, 168), 168)
    np.testing.assert_array_equal(exact, frame[:168, :168])
    out = fc.crop_face(frame, (-84, -84, 84, 84), 168)  # upstream boxes may leave the frame: black there
    assert out[:84, :84].max() == 0 and np.array_equal(out[84:, 84:], frame[:84, :84])


def test_mask_rect_matches_upstream_on_320_and_scales():
    assert fc.mask_rect(320) == (5, 5, 310, 305)
    img = np.ones((320, 320), np.uint8)
    x, y, w, h = fc.mask_rect(320)
    cv2.rectangle(img, (x, y, w, h), 0, -1)
    rows, cols = np.nonzero(img == 0)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (5, 309, 5, 314)  # synctalk2d-spec.md 4.6
    assert fc.mask_rect(160) == (2, 2, 156, 153)  # margins 2 / 2 / 2 and 5 at the bottom


@pytest.mark.parametrize("preset", ["small", "328"])
def test_unet_input_is_reference_then_masked_target(preset):
    from utils import get_size

    size = get_size(preset)
    rng = np.random.default_rng(2)
    crop = rng.integers(0, 255, (size.crop, size.crop, 3), dtype=np.uint8)
    ref = rng.integers(0, 255, (size.crop, size.crop, 3), dtype=np.uint8)
    x = fc.make_unet_input(crop, ref, preset)
    b, s = size.border, size.inner
    assert x.shape == (6, s, s) and x.dtype == np.float32
    np.testing.assert_allclose(x[:3], ref[b:b + s, b:b + s].transpose(2, 0, 1) / 255.0, atol=1e-6)
    mx, my, mw, mh = fc.mask_rect(s)
    assert np.all(x[3:, my:my + mh, mx:mx + mw] == 0.0)
    target = crop[b:b + s, b:b + s].transpose(2, 0, 1) / 255.0
    keep = np.ones((s, s), bool)
    keep[my:my + mh, mx:mx + mw] = False
    np.testing.assert_allclose(x[3:][:, keep], target[:, keep], atol=1e-6)
    with pytest.raises(ValueError):
        fc.make_unet_input(crop[:-1], ref, preset)


def test_paste_back_of_an_unchanged_crop_restores_the_box():
    rng = np.random.default_rng(3)
    frame = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (0, 0), 6)
    box = (60, 40, 260, 240)
    crop = fc.crop_face(frame, box, 168)
    out = fc.paste_back(frame.copy(), crop, box, fc.paste_mask(168))
    diff = np.abs(out.astype(int) - frame.astype(int))
    assert diff.max() <= 3  # smooth image: the crop round trip is nearly lossless
    assert np.array_equal(out[:40], frame[:40]) and np.array_equal(out[:, :60], frame[:, :60])


# ----------------------------------------------------------------------------------------------
# smoothing


def test_one_euro_is_steady_at_rest_and_follows_motion():
    rng = np.random.default_rng(4)
    f = fc.OneEuroFilter(scale=100.0)
    noisy = 50.0 + rng.normal(0, 1.0, 200)
    out = np.array([f(np.array([v]))[0] for v in noisy])
    assert np.std(np.diff(out[50:])) < 0.5 * np.std(np.diff(noisy[50:]))
    f = fc.OneEuroFilter(scale=100.0)
    ramp = np.arange(100) * 4.0  # 100 px/s for a 100 px face: fast head motion
    out = np.array([f(np.array([v]))[0] for v in ramp])
    assert abs(out[-1] - ramp[-1]) < 12.0  # lag of a few frames at most
    f = fc.OneEuroFilter()
    assert all(np.allclose(f(np.array([3.0, -2.0])), [3.0, -2.0], atol=1e-12) for _ in range(5))


def test_smoothing_lowers_box_jitter():
    rng = np.random.default_rng(5)
    seq = []
    for i in range(150):
        p = mp_face(cx=300 + 20 * np.sin(i / 25.0), top=200, width=160, chin=320)
        seq.append(p + rng.normal(0, 1.5, p.shape))
    raw = fc.boxes_from_landmarks(seq, 640, 480, smooth=False)
    smooth = fc.boxes_from_landmarks(seq, 640, 480, smooth=True)
    assert raw.dtype == np.int32 and raw.shape == (150, 4)
    assert fc.box_jitter(smooth) < 0.6 * fc.box_jitter(raw)
    centre = (smooth[:, 0] + smooth[:, 2]) / 2.0
    truth = 300 + 20 * np.sin(np.arange(150) / 25.0)
    assert np.abs(centre - truth)[20:].max() < 4.0  # still follows the slow sway


def test_box_jitter_definition():
    boxes = np.array([[0, 0, 100, 100], [3, 4, 103, 104], [3, 4, 103, 104]])
    assert fc.box_jitter(boxes) == pytest.approx((5.0 + 0.0) / 2)
    assert fc.box_jitter(boxes[:1]) == 0.0


# ----------------------------------------------------------------------------------------------
# readers


def test_landmark_files_round_trip(tmp_path):
    p = mp_face() + 0.123
    path = tmp_path / "0.lms"
    path.write_text(fc.format_landmarks(p))
    back = fc.load_landmarks(path)
    assert back.shape == (478, 2) and back.dtype == np.float32
    np.testing.assert_allclose(back, p, atol=0.006)
    (tmp_path / "bad.lms").write_text("1 2 3\n")
    with pytest.raises(ValueError):
        fc.load_landmarks(tmp_path / "bad.lms")


def test_dataset_boxes_from_upstream_lms_and_from_our_lms(tmp_path):
    up = tmp_path / "up"
    (up / "landmarks").mkdir(parents=True)
    for i in range(3):
        p = np.zeros((110, 2), int)
        p[1], p[31], p[52] = (100 + i, 0), (300 + i, 0), (0, 180)
        (up / "landmarks" / f"{i}.lms").write_text("".join(f"{x} {y}\n" for x, y in p))
    np.testing.assert_array_equal(fc.dataset_crop_boxes(up), [[100 + i, 180, 300 + i, 380] for i in range(3)])

    ours = tmp_path / "ours"
    (ours / "landmarks").mkdir(parents=True)
    (ours / "full_body_img").mkdir()
    cv2.imwrite(str(ours / "full_body_img" / "0.jpg"), np.zeros((400, 500, 3), np.uint8))
    seq = [np.round(mp_face(cx=250 + i, top=300, width=150, chin=400), 2) for i in range(10)]
    for i, p in enumerate(seq):
        (ours / "landmarks" / f"{i}.lms").write_text(fc.format_landmarks(p))
    boxes = fc.dataset_crop_boxes(ours)
    np.testing.assert_array_equal(boxes, fc.boxes_from_landmarks(seq, 500, 400))
    assert boxes[:, 3].max() <= 400  # clamped: the rule alone would reach y = 450
    np.save(ours / "crop_boxes.npy", boxes + 1)
    np.testing.assert_array_equal(fc.dataset_crop_boxes(ours), boxes + 1)  # the saved file wins
    with pytest.raises(FileNotFoundError):
        fc.dataset_crop_boxes(tmp_path / "empty")
