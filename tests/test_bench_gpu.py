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
