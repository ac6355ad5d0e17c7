"""SparK's light UNet decoder, shared by both backends."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from timm.layers import trunc_normal_
from torch import nn

from .norm import SyncBatchNorm2d


class UNetBlock(nn.Module):
    """Upsample by 2 with a transposed convolution, then two 3x3 conv + batch norm layers."""

    def __init__(self, in_channels: int, out_channels: int, sync_bn: bool) -> None:
        super().__init__()
        norm = SyncBatchNorm2d if sync_bn else nn.BatchNorm2d
        self.up_sample = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1, bias=False),
            norm(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False),
            norm(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """Dense decoder from the smallest feature map up to the image, halving the width at each block.

    ``upsample_ratio`` is the encoder's downsample ratio (32 gives five blocks,
    widths 768, 384, 192, 96, 48, 24 with the default ``width``). Block ``i`` adds the
    ``i``-th densified feature (smallest scale first) before it upsamples.
    """

    def __init__(self, upsample_ratio: int, width: int = 768, sync_bn: bool = False) -> None:
        super().__init__()
        self.width = width
        num_blocks = round(math.log2(upsample_ratio))
        if 2**num_blocks != upsample_ratio:
            raise ValueError(f"upsample ratio {upsample_ratio} is not a power of two")
        channels = [width // 2**i for i in range(num_blocks + 1)]
        self.dec = nn.ModuleList(UNetBlock(cin, cout, sync_bn) for cin, cout in zip(channels[:-1], channels[1:]))
        self.proj = nn.Conv2d(channels[-1], 3, kernel_size=1, stride=1, bias=True)
        self.initialize()

    def initialize(self, init_std: float = 0.02) -> None:
        """Initialise weights as SparK does: truncated normal convs, Kaiming transposed convs, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                trunc_normal_(module.weight, std=init_std)
            elif isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, features: List[Optional[torch.Tensor]]) -> torch.Tensor:
        """Decode densified features (smallest scale first; None to skip one) to a ``(B, 3, H, W)`` image."""
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(features) and features[i] is not None:
                x = x + features[i]
            x = block(x)
        return self.proj(x)
