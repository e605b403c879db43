"""Upstream's AVE audio path (for users who own `audio_visual_encoder.pth`): the Wav2Lip mel
spectrogram and the AVE audio encoder. The STFT runs in torch; librosa only builds the Slaney
filterbank once per process."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from synctalk.layers import ConvBNAct
from synctalk.timing import FPS, SAMPLE_RATE

# ----------------------------------------------------------------------------------------------
# Upstream (Wav2Lip) mel spectrogram: 16 kHz, pre-emphasis 0.97, STFT 800/200 Hann, 80 Slaney mels
# 55-7600 Hz, 20*log10 - 20 dB, symmetric clip to +-4.

MEL_SR, MEL_NFFT, MEL_HOP, MEL_NMELS, MEL_FMIN, MEL_FMAX = SAMPLE_RATE, 800, 200, 80, 55.0, 7600.0
MEL_REF_DB, MEL_MIN_DB, MEL_MAX_ABS = 20.0, -100.0, 4.0
MELS_PER_SECOND = MEL_SR / MEL_HOP  # 80


@functools.lru_cache(maxsize=4)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    import librosa  # filterbank construction only (no JIT-heavy code path)

    return torch.from_numpy(
        librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)
    )


def melspectrogram(wav: np.ndarray | torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Upstream's normalised mel of 16 kHz mono audio: float32 [80, M], M = 1 + len(wav) // 200."""
    y = torch.as_tensor(np.asarray(wav, dtype=np.float32), device=device)
    y = torch.cat([y[:1], y[1:] - 0.97 * y[:-1]])  # pre-emphasis (lfilter([1, -0.97], [1]))
    spec = torch.stft(
        y, MEL_NFFT, MEL_HOP, MEL_NFFT, window=torch.hann_window(MEL_NFFT, device=device),
        center=True, pad_mode="constant", return_complex=True,
    ).abs()
    mel = _mel_basis(MEL_SR, MEL_NFFT, MEL_NMELS, MEL_FMIN, MEL_FMAX).to(device) @ spec
    db = 20.0 * torch.log10(torch.clamp(mel, min=1e-5)) - MEL_REF_DB
    norm = (2 * MEL_MAX_ABS) * ((db - MEL_MIN_DB) / -MEL_MIN_DB) - MEL_MAX_ABS
    return torch.clamp(norm, -MEL_MAX_ABS, MEL_MAX_ABS).cpu().numpy()


def ave_window_count(n_mels: int) -> int:
    """Number of AVE windows L for M mel frames: int((M - 16) / 80 * 25) + 2 (upstream 2.2)."""
    return int((n_mels - 16) / MELS_PER_SECOND * FPS) + 2


def ave_mel_windows(mel: np.ndarray) -> np.ndarray:
    """Upstream's per-video-frame mel windows: [L, 1, 80, 16]; window k starts at floor(3.2 k) and is
    shifted left to [M-16, M) when it would run past the end."""
    n_mels = mel.shape[1]
    if n_mels < 16:
        raise ValueError(f"audio too short for AVE features: {n_mels} mel frames, need at least 16")
    count = ave_window_count(n_mels)
    out = np.empty((count, 1, MEL_NMELS, 16), dtype=np.float32)
    for k in range(count):
        start = int(MELS_PER_SECOND * k / FPS)
        if start + 16 > n_mels:
            start = n_mels - 16
        out[k, 0] = mel[:, start: start + 16]
    return out


def pad_ave_features(encoded: np.ndarray) -> np.ndarray:
    """Upstream's edge padding: duplicate the first and the last vector -> [L + 2, 512]."""
    return np.concatenate([encoded[:1], encoded, encoded[-1:]], axis=0)


# ----------------------------------------------------------------------------------------------
# AVE audio encoder (Wav2Lip-style SyncNet audio tower), keys `audio_encoder.<i>.conv_block.*`


Conv2dBNReLU = ConvBNAct  # upstream name of the AVE block (ReLU)


class AudioEncoder(nn.Module):
    """AVE encoder: mel window [B, 1, 80, 16] -> [B, 512] (no normalisation), 2,812,672 parameters."""

    def __init__(self):
        super().__init__()
        c = Conv2dBNReLU
        self.audio_encoder = nn.Sequential(
            c(1, 32, 3, 1, 1), c(32, 32, 3, 1, 1, True), c(32, 32, 3, 1, 1, True),
            c(32, 64, 3, (3, 1), 1), c(64, 64, 3, 1, 1, True), c(64, 64, 3, 1, 1, True),
            c(64, 128, 3, 3, 1), c(128, 128, 3, 1, 1, True), c(128, 128, 3, 1, 1, True),
            c(128, 256, 3, (3, 2), 1), c(256, 256, 3, 1, 1, True),
            c(256, 512, 3, 1, 0), c(512, 512, 1, 1, 0),
        )

    def forward(self, mel_windows: torch.Tensor) -> torch.Tensor:
        return self.audio_encoder(mel_windows).squeeze(-1).squeeze(-1)  # [B, 512]


def load_ave_encoder(path: str | Path | None, device: str = "cpu") -> AudioEncoder:
    """Load the AVE encoder from a user-supplied checkpoint (keys with or without the
    `audio_encoder.` prefix). Refuses plainly when no file is given: random weights are useless."""
    if path is None:
        raise ValueError(
            "ave mode needs the AVE audio encoder checkpoint (upstream's audio_visual_encoder.pth); "
            "set SYNCTALK_MODELS__AVE_CHECKPOINT=/path/to/it or use the default whisper mode"
        )
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"AVE checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {(k if k.startswith("audio_encoder.") else f"audio_encoder.{k}"): v for k, v in state.items()}
    model = AudioEncoder()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not an AVE audio encoder checkpoint: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]}"
        )
    return model.to(device).eval()


@torch.no_grad()
def ave_features(wav16k: np.ndarray, encoder: AudioEncoder, batch_size: int = 64) -> np.ndarray:
    """Upstream `aud_ave.npy` for 16 kHz audio: [L + 2, 512] float32."""
    windows = ave_mel_windows(melspectrogram(wav16k))
    device = next(encoder.parameters()).device
    outs = [
        encoder(torch.from_numpy(windows[i: i + batch_size]).to(device)).float().cpu().numpy()
        for i in range(0, len(windows), batch_size)
    ]
    return pad_ave_features(np.concatenate(outs, axis=0))
