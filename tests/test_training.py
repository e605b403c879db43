"""Training: datasets, SyncNet and U-Net trainers, resume, DDP, the pipeline script.

Fast tests run on a small fabricated dataset (a drawn face whose mouth opening is written into the
audio features); the acceptance tests read the logs of the shared `fixture_avatar` training."""
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
import torch
from conftest import REPO

FAST = ["--size", "small", "--device", "cpu", "--threads", "1", "--workers", "0"]


def fabricate_dataset(root: Path, name: str = "fake", n: int = 60, side: int = 200, seed: int = 0,
                      trailing_silence: int = 0) -> Path:
    """A preprocessed-looking dataset: frames, crop boxes, whisper-shaped features that encode the mouth
    opening, and aud.wav (a tone whose loudness follows the opening, then `trailing_silence` silent
    frames)."""
    rng = np.random.default_rng(seed)
    d = root / name
    (d / "full_body_img").mkdir(parents=True)
    opening = np.clip(np.convolve(rng.random(n + 8), np.ones(5) / 5, "same")[4:4 + n] * 1.6 - 0.3, 0, 1)
    opening[n - trailing_silence:] = 0
    boxes = np.zeros((n, 4), np.int32)
    for i in range(n):
        img = np.full((side, side, 3), (90, 120, 160), np.uint8)
        cv2.circle(img, (side // 2, side // 2), side // 3, (120, 160, 210), -1)
        cv2.ellipse(img, (side // 2, int(side * 0.66)), (side // 8, int(2 + side * 0.08 * opening[i])),
                    0, 0, 360, (40, 30, 120), -1)
        cv2.imwrite(str(d / "full_body_img" / f"{i}.jpg"), img)
        boxes[i] = (side // 4 + i % 3, side // 2 - 10, side * 3 // 4 + i % 3, side - 10)
    np.save(d / "crop_boxes.npy", boxes)
    pattern = rng.standard_normal((2, 384)).astype(np.float32)
    feats = opening[:, None, None].astype(np.float32) * pattern
    np.save(d / "aud_whisper.npy", feats + 0.05 * rng.standard_normal(feats.shape).astype(np.float32))
    import soundfile as sf

    t = np.arange(640) / 16000
    wav = np.concatenate([0.5 * max(o, 0.05 if i < n - trailing_silence else 0) * np.sin(2 * np.pi * 220 * t)
                          for i, o in enumerate(opening)]).astype(np.float32)
    sf.write(str(d / "aud.wav"), wav, 16000, subtype="PCM_16")
    return d


@pytest.fixture(scope="module")
def fake_dataset(tmp_path_factory) -> Path:
    return fabricate_dataset(tmp_path_factory.mktemp("fake"), n=60)


def run_py(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env, **kw)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
# Datasets


def test_split_is_disjoint_guarded_and_skips_trailing_silence(tmp_path):
    from synctalk.dataset import GUARD, dataset_split, split_frames

    val, train = split_frames(350, "val"), split_frames(350, "train")
    assert list(val) == list(range(315, 350)) and train.max() == 315 - GUARD - 1
    d = fabricate_dataset(tmp_path, n=200, trailing_silence=40)
    val, train = dataset_split(d, 200, "val"), dataset_split(d, 200, "train")
    assert len(val) == 20 and np.all(np.diff(val) == 1)
    assert 160 <= val[-1] + 1 <= 163, "the held-out block ends where the speech ends (+ margin)"
    assert not set(val) & set(train)
    assert np.abs(train[:, None] - val[None, :]).min() > GUARD
    assert train.max() == 199, "the silent tail after the held-out block is trained on"


def test_crop_cache_is_built_once_with_the_inference_crop(fake_dataset):
    from synctalk import face as face_crop
    from synctalk.dataset import ensure_crop_cache

    path = ensure_crop_cache(fake_dataset, "small")
    cache = np.load(path, mmap_mode="r")
    assert path.name == "crops_168.npy" and cache.shape == (60, 168, 168, 3) and cache.dtype == np.uint8
    boxes = face_crop.dataset_crop_boxes(fake_dataset)
    frame = cv2.imread(str(fake_dataset / "full_body_img" / "7.jpg"))
    np.testing.assert_array_equal(cache[7], face_crop.crop_face(frame, boxes[7], 168))
    mtime = path.stat().st_mtime_ns
    assert ensure_crop_cache(fake_dataset, "small") == path and path.stat().st_mtime_ns == mtime
    assert not list(fake_dataset.glob(".crops_*")), "no temp file left behind"


def test_unet_samples_follow_upstream_construction(fake_dataset):
    from synctalk import face as face_crop
    from synctalk.dataset import AvatarDataset

    ds = AvatarDataset(fake_dataset, "small", split="train")
    assert ds.mode == "whisper" and len(ds) == 60 - 6 - 8
    image, audio, label = ds[(0, 5)]
    assert image.shape == (6, 160, 160) and audio.shape == (48, 16, 16) and label.shape == (3, 160, 160)
    frame = int(ds.frames[5])
    np.testing.assert_allclose(label.numpy(), ds.interior(frame).transpose(2, 0, 1) / 255.0, atol=1e-6)
    # masked half: the face_crop mask rectangle is black, the border ring is the target's
    x, y, w, h = face_crop.mask_rect(160)
    assert float(image[3:, y:y + h, x:x + w].abs().max()) == 0.0
    np.testing.assert_allclose(image[3:, :2].numpy(), label[:, :2].numpy(), atol=1e-6)
    # reference: another training frame, a pure function of (epoch, frame)
    refs = {ds.reference_for(frame, ds.rng(frame, e)) for e in range(20)}
    assert frame not in refs and len(refs) > 5 and refs <= set(ds.train_frames.tolist())
    assert torch.equal(ds[(3, 5)][0], ds[(3, 5)][0]) and not torch.equal(ds[(3, 5)][0], ds[(4, 5)][0])


def test_syncnet_pairs_are_balanced_and_off_sync(fake_dataset):
    from synctalk.dataset import MIN_SHIFT, SyncNetDataset

    val = SyncNetDataset(fake_dataset, "small", split="val")
    labels = [float(val[i][2]) for i in range(len(val))]
    assert len(val) == 2 * len(val.frames) and sum(labels) == len(val.frames)
    train = SyncNetDataset(fake_dataset, "small", split="train")
    members = set(train.frames.tolist())
    for frame in train.frames[::5]:
        for e in range(4):
            neg = train.negative_for(int(frame), train.rng(int(frame), e))
            assert abs(neg - frame) >= MIN_SHIFT and neg in members
    trip = SyncNetDataset(fake_dataset, "small", split="train", triplets=True)
    face, own, shifted, frame = trip[(0, 3)]
    assert face.shape == (3, 160, 160) and own.shape == shifted.shape == (48, 16, 16)
    assert not torch.equal(own, shifted)


def test_missing_dataset_is_one_line_with_the_fix(tmp_path, capsys):
    import train_328
    from synctalk import train_syncnet

    for main in (train_328.main, train_syncnet.main):
        rc = main(["--dataset_dir", str(tmp_path / "nobody"), "--save_dir", str(tmp_path / "out"), *FAST])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: dataset folder not found") and err.count("\n") == 1
        assert "data_utils/process.py" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = train_328.main(["--dataset_dir", str(empty), "--save_dir", str(tmp_path / "out"), *FAST])
    assert rc == 2 and "aud_whisper.npy" in capsys.readouterr().err
    assert not (tmp_path / "out" / "latest.pth").exists()


# ----------------------------------------------------------------------------------------------
# Losses and schedule


def test_sync_loss_is_defined_for_negative_cosines():
    import torch.nn.functional as F

    from syncnet_328 import SyncHead, build_syncnet
    from synctalk.train_syncnet import triplet_loss

    head = SyncHead()
    a = F.normalize(torch.randn(8, 32), dim=1)
    logits = head(a, -a)  # cosine -1: upstream's BCELoss(cos) raises here
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros(8))
    assert torch.isfinite(loss) and loss.item() < 1e-3
    net = build_syncnet("whisper", "small")
    face, audio = net.example_inputs(4)
    loss, acc = triplet_loss(net, head, face, audio, torch.randn_like(audio), torch.tensor([0, 10, 20, 30]))
    loss.backward()
    assert torch.isfinite(loss) and 0.0 <= acc <= 1.0 and head.scale.grad is not None


def test_generator_loss_terms_and_local_only_vgg(tmp_path, monkeypatch):
    import train_328
    from syncnet_328 import build_syncnet

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert train_328.vgg19_weights_file() is None  # never downloaded
    from torchvision.models.vgg import cfgs, make_layers

    state = {f"features.{k}": v for k, v in make_layers(cfgs["E"])[:15].state_dict().items()}
    path = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert train_328.vgg19_weights_file() == path
    vgg = train_328.VGGFeatures(path)
    syncnet = build_syncnet("whisper", "small")
    loss = train_328.GeneratorLoss(160, 1.0, 0.2, "auto", 0.05, 0.01, syncnet, (10.0, -5.0), vgg)
    assert loss.active() == {"l1": 1.0, "ssim": 0.2, "sync": 0.05, "perceptual": 0.01}
    assert loss.ssim_kind == "ssim"  # MS-SSIM needs more than 160 px
    pred = torch.rand(2, 3, 160, 160, requires_grad=True)
    total, terms = loss(pred, torch.rand(2, 3, 160, 160), torch.randn(2, 48, 16, 16))
    total.backward()
    assert set(terms) == {"l1", "ssim", "sync", "perceptual"} and pred.grad is not None
    assert all(p.grad is None for p in syncnet.parameters()), "the SyncNet stays frozen"
    loss.train()
    assert not syncnet.training and not vgg.training


def test_cosine_schedule_with_warmup():
    from synctalk.trainkit import cosine_with_warmup

    f = cosine_with_warmup(1000, 500, 0.05)  # warm-up capped at 5 % = 50 steps
    assert f(0) == pytest.approx(1 / 50) and f(49) == pytest.approx(1.0)
    values = [f(s) for s in range(50, 1000)]
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(0.05, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# Trainers: resume, DDP, the pipeline script


def test_kill_and_resume_continues_the_same_loss_curve(fake_dataset, tmp_path):
    """An uninterrupted run and a SIGKILLed + --resume'd one log identical per-step losses."""
    args = ["train_328.py", "--dataset_dir", str(fake_dataset), *FAST, "--batchsize", "2", "--max_steps", "12",
            "--latest_every", "3", "--log_every", "1", "--val_frames", "2", "--lmd_frames", "0", "--ema"]
    ref = run_py(args + ["--save_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-2000:]
    save = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, *args, "--save_dir", str(save)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved_step = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (save / "latest.pth").is_file():
                saved_step = torch.load(save / "latest.pth", weights_only=True)["step"]
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert saved_step is not None and saved_step < 12, "the run must be killed mid-way"
    res = run_py(args + ["--save_dir", str(save), "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"at epoch 0, step {saved_step}" in res.stderr
    expected, got = jsonl(tmp_path / "ref" / "train_log.jsonl"), jsonl(save / "train_log.jsonl")
    assert [e["step"] for e in got] == list(range(1, 13))
    assert [e["loss"] for e in got] == [e["loss"] for e in expected]  # bit-for-bit
    a = torch.load(tmp_path / "ref" / "latest.pth", weights_only=True)
    b = torch.load(save / "latest.pth", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12
    assert all(torch.equal(a["ema"]["weights"][k], b["ema"]["weights"][k]) for k in a["ema"]["weights"])


def test_ddp_two_cpu_processes(fake_dataset, tmp_path):
    save = tmp_path / "ddp"
    proc = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_328.py",
                   "--dataset_dir", str(fake_dataset), "--save_dir", str(save), *FAST, "--batchsize", "2",
                   "--max_steps", "3", "--log_every", "1", "--val_frames", "2", "--lmd_frames", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.endswith(".pth")]
    assert lines == [str(save / "1.pth")], "rank 0 alone reports the checkpoint"
    log = jsonl(save / "train_log.jsonl")
    assert [e["step"] for e in log] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)
    blob = torch.load(save / "latest.pth", weights_only=True)
    assert len(blob["rng"]) == 2 and blob["step"] == 3
    assert not any(k.startswith("module.") for k in blob["state_dict"])


def test_training_script_runs_all_stages(fake_dataset, tmp_path):
    root = tmp_path / "roots"
    shutil.copytree(fake_dataset, root / "dataset" / "fake")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, EVALUATE=str(tmp_path / "none.py"),
               SYNCTALK_PATHS__DATASET_ROOT=str(root / "dataset"),
               SYNCTALK_PATHS__CHECKPOINT_ROOT=str(root / "checkpoint"),
               SYNCTALK_PATHS__SYNCNET_ROOT=str(root / "syncnet_ckpt"),
               SYNCNET_ARGS="--max_steps 2 --batchsize 4 --threads 1 --workers 0")
    proc = subprocess.run(["bash", str(REPO / "training_328.sh"), "fake", "cpu", "--size", "small",
                           "--max_steps", "2", "--batchsize", "2", "--threads", "1", "--workers", "0",
                           "--val_frames", "2", "--lmd_frames", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "preprocessing skipped" in proc.stderr and "evaluation step is skipped" in proc.stderr
    final = proc.stdout.strip().splitlines()[-1]
    assert final == f"final checkpoint: {root / 'checkpoint' / 'fake' / '1.pth'}"
    from unet_328 import load_unet_checkpoint

    _, meta = load_unet_checkpoint(root / "checkpoint" / "fake" / "1.pth")
    assert meta["size"] == "small" and meta["dataset"] == "fake"
    sync_meta = torch.load(root / "syncnet_ckpt" / "fake" / "best.pth", weights_only=True)["meta"]
    assert sync_meta["kind"] == "syncnet" and sync_meta["size"] == "small"


def test_training_script_stops_at_the_first_failing_stage(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, SYNCTALK_PATHS__DATASET_ROOT=str(tmp_path))
    proc = subprocess.run(["bash", str(REPO / "training_328.sh"), "ghost", "cpu"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "error: video not found" in proc.stderr and "stage 2" not in proc.stderr
    proc = subprocess.run(["bash", str(REPO / "training_328.sh"), "ghost", "gpu0"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "GPU_ID must be" in proc.stderr


# ----------------------------------------------------------------------------------------------
# Acceptance on the synthetic fixture (shared session training)


def test_fixture_syncnet_beats_chance_on_held_out_pairs(fixture_avatar):  # noqa: F811
    meta = torch.load(fixture_avatar.syncnet_path, weights_only=True)["meta"]
    assert meta["kind"] == "syncnet" and meta["size"] == "small" and meta["mode"] == "whisper"
    evals = fixture_avatar.syncnet_log()
    assert meta["accuracy"] == max(e["accuracy"] for e in evals), "best.pth keeps the best held-out accuracy"
    best = next(e for e in evals if e["accuracy"] == meta["accuracy"])
    # chance is 0.5 on these exactly balanced pairs; 80 CPU steps on 300 frames is a very short training
    assert meta["accuracy"] >= 0.6 and best["auc"] >= 0.6, (
        f"held-out accuracy {meta['accuracy']:.3f}, AUC {best['auc']:.3f} on {best['pairs']} pairs")


def test_fixture_unet_loss_falls_and_mouth_landmarks_improve(fixture_avatar):  # noqa: F811
    log = fixture_avatar.train_log()
    first, last = np.mean([e["loss"] for e in log[:5]]), np.mean([e["loss"] for e in log[-5:]])
    assert last <= 0.7 * first, f"loss {first:.4f} -> {last:.4f}"
    assert {"l1", "ssim", "sync"} <= set(log[-1])
    val = fixture_avatar.val_log()
    assert len(val) >= 2 and all("mouth_lmd" in v for v in val), val
    assert val[-1]["mouth_lmd"] < val[0]["mouth_lmd"], [v["mouth_lmd"] for v in val]


def test_fixture_checkpoint_describes_itself(fixture_avatar):  # noqa: F811
    from unet_328 import load_unet_checkpoint

    model, meta = load_unet_checkpoint(fixture_avatar.checkpoint_path)
    assert meta["kind"] == "unet" and meta["mode"] == "whisper" and meta["size"] == "small"
    assert meta["dataset"] == fixture_avatar.name and meta["step"] > 0 and "psnr" in meta["val"]
    assert (fixture_avatar.save_dir / "runs").is_dir()
    assert (fixture_avatar.dataset_dir / "crops_168.npy").is_file()


def test_cuda_out_of_memory_suggests_a_smaller_batch(monkeypatch, capsys, tmp_path):
    import train_328

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_328, "train", out_of_memory)
    rc = train_328.main(["--dataset_dir", str(tmp_path), "--save_dir", str(tmp_path / "o"), "--batchsize", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "error: CUDA out of memory at --batchsize 8; try a smaller --batchsize (e.g. 4)\n"


def test_ema_warms_up_instead_of_keeping_the_initial_weights():
    """With decay 0.999 and no warm-up, 400 steps would leave 67% of the random init in the average."""
    from train_328 import EMA

    model = torch.nn.Linear(4, 4)
    ema = EMA(model, 0.999)
    with torch.no_grad():
        for _ in range(50):
            model.weight.add_(1.0)
            ema.update(model)
    gap = (ema.model.weight - model.weight).abs().mean().item()
    assert gap < 10.0, gap  # a plain 0.999 average would still lag by about 49
    assert ema.state_dict()["updates"] == 50
