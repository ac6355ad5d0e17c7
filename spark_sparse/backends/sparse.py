"""The spconv backend: genuine sparse layers over the ``(N, C)`` matrix of active sites.

Between layers the features are plain ``(N, C)`` tensors whose rows are the
active sites of the layer's scale in row-major ``(b, y, x)`` order, so timm's own
residual blocks (``x += shortcut``, activation) run on them unchanged. Each
converted layer stores its input stride from the build-time trace. It reads the
site lists and neighbour tables of its scale from the encoder's
:class:`SparseSites`, which builds them once per forward call.

Convolutions compute on the CPU by gather-GEMM in PyTorch, which is correct with
any thread count and gets its backward from autograd. On a GPU with spconv
installed they run spconv's kernels through :mod:`.spconv_engine` on the same
tables. Only the four stage outputs are densified, into maps that are exactly
zero at hidden sites.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import timm.layers
import timm.models.resnet as timm_resnet
import torch
import torch.nn.functional as F
from torch import nn

from ..norm import batch_norm_rows
from . import spconv_engine
from .encoder import SparseEncoder
from .gather_conv import autocast_operands, gather_gemm, gathers_all, transposed_neighbours
from .registry import BuildContext, ConverterRegistry, UnsupportedLayerError
from .site_tables import SparseSites, conv_output_size

SPCONV_CONVERTERS = ConverterRegistry("spconv")



def _input_stride(context: BuildContext) -> int:
    if context.path not in context.input_strides:
        raise UnsupportedLayerError(
            f"layer at '{context.path}' was not reached by the build-time trace, so its input stride "
            f"is unknown; the spconv backend converts only layers the model's forward calls"
        )
    return context.input_strides[context.path]


def _square(value, name: str, context: BuildContext) -> int:
    """Return the side of a square ``(n, n)`` window parameter, or raise naming the layer."""
    pair = value if isinstance(value, tuple) else (value, value)
    if isinstance(pair[0], str) or pair[0] != pair[1]:
        raise UnsupportedLayerError(
            f"layer at '{context.path}' has {name}={value!r}; the spconv backend supports only "
            f"equal integer {name} along both axes"
        )
    return int(pair[0])


def _check_rows(x: torch.Tensor, layer: nn.Module) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{type(layer).__name__} expects an (N, C) matrix of active sites, got shape {tuple(x.shape)}"
        )


class SparseConv2d(nn.Conv2d):
    """``Conv2d`` from the active sites of its input scale to the active sites of its output scale.

    A 1x1 stride-1 convolution is a matrix product on the rows. Any other
    kernel reads its taps through the scale's neighbour table, so a strided
    convolution outputs exactly the next scale's active sites and no others.
    A dense ``(B, C, H, W)`` input (the masked image entering the stem) is first
    gathered into rows.
    """

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = self._gather_dense(x)
        _check_rows(x, self)

        kernel, stride, padding, dilation = self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]
        if kernel == 1 and stride == 1 and padding == 0:
            return F.linear(x, self.weight.flatten(1), self.bias)
        key = (self.in_stride, kernel, stride, padding, dilation)
        return self._convolve(x, self.sites.neighbours(*key), key, self._centred())

    def _centred(self) -> bool:
        """Return whether the window has stride 1 and is centred on its output site."""
        kernel, padding, dilation = self.kernel_size[0], self.padding[0], self.dilation[0]
        return self.stride[0] == 1 and 2 * padding == dilation * (kernel - 1)

    def _convolve(self, x: torch.Tensor, neighbours: torch.Tensor, key: tuple, centred: bool) -> torch.Tensor:
        """Convolve the rows over ``neighbours``; ``key`` names the table's derived forms in the site cache.

        ``centred`` marks a stride-1 window centred on its output site, whose
        table with its taps reversed is its own transpose.
        """
        x, weight = autocast_operands(x, self.weight)
        kernel = self.kernel_size[0]
        if spconv_engine.runs_on(x):
            num_inputs = x.shape[0]
            rule_book = self.sites.cached(
                ("rule_book",) + key, lambda: spconv_engine.rule_book_from_neighbours(neighbours, num_inputs)
            )
            out = spconv_engine.conv(x, weight, rule_book)
        else:
            # A one-gather convolution (the 7x7 stem among them) needs no tap-major copy of its table.
            by_tap = None
            if not gathers_all(self.in_channels, kernel * kernel):
                by_tap = self.sites.cached(("neighbours_by_tap",) + key, lambda: neighbours.t().contiguous())
            transposed = transposed_by_tap = None
            if x.requires_grad and torch.is_grad_enabled():
                transposed, transposed_by_tap = self.sites.cached(
                    ("transposed_neighbours",) + key, lambda: self._transposed(neighbours, x.shape[0], centred)
                )
            out = gather_gemm(x, weight, neighbours, by_tap, transposed, transposed_by_tap)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _transposed(
        self, neighbours: torch.Tensor, num_inputs: int, centred: bool
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return the transposed table and its tap-major copy; a centred window is its own mirror."""
        table = neighbours.flip(1) if centred else transposed_neighbours(neighbours, num_inputs)
        if gathers_all(self.out_channels, neighbours.shape[1]):
            return table, None
        return table, table.t().contiguous()

    def _gather_dense(self, x: torch.Tensor) -> torch.Tensor:
        # For the 7x7/2 stem on 3 channels, gathering the image and convolving by
        # gather-GEMM took 32 ms forward plus backward, against 48 ms for a dense
        # channels-last convolution followed by a gather (B=8, 224x224 images, 40 %
        # density, 1 thread, 2-core x86-64 CPU).
        return self.sites.gather(x, self.in_stride)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """Batch norm of the ``(N, C)`` rows of active sites, optionally synchronised; state as ``BatchNorm2d``."""

    sync: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        return batch_norm_rows(self, x, self.sync)


class SparseMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d`` over the active sites; a hidden tap reads zero, as in the zero-filled dense map.

    A tap in the padding reads ``-inf``, as in ``torch.nn.MaxPool2d``. The taps are
    gathered through the neighbour table, whose backward keeps only the argmax.
    Scattering the rows into the zero-filled map for ``F.max_pool2d`` was faster
    (forward plus backward 59.2 ms against 67.6 ms for ResNet-50's 3x3/2 pool of 64
    channels at 112x112, B=16, 40 % of sites active, 2 threads, 2-core x86-64 CPU),
    but it keeps the map and int64 indices for the backward, which raised the
    encoder's peak memory at mask ratio 0.6 from 0.59 to 0.64 of the masked backend's.
    """

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        neighbours = self.sites.neighbours(self.in_stride, self.kernel_size, self.stride, self.padding)
        channels = x.shape[1]
        padded = torch.cat([x, x.new_zeros(1, channels), x.new_full((1, channels), float("-inf"))])
        windows = padded.index_select(0, neighbours.reshape(-1)).view(*neighbours.shape, channels)
        return windows.max(dim=1).values


class SparseAvgPool2d(nn.AvgPool2d):
    """``AvgPool2d`` over the active sites; a hidden tap reads zero and counts toward the divisor.

    Padding taps count toward the divisor only with ``count_include_pad``, as in
    ``torch.nn.AvgPool2d``. In ceil mode the map must divide evenly, so that no
    window hangs past its edge.
    """

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rows(x, self)
        kernel, stride, padding = self.kernel_size, self.stride, self.padding
        if self.ceil_mode:
            self._check_no_partial_window(kernel, stride, padding)
        neighbours = self.sites.neighbours(self.in_stride, kernel, stride, padding)
        num_inputs, channels = x.shape
        padded = torch.cat([x, x.new_zeros(2, channels)])
        windows = padded.index_select(0, neighbours.reshape(-1)).view(*neighbours.shape, channels)

        if self.count_include_pad:
            return windows.mean(dim=1)
        inside = (neighbours <= num_inputs).sum(dim=1, keepdim=True).to(x.dtype)
        return windows.sum(dim=1) / inside

    def _check_no_partial_window(self, kernel: int, stride: int, padding: int) -> None:
        size = self.sites.size_at(self.in_stride)
        floor_size = conv_output_size(size, kernel, stride, padding)
        ceil_size = tuple(-(-(side + 2 * padding - kernel) // stride) + 1 for side in size)
        if floor_size != ceil_size:
            raise ValueError(
                f"average pooling in ceil mode over a {size[0]}x{size[1]} map leaves a partial window; "
                f"use an input size whose maps divide by the pooling stride {stride}"
            )


class SparseDropPath(timm.layers.DropPath):
    """Stochastic depth per image over the ``(N, C)`` rows: all rows of a dropped image are zeroed.

    One Bernoulli draw per image, in the same order as ``timm.layers.drop_path``
    on a ``(B, C, H, W)`` map, so a seeded run drops the same images on both backends.
    """

    sites: SparseSites
    in_stride: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        _check_rows(x, self)

        keep_prob = 1.0 - self.drop_prob
        scale = self.sites.scale(self.in_stride)
        keep = x.new_empty(self.sites.active.shape[0]).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            keep.div_(keep_prob)
        return x * keep.index_select(0, scale.batch_index).unsqueeze(1)


@SPCONV_CONVERTERS.register(nn.Conv2d)
def convert_conv(conv: nn.Conv2d, context: BuildContext) -> nn.Module:
    kernel = _square(conv.kernel_size, "kernel_size", context)
    stride = _square(conv.stride, "stride", context)
    padding = _square(conv.padding, "padding", context)
    dilation = _square(conv.dilation, "dilation", context)
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"convolution at '{context.path}' has padding_mode={conv.padding_mode!r}; the spconv backend "
            f"supports only zero padding (use the masked backend for this model)"
        )
    layer_type = SparseConv2d
    if conv.groups != 1:
        # Imported here because the grouped layer subclasses SparseConv2d from this module.
        from .layers.grouped_conv import SparseGroupedConv2d

        layer_type = SparseGroupedConv2d

    layer = layer_type(
        conv.in_channels,
        conv.out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    layer.load_state_dict(conv.state_dict())
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer


@SPCONV_CONVERTERS.register(nn.BatchNorm2d, nn.SyncBatchNorm)
def convert_batch_norm(bn: nn.modules.batchnorm._BatchNorm, context: BuildContext) -> nn.Module:
    layer = SparseBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    layer.load_state_dict(bn.state_dict())
    layer.to(device=bn.running_mean.device if bn.running_mean is not None else None)
    layer.train(bn.training)
    layer.sync = context.sync_bn or isinstance(bn, nn.SyncBatchNorm)
    return layer


@SPCONV_CONVERTERS.register(nn.MaxPool2d)
def convert_max_pool(pool: nn.MaxPool2d, context: BuildContext) -> nn.Module:
    kernel = _square(pool.kernel_size, "kernel_size", context)
    stride = _square(pool.stride, "stride", context)
    padding = _square(pool.padding, "padding", context)
    if _square(pool.dilation, "dilation", context) != 1 or pool.ceil_mode or pool.return_indices:
        raise UnsupportedLayerError(
            f"max pooling at '{context.path}' uses dilation, ceil mode or return_indices, which the "
            f"spconv backend does not support"
        )
    layer = SparseMaxPool2d(kernel, stride, padding)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer


@SPCONV_CONVERTERS.register(nn.AvgPool2d)
def convert_avg_pool(pool: nn.AvgPool2d, context: BuildContext) -> nn.Module:
    kernel = _square(pool.kernel_size, "kernel_size", context)
    stride = _square(pool.stride, "stride", context)
    padding = _square(pool.padding, "padding", context)
    if pool.divisor_override is not None:
        raise UnsupportedLayerError(
            f"average pooling at '{context.path}' sets divisor_override, which the spconv backend does not support"
        )
    layer = SparseAvgPool2d(kernel, stride, padding, pool.ceil_mode, pool.count_include_pad)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer


@SPCONV_CONVERTERS.register(timm.layers.DropPath)
def convert_drop_path(drop: timm.layers.DropPath, context: BuildContext) -> nn.Module:
    layer = SparseDropPath(drop.drop_prob, drop.scale_by_keep)
    layer.train(drop.training)
    layer.sites = context.sites
    layer.in_stride = _input_stride(context)
    return layer


# Element-wise layers act on each row alone, so they run on the (N, C) matrix as they are.
SPCONV_CONVERTERS.register_elementwise(
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Dropout,
)
SPCONV_CONVERTERS.register_container(nn.Sequential, timm_resnet.BasicBlock, timm_resnet.Bottleneck)


class SpconvEncoder(SparseEncoder):
    """Encoder on the spconv backend: ``(N, C)`` rows of active sites from the stem to the last stage."""

    backend = "spconv"
    sites: SparseSites

    def __init__(self, model_name, family, dense, input_size, sync_bn: bool = False) -> None:
        reductions = {info["module"]: int(info["reduction"]) for info in dense.feature_info}
        super().__init__(model_name, family, dense, input_size, SPCONV_CONVERTERS, sync_bn=sync_bn, needs_strides=True)
        self.stage_strides: List[int] = [reductions[name] for name in family.stages]

    def create_sites(self) -> SparseSites:
        return SparseSites(self.downsample_ratio)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        grid = self.check_inputs(images, active)
        bound = active
        if bound is None:
            bound = torch.ones(images.shape[0], 1, *grid, dtype=torch.bool, device=images.device)

        with self.sites.bind(bound):
            stage_rows = self.family.forward_features(self, self.mask_images(images, active))
            return [self.densify(rows, stride) for rows, stride in zip(stage_rows, self.stage_strides)]

    def densify(self, rows: torch.Tensor, stride: int) -> torch.Tensor:
        """Scatter the ``(N, C)`` rows at ``stride`` into a ``(B, C, H, W)`` map that is zero at hidden sites.

        The map keeps the rows' channels-last memory layout, in which the dense
        decoder's convolutions run fastest on the CPU.
        """
        return self.sites.scatter(rows, stride)
