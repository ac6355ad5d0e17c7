"""Global pooling over the active sites of each image, on both backends.

A global average (or max) pool reduces an image's map to one ``(C,)`` vector.
Over a masked map it must reduce that image's active sites only: a dense mean
would count hidden sites as zeros and shrink with the mask ratio. The result is
a dense ``(B, C, 1, 1)`` tensor (``(B, C)`` when flattened) on both backends,
because it describes whole images, not sites.

Layers that compute on that result (a squeeze-excite gate's convolutions) act
on per-image vectors, so they must stay dense: a converter that uses a global
pool keeps them unconverted, as the squeeze-excite converters do.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool, FastAdaptiveMaxPool
from torch import nn

from ...masking import ActiveSites
from ..masked import MASKED_CONVERTERS
from ..registry import BuildContext, UnsupportedLayerError
from ..site_tables import SparseSites
from ..sparse import SPCONV_CONVERTERS, _check_rows, _input_stride

def masked_mean(sites: ActiveSites, x: torch.Tensor) -> torch.Tensor:
    """Return the ``(B, C, 1, 1)`` mean of each image's active sites of a ``(B, C, H, W)`` map that is zero elsewhere."""
    mask = sites.mask_at(x.shape[-2:])
    if mask is None:
        return x.mean((2, 3), keepdim=True)
    # An image with no active site gets a zero mean, not 0 / 0.
    counts = mask.sum((2, 3), keepdim=True).clamp(min=1).to(x.dtype)
    return x.sum((2, 3), keepdim=True) / counts


def masked_amax(sites: ActiveSites, x: torch.Tensor) -> torch.Tensor:
    """Return the ``(B, C, 1, 1)`` maximum over each image's active sites of a ``(B, C, H, W)`` map."""
    mask = sites.mask_at(x.shape[-2:])
    if mask is None:
        return x.amax((2, 3), keepdim=True)
    return x.masked_fill(~mask, float("-inf")).amax((2, 3), keepdim=True)


def rows_mean(sites: SparseSites, stride: int, rows: torch.Tensor) -> torch.Tensor:
    """Return the ``(B, C)`` mean of each image's ``(N, C)`` rows at ``stride``."""
    scale = sites.scale(stride)
    batch = sites.active.shape[0]
    sums = rows.new_zeros(batch, rows.shape[1]).index_add(0, scale.batch_index, rows)
    counts = torch.bincount(scale.batch_index, minlength=batch).clamp(min=1).to(rows.dtype)
    return sums / counts.unsqueeze(1)


def rows_amax(sites: SparseSites, stride: int, rows: torch.Tensor) -> torch.Tensor:
    """Return the ``(B, C)`` maximum of each image's ``(N, C)`` rows at ``stride`` (``-inf`` for an image with none)."""
    scale = sites.scale(stride)
    batch = sites.active.shape[0]
    index = scale.batch_index.unsqueeze(1).expand_as(rows)
    start = rows.new_full((batch, rows.shape[1]), float("-inf"))
    return start.scatter_reduce(0, index, rows, reduce="amax", include_self=True)


class MaskedGlobalPool2d(nn.Module):
    """Global average or max pooling over each image's active sites of a ``(B, C, H, W)`` map."""

    sites: ActiveSites

    def __init__(self, mode: str, flatten: bool) -> None:
        super().__init__()
        self.mode = mode
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = masked_mean(self.sites, x) if self.mode == "avg" else masked_amax(self.sites, x)
        return pooled.flatten(1) if self.flatten else pooled


class SparseGlobalPool2d(nn.Module):
    """Global average or max pooling of each image's ``(N, C)`` rows into a dense ``(B, C, 1, 1)`` tensor."""

    sites: SparseSites
    in_stride: int

    def __init__(self, mode: str, flatten: bool) -> None:
        super().__init__()
        self.mode = mode
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        if self.mode == "avg":
            pooled = rows_mean(self.sites, self.in_stride, x)
        else:
            pooled = rows_amax(self.sites, self.in_stride, x)
        return pooled if self.flatten else pooled[:, :, None, None]


def _global_pool_mode(pool: nn.Module, context: BuildContext) -> Optional[str]:
    """Return "avg" or "max" for a global pooling layer, None for a pass-through, else raise naming the layer."""
    if isinstance(pool, SelectAdaptivePool2d):
        if pool.is_identity():
            return None
        return _global_pool_mode(pool.pool, context)

    if isinstance(pool, (FastAdaptiveAvgPool, FastAdaptiveMaxPool)) and tuple(pool.dim) != (2, 3):
        raise UnsupportedLayerError(
            f"global pooling at '{context.path}' reads channels-last (NHWC) input; only NCHW input is supported"
        )
    if isinstance(pool, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and pool.output_size not in (1, (1, 1)):
        raise UnsupportedLayerError(
            f"adaptive pooling at '{context.path}' has output_size={pool.output_size}; only global pooling "
            f"(output size 1) is supported, because a larger output mixes active and hidden sites per cell"
        )
    if isinstance(pool, (nn.AdaptiveAvgPool2d, FastAdaptiveAvgPool)):
        return "avg"
    if isinstance(pool, (nn.AdaptiveMaxPool2d, FastAdaptiveMaxPool)):
        return "max"
    raise UnsupportedLayerError(
        f"global pooling {type(pool).__qualname__} at '{context.path}' has no converter; "
        f"the backends support average and max pooling"
    )


def _flattens(pool: nn.Module) -> bool:
    if isinstance(pool, SelectAdaptivePool2d):
        return isinstance(pool.flatten, nn.Flatten) or _flattens(pool.pool)
    return bool(getattr(pool, "flatten", False))


GLOBAL_POOL_TYPES = (
    SelectAdaptivePool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    FastAdaptiveAvgPool,
    FastAdaptiveMaxPool,
)


@MASKED_CONVERTERS.register(*GLOBAL_POOL_TYPES)
def convert_global_pool_masked(pool: nn.Module, context: BuildContext) -> nn.Module:
    mode = _global_pool_mode(pool, context)
    if mode is None:
        return pool
    layer = MaskedGlobalPool2d(mode, _flattens(pool))
    layer.sites = context.sites
    return layer


@SPCONV_CONVERTERS.register(*GLOBAL_POOL_TYPES)
def convert_global_pool_sparse(pool: nn.Module, context: BuildContext) -> nn.Module:
    mode = _global_pool_mode(pool, context)
    if mode is None:
        return pool
    layer = SparseGlobalPool2d(mode, _flattens(pool))
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer
