"""Shared test fixtures: repository paths, real media from ../shared (skipped when absent)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
MEDIA = SHARED / "media"
ARTIFACTS = REPO / "test-artifacts"

# `fixture_avatar` (session): the synthetic fixture video preprocessed and trained once per session.
# Test modules take it as an argument; importing it into a module would train it again there.
pytest_plugins = ["fixture_avatar"]


def need_shared(path: Path) -> Path:
    """Return `path` under ../shared or skip the test with the reason."""
    if not path.exists():
        pytest.skip(f"test media not available: {path} (../shared is not present on this machine)")
    return path


MIC_PARTS: list = [1.5, "Hello there, how are you doing today?", 2.5, "I am fine, thank you very much.", 2.5]


@pytest.fixture(scope="session")
def mic_wav(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The microphone of the live tests: TTS speech with long silences (`MIC_PARTS`), as a 16 kHz WAV file
    and its samples."""
    from test_live import speech_clip

    from synctalk.audio import write_wav

    audio = speech_clip(MIC_PARTS)
    path = tmp_path_factory.mktemp("mic") / "speech.wav"
    write_wav(path, audio, 16000)
    return path, audio


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session", autouse=True)
def _single_thread_torch():
    """Tests share 2 cores; one intra-op thread is faster and steadier there."""
    import torch

    torch.set_num_threads(1)
