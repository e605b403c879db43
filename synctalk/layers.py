"""Network building blocks shared by the SyncNet and the AVE audio encoder (torch only)."""
from __future__ import annotations

import torch
import torch.nn as nn


class ConvBNAct(nn.Module):
    """Conv2d (bias) -> BN -> activation, with an optional residual add before the activation.
    `negative_slope` 0 is ReLU (the AVE encoder); 0.01 is upstream SyncNet's LeakyReLU. Parameter
    names (`conv_block.0`, `conv_block.1`) match upstream checkpoints."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int | tuple[int, int],
                 padding: int | tuple[int, int], residual: bool = False, negative_slope: float = 0.0):
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.act: nn.Module = nn.LeakyReLU(negative_slope, inplace=True) if negative_slope else nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        return self.act(out + x if self.residual else out)
