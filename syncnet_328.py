"""SyncNet: judges whether a lower-face crop and an audio window belong together.

Face tower on the whole model crop [B, 3, S, S] (BGR, [0, 1]); audio tower on the mode-shaped window;
both end at [B, C, 3, 3], flattened and L2-normalised. In `ave` mode at size 328 the keys and shapes equal
upstream's SyncNet_color (25,147,616 parameters).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ModelSize, audio_input_shape, get_size


class Conv2d(nn.Module):
    """Conv2d (bias) -> BN -> LeakyReLU(0.01), with an optional residual add before the activation."""

    def __init__(self, cin: int, cout: int, kernel, stride, padding, residual: bool = False):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        return self.act(out + x if self.residual else out)


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
        stride = {"hubert": 2, "wenet": (1, 2)}.get(mode, 1)  # brings every mode to 16 x 16
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


if __name__ == "__main__":
    import sys

    sys.stderr.write("error: SyncNet training is not built yet (training issue); "
                     "this module currently provides the network only\n")
    raise SystemExit(2)
