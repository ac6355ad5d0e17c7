"""ConvNeXt's layers on both backends: layer norms, linear layers, global response norm and the block.

timm's ConvNeXt block runs its depthwise convolution on a ``(B, C, H, W)`` map,
then permutes to ``(B, H, W, C)`` for a channels-last layer norm and a linear MLP
(``conv_mlp=False``). Every layer here acts on each site alone, except global
response norm, whose statistics span an image's sites.

- masked backend: each layer runs as in timm and sets hidden sites back to
  zero, because a layer norm or a linear layer maps a zero site to its bias. A
  4-D input to a linear layer or a channels-last layer norm is ``(B, H, W, C)``.
  The block stays timm's own, since its permutes act on dense maps.
- spconv backend: the features are already ``(N, C)`` rows, so the block gets
  its own ``forward`` without the permutes, keeping timm's parameter names.
  Linear layers and channels-last layer norms act on each row as they are.

Global response norm (ConvNeXt V2) takes each image's L2 norm over its active
sites only, on both backends.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import timm.layers
from timm.layers.grn import GlobalResponseNorm
import timm.models.convnext as timm_convnext
import torch
import torch.nn.functional as F
from torch import nn

from ...masking import ActiveSites
from ..masked import MASKED_CONVERTERS
from ..registry import BuildContext, UnsupportedLayerError
from ..site_tables import SparseSites
from ..sparse import SPCONV_CONVERTERS, _check_rows, _input_stride

# Layer norms over the last dimension that both backends may treat as per-site layers.
# Other subclasses of nn.LayerNorm (timm's LayerNormExp2d, for one) are channels-first and need a converter.
CHANNELS_LAST_LAYER_NORMS = (nn.LayerNorm, timm.layers.LayerNorm)


def _mask_channels_first(sites: ActiveSites, x: torch.Tensor) -> torch.Tensor:
    mask = sites.mask_at(x.shape[-2:])
    return x if mask is None else x * mask


def _mask_channels_last(sites: ActiveSites, x: torch.Tensor) -> torch.Tensor:
    """Zero the hidden sites of a ``(B, H, W, C)`` map; a ``(B, C)`` input (one vector per image) passes."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise ValueError(f"expected a (B, H, W, C) map or (B, C) vectors, got shape {tuple(x.shape)}")
    mask = sites.mask_at(x.shape[1:3])
    return x if mask is None else x * mask.permute(0, 2, 3, 1)


class MaskedLayerNorm2d(timm.layers.LayerNorm2d):
    """``LayerNorm2d`` of a ``(B, C, H, W)`` map, with hidden sites set back to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_channels_first(self.sites, super().forward(x))


class MaskedLayerNorm(timm.layers.LayerNorm):
    """Layer norm over the last dimension of a ``(B, H, W, C)`` map, with hidden sites set back to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_channels_last(self.sites, super().forward(x))


