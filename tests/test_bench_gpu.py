"""bench/gpu.py on a machine without CUDA: one JSON object saying every CUDA section was skipped."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the benchmark would run for real")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["cuda_available"] is False and "no CUDA device" in report["skipped"]


def test_parity_section_runs_the_demo_model_on_real_held_out_samples():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--sections", "parity"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["seconds"]) == {"parity"}, "only the section asked for runs"
    parity = report["parity"]
    assert parity["samples"] == 16
    assert parity["float32"]["max_abs_diff"] == 0.0  # the same device and precision as the reference
    # the shipped model reconstructs held-out crops far better than a blank or a shifted image would
    assert 0.0 < parity["cpu_fp32_l1_to_real"] < 0.05
    assert parity["float32"]["l1_to_real"] == parity["cpu_fp32_l1_to_real"]
    assert not (REPO / "demo_avatar" / "dataset" / "demo" / "crops_168.npy").exists(), "the cache stays in tmp"


def test_unknown_section_is_one_readable_error():
    run = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--device", "cpu", "--sections", "unet,gpus"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "gpus" in run.stderr.strip().splitlines()[-1]
