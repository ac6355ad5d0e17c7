"""Group norm on both backends, with statistics per image and group over active sites only.

A dense ``GroupNorm`` over a masked map would count hidden sites as zeros in
each image's mean and variance. Here both come from the active sites alone, in
two passes (mean, then the centred sum of squares). Half-precision input is
normalised in float32 and returned as float32, as autocast runs ``group_norm``.
"""
from __future__ import annotations

import torch
from torch import nn

from ...masking import ActiveSites
from ..masked import MASKED_CONVERTERS
from ..registry import BuildContext
from ..site_tables import SparseSites
from ..sparse import SPCONV_CONVERTERS, _check_rows, _input_stride


class MaskedGroupNorm(nn.GroupNorm):
    """``GroupNorm`` of a ``(B, C, H, W)`` map whose statistics span each image's active sites; hidden sites stay zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.sites.mask_at(x.shape[-2:])
        if mask is None:
            return super().forward(x)

        x = x.to(torch.promote_types(x.dtype, torch.float32))
        batch, channels, height, width = x.shape
        groups = self.num_groups
        grouped = x.reshape(batch, groups, channels // groups, height, width)
        weights = mask.view(batch, 1, 1, height, width).to(x.dtype)
        # An image with no active site gets count 1 and zero statistics, not 0 / 0.
        counts = (weights.sum((2, 3, 4), keepdim=True) * (channels // groups)).clamp(min=1)

        mean = grouped.sum((2, 3, 4), keepdim=True) / counts
        centred = (grouped - mean) * weights
        var = centred.square().sum((2, 3, 4), keepdim=True) / counts
        out = (centred * torch.rsqrt(var + self.eps)).view(batch, channels, height, width)

        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1) * mask
        return out


class SparseGroupNorm(nn.GroupNorm):
    """``GroupNorm`` of the ``(N, C)`` rows of active sites, with statistics per image and group."""

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        scale = self.sites.scale(self.in_stride)
        batch = self.sites.active.shape[0]
        num_rows, channels = x.shape
        groups = self.num_groups
        grouped = x.view(num_rows, groups, channels // groups)
        counts = torch.bincount(scale.batch_index, minlength=batch).clamp(min=1).to(x.dtype) * (channels // groups)

        sums = x.new_zeros(batch, groups).index_add(0, scale.batch_index, grouped.sum(2))
        mean = (sums / counts.unsqueeze(1)).index_select(0, scale.batch_index)
        centred = grouped - mean.unsqueeze(2)
        squares = x.new_zeros(batch, groups).index_add(0, scale.batch_index, centred.square().sum(2))
        var = (squares / counts.unsqueeze(1)).index_select(0, scale.batch_index)
        out = (centred * torch.rsqrt(var + self.eps).unsqueeze(2)).view(num_rows, channels)

        if self.affine:
            out = out * self.weight + self.bias
        return out


def _group_norm_like(layer_type: type, norm: nn.GroupNorm) -> nn.GroupNorm:
    layer = layer_type(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
    layer.load_state_dict(norm.state_dict())
    if norm.affine:
        layer.to(device=norm.weight.device, dtype=norm.weight.dtype)
    layer.train(norm.training)
    return layer


@MASKED_CONVERTERS.register(nn.GroupNorm)
def convert_group_norm_masked(norm: nn.GroupNorm, context: BuildContext) -> nn.Module:
    layer = _group_norm_like(MaskedGroupNorm, norm)
    layer.sites = context.sites
    return layer


@SPCONV_CONVERTERS.register(nn.GroupNorm)
def convert_group_norm_sparse(norm: nn.GroupNorm, context: BuildContext) -> nn.Module:
    layer = _group_norm_like(SparseGroupNorm, norm)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer
