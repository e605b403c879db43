"""Session fixture `fixture_avatar`: the synthetic fixture video preprocessed and trained (small size).

Used by the training, inference, server and evaluation tests; `tests/conftest.py` loads this file
(`pytest_plugins = ["fixture_avatar"]`), so any test can take `fixture_avatar` as an argument.

It runs the real command lines, in this order, into one session temp folder:

1. `data_utils/process.py DATASET_ROOT/synth/synth.mp4` on a copy of `tests/fixtures/synth_fixture.mp4`,
2. `syncnet_328.py --size small --max_steps SYNCNET_STEPS` -> SYNCNET_ROOT/synth/best.pth,
3. `train_328.py --size small --max_steps UNET_STEPS --use_syncnet` -> CHECKPOINT_ROOT/synth/<epoch>.pth,

about 2-3 minutes of one CPU core in total. The model is small and briefly trained: good enough to
check wiring, shapes, formats and that training moves in the right direction, not for visual quality.
Any failing stage fails every test that uses the fixture, with that stage's stderr in the message.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_VIDEO = REPO / "tests" / "fixtures" / "synth_fixture.mp4"
FIXTURE_GT = REPO / "tests" / "fixtures" / "synth_fixture.gt.json"
NAME = "synth"
SYNCNET_STEPS = 80   # batch 16
UNET_STEPS = 60      # batch 4
UNET_VAL_EVERY = 20  # held-out metrics at steps 20, 40, 60
COMMON = ["--size", "small", "--device", "cpu", "--threads", "1", "--workers", "0"]


@dataclass(frozen=True)
class TrainedAvatar:
    """Where the fixture avatar lives. Stable interface: tests of other modules rely on these names.

    name             avatar name ("synth")
    dataset_root     folder holding `<name>/` (the preprocessed dataset: frames, boxes, features, crops)
    dataset_dir      dataset_root / name
    checkpoint_root  folder holding `<name>/<epoch>.pth` (U-Net, size small, whisper mode)
    checkpoint_path  the final U-Net checkpoint
    save_dir         checkpoint_root / name (also latest.pth, train_log.jsonl, metrics.jsonl, runs/)
    syncnet_root     folder holding `<name>/best.pth` (SyncNet, size small)
    syncnet_path     syncnet_root / name / "best.pth"
    gt_path          the fixture's per-frame ground truth (mouth_open, ...) for the same 350 frames
    timings          seconds per stage: {"process", "syncnet", "unet"}
    """

    name: str
    dataset_root: Path
    dataset_dir: Path
    checkpoint_root: Path
    checkpoint_path: Path
    save_dir: Path
    syncnet_root: Path
    syncnet_path: Path
    gt_path: Path
    timings: dict = field(default_factory=dict)

    def train_log(self) -> list[dict]:
        """U-Net loss terms per step (train_log.jsonl)."""
        return _jsonl(self.save_dir / "train_log.jsonl")

    def val_log(self) -> list[dict]:
        """U-Net held-out metrics per validation (metrics.jsonl)."""
        return _jsonl(self.save_dir / "metrics.jsonl")

    def syncnet_log(self) -> list[dict]:
        """SyncNet held-out accuracy per evaluation (metrics.jsonl)."""
        return _jsonl(self.syncnet_root / self.name / "metrics.jsonl")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_stage(label: str, args: list[str], timeout: float = 600) -> float:
    """Run one command from the repository root; fail the fixture with its stderr tail. Returns seconds."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        pytest.fail(f"fixture_avatar: {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
                    pytrace=False)
    return time.perf_counter() - t0


def build_avatar(root: Path) -> TrainedAvatar:
    """Preprocess and train the fixture avatar under `root` (see the module docstring)."""
    if not FIXTURE_VIDEO.is_file():
        pytest.skip(f"fixture video missing: {FIXTURE_VIDEO}")
    dataset_root, checkpoint_root, syncnet_root = root / "dataset", root / "checkpoint", root / "syncnet_ckpt"
    dataset_dir = dataset_root / NAME
    dataset_dir.mkdir(parents=True)
    video = dataset_dir / f"{NAME}.mp4"
    shutil.copyfile(FIXTURE_VIDEO, video)
    timings = {"process": run_stage("preprocessing", ["data_utils/process.py", str(video)])}
    syncnet_dir, save_dir = syncnet_root / NAME, checkpoint_root / NAME
    timings["syncnet"] = run_stage("SyncNet training", [
        "syncnet_328.py", "--dataset_dir", str(dataset_dir), "--save_dir", str(syncnet_dir), *COMMON,
        "--max_steps", str(SYNCNET_STEPS), "--batchsize", "16", "--log_every", "1"])
    timings["unet"] = run_stage("U-Net training", [
        "train_328.py", "--dataset_dir", str(dataset_dir), "--save_dir", str(save_dir), *COMMON,
        "--max_steps", str(UNET_STEPS), "--batchsize", "4", "--log_every", "1", "--save_every", "1",
        "--val_every", str(UNET_VAL_EVERY), "--lmd_frames", "6", "--use_syncnet",
        "--syncnet_checkpoint", str(syncnet_dir / "best.pth")])
    checkpoints = sorted((int(p.stem), p) for p in save_dir.glob("*.pth") if p.stem.isdigit())
    assert checkpoints, f"no <epoch>.pth in {save_dir}"
    return TrainedAvatar(NAME, dataset_root, dataset_dir, checkpoint_root, checkpoints[-1][1], save_dir,
                         syncnet_root, syncnet_dir / "best.pth", FIXTURE_GT, timings)


@pytest.fixture(scope="session")
def fixture_avatar(tmp_path_factory) -> TrainedAvatar:
    """The synthetic fixture, preprocessed and trained once per test session (see TrainedAvatar)."""
    return build_avatar(tmp_path_factory.mktemp("fixture_avatar"))
