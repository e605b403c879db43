"""Inference engine (services/generator.py), paste-back (face_crop) and the offline CLI (inference_328.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import av
import cv2
import numpy as np
import pytest
from conftest import REPO

from synctalk import face as face_crop
from synctalk.audio import SpeechGate, speaking_frames
from synctalk.engine import LipSyncEngine, ensure_onnx, onnx_model_path, pingpong_order
from synctalk.metrics import colour_step_excess, paste_composite

FIXTURE_VIDEO = REPO / "tests" / "fixtures" / "synth_fixture.mp4"


# ----------------------------------------------------------------------------------------------
# helpers


def upstream_walk(n_source: int, n: int) -> list[int]:
    """Upstream 6.2 transcribed: stride flips when idx > len_img - 1 or idx < 1, then idx += stride."""
    len_img, idx, stride, out = n_source - 1, 0, 1, []
    for _ in range(n):
        if idx > len_img - 1:
            stride = -1
        if idx < 1:
            stride = 1
        idx += stride
        out.append(idx)
    return out


def decode_audio(path, sr: int = 16000) -> np.ndarray:
    """Mono float32 at `sr` of a file's first audio track (PyAV, independent of audio_io)."""
    with av.open(str(path)) as c:
        res = av.AudioResampler(format="flt", layout="mono", rate=sr)
        chunks = [r.to_ndarray().ravel() for f in c.decode(c.streams.audio[0]) for r in res.resample(f)]
        chunks += [r.to_ndarray().ravel() for r in res.resample(None)]
    return np.concatenate(chunks)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def seam_ratio(frame: np.ndarray, box, ring: int) -> float:
    """How visible the crop's outline is: mean gradient magnitude on the band along the box outline
    (2 px outside to ring + 2 px inside, which holds both seams of a hard paste: the outline and the edge
    of the never-generated ring) over the mean gradient magnitude of the box interior next to it (from
    ring + 2 px to a sixth of the box side inside). Natural image content crosses both bands alike."""
    gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32)
    mag = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = gray.shape

    def inside(offset: int) -> np.ndarray:  # the box shrunk by `offset` px (grown when negative)
        sel = np.zeros((h, w), bool)
        sel[max(y1 + offset, 1):min(y2 - offset, h - 1), max(x1 + offset, 1):min(x2 - offset, w - 1)] = True
        return sel

    band = inside(-2) & ~inside(ring + 2)
    interior = inside(ring + 2) & ~inside(max((x2 - x1) // 6, ring + 4))
    return float(mag[band].mean() / mag[interior].mean())


# ----------------------------------------------------------------------------------------------
# the avatar: the synthetic fixture clip preprocessed and trained briefly (tests/fixture_avatar.py)


@pytest.fixture(scope="module")
def avatar(fixture_avatar):
    """(dataset_root, checkpoint_root, name, checkpoint_path, dataset_dir)."""
    a = fixture_avatar
    return a.dataset_root, a.checkpoint_root, a.name, a.checkpoint_path, a.dataset_dir


@pytest.fixture(scope="module")
def engine(avatar):
    _, _, _, ckpt, ds = avatar
    return LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=4, threads=1)


# ----------------------------------------------------------------------------------------------
# frame order


def test_pingpong_matches_upstream_and_never_overruns():
    for n_source in range(2, 7):
        assert pingpong_order(n_source, 40).tolist() == upstream_walk(n_source, 40)
    assert pingpong_order(5, 10).tolist() == [1, 2, 3, 4, 3, 2, 1, 0, 1, 2]  # first frame used is 1
    assert pingpong_order(1, 4).tolist() == [0, 0, 0, 0]
    for start in range(-3, 12):
        order = pingpong_order(5, 50, start_frame=start)
        assert order.min() >= 0 and order.max() <= 4
        assert np.all(np.abs(np.diff(order)) == 1)  # one step per frame, no jumps
    assert pingpong_order(5, 3, start_frame=2).tolist() == [3, 4, 3]


@pytest.mark.parametrize("n", [1, 2, 7, 8, 31])
def test_loop_back_ends_where_it_started(n):
    order = pingpong_order(6, n, start_frame=2, loop_back=True)
    assert len(order) == n and order[0] == order[-1] == 3
    assert np.all(np.abs(np.diff(order)) <= 1)  # retraces; an even n holds the turning frame once


# ----------------------------------------------------------------------------------------------
# paste-back


def test_paste_mask_is_zero_on_the_crop_border_and_one_over_the_mouth():
    mask = face_crop.paste_mask(168, border=4)
    assert mask.shape == (168, 168) and mask.dtype == np.float32
    ring = np.ones_like(mask, dtype=bool)
    ring[5:-5, 5:-5] = False
    assert mask[ring].max() == 0.0
    assert mask[84, 84] == 1.0 and mask[110, 84] == 1.0  # centre and mouth/chin
    assert 0.0 <= mask.min() and mask.max() <= 1.0


def test_hard_paste_is_upstreams_bicubic_rectangle():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    crop = rng.integers(0, 255, (168, 168, 3), dtype=np.uint8)
    out = face_crop.paste_back(frame.copy(), crop, (30, 10, 110, 90), None)
    np.testing.assert_array_equal(out[10:90, 30:110], cv2.resize(crop, (80, 80), interpolation=cv2.INTER_CUBIC))
    outside = np.ones(frame.shape[:2], bool)
    outside[10:90, 30:110] = False
    np.testing.assert_array_equal(out[outside], frame[outside])


def test_feathered_paste_keeps_the_box_outline_and_clips_to_the_frame():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    crop = np.zeros((168, 168, 3), np.uint8)
    mask = face_crop.paste_mask(168)
    box = (-20, 40, 60, 120)  # reaches past the left and bottom edges
    out = face_crop.paste_back(frame.copy(), crop, box, mask)
    assert out.shape == frame.shape
    np.testing.assert_array_equal(out[:40], frame[:40])  # above the box
    np.testing.assert_array_equal(out[40:42], frame[40:42])  # the box's top rows: mask 0
    assert out[80, 20].sum() < frame[80, 20].sum() or frame[80, 20].sum() == 0  # centre pasted (black)


def test_color_match_removes_a_tint_at_the_paste_border_and_keeps_the_mouth():
    """A generated crop with a lighting gradient tint (darker and greener to the right) over real skin
    texture and a dark mouth: matched, the colour step across the paste border falls from clearly visible to
    under 1 dE, and the mouth keeps its contrast against the skin (only low frequencies move)."""
    rng = np.random.default_rng(2)
    original = np.clip(rng.normal(150, 12, (168, 168, 3)), 0, 255).astype(np.uint8)
    mouth = (slice(70, 85), slice(60, 110))
    pred = original.astype(np.float32)
    pred[mouth] = 40.0  # the generated mouth is open where the source frame's is closed
    pred += np.linspace(0, -30, 168)[None, :, None] * np.array([1.0, 0.3, 1.0])  # the tint
    pred = np.clip(pred, 0, 255).astype(np.uint8)
    paster = face_crop.Paster("small")
    fixed = paster.shown_crop(pred, original)
    mask = paster.mask
    before = colour_step_excess(paste_composite(pred, original, mask), original, mask)
    after = colour_step_excess(paste_composite(fixed, original, mask), original, mask)
    assert after < 1.0 < 5.0 < before, (before, after)
    skin = fixed[60:68, 60:110].astype(float).mean()
    assert skin - fixed[mouth].astype(float).mean() > 0.9 * (skin - 40.0)  # the dark mouth is still dark
    assert face_crop.Paster("small", color_match=False).shown_crop(pred, original) is pred


# ----------------------------------------------------------------------------------------------
# engine


def test_onnx_and_torch_backends_agree(avatar, engine):
    _, _, _, ckpt, ds = avatar
    torch_engine = LipSyncEngine.load(ds, ckpt, backend="torch", device="cpu", batch_size=3, threads=1)
    feats = np.random.default_rng(0).standard_normal((12, 2, 384)).astype(np.float32)
    order = engine.frame_order(12)
    windows = engine.audio_windows(feats, range(12))
    a, b = engine.render_crops(windows, order), torch_engine.render_crops(windows, order)
    s, bd = engine.size.inner, engine.size.border
    value = psnr(a[:, bd:bd + s, bd:bd + s], b[:, bd:bd + s, bd:bd + s])
    assert value >= 45.0, f"ONNX vs torch PSNR {value:.1f} dB"


def test_run_streams_through_a_fixed_pool_and_equals_render(engine):
    feats = np.random.default_rng(1).standard_normal((11, 2, 384)).astype(np.float32)
    order = engine.frame_order(11, start_frame=5)
    seen_ids, frames = set(), []

    def sink(frame):
        seen_ids.add(id(frame))
        frames.append(frame.copy())

    assert engine.run(feats, order, sink) == 11
    assert len(seen_ids) <= 2  # pooled buffers, however long the audio
    expected = engine.render(engine.audio_windows(feats, range(11)), order)
    for got, want in zip(frames, expected):
        np.testing.assert_array_equal(got, want)


def test_speaking_frames_follow_the_energy_with_hangover_and_measure_a_partial_tail():
    t = np.arange(640, dtype=np.float32) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)  # about -13.5 dBFS
    audio = np.zeros(20 * 640 + 100, np.float32)  # 20 whole frames and a partial one
    audio[5 * 640:10 * 640] = np.tile(tone, 5)  # frames 5-9 voiced
    audio[-100:] = 0.3  # the partial frame 20 is loud
    got = speaking_frames(audio, 22, threshold_db=-45.0, hangover=3)
    want = np.zeros(22, bool)
    want[5:13] = True  # 5-9 voiced, 10-12 by the hangover
    want[20:] = True  # the partial tail measured on its own samples; frame 21 (past the end) by the hangover
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(speaking_frames(audio, 22, -45.0, 0)[:13], (np.arange(13) >= 5) & (np.arange(13) < 10))


