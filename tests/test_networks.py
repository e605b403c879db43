"""Foundation: the three networks, upstream checkpoint compatibility, the upstream mel and windows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import MEDIA, REFERENCE, need_shared

from syncnet_328 import build_syncnet
from unet_328 import CheckpointError, build_unet, export_onnx, load_unet_checkpoint
from utils import (
    AudioEncoder,
    audio_input_shape,
    audio_window,
    ave_mel_windows,
    count_parameters,
    load_ave_encoder,
    melspectrogram,
    pad_ave_features,
)

MODES = ["ave", "hubert", "wenet", "whisper"]


def state_from_reference(name: str) -> dict:
    shapes = json.loads((need_shared(REFERENCE / name)).read_text())
    gen = torch.Generator().manual_seed(0)
    return {k: (torch.randint(0, 5, ()) if not s else torch.randn(s, generator=gen)) for k, s in shapes.items()}


def test_parameter_counts():
    assert count_parameters(build_unet("ave", "328")) == 12_186_935
    assert count_parameters(build_unet("hubert", "328")) == 12_186_935
    assert count_parameters(build_unet("wenet", "328")) == 12_986_871
    assert count_parameters(build_syncnet("ave", "328")) == 25_147_616
    assert count_parameters(AudioEncoder()) == 2_812_672
    # whisper mode only widens the first audio IR block's input from 32 to 48 channels (hidden 96)
    assert count_parameters(build_unet("whisper", "328")) == 12_191_959
    assert count_parameters(build_unet("whisper", "small")) < count_parameters(build_unet("whisper")) / 3


def test_upstream_unet_state_dict_loads_strict(tmp_path):
    state = state_from_reference("unet328_state_dict.json")
    model = build_unet("ave", "328")
    model.load_state_dict(state, strict=True)
    path = tmp_path / "99.pth"
    torch.save(state, path)  # upstream writes a bare state_dict
    loaded, meta = load_unet_checkpoint(path)
    assert meta["mode"] == "ave" and meta["size"] == "328"
    assert torch.equal(loaded.state_dict()["outc.conv.weight"], state["outc.conv.weight"])


def test_upstream_syncnet_and_ave_state_dicts_load_strict(tmp_path):
    build_syncnet("ave", "328").load_state_dict(state_from_reference("syncnet328_state_dict.json"), strict=True)
    ave = state_from_reference("ave_audio_encoder_state_dict.json")
    AudioEncoder().load_state_dict(ave, strict=True)
    # upstream's file has no prefix; the loader accepts both
    bare = {k[len("audio_encoder."):]: v for k, v in ave.items()}
    torch.save(bare, tmp_path / "ave.pth")
    enc = load_ave_encoder(tmp_path / "ave.pth")
    assert torch.equal(enc.state_dict()["audio_encoder.0.conv_block.0.weight"],
                       ave["audio_encoder.0.conv_block.0.weight"])


def test_ave_mode_refuses_without_checkpoint():
    with pytest.raises(ValueError, match="AVE audio encoder checkpoint"):
        load_ave_encoder(None)


@pytest.mark.parametrize("size", ["328", "small"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_shapes(mode, size):
    unet, sync = build_unet(mode, size).eval(), build_syncnet(mode, size).eval()
    image, audio = unet.example_inputs(2)
    with torch.no_grad():
        pred = unet(image, audio)
        a, v = sync(image[:, :3], audio)
    side = 320 if size == "328" else 160
    assert pred.shape == (2, 3, side, side) and 0 <= pred.min() and pred.max() <= 1
    assert a.shape == v.shape and torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)


def test_wrong_checkpoint_names_mode_and_keys(tmp_path):
    from unet_328 import save_checkpoint

    model = build_unet("whisper", "small")
    state = model.state_dict()
    state.pop("outc.conv.bias")
    save_checkpoint(tmp_path / "bad.pth", state, {"kind": "unet", "mode": "whisper", "size": "small"})
    with pytest.raises(CheckpointError, match="mode 'whisper'.*missing keys.*outc.conv.bias"):
        load_unet_checkpoint(tmp_path / "bad.pth")
    save_checkpoint(tmp_path / "w.pth", model.state_dict(), {"kind": "unet", "mode": "whisper", "size": "small"})
    with pytest.raises(CheckpointError, match="trained in audio mode 'whisper', expected 'ave'"):
        load_unet_checkpoint(tmp_path / "w.pth", expect_mode="ave")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_unet_checkpoint(tmp_path / "junk.pth")


def test_mismatched_syncnet_is_one_line_error(tmp_path):
    """A SyncNet state of another size: the error names mode, size and the differing keys in one line
    (torch's own message runs over many lines, its first says nothing), and `one_line` keeps an empty
    message readable."""
    from syncnet_328 import load_syncnet_checkpoint
    from synctalk.errors import one_line
    from unet_328 import save_checkpoint

    state = build_syncnet("whisper", "328").state_dict()
    save_checkpoint(tmp_path / "s.pth", state, {"kind": "syncnet", "mode": "whisper", "size": "small"})
    with pytest.raises(CheckpointError, match="does not match a SyncNet in mode 'whisper', size 'small': "
                                              "missing keys .*shape mismatches \\[\\('") as err:
        load_syncnet_checkpoint(tmp_path / "s.pth")
    assert "\n" not in str(err.value)
    assert one_line(ValueError("first\nsecond")) == "first"
    assert one_line(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_onnx_export_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_unet("whisper", "small").eval()
    path = export_onnx(model, tmp_path / "unet.onnx")
    image, audio = model.example_inputs(3)
    with torch.no_grad():
        ref = model(image, audio).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(["pred"], {"image": image.numpy(), "audio": audio.numpy()})[0]
    assert np.abs(out - ref).max() < 1e-4


def librosa_reference_mel(wav: np.ndarray) -> np.ndarray:
    import librosa
    from scipy.signal import lfilter

    y = lfilter([1, -0.97], [1], wav)
    spec = np.abs(librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, pad_mode="constant"))
    mel = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) @ spec
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def test_mel_matches_librosa_on_real_speech():
    import soundfile as sf

    wav, sr = sf.read(need_shared(MEDIA / "audio" / "latentsync_demo2_audio.wav"), dtype="float32")
    assert sr == 16000
    wav = wav if wav.ndim == 1 else wav.mean(axis=1)
    ours = melspectrogram(wav)
    ref = librosa_reference_mel(wav.astype(np.float64))
    assert ours.shape == ref.shape == (80, 1 + len(wav) // 200)
    assert np.abs(ours - ref).max() < 1e-3


def test_window_indexing_matches_upstream_examples():
    wav = np.random.default_rng(0).standard_normal(160_000).astype(np.float32) * 0.1  # 10.0 s
    mel = melspectrogram(wav)
    assert mel.shape[1] == 801
    windows = ave_mel_windows(mel)
    assert len(windows) == 247  # L = int((801 - 16) / 80 * 25) + 2
    assert len(pad_ave_features(np.zeros((247, 512), np.float32))) == 249
    # window k starts at floor(3.2 k); the last ones are shifted left to end at M
    np.testing.assert_array_equal(windows[5, 0], mel[:, 16:32])
    np.testing.assert_array_equal(windows[-1, 0], mel[:, 801 - 16:])


def test_audio_window_edges_and_shapes():
    feats = np.arange(20 * 512, dtype=np.float32).reshape(20, 512)
    win = audio_window(feats, 0)
    assert win.shape == audio_input_shape("ave") == (32, 16, 16)
    flat = win.reshape(16, 512)
    assert (flat[:8] == 0).all() and np.array_equal(flat[8], feats[0])  # current frame at position 8
    flat_end = audio_window(feats, 19).reshape(16, 512)
    assert np.array_equal(flat_end[:9], feats[11:20]) and (flat_end[9:] == 0).all()
    whisper = np.ones((30, 2, 384), np.float32)
    assert audio_window(whisper, 10).shape == (48, 16, 16)
