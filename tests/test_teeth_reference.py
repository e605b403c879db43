"""The teeth reference (`train_328.py --teeth_reference`): a third input crop, a training frame that shows
the teeth, chosen by the dataset, saved in the checkpoint and used by the engine and the evaluation."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from test_recipe import add_lip_landmarks
from test_training import FAST, fabricate_dataset, run_py

from synctalk import face as face_crop
from synctalk import metrics
from synctalk.dataset import AvatarDataset, dataset_split, inner_lip_polygons
from synctalk.sizes import audio_input_shape, get_size
from unet_328 import CheckpointError, build_unet, load_unet_checkpoint, save_checkpoint, with_teeth_inputs

N = 40
WHITE = (240, 240, 240)


@pytest.fixture(scope="module")
def toothed(tmp_path_factory):
    """A fabricated dataset whose third-widest training mouth shows a white band of teeth (the two wider
    ones are dark inside); returns (folder, that frame)."""
    d = fabricate_dataset(tmp_path_factory.mktemp("toothed"), n=N)
    add_lip_landmarks(d, N)
    train = dataset_split(d, N, "train")
    area = [metrics.mouth_area(p) for p in inner_lip_polygons(d, N, get_size("small"))[train]]
    toothy = int(train[np.argsort(area, kind="stable")[::-1][2]])
    path = d / "full_body_img" / f"{toothy}.jpg"
    img = cv2.imread(str(path))
    cv2.rectangle(img, (88, 129), (112, 134), WHITE, -1)  # inside the open mouth (centre 100, 132)
    cv2.imwrite(str(path), img)
    return d, toothy


def test_unet_input_with_a_teeth_crop_appends_it_unmasked():
    size = get_size("small")
    rng = np.random.default_rng(4)
    crop, ref, teeth = (rng.integers(0, 255, (size.crop, size.crop, 3), dtype=np.uint8) for _ in range(3))
    x = face_crop.make_unet_input(crop, ref, "small", teeth)
    b, s = size.border, size.inner
    assert x.shape == (9, s, s)
    np.testing.assert_allclose(x[6:], teeth[b:b + s, b:b + s].transpose(2, 0, 1) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(x[:6], face_crop.make_unet_input(crop, ref, "small"))
    with pytest.raises(ValueError, match="crops must be"):
        face_crop.make_unet_input(crop, ref, "small", teeth[:-1])


def test_a_widened_network_computes_what_the_plain_one_did_and_keeps_its_teeth_crop():
    torch.manual_seed(0)
    plain, teeth = build_unet("whisper", "small").eval(), build_unet("whisper", "small", teeth=True).eval()
    teeth.load_state_dict(with_teeth_inputs(plain.state_dict(), 160))
    image, audio = teeth.example_inputs(2)
    assert image.shape[1] == 6  # the inference interface is unchanged
    nine = torch.cat([image, torch.rand(2, 3, 160, 160)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(teeth(nine, audio), plain(image, audio))
        teeth.inc.inconv[0].conv[0].weight.normal_()  # now the teeth channels count
        crop = np.random.default_rng(5).integers(0, 255, (160, 160, 3), dtype=np.uint8)
        teeth.set_teeth(crop)
        stored = torch.from_numpy(crop.transpose(2, 0, 1) / 255.0).float()[None].expand(2, -1, -1, -1)
        torch.testing.assert_close(teeth(image, audio), teeth(torch.cat([image, stored], dim=1), audio))
        assert not torch.allclose(teeth(image, audio), teeth(nine, audio))
    with pytest.raises(CheckpointError, match="expected a 6-input U-Net"):
        with_teeth_inputs(teeth.state_dict(), 160)
    with pytest.raises(ValueError, match="no teeth reference input"):
        plain.set_teeth(crop)


def test_the_dataset_picks_the_frame_showing_teeth_and_feeds_it(toothed):
    d, toothy = toothed
    ds = AvatarDataset(d, "small", split="train", teeth=True, pairs=True)
    assert ds.teeth_frame == toothy and list(ds.teeth_pool) == [toothy]
    image, _, _ = ds[0]
    assert image.shape == (2, 9, 160, 160)  # a pair: both frames see the same teeth crop
    want = torch.from_numpy(ds.interior(toothy).transpose(2, 0, 1) / 255.0).float()
    torch.testing.assert_close(image[0, 6:], want)
    torch.testing.assert_close(image[1, 6:], want)
    val = AvatarDataset(d, "small", split="val", teeth=True)
    assert val.teeth_frame == toothy and all(torch.allclose(val[i][0][6:], want) for i in range(len(val)))
    assert AvatarDataset(d, "small", split="train")[0][0].shape == (6, 160, 160)  # off: as before


def test_a_training_frame_in_the_teeth_pool_never_gets_its_own_crop(toothed, monkeypatch):
    import synctalk.dataset as dataset

    monkeypatch.setattr(dataset, "TEETH_SHARE", 0.25)
    ds = AvatarDataset(toothed[0], "small", split="train", teeth=True)
    pool = [int(f) for f in ds.teeth_pool]
    assert len(pool) >= 5 and pool[0] == toothed[1] and pool != sorted(pool)  # best first, not in order
    drawn = {f: {ds.teeth_for(f, ds.rng(f, epoch)) for epoch in range(20)} for f in pool}
    assert all(f not in got and got <= set(pool) for f, got in drawn.items()), drawn


def test_training_engine_and_checkpoint_with_a_teeth_reference(toothed, tmp_path):
    from synctalk.engine import LipSyncEngine

    d, toothy = toothed
    plain = tmp_path / "plain.pth"
    save_checkpoint(plain, build_unet("whisper", "small").state_dict(), {"kind": "unet", "mode": "whisper",
                                                                         "size": "small"})
    save = tmp_path / "teeth"
    args = ["train_328.py", "--dataset_dir", str(d), "--save_dir", str(save), *FAST, "--batchsize", "2",
            "--val_frames", "2", "--lmd_frames", "0"]
    res = run_py([*args, "--max_steps", "2", "--teeth_reference", "--init_checkpoint", str(plain)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"teeth reference: frame {toothy} for inference" in res.stderr
    model, meta = load_unet_checkpoint(save / "1.pth")
    assert meta["teeth_frame"] == toothy and model.n_channels == 9
    interior = AvatarDataset(d, "small", split="val").interior(toothy)
    torch.testing.assert_close(model.teeth[0], torch.from_numpy(interior.transpose(2, 0, 1) / 255.0).float())

    outputs = {}
    for backend in ("torch", "onnx"):  # the engine feeds 6 channels; the model (and its export) adds the teeth
        eng = LipSyncEngine.load(d, save / "1.pth", backend=backend, batch_size=2)
        windows = np.zeros((3, *audio_input_shape("whisper")), np.float32)
        outputs[backend] = eng.render_crops(windows, [0, 1, 2]).astype(np.int16)
    assert np.abs(outputs["torch"] - outputs["onnx"]).max() <= 2

    again = run_py([*args, "--max_steps", "3", "--resume"])  # resumed without the flag: another network
    assert again.returncode != 0 and "holds another network" in again.stderr
    assert "Traceback" not in again.stderr
    wrong = run_py([*args[:4], str(tmp_path / "other"), *args[5:], "--max_steps", "1",
                    "--init_checkpoint", str(save / "1.pth")])
    assert wrong.returncode != 0 and "train it with --teeth_reference" in wrong.stderr

    state, meta = torch.load(save / "1.pth", weights_only=True).values()
    save_checkpoint(tmp_path / "lost.pth", {k: v for k, v in state.items() if k != "teeth"}, meta)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_unet_checkpoint(tmp_path / "lost.pth")