def test_speech_gate_gives_pauses_the_silent_mouth_and_streams_equal_the_offline_path(avatar, engine):
    """With a gate, pause frames get the window of silence (the idle loop's silent mouth) and their feature
    rows the row of silence; speech frames keep theirs; /generate's streaming feed produces exactly the rows
    and windows the offline CLI renders from; without a gate nothing changes."""
    from services.generator import FeatureFeed

    _, _, _, ckpt, ds = avatar
    gated_engine = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=4,
                                      speech_gate=SpeechGate(-45.0, 120))
    rng = np.random.default_rng(4)
    audio = np.zeros(16000 * 3, np.float32)
    audio[:16000] = 0.2 * rng.standard_normal(16000)  # 1 s of noise "speech", then 2 s of pause
    feats = gated_engine.features(audio)
    speaking = gated_engine.speaking(audio, len(feats))
    assert engine.speaking(audio, len(feats)) is None and engine.gate(feats, None) is feats  # no gate
    np.testing.assert_array_equal(speaking, speaking_frames(audio, len(feats), -45.0, 3))
    assert speaking[:28].all() and not speaking[28:].any()
    gated = gated_engine.gate(feats, speaking)
    np.testing.assert_array_equal(gated[speaking], feats[speaking])
    silent_row = gated_engine.features(np.zeros(32000, np.float32))[25]
    np.testing.assert_array_equal(gated[~speaking], np.broadcast_to(silent_row, gated[~speaking].shape))
    assert np.abs(feats[~speaking] - silent_row).max() > 1e-3  # the pause's own rows did differ
    windows = gated_engine.audio_windows(gated, range(len(feats)), speaking=speaking)
    np.testing.assert_array_equal(windows[40], gated_engine.silence_window()[0])
    np.testing.assert_array_equal(windows[10], gated_engine.audio_windows(feats, [10])[0])  # deep in speech
    feed = FeatureFeed(gated_engine, audio)
    np.testing.assert_allclose(feed.ensure(len(feats)), gated, atol=1e-4)  # batched vs single encoder calls
    np.testing.assert_array_equal(feed.speaking, speaking)


def test_onnx_model_is_cached_and_reexported_when_the_checkpoint_changes(avatar, tmp_path):
    ckpt = tmp_path / "7.pth"
    ckpt.write_bytes(avatar[3].read_bytes())
    path = ensure_onnx(ckpt)
    assert path == onnx_model_path(ckpt) == tmp_path / "7.onnx"
    first = path.stat().st_mtime_ns
    assert ensure_onnx(ckpt).stat().st_mtime_ns == first  # cached
    later = time.time() + 5
    os.utime(ckpt, (later, later))
    assert ensure_onnx(ckpt).stat().st_mtime_ns != first  # newer checkpoint: exported again


def test_feathered_paste_hides_the_seam_that_hard_paste_shows(avatar, engine):
    _, _, _, ckpt, ds = avatar
    hard = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=4, blend="none")
    plain = LipSyncEngine.load(ds, ckpt, backend="onnx", device="cpu", batch_size=4, color_match=False)
    feats = np.random.default_rng(3).standard_normal((8, 2, 384)).astype(np.float32)
    order = engine.frame_order(8)
    windows = engine.audio_windows(feats, range(8))
    box = engine.boxes[int(order[0])]
    ring = int(np.ceil(engine.size.border * (box[2] - box[0]) / engine.size.crop)) + 1
    soft_ratios = [seam_ratio(f, engine.boxes[i], ring) for f, i in zip(engine.render(windows, order), order)]
    hard_ratios = [seam_ratio(f, engine.boxes[i], ring) for f, i in zip(hard.render(windows, order), order)]
    plain_ratios = [seam_ratio(f, engine.boxes[i], ring) for f, i in zip(plain.render(windows, order), order)]
    source = [seam_ratio(engine.frames.get(int(i)), engine.boxes[i], ring) for i in order]
    assert max(soft_ratios) <= 1.15, (soft_ratios, source)
    assert max(plain_ratios) <= 1.15, (plain_ratios, source)
    assert min(hard_ratios) > 1.15, (hard_ratios, source)  # the check can fail: upstream's paste does


# ----------------------------------------------------------------------------------------------
# CLI


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "inference_328.py"), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def stereo_audio(tmp_path_factory):
    """3.3 s of the fixture's speech as 44.1 kHz stereo FLAC (a rate and layout the model never sees)."""
    path = tmp_path_factory.mktemp("audio") / "speech.flac"
    speech = decode_audio(FIXTURE_VIDEO, 44100)[44100: 44100 + int(3.3 * 44100)]
    with av.open(str(path), "w") as c:
        s = c.add_stream("flac", rate=44100)
        s.layout = "stereo"
        pcm = np.stack([speech, 0.5 * speech]).astype(np.float32)
        for k in range(0, pcm.shape[1], 4096):
            fr = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, k:k + 4096]), format="fltp", layout="stereo")
            fr.sample_rate, fr.pts = 44100, k
            c.mux(s.encode(fr))
        c.mux(s.encode(None))
    return path


def test_cli_writes_mp4_matching_the_audio(avatar, stereo_audio, tmp_path):
    dataset_root, checkpoint_root, name, ckpt, _ = avatar
    proc = cli("--name", name, "--audio_path", str(stereo_audio), "--dataset_root", str(dataset_root),
               "--checkpoint_root", str(checkpoint_root), "--result_dir", str(tmp_path), "--batch_size", "4",
               "--loop_back")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / f"{name}_speech_{ckpt.stem}.mp4"
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == str(out) and "frames/s" in lines[-1]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # the temp file was renamed away

    audio_in = decode_audio(stereo_audio)
    duration = len(audio_in) / 16000
    with av.open(str(out)) as c:
        vs, aus = c.streams.video[0], c.streams.audio[0]
        assert vs.codec_context.name == "h264" and aus.codec_context.name == "aac"
        assert vs.average_rate == 25 and aus.codec_context.sample_rate == 44100
        n_frames = sum(1 for _ in c.decode(vs))
    assert abs(n_frames - 25 * duration) <= 1
    audio_out = decode_audio(out)
    assert abs(len(audio_out) - len(audio_in)) / 16000 <= 0.040
    m = min(len(audio_in), len(audio_out))
    corr = np.corrcoef(audio_in[:m], audio_out[:m])[0, 1]
    assert corr >= 0.99, corr


def test_cli_bad_inputs_exit_2_with_one_line(avatar, tmp_path):
    dataset_root, checkpoint_root, name, _, _ = avatar
    roots = ["--dataset_root", str(dataset_root), "--checkpoint_root", str(checkpoint_root),
             "--result_dir", str(tmp_path / "out")]
    empty = tmp_path / "empty.wav"
    import soundfile as sf

    sf.write(str(empty), np.zeros(0, np.float32), 16000)
    garbage = tmp_path / "noise.mp3"
    garbage.write_bytes(os.urandom(2000))
    cases = {
        "unknown avatar": (["--name", "nobody", "--audio_path", str(empty)], "unknown avatar 'nobody'; available: demo, " + name),
        "unreadable audio": (["--name", name, "--audio_path", str(garbage)], garbage.name),
        "missing audio": (["--name", name, "--audio_path", str(tmp_path / "nope.wav")], "not found"),
        "empty audio": (["--name", name, "--audio_path", str(empty)], empty.name),
        "missing checkpoint": (["--name", name, "--audio_path", str(empty), "--checkpoint", "99"], "99.pth"),
    }
    for case, (args, expected) in cases.items():
        proc = cli(*args, *roots)
        assert proc.returncode == 2, (case, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (case, proc.stderr)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------------------------
# issue 21: the audio track of any decodable input reaches the mp4, and is encoded before rendering


def encode_tone(path, codec: str, rate: int, layout: str, seconds: float, fmt: str | None = None) -> None:
    """A 220 Hz tone of `seconds` (an odd length) written with PyAV's `codec` into `path`."""
    n = int(rate * seconds)
    channels = 1 if layout == "mono" else 2
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / rate)).astype(np.float32)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.layout = layout
        res = av.AudioResampler(format=s.codec_context.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.tile(tone, (channels, 1)), format="fltp", layout=layout)
        frame.sample_rate = rate
        for fr in [*res.resample(frame), *res.resample(None)]:
            c.mux(s.encode(fr))
        c.mux(s.encode(None))


AUDIO_INPUTS = {  # name: (codec, rate, layout, container format)
    "speech.mp3": ("libmp3lame", 44100, "stereo", None),
    "speech.m4a": ("aac", 22050, "mono", "mp4"),
    "speech.opus": ("libopus", 48000, "stereo", "ogg"),
    "speech.flac": ("flac", 32000, "mono", None),
}


@pytest.mark.parametrize("name", list(AUDIO_INPUTS))
def test_mp4_writer_rechunks_any_input_to_the_aac_frame_size(name, tmp_path):
    """mp3's 47-then-1,152-sample frames used to reach the 1,024-sample AAC encoder with explicit
    timestamps; a packet went backwards and the muxer failed with `returned 22` after the whole render."""
    from inference_328 import Mp4Writer

    codec, rate, layout, fmt = AUDIO_INPUTS[name]
    src = tmp_path / name
    encode_tone(src, codec, rate, layout, 3.337, fmt)
    out = tmp_path / "out.mp4"
    writer = Mp4Writer(out, 64, 48, str(src))
    seconds = writer.write_audio()  # before any frame, as run() does
    for i in range(83):
        writer.write_frame(np.full((48, 64, 3), i, np.uint8))
    writer.commit()
    assert abs(seconds - 3.337) < 0.1
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 83
    with av.open(str(out)) as c:
        pts = [p.pts for p in c.demux(audio=0) if p.pts is not None]
    assert pts == sorted(pts) and len(set(pts)) == len(pts)
    assert abs(len(decode_audio(out)) / 16000 - 3.337) < 0.1


def test_run_encodes_the_audio_before_rendering(avatar, tmp_path, monkeypatch):
    """An audio track that cannot be encoded fails the run before the engine renders a frame."""
    import inference_328

    dataset_root, checkpoint_root, name, _, _ = avatar
    src = tmp_path / "speech.mp3"
    encode_tone(src, "libmp3lame", 44100, "stereo", 1.5)
    rendered = []

    def broken_audio(self) -> float:
        raise av.error.ArgumentError(22, "Invalid argument")  # what the muxer raised

    def no_render(self, *args, **kwargs) -> None:
        rendered.append(True)

    monkeypatch.setattr(inference_328.Mp4Writer, "write_audio", broken_audio)
    monkeypatch.setattr(LipSyncEngine, "run", no_render)
    args = inference_328.parse_args(["--name", name, "--audio_path", str(src), "--dataset_root", str(dataset_root),
                                     "--checkpoint_root", str(checkpoint_root), "--result_dir", str(tmp_path / "o")])
    with pytest.raises(inference_328.InferenceError, match="cannot encode the audio"):
        inference_328.run(args)
    assert rendered == []
    assert not any((tmp_path / "o").iterdir())  # the temp mp4 is gone too


def test_encoder_threads_leave_the_unet_its_cores(monkeypatch):
    """On the CPU x264 gets the cores the U-Net's threads leave free (at least one), so the two don't
    preempt each other's threads; beside an accelerator x264 chooses (0)."""
    import inference_328

    monkeypatch.setattr(inference_328.os, "cpu_count", lambda: 8)
    assert inference_328.encoder_threads("cpu", 2) == 6
    assert inference_328.encoder_threads("cpu", 8) == 1
    assert inference_328.encoder_threads("cpu", 16) == 1
    assert inference_328.encoder_threads("cuda", 2) == 0
    assert inference_328.encoder_threads("cuda:1", 8) == 0


def test_mp4_writer_encodes_with_the_threads_it_is_given(tmp_path):
    """The writer hands its `threads` to x264, and a one-thread encode still writes every frame."""
    from inference_328 import Mp4Writer

    src = tmp_path / "tone.wav"
    encode_tone(src, "pcm_s16le", 16000, "mono", 1.0, "wav")
    out = tmp_path / "one_thread.mp4"
    writer = Mp4Writer(out, 64, 48, str(src), threads=1)
    assert writer.video.codec_context.options["threads"] == "1"
    writer.write_audio()
    for i in range(25):
        writer.write_frame(np.full((48, 64, 3), 10 * i % 255, np.uint8))
    writer.commit()
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 25
