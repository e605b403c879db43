"""The timing contract every module shares: 16 kHz mono audio, 25 fps video, 640 samples per frame,
and the U-Net's 16-frame audio window. These are data-format constants (upstream datasets and
checkpoints are built on them), not settings: nothing else defines them."""
from __future__ import annotations

SAMPLE_RATE = 16000  # Hz, mono float32 everywhere inside the library
FPS = 25  # video frames per second of datasets, renders and streams
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640 samples = 40 ms of audio per video frame
FRAME_SECONDS = 1.0 / FPS
WINDOW = 16  # audio feature rows per network input: rows [i - 8, i + 8) for video frame i
FUTURE_ROWS = WINDOW // 2 - 1  # frame i needs feature rows up to i + 7


def frames_for_samples(n_samples: int) -> int:
    """Number of video frames for `n_samples` of audio: round(25 x duration)."""
    return int(round(n_samples / SAMPLES_PER_FRAME))
