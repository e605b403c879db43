"""Helpers shared by the server benchmarks (`bench/server.py`, `bench/live.py`, `bench/soak.py`)."""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_bench_inference() -> ModuleType:
    """bench/inference.py as a module (its avatar and audio builders are reused); the benchmarks run
    as scripts from bench/, so it is a sibling import."""
    import inference  # bench/inference.py (a script folder, not a package)

    return inference


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate a server process, killing it when it has not exited within `timeout` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
