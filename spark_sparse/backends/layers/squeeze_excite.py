"""Squeeze-excite blocks on both backends: the squeeze averages each image's active sites only.

A squeeze-excite block pools its input globally, computes per-channel gates
from the pooled vector and scales the input by them. Over a masked map the
dense mean counts hidden sites as zeros, so the gates would depend on the mask
ratio. Here the mean spans each image's active sites. The gate layers compute
on ``(B, C, 1, 1)`` per-image vectors, so they stay timm's (or torchvision's)
dense modules, under the same names.

Supported: timm's ``SEModule`` (``seresnet50``) and ``EffectiveSEModule``, and
torchvision's ``SqueezeExcitation``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torchvision.ops
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from torch import nn

from ...masking import ActiveSites
from ..masked import MASKED_CONVERTERS
from ..registry import BuildContext
from ..site_tables import SparseSites
from ..sparse import SPCONV_CONVERTERS, _check_rows, _input_stride
from .global_pool import masked_amax, masked_mean, rows_amax, rows_mean

# Gate of each supported block type from its pooled (B, C, 1, 1) input, using the block's own children.
Excite = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _excite_se(block: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return block.gate(block.fc2(block.act(block.bn(block.fc1(pooled)))))


def _excite_effective_se(block: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return block.gate(block.fc(pooled))


def _excite_torchvision(block: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    return block.scale_activation(block.fc2(block.activation(block.fc1(pooled))))


EXCITE_BY_TYPE = {
    SEModule: _excite_se,
    EffectiveSEModule: _excite_effective_se,
    torchvision.ops.SqueezeExcitation: _excite_torchvision,
}


class _SqueezeExcite(nn.Module):
    """Holds the children of a dense squeeze-excite block under their names, unconverted."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        # timm's experimental option: average the mean and the maximum of the squeeze.
        self.add_maxpool = bool(getattr(block, "add_maxpool", False))
        self.excite: Excite = next(EXCITE_BY_TYPE[t] for t in type(block).__mro__ if t in EXCITE_BY_TYPE)
        self.training = block.training


class MaskedSqueezeExcite(_SqueezeExcite):
    """Squeeze-excite of a ``(B, C, H, W)`` map that is zero at hidden sites; they stay zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(self.sites, x)
        if self.add_maxpool:
            pooled = 0.5 * pooled + 0.5 * masked_amax(self.sites, x)
        return x * self.excite(self, pooled)


class SparseSqueezeExcite(_SqueezeExcite):
    """Squeeze-excite of the ``(N, C)`` rows of active sites: each row scaled by its image's gates."""

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        pooled = rows_mean(self.sites, self.in_stride, x)
        if self.add_maxpool:
            pooled = 0.5 * pooled + 0.5 * rows_amax(self.sites, self.in_stride, x)

        gates = self.excite(self, pooled[:, :, None, None]).flatten(1)
        return x * gates.index_select(0, self.sites.scale(self.in_stride).batch_index)


@MASKED_CONVERTERS.register(*EXCITE_BY_TYPE)
def convert_squeeze_excite_masked(block: nn.Module, context: BuildContext) -> nn.Module:
    layer = MaskedSqueezeExcite(block)
    layer.sites = context.sites
    return layer


@SPCONV_CONVERTERS.register(*EXCITE_BY_TYPE)
def convert_squeeze_excite_sparse(block: nn.Module, context: BuildContext) -> nn.Module:
    layer = SparseSqueezeExcite(block)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer
