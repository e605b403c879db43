"""Upstream-compatible utility module: the names SyncTalk_2D scripts import from `utils`, each
defined once in the `synctalk` package (sizes, audio window, AVE mel/encoder, timing), plus
`count_parameters`."""
from __future__ import annotations

import torch.nn as nn

from synctalk.ave import (
    AudioEncoder,
    Conv2dBNReLU,
    ave_features,
    ave_mel_windows,
    ave_window_count,
    load_ave_encoder,
    melspectrogram,
    pad_ave_features,
)
from synctalk.sizes import AUDIO_MODES, SIZE_PRESETS, ModelSize, audio_input_shape, audio_window, get_size
from synctalk.timing import FPS, SAMPLE_RATE, WINDOW

__all__ = ["AUDIO_MODES", "FPS", "SAMPLE_RATE", "SIZE_PRESETS", "WINDOW", "AudioEncoder", "Conv2dBNReLU",
           "ModelSize", "audio_input_shape", "audio_window", "ave_features", "ave_mel_windows",
           "ave_window_count", "count_parameters", "get_size", "load_ave_encoder", "melspectrogram",
           "pad_ave_features"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())
