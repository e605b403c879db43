"""Packaging an avatar for shipping (scripts/package_demo_avatar.py): whole utterances renumbered, the
held-out ones kept so `evaluate.py` works on the package, avatar.json (attribution, rendered idle), fp16
weights; and the contact sheet (scripts/contact_sheet.py) made from the package."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO
from fixture_avatar import fixture_avatar  # noqa: F401

from synctalk.avatar import AvatarRegistry, AvatarRoot
from synctalk.engine import LipSyncEngine

UTT = 50  # frames per fabricated utterance


@pytest.fixture(scope="module")
def package(fixture_avatar, tmp_path_factory):  # noqa: F811
    """The fixture avatar's dataset cut into utterances (two held out) and packaged with 2 loop utterances."""
    root = tmp_path_factory.mktemp("pkg")
    src = root / "src" / "synth"
    src.mkdir(parents=True)
    for item in fixture_avatar.dataset_dir.iterdir():
        if item.name != "utterances.json":
            os.symlink(item, src / item.name)
    n = len(np.load(src / "crop_boxes.npy"))
    utts = [{"name": f"u{k}", "start": k * UTT, "end": (k + 1) * UTT, "silences": [[k * UTT, k * UTT + 10]]}
            for k in range(n // UTT)]
    held = [utts[3]["name"], utts[5]["name"]]
    (src / "utterances.json").write_text(json.dumps({"utterances": utts, "held_out": held}))
    out = root / "demo_avatar"
    res = subprocess.run([sys.executable, "scripts/package_demo_avatar.py", "--source", str(src), "--checkpoint",
                          str(fixture_avatar.checkpoint_path), "--idle_utterances", "2", "--attribution",
                          "Credit: a test line", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return src, out, json.loads(res.stdout)


def test_package_keeps_whole_utterances_renumbered(package):
    src, out, summary = package
    ds = out / "dataset" / "demo"
    assert summary["frames"] == 4 * UTT and summary["utterances"] == 4
    data = json.loads((ds / "utterances.json").read_text())
    assert [(u["name"], u["start"], u["end"]) for u in data["utterances"]] == [
        ("u0", 0, 50), ("u1", 50, 100), ("u3", 100, 150), ("u5", 150, 200)]
    assert data["held_out"] == ["u3", "u5"] and data["utterances"][2]["silences"] == [[100, 110]]
    source_frames = np.r_[0:100, 150:200, 250:300]
    assert np.array_equal(np.load(ds / "crop_boxes.npy"), np.load(src / "crop_boxes.npy")[source_frames])
    assert np.array_equal(np.load(ds / "aud_whisper.npy"), np.load(src / "aud_whisper.npy")[source_frames])
    audio, sr = sf.read(str(ds / "aud.wav"), dtype="int16")
    whole, _ = sf.read(str(src / "aud.wav"), dtype="int16")
    assert sr == 16000 and len(audio) == 200 * 640
    assert np.array_equal(audio[100 * 640:150 * 640], whole[150 * 640:200 * 640])
    frame = cv2.imread(str(ds / "full_body_img" / "100.jpg")).astype(float)
    assert np.abs(frame - cv2.imread(str(src / "full_body_img" / "150.jpg"))).mean() < 3  # re-encoded JPEG
    state = torch.load(next((out / "checkpoint" / "demo").glob("*.pth")), weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())


def test_registry_reads_the_attribution_and_idle_mode(package):
    _, out, _ = package
    info = AvatarRegistry([AvatarRoot(out / "dataset", out / "checkpoint", "demo")]).find("demo")
    assert info.attribution == "Credit: a test line" and info.idle == "rendered"
    assert info.public()["attribution"] == "Credit: a test line"


def test_rendered_idle_shows_the_model_mouth_for_silence(package):
    _, out, _ = package
    info = AvatarRegistry([AvatarRoot(out / "dataset", out / "checkpoint", "demo")]).find("demo")
    engine = LipSyncEngine.load(info.dataset_dir, info.checkpoint_path, idle=info.idle)
    recorded = engine.frames.get(3)
    idle = engine.idle_frame(3)
    x1, y1, x2, y2 = engine.boxes[3]
    outside = np.ones(recorded.shape[:2], bool)
    outside[y1:y2, x1:x2] = False
    assert np.array_equal(idle[outside], recorded[outside]), "only the face crop is re-rendered"
    assert np.abs(idle.astype(int) - recorded.astype(int))[y1:y2, x1:x2].mean() > 0.5
    silence = engine.render(engine.silence_window(), [3])[0]
    assert np.array_equal(idle, silence) and np.array_equal(engine.idle_frame(3), idle)
    plain = LipSyncEngine.load(info.dataset_dir, info.checkpoint_path)
    assert np.array_equal(plain.idle_frame(3), recorded)


def test_evaluate_and_contact_sheet_work_on_the_package(package, tmp_path):
    _, out, _ = package
    res = subprocess.run([sys.executable, "evaluate.py", "--name", "demo", "--dataset_root", str(out / "dataset"),
                          "--checkpoint_root", str(out / "checkpoint"), "--references", "closed",
                          "--max_frames", "40", "--out", str(tmp_path / "eval")], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["split"]["kind"] == "utterances" and report["self_reconstruction"]["frames"] == 40
    env = dict(os.environ, SYNCTALK_PATHS__DATASET_ROOT=str(out / "dataset"),
               SYNCTALK_PATHS__CHECKPOINT_ROOT=str(out / "checkpoint"))
    sheet = tmp_path / "sheet.jpg"
    res = subprocess.run([sys.executable, "scripts/contact_sheet.py", "--name", "demo", "--speech", "3",
                          "--silence", "2", "--out", str(sheet)], cwd=REPO, capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    assert len(info["frames"]) == 5 and all(100 <= f < 200 for f in info["frames"])  # held-out frames only
    image = cv2.imread(str(sheet))
    assert image.shape[0] == 24 + 4 * 192 and image.shape[1] == 170 + 5 * 192
