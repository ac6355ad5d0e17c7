"""Grouped and depthwise submanifold convolution for the spconv backend.

spconv has no grouped convolution (it asserts ``groups == 1``), so these layers
compute in PyTorch from the backend's neighbour tables, on the CPU and on CUDA
alike. A depthwise convolution multiplies each tap's ``(N, C)`` neighbour rows
by that tap's ``(C,)`` weights and sums over the taps. Its autograd function keeps
only the input rows for the backward pass, not the ``(N, K, C)`` gathered taps.
Any other grouped convolution gathers one ``(N, K * C_in)`` matrix and runs one
batched matrix product per group.

A stride-1 depthwise layer whose window is centred on its output site takes a
second route when enough sites are active: it scatters the rows into a zero-filled
channels-last map, runs ``F.conv2d`` over it and gathers the active sites back.
Hidden sites are zero in that map, so the active outputs are those of the sum over
the taps. A depthwise layer does only 49 multiply-adds per value for a 7x7 kernel,
so its cost is memory traffic, and the sum's 49 row gathers cost more than one
dense pass. ``kernels_bench/bench_layers.py`` on convnext_tiny's first depthwise
shape (B=4, C=96, 56x56 map, 40 % of sites active, 2 threads, 2-core x86-64 CPU),
forward plus backward: 46.97 ms by the sum over the taps, 14.08 ms through the
dense map, 15.46 ms for the masked backend's channels-last layer.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..gather_conv import autocast_operands, transposed_neighbours
from ..sparse import SparseConv2d, _check_rows


# A stride-1 depthwise layer runs through a dense map from this share of active sites up.
# NOTE: an estimate from one shape. The dense map's cost does not depend on the share and
# the sum's grows with it, so the figures in the module docstring break even near 12 %.
DEPTHWISE_DENSE_MIN_DENSITY = 0.12


def _depthwise_sum(rows: torch.Tensor, weight_by_tap: torch.Tensor, table_by_tap: torch.Tensor) -> torch.Tensor:
    """Sum, over the taps, each tap's gathered ``(N_out, C)`` rows times its ``(C,)`` weights; untracked."""
    padded = torch.cat([rows, rows.new_zeros(2, rows.shape[1])])
    out = rows.new_zeros(table_by_tap.shape[1], rows.shape[1])
    for tap in range(table_by_tap.shape[0]):
        out.addcmul_(padded.index_select(0, table_by_tap[tap]), weight_by_tap[tap])
    return out


class DepthwiseConvFunction(torch.autograd.Function):
    """Depthwise convolution of ``(N_in, C)`` rows over a tap-major ``(K, N_out)`` neighbour table.

    Entries ``N_in`` and ``N_in + 1`` of the table (a hidden or a padding tap)
    read zero. ``weight_by_tap`` is ``(K, C)``; the result is ``(N_out, C)``.
    The input gradient is the same sum over the transposed ``(K, N_in)`` table,
    which lists the output row that read each input row at each tap. A gather
    runs there instead of ``index_add_``, whose CPU kernel adds one row at a time.
    """

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        weight_by_tap: torch.Tensor,
        neighbours_by_tap: torch.Tensor,
        transposed_by_tap: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(rows, weight_by_tap, neighbours_by_tap, transposed_by_tap)
        return _depthwise_sum(rows, weight_by_tap, neighbours_by_tap)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None]:
        rows, weight_by_tap, neighbours_by_tap, transposed_by_tap = ctx.saved_tensors
        grad_rows = grad_weight = None

        if ctx.needs_input_grad[0]:
            grad_rows = _depthwise_sum(grad_out, weight_by_tap, transposed_by_tap)
        if ctx.needs_input_grad[1]:
            padded = torch.cat([rows, rows.new_zeros(2, rows.shape[1])])
            grad_weight = torch.empty_like(weight_by_tap)
            for tap in range(neighbours_by_tap.shape[0]):
                grad_weight[tap] = (padded.index_select(0, neighbours_by_tap[tap]) * grad_out).sum(dim=0)
        return grad_rows, grad_weight, None, None