class MaskedLinear(nn.Linear):
    """``Linear`` on a ``(B, H, W, C)`` map, with hidden sites set back to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mask_channels_last(self.sites, super().forward(x))


class MaskedGlobalResponseNorm(GlobalResponseNorm):
    """``GlobalResponseNorm`` whose per-image L2 norm spans the active sites only.

    The input is zero at hidden sites (the masked backend's invariant), so the
    dense norm over ``(H, W)`` already sums the active sites alone. The output is
    masked because the bias would fill hidden sites.
    """

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.channel_dim == 1:
            return _mask_channels_first(self.sites, out)
        return _mask_channels_last(self.sites, out)


def masked_layer_norm_2d(norm: nn.LayerNorm, sites: ActiveSites) -> MaskedLayerNorm2d:
    """Build a :class:`MaskedLayerNorm2d` with the configuration and weights of ``norm``."""
    layer = MaskedLayerNorm2d(
        norm.normalized_shape[0],
        eps=norm.eps,
        affine=norm.elementwise_affine,
        bias=norm.bias is not None,
        **_placement_of(norm),
    )
    layer.load_state_dict(norm.state_dict())
    layer.sites = sites
    return layer


def _placement_of(module: nn.Module) -> Dict[str, Optional[Union[torch.device, torch.dtype]]]:
    """Return ``device`` and ``dtype`` keyword arguments that create a layer where ``module``'s parameters are."""
    tensor = next(module.parameters(), None)
    return {"device": None if tensor is None else tensor.device, "dtype": None if tensor is None else tensor.dtype}


def _check_layer_norm(norm: nn.LayerNorm, context: BuildContext, channels_last: bool) -> None:
    """Reject layer norms that mix sites or whose layout is unknown, naming the layer."""
    if len(norm.normalized_shape) != 1:
        raise UnsupportedLayerError(
            f"layer norm at '{context.path}' normalises over {tuple(norm.normalized_shape)}, which spans "
            f"several sites; only a norm over the channels (one dimension) keeps sites apart"
        )
    if channels_last and type(norm) not in CHANNELS_LAST_LAYER_NORMS:
        raise UnsupportedLayerError(
            f"layer norm {type(norm).__qualname__} at '{context.path}' has no converter; register one for "
            f"its layout (channels first or last) in both backends"
        )


@MASKED_CONVERTERS.register(timm.layers.LayerNorm2d)
def convert_layer_norm_2d_masked(norm: timm.layers.LayerNorm2d, context: BuildContext) -> nn.Module:
    _check_layer_norm(norm, context, channels_last=False)
    return masked_layer_norm_2d(norm, context.sites)


@MASKED_CONVERTERS.register(nn.LayerNorm)
def convert_layer_norm_masked(norm: nn.LayerNorm, context: BuildContext) -> nn.Module:
    _check_layer_norm(norm, context, channels_last=True)
    layer = MaskedLayerNorm(
        norm.normalized_shape[0],
        eps=norm.eps,
        affine=norm.elementwise_affine,
        bias=norm.bias is not None,
        **_placement_of(norm),
    )
    layer.load_state_dict(norm.state_dict())
    layer.sites = context.sites
    return layer


@MASKED_CONVERTERS.register(nn.Linear)
def convert_linear_masked(linear: nn.Linear, context: BuildContext) -> nn.Module:
    layer = MaskedLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    layer.load_state_dict(linear.state_dict())
    layer.sites = context.sites
    return layer


@MASKED_CONVERTERS.register(GlobalResponseNorm)
def convert_grn_masked(grn: GlobalResponseNorm, context: BuildContext) -> nn.Module:
    layer = MaskedGlobalResponseNorm(grn.weight.shape[0], eps=grn.eps, channels_last=grn.channel_dim != 1)
    layer.load_state_dict(grn.state_dict())
    layer.to(device=grn.weight.device, dtype=grn.weight.dtype)
    layer.sites = context.sites
    return layer


MASKED_CONVERTERS.register_elementwise(timm.layers.activations.GELU)
MASKED_CONVERTERS.register_container(
    timm_convnext.ConvNeXtStage,
    timm_convnext.ConvNeXtBlock,
    timm_convnext.Downsample,
    timm.layers.Mlp,
    timm.layers.GlobalResponseNormMlp,
)


class SparseLayerNorm2d(timm.layers.LayerNorm2d):
    """``LayerNorm2d`` on the ``(N, C)`` rows of active sites: each row normalised over its channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class SparseGlobalResponseNorm(GlobalResponseNorm):
    """``GlobalResponseNorm`` on ``(N, C)`` rows; each image's L2 norm spans its own rows."""

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        scale = self.sites.scale(self.in_stride)
        batch = self.sites.active.shape[0]

        # Float32 sums at least: a half-precision sum of squares over many rows overflows.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        sum_squares = wide.new_zeros(batch, x.shape[1]).index_add(0, scale.batch_index, wide * wide)
        # torch.norm's gradient at an all-zero channel is zero; sqrt's would be infinite.
        nonzero = sum_squares > 0
        norms = torch.where(nonzero, sum_squares, torch.ones_like(sum_squares)).sqrt() * nonzero
        normalised = (norms / (norms.mean(dim=1, keepdim=True) + self.eps)).to(x.dtype)

        return x + torch.addcmul(self.bias, self.weight, x * normalised.index_select(0, scale.batch_index))


class SparseConvNeXtBlock(nn.Module):
    """timm's ``ConvNeXtBlock`` on ``(N, C)`` rows, with the same children and parameter names.

    Runs depthwise convolution, layer norm, MLP, layer scale (``gamma``) and drop
    path as timm does, without the permutes, which have no meaning on rows.
    """

    def __init__(self, block: timm_convnext.ConvNeXtBlock) -> None:
        super().__init__()
        self.conv_dw = block.conv_dw
        self.norm = block.norm
        self.mlp = block.mlp
        self.gamma = block.gamma
        self.shortcut = block.shortcut
        self.drop_path = block.drop_path
        self.training = block.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        shortcut = x

        x = self.conv_dw(x)
        x = self.norm(x)
        x = self.mlp(x)
        if self.gamma is not None:
            x = x * self.gamma

        return self.drop_path(x) + self.shortcut(shortcut)


@SPCONV_CONVERTERS.register(timm.layers.LayerNorm2d)
def convert_layer_norm_2d_sparse(norm: timm.layers.LayerNorm2d, context: BuildContext) -> nn.Module:
    _check_layer_norm(norm, context, channels_last=False)
    layer = SparseLayerNorm2d(
        norm.normalized_shape[0],
        eps=norm.eps,
        affine=norm.elementwise_affine,
        bias=norm.bias is not None,
        **_placement_of(norm),
    )
    layer.load_state_dict(norm.state_dict())
    return layer


@SPCONV_CONVERTERS.register(nn.LayerNorm)
def convert_layer_norm_sparse(norm: nn.LayerNorm, context: BuildContext) -> nn.Module:
    _check_layer_norm(norm, context, channels_last=True)
    return norm


@SPCONV_CONVERTERS.register(GlobalResponseNorm)
def convert_grn_sparse(grn: GlobalResponseNorm, context: BuildContext) -> nn.Module:
    layer = SparseGlobalResponseNorm(grn.weight.shape[0], eps=grn.eps, channels_last=grn.channel_dim != 1)
    layer.load_state_dict(grn.state_dict())
    layer.to(device=grn.weight.device, dtype=grn.weight.dtype)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer


@SPCONV_CONVERTERS.register(timm_convnext.ConvNeXtBlock)
def convert_convnext_block_sparse(block: timm_convnext.ConvNeXtBlock, context: BuildContext) -> nn.Module:
    return SparseConvNeXtBlock(SPCONV_CONVERTERS.convert_children(block, context))


# A linear layer maps each row alone, so it runs on the (N, C) matrix as it is.
SPCONV_CONVERTERS.register_elementwise(nn.Linear, timm.layers.activations.GELU)
SPCONV_CONVERTERS.register_container(
    timm_convnext.ConvNeXtStage,
    timm_convnext.Downsample,
    timm.layers.Mlp,
    timm.layers.GlobalResponseNormMlp,
)
