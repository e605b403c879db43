"""Synthetic talking head: ground truth matches what mediapipe sees, silence is closed, audio is aligned,
the tool is deterministic, and the committed fixture is what the tool makes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_utils import synth_talker as st

FIXTURE = Path(__file__).parent / "fixtures" / "synth_fixture.mp4"
FIXTURE_ARGS = {"seconds": 14.0, "seed": 0}  # how the fixture was made (see docs/synthetic-talker.md)


def decode(path: Path) -> tuple[list[np.ndarray], np.ndarray, float]:
    """RGB frames, mono float audio and the video frame rate of an mp4 (PyAV)."""
    import av

    with av.open(str(path)) as c:
        fps = float(c.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        assert c.streams.audio[0].rate == 16000
        audio = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)]).astype(np.float32)
    return frames, audio, fps


def measured_opening(frames: list[np.ndarray]) -> np.ndarray:
    """Inner-lip gap (landmarks 13-14) over the eye-corner distance (33-263), per frame, by mediapipe."""
    import mediapipe as mp

    out = []
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=True) as fm:
        for f in frames:
            res = fm.process(f)
            assert res.multi_face_landmarks, "mediapipe lost the face"
            p = np.array([(q.x * f.shape[1], q.y * f.shape[0]) for q in res.multi_face_landmarks[0].landmark])
            out.append(np.linalg.norm(p[13] - p[14]) / np.linalg.norm(p[33] - p[263]))
    return np.array(out)


def frame_rms(audio: np.ndarray, n: int) -> np.ndarray:
    hop = 16000 // 25
    a = np.zeros(n * hop, np.float32)
    a[: min(len(a), len(audio))] = audio[: n * hop]
    return np.sqrt((a.reshape(n, hop) ** 2).mean(1))


def check_clip(path: Path, gt: dict, artifacts: Path | None = None) -> None:
    frames, audio, fps = decode(path)
    n = gt["n_frames"]
    assert fps == 25 and len(frames) == n
    for key in ("mouth_open", "mouth_width", "viseme", "speaking"):
        assert len(gt[key]) == n, key
    opening = measured_opening(frames)
    gt_open = np.array(gt["mouth_open"])
    speaking = np.array(gt["speaking"])
    r = float(np.corrcoef(opening, gt_open)[0, 1])
    assert r >= 0.9, f"mediapipe opening vs ground truth: Pearson {r:.3f}"
    # closed in every silent frame: ground truth exactly 0, measured gap well below a speaking one
    assert np.all(gt_open[~speaking] == 0.0)
    wide = np.median(opening[gt_open > 0.5])
    assert opening[~speaking].max() < 0.25 * wide, (opening[~speaking].max(), wide)
    # audio/ground-truth alignment: each sentence's energy onset within one frame of its first open frame
    rms = frame_rms(audio, n)
    near = np.convolve(speaking.astype(float), np.ones(5), mode="same") > 0  # within 2 frames of speech
    assert rms[~near].max() < 0.02 * rms.max()  # silence (away from phoneme-boundary rounding) is silent
    for s in gt["sentences"]:
        if s["first_viseme"] in ("PP", "FF", "SS"):  # closed lips or weak onsets: no visible onset
            continue
        lo = max(0, int(s["start_s"] * 25) - 3)
        hi = int(s["speech_end_s"] * 25)
        onset_energy = lo + int(np.argmax(rms[lo:hi] > 0.05 * rms.max()))
        onset_open = lo + int(np.argmax(gt_open[lo:hi] > 0.05))
        assert abs(onset_energy - onset_open) <= 1, (s["text"], onset_energy, onset_open)
    if artifacts is not None:
        (artifacts / f"{path.stem}_opening.json").write_text(json.dumps({"pearson": r}))


def test_fixture_matches_ground_truth(artifacts_dir: Path) -> None:
    gt = json.loads(st.gt_path_for(FIXTURE).read_text())
    assert 12 <= gt["n_frames"] / 25 <= 16 and gt["fps"] == 25
    assert FIXTURE.stat().st_size < 1_000_000
    speaking = np.array(gt["speaking"])
    runs, cur = [], 0
    for v in speaking:
        cur = 0 if v else cur + 1
        runs.append(cur)
    assert max(runs) >= 25 and speaking.sum() >= 5 * 25  # a silence of >= 1 s and at least 5 s of speech
    check_clip(FIXTURE, gt, artifacts_dir)


def test_fixture_is_what_the_tool_makes() -> None:
    """Re-plan the fixture from its recorded parameters (no rendering): same sentences and mouth curves."""
    gt = json.loads(st.gt_path_for(FIXTURE).read_text())
    assert gt["seed"] == FIXTURE_ARGS["seed"] and gt["seconds"] == FIXTURE_ARGS["seconds"]
    talker = st.plan_talker(**FIXTURE_ARGS)
    assert [s["text"] for s in talker.gt["sentences"]] == [s["text"] for s in gt["sentences"]]
    np.testing.assert_allclose(talker.gt["mouth_open"], gt["mouth_open"], atol=0.02)
    assert np.mean(np.array(talker.gt["speaking"]) == np.array(gt["speaking"])) > 0.98


def test_generate_clip_deterministic_and_aligned(tmp_path: Path, artifacts_dir: Path) -> None:
    out = tmp_path / "talk.mp4"
    sheet = artifacts_dir / "synth_contact_sheet.png"
    gt = st.synthesize_talker(out, seconds=7.0, seed=11, size=384, contact_sheet_path=sheet)
    assert out.is_file() and st.gt_path_for(out).is_file() and sheet.stat().st_size > 10_000
    assert json.loads(st.gt_path_for(out).read_text()) == json.loads(json.dumps(gt))
    assert not list(tmp_path.glob("*.tmp*"))
    check_clip(out, gt)
    # same seed: identical plan, audio and pixels; another seed: a different clip
    a, b = st.plan_talker(7.0, seed=11, size=384), st.plan_talker(7.0, seed=11, size=384)
    assert a.gt == b.gt and np.array_equal(a.audio, b.audio)
    i = int(np.argmax(a.gt["mouth_open"]))
    assert np.array_equal(a.frame(i), b.frame(i))
    # the decoded audio is the planned audio without offset (the container handles AAC priming)
    _, decoded, _ = decode(out)
    seg = a.audio[16000:48000]
    lags = np.arange(-320, 321)
    score = [float(np.dot(seg, decoded[16000 + k:48000 + k])) for k in lags]
    assert abs(int(lags[int(np.argmax(score))])) <= 16  # within 1 ms
    c = st.plan_talker(7.0, seed=12, size=384)
    assert c.gt["mouth_open"] != a.gt["mouth_open"]


def test_visemes_and_modifiers() -> None:
    assert st.viseme_of("p") == "PP" and st.viseme_of("ˈɑː") == "aa" and st.viseme_of("tʃ") == "CH"
    assert st.viseme_of(".") == "sil" and st.viseme_of("^") == "sil" and st.viseme_of(" ") is None
    merged = st.merge_modifiers([("h", 0.0, 0.1), ("ˈ", 0.1, 0.15), ("ɑ", 0.15, 0.3), ("ː", 0.3, 0.35)])
    assert merged == [("h", 0.0, 0.1), ("ˈɑː", 0.1, 0.35)]
    phones = [("^", 0.0, 0.2), ("m", 0.2, 0.3), ("ɑ", 0.3, 0.5), (" ", 0.5, 0.55), ("m", 0.55, 0.65),
              ("ɑ", 0.65, 0.9), (".", 0.9, 1.2)]
    assert st.speech_runs(phones) == [(0.2, 0.9)]
    curves = st.mouth_curves(phones, 30)
    frame_of = lambda t: int(t * 25)  # noqa: E731
    assert not curves["speaking"][frame_of(0.1)] and curves["speaking"][frame_of(0.52)]  # word gap: speaking
    assert curves["open"][frame_of(0.4)] > 0.6 and curves["open"][frame_of(0.25)] < 0.3
    assert curves["open"][frame_of(1.1)] == 0.0


def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert st.main(["--out", str(tmp_path / "x.avi")]) == 2
    assert capsys.readouterr().err.startswith("error: --out must end in .mp4")
    assert st.main(["--out", str(tmp_path / "x.mp4"), "--photo", str(tmp_path / "none.png")]) == 2
    assert "photo not found" in capsys.readouterr().err
    blank = tmp_path / "blank.png"
    import cv2

    cv2.imwrite(str(blank), np.full((200, 200, 3), 128, np.uint8))
    assert st.main(["--out", str(tmp_path / "x.mp4"), "--photo", str(blank)]) == 2
    assert "no face" in capsys.readouterr().err
    assert st.main(["--out", str(tmp_path / "x.mp4"), "--seconds", "1"]) == 2
    assert not (tmp_path / "x.mp4").exists()
