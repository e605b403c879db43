"""SyncNet: judges whether a lower-face crop and an audio window belong together.

Face tower on the whole model crop [B, 3, S, S] (BGR, [0, 1]); audio tower on the mode-shaped window;
both end at [B, C, 3, 3], flattened and L2-normalised. In `ave` mode at size 328 the keys and shapes equal
upstream's SyncNet_color (25,147,616 parameters).

Also the sync probability head (`SyncHead`: logit = scale * cosine + bias), checkpoint loading and the
trainer (balanced in-sync / off-sync pairs, best held-out accuracy kept):

    python syncnet_328.py --dataset_dir dataset/NAME --save_dir syncnet_ckpt/NAME [--size small]
        [--max_steps N] [--device cpu|cuda|cuda:N]

See docs/training-guide.md.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from synctalk.layers import ConvBNAct
from synctalk.sizes import ModelSize, audio_input_shape, get_size
from unet_328 import CheckpointError, read_checkpoint, state_mismatch


def Conv2d(cin: int, cout: int, kernel: int | tuple[int, int], stride: int | tuple[int, int],  # noqa: N802
           padding: int | tuple[int, int], residual: bool = False) -> ConvBNAct:
    """Upstream SyncNet's block: conv -> BN -> LeakyReLU(0.01) (`synctalk.layers.ConvBNAct`)."""
    return ConvBNAct(cin, cout, kernel, stride, padding, residual, negative_slope=0.01)


