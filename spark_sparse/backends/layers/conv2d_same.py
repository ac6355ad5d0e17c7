"""timm's ``Conv2dSame`` (TensorFlow "same" padding) on both backends.

With stride 1 and an even kernel, "same" padding puts one more zero after the
map than before it: ConvNeXt with ``output_stride=16`` downsamples its dilated
last stage with such a 2x2 convolution.

- masked backend: timm's layer over the zero-filled map, hidden sites set back to zero.
- spconv backend: stride 1 and dilation 1 only. A ``k x k`` kernel padded ``(k/2 - 1, k/2)``
  reads the taps ``1..k`` of a ``(k + 1) x (k + 1)`` window padded ``k/2`` on both sides,
  so its neighbour table is the last ``k`` rows and columns of that window's table.
"""
from __future__ import annotations

import torch
from timm.layers import Conv2dSame
from torch import nn

from ...masking import ActiveSites
from ..masked import MASKED_CONVERTERS, _apply_mask
from ..registry import BuildContext, UnsupportedLayerError
from ..sparse import SPCONV_CONVERTERS, SparseConv2d, _check_rows, _input_stride, _square


class MaskedConv2dSame(Conv2dSame):
    """``Conv2dSame`` over the zero-filled map, with hidden output sites set to zero."""

    sites: ActiveSites

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _apply_mask(self.sites, super().forward(x))


class SparseConv2dSame(SparseConv2d):
    """A stride-1 ``Conv2dSame`` from the active sites of a scale to the same sites."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        kernel = self.kernel_size[0]
        if kernel % 2:
            # An odd kernel pads evenly, so the window is the plain one.
            neighbours = self.sites.neighbours(self.in_stride, kernel, 1, kernel // 2)
        else:
            window = self.sites.neighbours(self.in_stride, kernel + 1, 1, kernel // 2)
            neighbours = window.view(-1, kernel + 1, kernel + 1)[:, 1:, 1:].reshape(-1, kernel * kernel)

        # An odd kernel's window is centred on its output site, so its table reversed is its own transpose.
        return self._convolve(x, neighbours, ("same", self.in_stride, kernel), centred=kernel % 2 == 1)


def _layer_like(layer_type: type, conv: Conv2dSame) -> nn.Conv2d:
    layer = layer_type(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    layer.load_state_dict(conv.state_dict())
    return layer


@MASKED_CONVERTERS.register(Conv2dSame)
def convert_conv2d_same_masked(conv: Conv2dSame, context: BuildContext) -> nn.Module:
    layer = _layer_like(MaskedConv2dSame, conv)
    layer.sites = context.sites
    return layer


@SPCONV_CONVERTERS.register(Conv2dSame)
def convert_conv2d_same_sparse(conv: Conv2dSame, context: BuildContext) -> nn.Module:
    _square(conv.kernel_size, "kernel_size", context)
    if _square(conv.stride, "stride", context) != 1 or _square(conv.dilation, "dilation", context) != 1 or conv.groups != 1:
        raise UnsupportedLayerError(
            f"'same'-padded convolution at '{context.path}' has stride={conv.stride}, dilation={conv.dilation}, "
            f"groups={conv.groups}; the spconv backend supports it only with stride 1, dilation 1 and groups 1 "
            f"(use the masked backend for this model)"
        )
    layer = _layer_like(SparseConv2dSame, conv)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer
