"""Issue 21, crash safety: `kill -9` of preprocessing and of training at a random (seeded) moment, then a
rerun. The rerun resumes and completes, its results equal those of a run never interrupted, and after every
kill each visible output is complete (temporaries are hidden names, `.*.tmp<pid>*` / `.tmp_*`, that no
reader opens): the `.npy`/`.npz` files load, JSON parses, the WAV reads, image folders hold every frame.

Runs the real command lines on the small fixture video (`tests/fixtures/synth_fixture.mp4`), the small
U-Net and a few steps: about 1-2 minutes of one CPU core."""
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
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
VIDEO = REPO / "tests" / "fixtures" / "synth_fixture.mp4"
SEED = 2109
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TRAIN_STEPS = 12
TRAIN_ARGS = ["--size", "small", "--device", "cpu", "--threads", "1", "--workers", "0", "--batchsize", "4",
              "--max_steps", str(TRAIN_STEPS), "--log_every", "1", "--save_every", "1", "--latest_every", "2",
              "--val_every", "0", "--lmd_frames", "0", "--val_frames", "4"]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """`python <args>` from the repository root, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=out, stderr=out)


def run(args: list[str], log: Path, timeout: float = 300) -> None:
    """Run to completion; fail with the log's tail otherwise."""
    proc = start(args, log)
    if proc.wait(timeout) != 0:
        pytest.fail(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")


def kill_after(proc: subprocess.Popen, delay_s: float) -> bool:
    """SIGKILL `proc` after `delay_s` seconds; False when it had already finished."""
    try:
        proc.wait(delay_s)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def visible(folder: Path) -> list[Path]:
    """Files and folders a reader would open (no hidden temporaries)."""
    return [p for p in folder.iterdir() if not p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------
# Preprocessing


def check_dataset_outputs(out: Path) -> list[str]:
    """Every visible output of `data_utils/process.py` is complete; returns their names."""
    stages = json.loads((out / ".stages.json").read_text()) if (out / ".stages.json").exists() else {"stages": {}}
    n_frames = stages["stages"].get("audio", {}).get("result", {}).get("info", {}).get("n_frames")
    for path in visible(out):
        if path.suffix == ".npy":
            np.load(path, mmap_mode="r")[-1]  # a truncated array fails to map
        elif path.suffix == ".npz":
            dict(np.load(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".wav":
            assert sf.info(str(path)).frames > 0
        elif path.is_dir() and path.name in ("full_body_img", "landmarks"):
            files = sorted(path.iterdir(), key=lambda p: int(p.stem))
            assert n_frames is not None and len(files) == n_frames, (path.name, len(files), n_frames)
            if path.name == "full_body_img":
                assert cv2.imread(str(files[-1])) is not None
            else:
                assert len(files[-1].read_text().split()) >= 2 * 468
    for name, rec in stages["stages"].items():  # a stage marked complete has its outputs
        if name == "audio":
            assert (out / "aud.wav").is_file()
        elif name == "frames":
            assert (out / "crop_boxes.npy").is_file() and (out / "full_body_img").is_dir()
        elif name == "features":
            assert (out / rec["result"]["file"]).is_file()
    return sorted(p.name for p in visible(out))


def preprocess_args(out: Path) -> list[str]:
    return ["data_utils/process.py", str(out / "synth.mp4"), "--quiet"]


@pytest.fixture(scope="module")
def clean_dataset(tmp_path_factory) -> Path:
    """The fixture video preprocessed by one uninterrupted run."""
    folder = tmp_path_factory.mktemp("clean") / "synth"
    folder.mkdir()
    shutil.copyfile(VIDEO, folder / "synth.mp4")
    run(preprocess_args(folder), folder.parent / "process.log")
    return folder


def test_preprocessing_killed_at_random_moments_resumes_to_the_same_result(tmp_path, clean_dataset):
    rng = np.random.default_rng(SEED)
    killed_dir, clean_dir = tmp_path / "killed" / "synth", clean_dataset
    killed_dir.mkdir(parents=True)
    shutil.copyfile(VIDEO, killed_dir / "synth.mp4")
    log = tmp_path / "process.log"
    kills = 0
    for delay in rng.uniform(2.0, 9.0, size=3):  # imports take a few seconds, the stages about 5 s
        proc = start(preprocess_args(killed_dir), log)
        if not kill_after(proc, float(delay)):
            assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]
            break
        kills += 1
        print(f"killed after {delay:.2f} s; complete outputs: {check_dataset_outputs(killed_dir)}")
    assert kills >= 1, "no run was killed: the kill moments are too late for this machine"
    run(preprocess_args(killed_dir), log)
    assert check_dataset_outputs(killed_dir) == check_dataset_outputs(clean_dir)
    for name in ("crop_boxes.npy", "crops_328.npy", "aud_whisper.npy"):
        a, b = np.load(killed_dir / name), np.load(clean_dir / name)
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), name
    assert sf.read(killed_dir / "aud.wav")[0].tolist() == sf.read(clean_dir / "aud.wav")[0].tolist()
    assert not [p.name for p in killed_dir.iterdir() if p.name.startswith(".tmp") or ".old" in p.name]


# ----------------------------------------------------------------------------------------------
# Training


def check_checkpoint_outputs(save_dir: Path) -> int:
    """Every visible output of `train_328.py` is complete; returns the step `latest.pth` holds (0 if none)."""
    step = 0
    for path in visible(save_dir):
        if path.suffix == ".pth":
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if path.name == "latest.pth":
                step = int(blob["step"])
        elif path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)  # (the last line may be cut by the kill: a resume drops it)
    return step


def train_args(dataset_dir: Path, save_dir: Path, resume: bool) -> list[str]:
    return ["train_328.py", "--dataset_dir", str(dataset_dir), "--save_dir", str(save_dir), *TRAIN_ARGS,
            *(["--resume"] if resume else [])]


def test_training_killed_at_a_random_moment_resumes_and_completes(tmp_path, clean_dataset):
    rng = np.random.default_rng(SEED + 1)
    dataset_dir = clean_dataset
    save_dir, log = tmp_path / "ckpt" / "synth", tmp_path / "train.log"
    proc = start(train_args(dataset_dir, save_dir, resume=False), log)
    deadline = time.time() + 240
    while not (save_dir / "latest.pth").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (save_dir / "latest.pth").exists(), log.read_text(errors="replace")[-3000:]
    assert kill_after(proc, float(rng.uniform(0.0, 1.5))), "training finished before the kill"
    resumed_from = check_checkpoint_outputs(save_dir)
    print(f"training killed; latest.pth holds step {resumed_from}")
    assert 0 < resumed_from < TRAIN_STEPS
    run(train_args(dataset_dir, save_dir, resume=True), log)
    assert check_checkpoint_outputs(save_dir) == TRAIN_STEPS
    assert "resuming from" in log.read_text(errors="replace")
    steps = [json.loads(line)["step"] for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TRAIN_STEPS + 1)), steps  # nothing lost, nothing twice
    final = sorted(int(p.stem) for p in save_dir.glob("*.pth") if p.stem.isdigit())
    assert final, list(save_dir.iterdir())
    torch.load(save_dir / f"{final[-1]}.pth", map_location="cpu", weights_only=True)


def test_a_log_line_cut_by_a_kill_does_not_stop_a_resume(tmp_path):
    from synctalk.trainkit import JsonlLog

    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # killed while appending step 3
    JsonlLog(path, True, resume_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