class SyncNet_color(nn.Module):
    """Upstream's SyncNet architecture, generalised to our audio modes and size presets."""

    def __init__(self, mode: str = "whisper", size: str | ModelSize = "328"):
        super().__init__()
        self.size = size if isinstance(size, ModelSize) else get_size(size)
        self.mode = mode
        s = self.size.syncnet_scale
        c32, c64, c128, c256, c512 = (int(c * s) for c in (32, 64, 128, 256, 512))
        last_stride = 2 if self.size.inner >= 320 else 1  # keeps the face map at 3x3 for 160-px input
        self.face_encoder = nn.Sequential(
            Conv2d(3, c32, 7, 1, 3),
            Conv2d(c32, c32, 5, 2, 1),
            Conv2d(c32, c64, 5, 2, 1),
            Conv2d(c64, c64, 3, 1, 1, True), Conv2d(c64, c64, 3, 1, 1, True),
            Conv2d(c64, c128, 3, 2, 1),
            Conv2d(c128, c128, 3, 1, 1, True), Conv2d(c128, c128, 3, 1, 1, True),
            Conv2d(c128, c128, 3, 1, 1, True),
            Conv2d(c128, c256, 3, 2, 1),
            Conv2d(c256, c256, 3, 1, 1, True), Conv2d(c256, c256, 3, 1, 1, True),
            Conv2d(c256, c512, 3, 2, 1),
            Conv2d(c512, c512, 3, 1, 1, True), Conv2d(c512, c512, 3, 1, 1, True),
            Conv2d(c512, c512, 3, last_stride, 1),
            Conv2d(c512, c512, 3, 1, 0),
            Conv2d(c512, c512, 1, 1, 0),
        )
        cin = audio_input_shape(mode)[0]
        strides: dict[str, int | tuple[int, int]] = {"hubert": 2, "wenet": (1, 2)}
        stride = strides.get(mode, 1)  # brings every mode to 16 x 16
        self.audio_encoder = nn.Sequential(
            Conv2d(cin, c128, 3, 1, 1),
            Conv2d(c128, c128, 3, 1, 1, True), Conv2d(c128, c128, 3, 1, 1, True),
            Conv2d(c128, c256, 3, stride, 1),
            Conv2d(c256, c256, 3, 1, 1, True), Conv2d(c256, c256, 3, 1, 1, True),
            Conv2d(c256, c256, 3, 2, 2),
            Conv2d(c256, c256, 3, 1, 1, True), Conv2d(c256, c256, 3, 1, 1, True),
            Conv2d(c256, c512, 3, 2, 1),
            Conv2d(c512, c512, 3, 1, 1, True), Conv2d(c512, c512, 3, 1, 1, True),
            Conv2d(c512, c512, 3, 1, 0),
            Conv2d(c512, c512, 1, 1, 0),
        )

    def forward(self, face: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(audio_embedding, face_embedding), each [B, C*9], L2-normalised."""
        a = self.audio_encoder(audio).flatten(1)
        v = self.face_encoder(face).flatten(1)
        return F.normalize(a, p=2, dim=1), F.normalize(v, p=2, dim=1)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.size.inner
        return torch.rand(batch, 3, s, s), torch.randn(batch, *audio_input_shape(self.mode))


def build_syncnet(mode: str = "whisper", size: str = "328") -> SyncNet_color:
    """A fresh SyncNet for `mode` and `size`."""
    return SyncNet_color(mode, size)


# ----------------------------------------------------------------------------------------------
# Sync probability, checkpoints
#
# Upstream applied BCELoss to the raw cosine, which is undefined (and crashes) for negative cosines and
# can never reach a confident 0 or 1 for unit vectors. We use BCE-with-logits on an affine map of the
# cosine, logit = scale * cos + bias, with scale and bias learned alongside the towers and stored in the
# checkpoint's meta (`logit_scale`, `logit_bias`); the state_dict stays upstream-shaped.

LOGIT_SCALE, LOGIT_BIAS = 10.0, -5.0  # initial values: cos 0.5 -> p 0.5, cos 1 -> p 0.993


class SyncHead(nn.Module):
    """logit = scale * cos(audio, face) + bias for L2-normalised embeddings [B, D] -> [B]."""

    def __init__(self, scale: float = LOGIT_SCALE, bias: float = LOGIT_BIAS):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def forward(self, a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.scale * (a.float() * v.float()).sum(1) + self.bias


def load_syncnet_checkpoint(path, device: str | torch.device = "cpu", expect_mode: str | None = None,
                            expect_size: str | None = None) -> tuple[SyncNet_color, dict]:
    """Build the SyncNet a checkpoint describes (eval mode); CheckpointError on any mismatch. The meta
    carries mode, size, accuracy and the logit head (scale, bias)."""

    state, meta = read_checkpoint(path)
    if meta.get("kind", "syncnet") != "syncnet":
        raise CheckpointError(f"{path} is a {meta.get('kind')} checkpoint, not a SyncNet")
    mode, size = meta.get("mode", expect_mode or "ave"), str(meta.get("size", expect_size or "328"))
    if expect_mode and mode != expect_mode:
        raise CheckpointError(f"SyncNet {path} was trained in audio mode {mode!r}, the dataset uses {expect_mode!r}")
    if expect_size and size != str(expect_size):
        raise CheckpointError(f"SyncNet {path} is size {size!r}, the U-Net being trained is {expect_size!r}")
    net = build_syncnet(mode, size)
    mismatch = state_mismatch(state, net.state_dict())
    if mismatch:
        raise CheckpointError(f"{path} does not match a SyncNet in mode {mode!r}, size {size!r}: {mismatch}")
    net.load_state_dict(state, strict=True)
    meta.setdefault("mode", mode)
    meta.setdefault("size", size)
    meta.setdefault("logit_scale", 1.0)  # upstream checkpoints: p = cosine
    meta.setdefault("logit_bias", 0.0)
    return net.to(device).eval(), meta


def embed(net: SyncNet_color, face: torch.Tensor | None = None, audio: torch.Tensor | None = None
          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """L2-normalised (audio, face) embeddings -- the order `forward` returns -- each tower run only
    when its input is given (None otherwise)."""
    v = F.normalize(net.face_encoder(face).flatten(1), p=2, dim=1) if face is not None else None
    a = F.normalize(net.audio_encoder(audio).flatten(1), p=2, dim=1) if audio is not None else None
    return a, v


if __name__ == "__main__":
    # The trainer lives in the training kit (a network module imports no trainer); this keeps
    # upstream's `python syncnet_328.py --dataset_dir ... --save_dir ...` entry point working.
    import runpy

    runpy.run_module("synctalk.train_syncnet", run_name="__main__", alter_sys=True)
