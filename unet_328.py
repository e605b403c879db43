"""Generator U-Net: a MobileNetV2-style inverted-residual U-Net that redraws the lower face.

Input: image [B, 6, S, S] BGR in [0, 1] (reference crop + masked crop), audio [B, C, H, W] (mode
dependent, see `utils.AUDIO_MODES`). A model trained with a teeth reference (`--teeth_reference`) has
9 image channels: the same six, then the interior of a crop that shows the person's teeth. It keeps its
inference teeth crop as the buffer `teeth` (so the checkpoint and the ONNX export carry it) and appends it
to a 6-channel input; training passes all 9 channels (a teeth crop drawn per sample).
Output: [B, 3, S, S] after a sigmoid. S = 320 for size `328` (upstream), 160 for `small`. Audio is fused
only at the S/32 bottleneck. In `ave` mode at size 328 the state_dict keys and shapes equal upstream
SyncTalk_2D's, so its checkpoints load with strict=True.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from synctalk.fileio import atomic_path
from synctalk.sizes import AUDIO_MODES, ModelSize, audio_input_shape, get_size

log = logging.getLogger(__name__)

IMAGE_INPUTS = 6   # reference crop + masked target crop (upstream)
TEETH_INPUTS = 9   # ... + the teeth reference crop
FIRST_CONV = "inc.inconv.0.conv.0.weight"  # the one layer that sees the image channels
TEETH_BUFFER = "teeth"  # a teeth-reference model's inference teeth crop [1, 3, S, S]


class InvertedResidual(nn.Module):
    """1x1 expand (x2) -> BN -> ReLU -> 3x3 depthwise (stride) -> BN -> ReLU -> 1x1 project -> BN,
    plus the input when `residual`; `hidden` overrides the expanded width."""

    def __init__(self, inp: int, oup: int, stride=1, residual: bool = False, expand: int = 2,
                 hidden: int | None = None):
        super().__init__()
        hidden = hidden or inp * expand
        self.use_res_connect = residual
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class DoubleConvDW(nn.Module):
    """IR(in -> out, stride) then IR(out -> out, residual)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(cin, cout, stride), InvertedResidual(cout, cout, 1, residual=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InConvDw(nn.Module):
    """The input block: an IR whose expanded width is upstream's (12) whatever the number of image channels,
    so a teeth-reference model differs from a plain one only in its first 1x1 convolution's inputs."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(cin, cout, 1, hidden=2 * IMAGE_INPUTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class Down(nn.Module):
    """Stride-2 DoubleConvDW (the upstream name `maxpool_conv` is kept for checkpoint keys)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleConvDW(cin, cout, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class Up(nn.Module):
    """Bilinear x2 (align_corners) of the deeper map, pad to the skip, concat [up, skip], DoubleConvDW."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = DoubleConvDW(cin, cout, stride=1)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        dy, dx = skip.shape[2] - deep.shape[2], skip.shape[3] - deep.shape[3]
        if dy or dx:
            deep = F.pad(deep, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([deep, skip], dim=1))


class OutConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioConv(nn.Module):
    """Audio branch: mode-shaped window -> [B, width, S/32, S/32] (upstream AudioConvAve/Hubert/Wenet)."""

    def __init__(self, mode: str, width: int, bottleneck: int):
        super().__init__()
        cin = audio_input_shape(mode)[0]
        w8, w4, w2 = width // 8, width // 4, width // 2
        stride3: int | tuple[int, int]
        if mode == "wenet":  # 256 x 16 x 32: residual IRs, then halve the time axis
            self.conv1 = InvertedResidual(cin, cin, 1, residual=True)
            self.conv2 = InvertedResidual(cin, cin, 1, residual=True)
            c2, stride3 = cin, (1, 2)
        else:
            self.conv1 = InvertedResidual(cin, w8, 1)
            self.conv2 = InvertedResidual(w8, w4, 1)
            c2, stride3 = w4, (2 if mode == "hubert" else 1)
        self.conv3 = nn.Conv2d(c2, w2, 3, stride3, 1)  # -> 16 x 16
        self.bn3 = nn.BatchNorm2d(w2)
        self.conv4 = InvertedResidual(w2, w2, 1, residual=True)
        # 16 -> 10 (upstream, stride 2) or 16 -> 5 (small, stride 4), padding 3
        stride5 = {10: 2, 5: 4}[bottleneck]
        self.conv5 = nn.Conv2d(w2, width, 3, stride5, 3)
        self.bn5 = nn.BatchNorm2d(width)
        self.conv6 = InvertedResidual(width, width, 1, residual=True)
        self.conv7 = InvertedResidual(width, width, 1, residual=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class Model(nn.Module):
    """The generator. `Model(6, 'ave')` is upstream's 12,186,935-parameter network."""

    def __init__(self, n_channels: int = IMAGE_INPUTS, mode: str = "whisper", size: str | ModelSize = "328"):
        super().__init__()
        if n_channels not in (IMAGE_INPUTS, TEETH_INPUTS):
            raise ValueError(f"a U-Net takes {IMAGE_INPUTS} or {TEETH_INPUTS} image channels, not {n_channels}")
        self.n_channels = n_channels
        if mode not in AUDIO_MODES:
            raise ValueError(f"unknown audio mode {mode!r}; choose one of {sorted(AUDIO_MODES)}")
        self.size = size if isinstance(size, ModelSize) else get_size(size)
        self.mode = mode
        if n_channels == TEETH_INPUTS:  # the inference teeth crop, set by training (`set_teeth`)
            self.register_buffer(TEETH_BUFFER, torch.zeros(1, 3, self.size.inner, self.size.inner))
        w0, w1, w2, w3, w4 = self.size.widths
        self.inc = InConvDw(n_channels, w0)
        self.down1 = Down(w0, w0)
        self.down2 = Down(w0, w1)
        self.down3 = Down(w1, w2)
        self.down4 = Down(w2, w3)
        self.down5 = Down(w3, w4)
        self.audio_model = AudioConv(mode, w4, self.size.bottleneck)
        self.fuse_conv = nn.Sequential(DoubleConvDW(2 * w4, w4), DoubleConvDW(w4, w3))
        self.up1 = Up(2 * w3, w2)
        self.up2 = Up(2 * w2, w1)
        self.up3 = Up(2 * w1, w0)
        self.up4 = Up(2 * w0, w0)
        self.up5 = Up(2 * w0, w0 // 2)
        self.outc = OutConv(w0 // 2, 3)

    def forward(self, x: torch.Tensor, audio_feat: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.n_channels:  # a teeth model given the usual 6 channels: add its teeth crop
            x = torch.cat([x, self.get_buffer(TEETH_BUFFER).expand(x.shape[0], -1, -1, -1)], dim=1)
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        audio = self.audio_model(audio_feat)  # [B, w4, S/32, S/32]
        x6 = self.fuse_conv(torch.cat([x6, audio], dim=1))
        x = self.up1(x6, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))

    def set_teeth(self, interior: np.ndarray) -> None:
        """Keep `interior` (uint8 BGR `[S, S, 3]`, a crop's interior that shows the teeth) as the teeth crop
        of a 6-channel input."""
        if self.n_channels != TEETH_INPUTS:
            raise ValueError("this U-Net has no teeth reference input")
        teeth = torch.from_numpy(np.ascontiguousarray(interior.transpose(2, 0, 1))).float().div_(255.0)
        self.get_buffer(TEETH_BUFFER).copy_(teeth[None])

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Random inputs of the inference shapes (6 image channels; for export, benchmarks and tests)."""
        s = self.size.inner
        return torch.rand(batch, IMAGE_INPUTS, s, s), torch.randn(batch, *audio_input_shape(self.mode))


def build_unet(mode: str = "whisper", size: str = "328", teeth: bool = False) -> Model:
    """A fresh generator for `mode` and `size`; `teeth`: with the teeth reference input (9 channels)."""
    return Model(TEETH_INPUTS if teeth else IMAGE_INPUTS, mode, size)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(ValueError):
    """A checkpoint that does not fit the expected architecture, with a readable message."""


def _strip_prefixes(state: dict) -> dict:
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(state_dict, meta) of a checkpoint of ours ({state_dict, meta}) or upstream's (bare state_dict,
    meta inferred: ave mode unless the audio input says otherwise, size from the first conv)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} does not hold a state_dict")
    if "state_dict" in blob:
        return _strip_prefixes(dict(blob["state_dict"])), dict(blob.get("meta", {}))
    state = _strip_prefixes(dict(blob))
    meta: dict = {"kind": "unet", "upstream": True}
    key = "audio_model.conv1.conv.0.weight"
    if key in state:
        cin = state[key].shape[1]
        meta["mode"] = {48: "whisper", 256: "wenet"}.get(cin, "ave")
        width = state["inc.inconv.0.conv.6.weight"].shape[0]
        meta["size"] = "328" if width == 32 else "small"
    return state, meta


def state_mismatch(state: dict, expected: dict) -> str | None:
    """How a state dict differs from a network's (missing keys, unexpected keys, shape mismatches; four
    of each at most) in one line, or None when it fits."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return None
    shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in mismatched[:4]]
    return f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}, shape mismatches {shapes}"


def with_teeth_inputs(state: dict, side: int) -> dict:
    """A 6-input U-Net state dict widened to the teeth reference's 9 inputs (interior side `side`): the first
    convolution's new input weights are zero, so the widened network computes exactly what the original
    did; the teeth crop is black until `Model.set_teeth`."""
    weight = state[FIRST_CONV]
    if weight.shape[1] != IMAGE_INPUTS:
        raise CheckpointError(f"expected a {IMAGE_INPUTS}-input U-Net, its first layer takes {weight.shape[1]}")
    pad = weight.new_zeros(weight.shape[0], TEETH_INPUTS - IMAGE_INPUTS, *weight.shape[2:])
    return {**state, FIRST_CONV: torch.cat([weight, pad], dim=1),
            TEETH_BUFFER: weight.new_zeros(1, 3, side, side)}


def load_unet_checkpoint(path: str | Path, expect_mode: str | None = None,
                         device: str | torch.device = "cpu") -> tuple[Model, dict]:
    """Build the U-Net a checkpoint describes and load it strictly; readable errors on mismatch."""
    state, meta = read_checkpoint(path)
    if meta.get("kind", "unet") != "unet":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint, not a U-Net")
    mode = meta.get("mode", expect_mode or "ave")
    if expect_mode and mode != expect_mode:
        raise CheckpointError(f"{path} was trained in audio mode {mode!r}, expected {expect_mode!r}")
    model = build_unet(mode, meta.get("size", "328"), teeth=TEETH_BUFFER in state)
    mismatch = state_mismatch(state, model.state_dict())
    if mismatch:
        raise CheckpointError(f"{path} does not match a U-Net in mode {mode!r}, size {meta.get('size', '328')!r}: "
                              f"{mismatch}")
    model.load_state_dict(state, strict=True)
    meta.setdefault("mode", mode)
    meta.setdefault("size", model.size.name)
    return model.to(device).eval(), meta


def save_checkpoint(path: str | Path, state_dict: dict, meta: dict) -> None:
    """Write {state_dict, meta} atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)


def export_onnx(model: Model, path: str | Path, batch: int = 1, dynamic_batch: bool = True) -> Path:
    """Export the generator to ONNX (inputs `image`, `audio`; output `pred`), atomically."""
    model = model.eval().float().cpu()
    image, audio = model.example_inputs(batch)
    axes = {"image": {0: "batch"}, "audio": {0: "batch"}, "pred": {0: "batch"}} if dynamic_batch else None
    with atomic_path(path) as tmp, torch.no_grad():
        torch.onnx.export(model, (image, audio), str(tmp), input_names=["image", "audio"],
                          output_names=["pred"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return Path(path)
