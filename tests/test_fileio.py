"""Atomic writes and the clean-up of temporaries left by killed processes (synctalk/fileio.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from synctalk.fileio import atomic_path, remove_stale_temporaries, temporary_sibling, write_text_atomic


def test_atomic_write_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "report.json"
    write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temporary left


def test_temporary_keeps_the_suffix_and_is_hidden(tmp_path):
    tmp = temporary_sibling(tmp_path / "model.onnx")
    assert tmp.name.startswith(".model.tmp") and tmp.suffix == ".onnx" and str(os.getpid()) in tmp.name


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / "ckpt" / f".3.tmp{dead_pid}.onnx"
    orphan.parent.mkdir()
    orphan.write_bytes(b"x")
    mine = tmp_path / f".aud.tmp{os.getpid()}.wav"
    mine.write_bytes(b"y")
    keep = tmp_path / "aud.wav"
    keep.write_bytes(b"z")
    removed = remove_stale_temporaries(tmp_path)
    assert removed == [orphan] and not orphan.exists() and mine.exists() and keep.exists()
