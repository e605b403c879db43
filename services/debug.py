"""Debug recording: generated frames to `debug.frames_dir`, audio to `debug.audio_dir`.

The flags can be switched at run time (`POST /debug/config`); the directories cannot (they come from
the configuration only). File names are built here from a generated session id, never from request
input, and everything written is counted against `debug.max_bytes`.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from synctalk.audio import wav_bytes
from synctalk.fileio import write_bytes_atomic

log = logging.getLogger(__name__)


def _dir_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class DebugRecorder:
    """Writes debug frames and audio when enabled, under the configured folders, within a byte cap."""

    def __init__(self, config: Any):
        self.enabled = bool(config.enabled)
        self.save_frames = bool(config.save_frames)
        self.save_audio = bool(config.save_audio)
        self.frames_dir = Path(config.frames_dir)
        self.audio_dir = Path(config.audio_dir)
        self.max_bytes = int(config.max_bytes)
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes under both folders, measured lazily once
        self._warned = False

    def update(self, **flags: bool | None) -> None:
        """Set any of `enabled`, `save_frames`, `save_audio` (None leaves a flag unchanged)."""
        for name in ("enabled", "save_frames", "save_audio"):
            value = flags.get(name)
            if value is not None:
                setattr(self, name, bool(value))
        if self.enabled:
            for folder in (self.frames_dir, self.audio_dir):
                folder.mkdir(parents=True, exist_ok=True)

    def status(self) -> dict[str, Any]:
        """The flags, folders and bytes used (for /debug/status)."""
        return {"enabled": self.enabled, "save_frames": self.save_frames, "save_audio": self.save_audio,
                "frames_dir": str(self.frames_dir), "audio_dir": str(self.audio_dir),
                "max_bytes": self.max_bytes, "bytes_used": self._usage()}

    @staticmethod
    def new_session(kind: str) -> str:
        """A unique, filesystem-safe session id such as `text_20250101_120000_1a2b3c`."""
        return f"{kind}_{time.strftime('%Y%m%d_%H%M%S')}_{secrets.token_hex(3)}"

    def _usage(self) -> int:
        with self._lock:
            if self._used is None:
                self._used = _dir_bytes(self.frames_dir) + _dir_bytes(self.audio_dir)
            return self._used

    def _write(self, folder: Path, name: str, data: bytes) -> bool:
        self._usage()
        with self._lock:
            assert self._used is not None
            if self._used + len(data) > self.max_bytes:
                if not self._warned:
                    log.warning("debug output cap of %d bytes reached; not writing more", self.max_bytes)
                    self._warned = True
                return False
            self._used += len(data)
        write_bytes_atomic(folder / name, data)
        return True

    def save_audio_clip(self, session: str, audio: np.ndarray, sample_rate: int) -> None:
        """Save `audio` as `<audio_dir>/<session>.wav` when audio saving is on."""
        if self.enabled and self.save_audio:
            self._write(self.audio_dir, f"{session}.wav", wav_bytes(audio, sample_rate))

    def frame_sink(self, session: str) -> Callable[[int, bytes], None] | None:
        """A callback saving frame i as `<frames_dir>/<session>_<i:05d>.jpg`, or None when off."""
        if not (self.enabled and self.save_frames):
            return None

        def sink(index: int, jpeg: bytes) -> None:
            self._write(self.frames_dir, f"{session}_{index:05d}.jpg", jpeg)

        return sink
