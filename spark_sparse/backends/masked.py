"""The masked backend: dense layers whose outputs are multiplied by the mask at their scale.

This is how the SparK reference simulates sparsity: convolution and pooling run
densely over the zero-filled map, and hidden sites are set back to zero after
each layer; batch norm gathers the active sites into an ``(N, C)`` matrix.
"""
from __future__ import annotations

from typing import List, Optional

import timm.layers
import timm.models.resnet as timm_resnet
import torch
from torch import nn

from ..masking import ActiveSites
from ..norm import batch_norm_rows
from .encoder import SparseEncoder
from .registry import BuildContext, ConverterRegistry

MASKED_CONVERTERS = ConverterRegistry("masked")


def _apply_mask(sites: ActiveSites, x: torch.Tensor) -> torch.Tensor:
    mask = sites.mask_at(x.shape[-2:])
    return x if mask is None else x * mask


class MaskedConv2d(nn.Conv2d):
    """``Conv2d`` over the zero-filled map, with hidden output sites set to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_mask(self.sites, super().forward(x))


class MaskedMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d`` over the zero-filled map, with hidden output sites set to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_mask(self.sites, super().forward(x))


class MaskedAvgPool2d(nn.AvgPool2d):
    """``AvgPool2d`` over the zero-filled map, with hidden output sites set to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_mask(self.sites, super().forward(x))


class MaskedBatchNorm2d(nn.BatchNorm1d):
    """Batch norm whose statistics come from the active sites only; state as ``BatchNorm2d``.

    The active sites of the ``(B, C, H, W)`` input are gathered into an ``(N, C)``
    matrix, normalised as by ``BatchNorm1d`` (synchronised across ranks when
    ``sync`` is set), and scattered back into a zero map.
    """

    sites: ActiveSites
    sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        bhwc = x.permute(0, 2, 3, 1)
        rows_index = self.sites.rows_at((height, width))
        if rows_index is None:
            out = batch_norm_rows(self, bhwc.reshape(-1, channels), self.sync).view(batch, height, width, channels)
        else:
            rows = bhwc.reshape(-1, channels).index_select(0, rows_index)
            normed = batch_norm_rows(self, rows, self.sync)
            out = x.new_zeros(batch * height * width, channels).index_copy(0, rows_index, normed)
            out = out.view(batch, height, width, channels)
        out = out.permute(0, 3, 1, 2)
        return out.contiguous() if x.is_contiguous() else out

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {input.dim()}-D")


@MASKED_CONVERTERS.register(nn.Conv2d)
def convert_conv(conv: nn.Conv2d, context: BuildContext) -> nn.Module:
    layer = MaskedConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    layer.load_state_dict(conv.state_dict())
    layer.sites = context.sites
    return layer


@MASKED_CONVERTERS.register(nn.MaxPool2d)
def convert_max_pool(pool: nn.MaxPool2d, context: BuildContext) -> nn.Module:
    layer = MaskedMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)
    layer.sites = context.sites
    return layer


@MASKED_CONVERTERS.register(nn.AvgPool2d)
def convert_avg_pool(pool: nn.AvgPool2d, context: BuildContext) -> nn.Module:
    layer = MaskedAvgPool2d(
        pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode, pool.count_include_pad, pool.divisor_override
    )
    layer.sites = context.sites
    return layer


def masked_batch_norm_from(bn: nn.modules.batchnorm._BatchNorm, sites: ActiveSites, sync: bool) -> MaskedBatchNorm2d:
    """Build a :class:`MaskedBatchNorm2d` with the configuration and state of ``bn``."""
    layer = MaskedBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    layer.load_state_dict(bn.state_dict())
    layer.to(device=bn.running_mean.device if bn.running_mean is not None else None)
    layer.train(bn.training)
    layer.sites = sites
    layer.sync = sync
    return layer


@MASKED_CONVERTERS.register(nn.BatchNorm2d, nn.SyncBatchNorm)
def convert_batch_norm(bn: nn.modules.batchnorm._BatchNorm, context: BuildContext) -> nn.Module:
    return masked_batch_norm_from(bn, context.sites, sync=context.sync_bn or isinstance(bn, nn.SyncBatchNorm))


# Element-wise layers map a zero to a zero, so hidden sites stay exactly zero.
MASKED_CONVERTERS.register_elementwise(
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Dropout,
    timm.layers.DropPath,
)
MASKED_CONVERTERS.register_container(nn.Sequential, timm_resnet.BasicBlock, timm_resnet.Bottleneck)


class MaskedEncoder(SparseEncoder):
    """Encoder on the masked backend: dense maps throughout, zero at hidden sites after every layer."""

    backend = "masked"

    def __init__(self, model_name, family, dense, input_size, sync_bn: bool = False) -> None:
        super().__init__(model_name, family, dense, input_size, MASKED_CONVERTERS, sync_bn=sync_bn)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        self.check_inputs(images, active)
        with self.sites.bind(active):
            return self.family.forward_features(self, self.mask_images(images, active))
