"""audio_io: decoding anything PyAV reads to 16 kHz mono float32, and the atomic PCM16 writer."""
from __future__ import annotations

import io
import wave
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import MEDIA, need_shared

from synctalk import audio as audio_io
from synctalk.audio import AudioError, load_audio, to_float32, write_wav


def tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def encode(path: Path, audio: np.ndarray, sr: int, codec: str, fmt: str | None = None) -> Path:
    """Encode mono float audio with PyAV (independent of audio_io's reader)."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=sr, layout="mono")
        fmt_name = stream.codec_context.codec.audio_formats[0].name
        frame_size = stream.codec_context.frame_size or 1024
        for start in range(0, len(audio), frame_size):
            block = audio[start: start + frame_size]
            frame = av.AudioFrame.from_ndarray(block[None].astype(np.float32), format="fltp", layout="mono")
            frame.sample_rate = sr
            frame.pts = start
            for out in av.AudioResampler(format=fmt_name, layout="mono", rate=sr).resample(frame):
                for packet in stream.encode(out):
                    container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def test_wav_roundtrip_exact_pcm16(tmp_path):
    x = tone(440, 1.0, 16000, 0.9)
    path = write_wav(tmp_path / "a.wav", x, 16000)
    with wave.open(str(path)) as wf:
        assert (wf.getnchannels(), wf.getsampwidth(), wf.getframerate(), wf.getnframes()) == (1, 2, 16000, 16000)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and y.shape == x.shape
    assert np.abs(y - x).max() < 1.5 / 32767


def test_stereo_44k_is_averaged_and_resampled(tmp_path):
    left, right = tone(440, 2.0, 44100, 0.5), tone(440, 2.0, 44100, 0.3)
    path = write_wav(tmp_path / "st.wav", np.stack([left, right], axis=1), 44100)
    y = load_audio(path, sr=16000)
    assert abs(len(y) - 32000) <= 16
    mid = y[2000:-2000]
    assert abs(np.abs(mid).max() - 0.4) < 0.01  # mean of the channels, no -3 dB downmix
    assert abs(dominant_hz(mid, 16000) - 440) < 2


@pytest.mark.parametrize("codec,ext,fmt", [("libmp3lame", "mp3", None), ("flac", "flac", None),
                                           ("libopus", "ogg", "ogg"), ("aac", "m4a", "ipod")])
def test_compressed_formats(tmp_path, codec, ext, fmt):
    sr = 48000 if codec == "libopus" else 44100
    x = tone(300, 1.5, sr, 0.5)
    path = encode(tmp_path / f"a.{ext}", x, sr, codec, fmt)
    y = load_audio(path)
    assert abs(len(y) - 24000) < 0.06 * 16000  # encoder delay/padding only
    assert abs(dominant_hz(y, 16000) - 300) < 3
    mid = y[4000:-4000]
    assert abs(np.sqrt(np.mean(mid ** 2)) - 0.5 / np.sqrt(2)) < 0.05  # level kept (RMS of the sine)


def test_bytes_and_file_objects_match_path(tmp_path):
    path = write_wav(tmp_path / "b.wav", tone(200, 0.5, 22050), 22050)
    ref = load_audio(path)
    data = path.read_bytes()
    np.testing.assert_array_equal(load_audio(data), ref)
    np.testing.assert_array_equal(load_audio(bytearray(data)), ref)
    np.testing.assert_array_equal(load_audio(io.BytesIO(data)), ref)
    np.testing.assert_array_equal(load_audio(str(path)), ref)


def test_audio_track_of_a_real_video():
    video = need_shared(MEDIA / "video" / "real3dportrait_May_5s.mp4")
    y = load_audio(video)
    assert abs(len(y) / 16000 - 5.0) < 0.1
    assert np.sqrt(np.mean(y ** 2)) > 0.01  # speech, not silence


def test_video_without_audio_stream(tmp_path):
    path = tmp_path / "silent.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 40, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(AudioError, match="no audio stream"):
        load_audio(path)


def make_bad(kind: str, folder: Path) -> Path:
    if kind == "missing":
        return folder / "missing.wav"
    if kind == "directory":
        return folder
    path = folder / f"{kind}.wav"
    path.write_bytes(b"" if kind == "empty" else b"RIFF....junk" * 50)
    return path


@pytest.mark.parametrize("kind,match", [("missing", "not found"), ("directory", "directory"),
                                        ("empty", "empty"), ("junk", "cannot decode")])
def test_bad_files_raise_value_error(tmp_path, kind, match):
    with pytest.raises(ValueError, match=match):
        load_audio(make_bad(kind, tmp_path))


def test_bad_bytes_raise_value_error():
    with pytest.raises(ValueError, match="empty"):
        load_audio(b"")
    with pytest.raises(ValueError, match="cannot decode"):
        load_audio(b"\x00\x01not audio at all" * 100)
    with pytest.raises(ValueError, match="cannot read audio"):
        load_audio(12345)  # type: ignore[arg-type]


def test_wav_with_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(16000)
    with pytest.raises(ValueError, match="no audio samples"):
        load_audio(path)


def test_write_wav_clips_converts_and_is_atomic(tmp_path):
    out = tmp_path / "sub" / "c.wav"
    write_wav(out, np.array([-2.0, -1.0, 0.0, 0.5, 3.0], np.float32), 8000)
    with wave.open(str(out)) as wf:
        pcm = np.frombuffer(wf.readframes(5), "<i2")
    np.testing.assert_array_equal(pcm, [-32767, -32767, 0, 16384, 32767])
    ints = np.array([1, -2, 300], np.int16)
    write_wav(out, ints, 8000)  # replaces the previous file
    with wave.open(str(out)) as wf:
        np.testing.assert_array_equal(np.frombuffer(wf.readframes(3), "<i2"), ints)
    assert [p.name for p in out.parent.iterdir()] == ["c.wav"]  # no temp file left behind
    with pytest.raises(ValueError):
        write_wav(tmp_path / "bad.wav", np.array([0.0, np.nan]), 16000)
    with pytest.raises(ValueError):
        write_wav(tmp_path / "bad.wav", np.zeros((2, 2, 2)), 16000)
    assert not (tmp_path / "bad.wav").exists()


def test_to_float32_and_resample():
    np.testing.assert_allclose(to_float32(np.array([-32768, 0, 16384], np.int16)), [-1.0, 0.0, 0.5])
    np.testing.assert_allclose(to_float32(np.array([[0.2, 0.4], [1.0, 0.0]])), [0.3, 0.5], rtol=1e-6)
    with pytest.raises(ValueError):
        to_float32(np.array(["a"]))
    y = audio_io.resample(tone(500, 1.0, 48000), 48000, 16000)
    assert len(y) == 16000 and abs(dominant_hz(y, 16000) - 500) < 2


def test_shift_voice_moves_the_pitch_and_keeps_the_timing():
    burst = np.concatenate([np.zeros(4000, np.float32), tone(200, 0.5, 16000), np.zeros(4000, np.float32)])
    up = audio_io.shift_voice(burst, 12)  # an octave up
    down = audio_io.shift_voice(burst, -12)
    assert len(up) == len(down) == len(burst) and up.dtype == np.float32
    assert abs(dominant_hz(up[5000:11000], 16000) - 400) < 10
    assert abs(dominant_hz(down[5000:11000], 16000) - 100) < 10
    # the words stay where they were: the burst's loud stretch starts and ends within the phase
    # vocoder's smear (its 2048-sample window, under two video frames) of the original's
    for shifted in (up, down):
        loud = np.flatnonzero(np.abs(shifted) > 0.1)
        assert abs(loud[0] - 4000) < 1100 and abs(loud[-1] - 12000) < 1100
    same = audio_io.shift_voice(burst, 0)
    np.testing.assert_array_equal(same, burst)
    assert same is not burst


def test_dub_words_fills_each_span_and_keeps_the_pitch():
    pad = np.zeros(1600, np.float32)
    word = np.concatenate([pad, tone(300, 0.3, 16000), pad])  # 0.3 s of voice inside 0.1 s of silence
    short = tone(300, 0.02, 16000)  # 20 ms: too short to stretch
    track = audio_io.dub_words([(0.5, 0.7, word), (1.0, 1.6, word), (1.8, 1.9, short)], 40000)
    assert track.shape == (40000,) and track.dtype == np.float32
    loud = np.abs(track) > 0.05
    # each word fills its span (the silence trimmed, the 0.3 s of voice squeezed into 0.2 s and stretched
    # to 0.6 s) and nothing sounds outside the spans
    for a, b in ((8000, 11200), (16000, 25600)):
        inside = np.flatnonzero(loud[a:b])
        assert inside[0] < 300 and inside[-1] > b - a - 300, (a, inside[0], inside[-1])
    outside = np.ones(len(track), bool)
    outside[8000:11200] = outside[16000:25600] = False
    assert not loud[outside].any()
    assert abs(dominant_hz(track[17000:24600], 16000) - 300) < 10  # stretched, not resampled
    assert abs(dominant_hz(track[8400:10800], 16000) - 300) < 15
    assert not audio_io.dub_words([(1.0, 0.9, word)], 40000).any()  # an empty span adds nothing
