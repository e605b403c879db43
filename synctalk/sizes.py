"""Model sizes and audio-feature modes: the geometry every network, dataset and engine agrees on,
plus the 16-frame audio window the networks read (torch-free, so data tools can import it)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synctalk.timing import WINDOW

# ----------------------------------------------------------------------------------------------
# Model size presets


@dataclass(frozen=True)
class ModelSize:
    """Geometry and widths of one model size. `crop` is the cached/pasted square, `inner` the model's
    input/output (the crop without its `border`-px ring)."""

    name: str
    crop: int
    inner: int
    widths: tuple[int, int, int, int, int]  # U-Net encoder widths, upstream (32, 64, 128, 256, 512)
    syncnet_scale: float  # SyncNet channel multiplier (1.0 = upstream)

    @property
    def border(self) -> int:
        return (self.crop - self.inner) // 2

    @property
    def bottleneck(self) -> int:
        """Spatial side of the U-Net bottleneck (inner / 32)."""
        return self.inner // 32


SIZE_PRESETS: dict[str, ModelSize] = {
    "328": ModelSize("328", crop=328, inner=320, widths=(32, 64, 128, 256, 512), syncnet_scale=1.0),
    "small": ModelSize("small", crop=168, inner=160, widths=(16, 32, 64, 128, 256), syncnet_scale=0.5),
}


def get_size(name: str | int) -> ModelSize:
    """Look up a size preset by name ('328' or 'small'); a clear error for anything else."""
    key = str(name)
    if key not in SIZE_PRESETS:
        raise ValueError(f"unknown model size {key!r}; choose one of {sorted(SIZE_PRESETS)}")
    return SIZE_PRESETS[key]


# ----------------------------------------------------------------------------------------------
# Audio feature modes: per-frame feature shape and network input channels

# mode -> (per-frame feature shape, U-Net audio input (C, H, W))
AUDIO_MODES: dict[str, tuple[tuple[int, ...], tuple[int, int, int]]] = {
    "ave": ((512,), (32, 16, 16)),
    "hubert": ((2, 1024), (32, 32, 32)),
    "wenet": ((16, 512), (256, 16, 32)),
    "whisper": ((2, 384), (48, 16, 16)),
}


def audio_input_shape(mode: str) -> tuple[int, int, int]:
    """(C, H, W) of the audio tensor the networks take in `mode`."""
    if mode not in AUDIO_MODES:
        raise ValueError(f"unknown audio mode {mode!r}; choose one of {sorted(AUDIO_MODES)}")
    return AUDIO_MODES[mode][1]


def audio_window(features: np.ndarray, index: int, mode: str | None = None) -> np.ndarray:
    """The network's audio input for video frame `index`: feature rows [index-8, index+8), zero-filled
    outside [0, N), flattened row-major to (C, H, W) of the mode (inferred from the feature shape)."""
    n = len(features)
    per_frame = features.shape[1:]
    if mode is None:
        mode = next((m for m, (shape, _) in AUDIO_MODES.items() if shape == per_frame), None)
        if mode is None:
            raise ValueError(f"no audio mode has per-frame features of shape {per_frame}")
    window = np.zeros((WINDOW, *per_frame), dtype=np.float32)
    lo, hi = index - WINDOW // 2, index + WINDOW // 2
    src_lo, src_hi = max(lo, 0), min(hi, n)
    if src_hi > src_lo:
        window[src_lo - lo: src_hi - lo] = features[src_lo:src_hi]
    return window.reshape(audio_input_shape(mode))
