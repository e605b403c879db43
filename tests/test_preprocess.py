"""Preprocessing (data_utils/process.py): real clips from ../shared/media/video, frame-rate conversion,
rotation, audio/video alignment, every refusal on synthetic bad files, atomic outputs and resume."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import MEDIA, REPO, need_shared

from data_utils import process
from synctalk import face as face_crop

VIDEO = MEDIA / "video"
REAL_CLIPS = {  # name -> (path, size)
    "grid": (VIDEO / "grid" / "bbaf2n.mpg", (360, 288)),
    "may": (VIDEO / "real3dportrait_May_5s.mp4", (512, 512)),
    "face2": (VIDEO / "videoretalking_face2.mp4", (844, 844)),
}
FAST = ["--features", "none", "--quiet", "--crop_sizes", "168"]


# ----------------------------------------------------------------------------------------------
# helpers


def write_clip(path: Path, frames, fps: float = 25, audio: np.ndarray | None = None, sr: int = 16000,
               rotation: int | None = None, pts: list[int] | None = None, time_base: int = 1000) -> Path:
    """H.264 (+ AAC when `audio` is given, mono or [samples, 2]) mp4. `pts` (in 1/time_base s) makes a
    variable-frame-rate file; `rotation` sets the display matrix (degrees counter-clockwise)."""
    from fractions import Fraction

    import av

    frames = list(frames)
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000),
                            options={"preset": "ultrafast", "crf": "16"})
        vs.height, vs.width = frames[0].shape[:2]
        vs.pix_fmt = "yuv420p"
        if pts is not None:
            vs.time_base = Fraction(1, time_base)
            vs.codec_context.time_base = Fraction(1, time_base)
        if rotation:
            vs.set_display_rotation(rotation)
        aus = None
        if audio is not None:
            layout = "mono" if audio.ndim == 1 else "stereo"
            aus = out.add_stream("aac", rate=sr, layout=layout)
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, time_base)
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
        if aus is not None:
            pcm = np.clip(audio * 32767, -32768, 32767).astype(np.int16)
            pcm = pcm.reshape(len(pcm), -1)
            for i in range(0, len(pcm), 1024):
                chunk = np.ascontiguousarray(pcm[i:i + 1024].reshape(1, -1))
                fr = av.AudioFrame.from_ndarray(chunk, format="s16", layout=aus.layout.name)
                fr.sample_rate, fr.pts = sr, i
                for p in aus.encode(fr):
                    out.mux(p)
            for p in aus.encode():
                out.mux(p)
    return path


def speechy(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Noise bursts with pauses: enough of a 'voice' for level and silence statistics."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    gate = (np.sin(2 * np.pi * 1.3 * t) > 0).astype(np.float32)
    return (0.2 * gate * rng.standard_normal(len(t))).astype(np.float32)


def run(args: list[str], capsys=None) -> tuple[int, str]:
    code = process.main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def may_frames() -> list[np.ndarray]:
    """The May clip's frames (BGR 512x512) and its audio, decoded once."""
    import av

    path = need_shared(REAL_CLIPS["may"][0])
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]


def small(frames: list[np.ndarray], side: int = 256) -> list[np.ndarray]:
    return [cv2.resize(f, (side, side), interpolation=cv2.INTER_AREA) for f in frames]


def container_duration(path: Path) -> float:
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        return float(vs.duration * vs.time_base) if vs.duration else c.duration / 1e6


# ----------------------------------------------------------------------------------------------
# real media