def depthwise_conv_rows(
    rows: torch.Tensor, weight: torch.Tensor, neighbours_by_tap: torch.Tensor, transposed_by_tap: torch.Tensor
) -> torch.Tensor:
    """Convolve ``(N_in, C)`` rows with a ``(C, 1, kh, kw)`` depthwise weight; return ``(N_out, C)`` rows.

    ``neighbours_by_tap`` is the tap-major ``(K, N_out)`` neighbour table and
    ``transposed_by_tap`` the tap-major ``(K, N_in)`` transposed one.
    """
    weight_by_tap = weight.flatten(1).t()
    return DepthwiseConvFunction.apply(rows, weight_by_tap, neighbours_by_tap, transposed_by_tap)


def grouped_conv_rows(rows: torch.Tensor, weight: torch.Tensor, neighbours: torch.Tensor, groups: int) -> torch.Tensor:
    """Convolve ``(N_in, C_in)`` rows with a ``(C_out, C_in / groups, kh, kw)`` weight; return ``(N_out, C_out)`` rows.

    The gathered ``(N_out, K, C_in)`` taps are split into ``groups`` matrices of
    ``(N_out, K * C_in / groups)``, each multiplied by its group's weight.
    """
    out_channels, group_in = weight.shape[:2]
    group_out = out_channels // groups
    num_outputs, taps = neighbours.shape
    padded = torch.cat([rows, rows.new_zeros(2, rows.shape[1])])

    columns = padded.index_select(0, neighbours.reshape(-1)).view(num_outputs, taps, groups, group_in)
    columns = columns.permute(2, 0, 1, 3).reshape(groups, num_outputs, taps * group_in)
    weight_by_group = weight.view(groups, group_out, group_in, taps).permute(0, 3, 2, 1)
    out = torch.bmm(columns, weight_by_group.reshape(groups, taps * group_in, group_out))
    return out.permute(1, 0, 2).reshape(num_outputs, out_channels)


class SparseGroupedConv2d(SparseConv2d):
    """Grouped ``Conv2d`` (depthwise included) from the active sites of one scale to those of the next."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = self._gather_dense(x)
        _check_rows(x, self)

        x, weight = autocast_operands(x, self.weight)
        if self._runs_dense(x):
            out = self._depthwise_through_dense_map(x, weight)
            return out if self.bias is None else out + self.bias.to(out.dtype)

        key = (self.in_stride, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0])
        neighbours = self.sites.neighbours(*key)
        if self.groups == self.in_channels == self.out_channels:
            by_tap = self.sites.cached(("neighbours_by_tap",) + key, lambda: neighbours.t().contiguous())
            num_inputs = x.shape[0]
            transposed_by_tap = self.sites.cached(
                ("depthwise_transposed_by_tap",) + key,
                lambda: transposed_neighbours(neighbours, num_inputs).t().contiguous(),
            )
            out = depthwise_conv_rows(x, weight, by_tap, transposed_by_tap)
        else:
            out = grouped_conv_rows(x, weight, neighbours, self.groups)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _runs_dense(self, x: torch.Tensor) -> bool:
        """Return whether this is a centred stride-1 depthwise layer on a map with enough active sites."""
        depthwise = self.groups == self.in_channels == self.out_channels
        if not (depthwise and self._centred()):
            return False
        height, width = self.sites.size_at(self.in_stride)
        return x.shape[0] >= DEPTHWISE_DENSE_MIN_DENSITY * self.sites.active.shape[0] * height * width

    def _depthwise_through_dense_map(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Scatter the rows into a zero-filled map, convolve it densely and gather the active sites back."""
        dense = self.sites.scatter(x, self.in_stride)
        height, width = dense.shape[-2:]
        window = self.dilation[0] * (self.kernel_size[0] - 1) + 1
        if min(height, width) <= window:
            # oneDNN's channels-last depthwise backward is slow on a map no larger than the window:
            # bench_layers.py gave 13.72 ms against 3.79 ms in NCHW (dense forward plus backward,
            # 7x7 kernel on a 7x7 map, B=4, C=768, 2 threads), and channels-last wins on larger maps.
            dense = dense.contiguous()
        out = F.conv2d(dense, weight, None, 1, self.padding, self.dilation, self.groups)
        return self.sites.gather(out, self.in_stride)
