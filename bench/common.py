"""Helpers shared by the server benchmarks (`bench/server.py`, `bench/live.py`)."""
from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_bench_inference():
    """bench/inference.py as a module (its avatar and audio builders are reused)."""
    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