@pytest.fixture(scope="module")
def real_datasets(tmp_path_factory) -> dict[str, Path]:
    out = {}
    root = tmp_path_factory.mktemp("real")
    for name, (src, _) in REAL_CLIPS.items():
        if not src.is_file():
            continue
        d = root / name
        d.mkdir()
        video = d / f"{name}{src.suffix}"
        shutil.copyfile(src, video)
        extra = ["--features", "whisper"] if name == "grid" else ["--features", "none"]
        assert process.main([str(video), "--quiet", "--min_seconds", "1", *extra]) == 0
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(REAL_CLIPS))
def test_real_clip_becomes_a_dataset(real_datasets, name):
    src, (w, h) = REAL_CLIPS[name]
    need_shared(src)
    d = real_datasets[name]
    report = json.loads((d / "report.json").read_text())
    n = report["frames"]
    # 25 frames per second of the source, within one frame
    assert abs(n - 25 * container_duration(src)) <= 1.0
    assert report["frame_size"] == [w, h]
    jpgs = sorted(int(p.stem) for p in (d / "full_body_img").glob("*.jpg"))
    assert jpgs == list(range(n))
    assert cv2.imread(str(d / "full_body_img" / f"{n - 1}.jpg")).shape == (h, w, 3)
    assert len(list((d / "landmarks").glob("*.lms"))) == n
    assert face_crop.load_landmarks(d / "landmarks" / "0.lms").shape == (478, 2)
    # audio: 16 kHz mono, as long as the video within 40 ms
    import soundfile as sf

    audio, sr = sf.read(str(d / "aud.wav"))
    assert sr == 16000 and audio.ndim == 1
    assert abs(len(audio) / sr - n / 25) <= 0.040
    assert report["audio"]["speech_level_dbfs"] > -40.0  # real speech was decoded
    # faces in every frame, boxes square and inside the frame
    assert report["face"]["found_share"] == 1.0 and report["face"]["second_face_frames"] == 0
    boxes = np.load(d / "crop_boxes.npy")
    assert boxes.shape == (n, 4) and boxes.dtype == np.int32
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert np.array_equal(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # the box covers the mouth: lip points of the landmarks are inside it, in its upper half
    lms = face_crop.load_landmarks(d / "landmarks" / "10.lms")
    x1, y1, x2, y2 = boxes[10]
    mouth = lms[[13, 14, 61, 291]]
    assert (mouth[:, 0] > x1).all() and (mouth[:, 0] < x2).all()
    assert (mouth[:, 1] > y1).all() and (mouth[:, 1] < y1 + 0.6 * (y2 - y1)).all()
    # jitter is reported and smoothing lowers it
    cj = report["crop_jump"]
    assert 0.0 <= cj["jitter_pct"] < cj["jitter_unsmoothed_pct"]
    assert cj["jitter_pct"] == pytest.approx(face_crop.box_jitter(boxes), abs=1e-3)


def test_crop_cache_matches_the_frames_and_boxes_match_the_landmarks(real_datasets, tmp_path):
    if "may" not in real_datasets:
        pytest.skip("May clip not available")
    d = real_datasets["may"]
    boxes = np.load(d / "crop_boxes.npy")
    crops = np.load(d / "crops_328.npy", mmap_mode="r")
    assert crops.shape == (len(boxes), 328, 328, 3) and crops.dtype == np.uint8
    for i in (0, 60, len(boxes) - 1):
        frame = cv2.imread(str(d / "full_body_img" / f"{i}.jpg"))
        ref = face_crop.crop_face(frame, boxes[i], 328)
        mse = np.mean((crops[i].astype(float) - ref.astype(float)) ** 2)
        assert 10 * np.log10(255 ** 2 / max(mse, 1e-9)) > 35.0  # same pixels up to JPEG loss
    # without crop_boxes.npy the readers recompute the same boxes from the .lms files
    copy = tmp_path / "copy"
    shutil.copytree(d / "landmarks", copy / "landmarks")
    (copy / "full_body_img").mkdir()
    shutil.copyfile(d / "full_body_img" / "0.jpg", copy / "full_body_img" / "0.jpg")
    np.testing.assert_array_equal(face_crop.dataset_crop_boxes(copy), boxes)


def test_whisper_features_have_one_row_per_frame(real_datasets):
    if "grid" not in real_datasets:
        pytest.skip("GRID clip not available")
    d = real_datasets["grid"]
    feats = np.load(d / "aud_whisper.npy")
    n = json.loads((d / "report.json").read_text())["frames"]
    assert feats.shape == (n, 2, 384) and feats.dtype == np.float32 and np.isfinite(feats).all()


def test_report_has_every_section(real_datasets):
    if "may" not in real_datasets:
        pytest.skip("May clip not available")
    r = json.loads((real_datasets["may"] / "report.json").read_text())
    for key in ("frames", "duration_s", "face", "face_size_px", "head_motion", "crop_jump", "audio", "warnings"):
        assert key in r
    assert r["face_size_px"]["box_side"]["median"] > 100
    a = r["audio"]
    assert {"rms_dbfs", "peak_dbfs", "clipped_share", "leading_silence_s", "trailing_silence_s",
            "longest_silences"} <= set(a)
    codes = {w["code"] for w in r["warnings"]}
    assert "short_recording" in codes and "no_silence" in codes  # 5 s of speech without pauses at the ends
    assert all(w["advice"] for w in r["warnings"])


# ----------------------------------------------------------------------------------------------
# frame rate, rotation, alignment


def test_30fps_input_is_resampled_to_25(may_frames, tmp_path, capsys):
    src = small(may_frames)
    frames30 = [src[min(len(src) - 1, int(round(j / 30 * 25)))] for j in range(90)]  # 3 s at 30 fps
    (tmp_path / "d").mkdir()
    video = write_clip(tmp_path / "d" / "d.mp4", frames30, fps=30, audio=speechy(3.0))
    code, err = run([video, *FAST, "--min_seconds", "1"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "d" / "report.json").read_text())
    assert r["input"]["source_fps"] == pytest.approx(30.0)
    assert r["frames"] == 75 and len(list((tmp_path / "d" / "full_body_img").glob("*.jpg"))) == 75
    assert r["face"]["found_share"] == 1.0


def test_rotated_input_comes_out_upright(may_frames, tmp_path, capsys):
    upright = [f[64:448, :] for f in small(may_frames[:50], 512)]  # 512 x 384 landscape
    stored = [cv2.rotate(f, cv2.ROTATE_90_CLOCKWISE) for f in upright]  # 384 x 512 on disk
    (tmp_path / "r").mkdir()
    # the display matrix says: rotate 90 degrees counter-clockwise to show it
    video = write_clip(tmp_path / "r" / "r.mp4", stored, audio=speechy(2.0), rotation=90)
    code, err = run([video, *FAST, "--min_seconds", "1"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    assert r["input"]["rotation"] == 90 and r["frame_size"] == [512, 384]
    first = cv2.imread(str(tmp_path / "r" / "full_body_img" / "0.jpg"))
    assert first.shape == (384, 512, 3)
    assert np.abs(first.astype(int) - upright[0].astype(int)).mean() < 4.0
    assert r["face"]["found_share"] == 1.0  # the face mesh saw upright faces


def test_audio_and_video_stay_aligned(tmp_path):
    """A flash and a beep at 1.2 s in a 30 fps clip with 44.1 kHz stereo audio land on frame 30 and
    sample 19200 of the 25 fps / 16 kHz outputs (within one frame)."""
    n30, onset = 90, 1.2
    frames = [np.full((120, 160, 3), 255 if j / 30 >= onset else 0, np.uint8) for j in range(n30)]
    sr = 44100
    t = np.arange(int(3.0 * sr)) / sr
    tone = (0.5 * np.sin(2 * np.pi * 440 * t) * (t >= onset)).astype(np.float32)
    video = write_clip(tmp_path / "flash.mp4", frames, fps=30, audio=np.stack([tone, tone], 1), sr=sr)
    info, audio, stats = process.scan_media(video, progress=False)
    assert info.n_frames == 75 and len(audio) == 75 * 640
    first_bright = next(k for k, img in process.video_frames_25fps(video, info) if img.mean() > 128)
    first_loud = int(np.argmax(np.abs(audio) > 0.1))
    assert abs(first_bright - 30) <= 1
    assert abs(first_loud - onset * 16000) <= 640
    assert abs(first_loud / 640 - first_bright) <= 1.0


class _Frame:
    def __init__(self, t: float):
        self.pts, self.time_base, self.t = int(round(t * 1000)), __import__("fractions").Fraction(1, 1000), t


def test_resampling_picks_the_nearest_frame_by_timestamp():
    def pick(times, n):
        return [round(f.t, 3) for _, f in process.resample_25fps(iter([_Frame(t) for t in times]), n, 0.0, 0.04)]

    assert pick([0.0, 0.04, 0.08], 3) == [0.0, 0.04, 0.08]  # 25 fps: identity
    thirty = [j / 30 for j in range(30)]
    got = pick(thirty, 25)
    assert got == [round(min(thirty, key=lambda s: (abs(s - k / 25), s)), 3) for k in range(25)]
    assert pick([0.0, 0.1, 0.13, 0.5], 14)[:7] == [0.0, 0.0, 0.1, 0.13, 0.13, 0.13, 0.13]  # variable rate
    assert pick([0.0, 0.04], 5) == [0.0, 0.04, 0.04, 0.04, 0.04]  # the last picture is held


def test_variable_frame_rate_file(may_frames, tmp_path, capsys):
    src = small(may_frames[:75])
    pts, t = [], 0
    for i in range(len(src)):  # alternating 30 ms and 50 ms frames: 40 ms on average
        pts.append(t)
        t += 30 if i % 2 == 0 else 50
    (tmp_path / "v").mkdir()
    video = write_clip(tmp_path / "v" / "v.mp4", src, audio=speechy(t / 1000), pts=pts)
    code, err = run([video, *FAST, "--min_seconds", "1"], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "v" / "report.json").read_text())
    assert abs(r["frames"] - t / 1000 * 25) <= 1.0


# ----------------------------------------------------------------------------------------------
# refusals


def assert_refused(video: Path, capsys, words: str, *extra) -> str:
    code, err = run([video, *FAST, *extra], capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and words in lines[0], err
    out = video.parent
    if out.is_dir():
        left = {p.name for p in out.iterdir()} - {video.name, "aud.wav", ".stages.json"}
        assert not left, f"half-written outputs left behind: {left}"
        stages = json.loads((out / ".stages.json").read_text())["stages"] if (out / ".stages.json").exists() else {}
        assert "frames" not in stages
    return lines[0]


def test_missing_and_unreadable_files_are_refused(tmp_path, capsys):
    assert_refused(tmp_path / "nothing" / "x.mp4", capsys, "not found")
    text = tmp_path / "t" / "t.mp4"
    text.parent.mkdir()
    text.write_text("this is not a video\n" * 100)
    assert_refused(text, capsys, "cannot read")


def test_truncated_file_is_refused(may_frames, tmp_path, capsys):
    (tmp_path / "c").mkdir()
    full = write_clip(tmp_path / "full.mp4", small(may_frames[:75]), audio=speechy(3.0))
    data = full.read_bytes()
    cut = tmp_path / "c" / "c.mp4"
    cut.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end of the file
    assert_refused(cut, capsys, "cannot read")


def test_audio_only_and_silent_video_are_refused(may_frames, tmp_path, capsys):
    from synctalk import audio as audio_io

    (tmp_path / "a").mkdir()
    wav = audio_io.write_wav(tmp_path / "a" / "a.wav", speechy(3.0))
    assert_refused(wav, capsys, "no video stream")
    (tmp_path / "b").mkdir()
    mute = write_clip(tmp_path / "b" / "b.mp4", small(may_frames[:75]))
    assert_refused(mute, capsys, "no audio stream")


def test_too_short_is_refused(may_frames, tmp_path, capsys):
    (tmp_path / "s").mkdir()
    clip = write_clip(tmp_path / "s" / "s.mp4", small(may_frames[:25]), audio=speechy(1.0))
    line = assert_refused(clip, capsys, "too short")
    assert "1.00 s" in line


def test_blank_wall_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wall = cv2.GaussianBlur(rng.integers(90, 160, (240, 320, 3), dtype=np.uint8), (0, 0), 3)
    (tmp_path / "w").mkdir()
    clip = write_clip(tmp_path / "w" / "w.mp4", [wall] * 75, audio=speechy(3.0))
    assert_refused(clip, capsys, "no face found")


def test_face_missing_in_too_many_frames_is_refused(may_frames, tmp_path, capsys):
    frames = small(may_frames[:75])
    frames = frames[:25] + [np.full_like(frames[0], 120)] * 50
    (tmp_path / "m").mkdir()
    clip = write_clip(tmp_path / "m" / "m.mp4", frames, audio=speechy(3.0))
    assert_refused(clip, capsys, "face is missing in more than 10%")


def test_two_faces_are_refused(may_frames, tmp_path, capsys):
    frames = [np.hstack([f, f[:, ::-1]]) for f in small(may_frames[:75])]  # two people side by side
    (tmp_path / "two").mkdir()
    clip = write_clip(tmp_path / "two" / "two.mp4", frames, audio=speechy(3.0))
    assert_refused(clip, capsys, "more than one face")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "data_utils/process.py", str(tmp_path / "none.mp4")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: video not found: {tmp_path / 'none.mp4'}"]


# ----------------------------------------------------------------------------------------------
# resume


def test_rerun_skips_finished_stages_and_force_redoes_them(may_frames, tmp_path, capsys):
    (tmp_path / "z").mkdir()
    clip = write_clip(tmp_path / "z" / "z.mp4", small(may_frames[:50]), audio=speechy(2.0))
    args = [clip, *FAST, "--min_seconds", "1"]
    assert run(args, capsys)[0] == 0
    cache = tmp_path / "z" / "crops_168.npy"
    stages = json.loads((tmp_path / "z" / ".stages.json").read_text())["stages"]
    assert {"audio", "frames", "report"} <= set(stages)
    mtime = cache.stat().st_mtime_ns
    assert run(args, capsys)[0] == 0
    assert cache.stat().st_mtime_ns == mtime  # frames stage skipped
    assert json.loads((tmp_path / "z" / ".stages.json").read_text())["stages"]["frames"] == stages["frames"]
    assert run([*args, "--jpeg_quality", "80"], capsys)[0] == 0  # a changed setting redoes its stage
    assert cache.stat().st_mtime_ns != mtime
    mtime = cache.stat().st_mtime_ns
    assert run([*args, "--jpeg_quality", "80", "--force"], capsys)[0] == 0
    assert cache.stat().st_mtime_ns != mtime


def test_killed_run_resumes(tmp_path):
    src = need_shared(REAL_CLIPS["face2"][0])
    d = tmp_path / "k"
    d.mkdir()
    video = d / "k.mp4"
    shutil.copyfile(src, video)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "data_utils/process.py", str(video), *FAST], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmp = list(d.glob(".tmp_frames*/full_body_img/*.jpg"))
            if len(tmp) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not (d / "full_body_img").exists() and not (d / "crops_168.npy").exists()
    stages = json.loads((d / ".stages.json").read_text())["stages"]
    assert "audio" in stages and "frames" not in stages
    assert process.main([str(video), *FAST]) == 0
    assert not list(d.glob(".tmp_*"))
    r = json.loads((d / "report.json").read_text())
    assert len(list((d / "full_body_img").glob("*.jpg"))) == r["frames"] == 125
    assert json.loads((d / ".stages.json").read_text())["stages"]["audio"] == stages["audio"]  # not redone


def test_default_crop_caches_are_the_size_presets():
    from utils import SIZE_PRESETS

    assert sorted(process.CROP_SIZES) == sorted({s.crop for s in SIZE_PRESETS.values()})
