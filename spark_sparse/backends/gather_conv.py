"""Sparse convolution of ``(N, C)`` rows by gather-GEMM, with a backward that keeps only the input rows.

The forward gathers each output site's taps through a neighbour table and
multiplies them by the weight. Autograd through that expression would save the
gathered ``(N, K * C)`` columns and take the input gradient with an
``index_add`` over every tap. :class:`GatherConvFunction` saves the input rows
and the tables instead. It takes the input gradient as a second gather-GEMM, the
transposed convolution. For each input site and tap, the transposed table lists
the output site that read it at that tap, and the gathered gradient rows are
multiplied by the transposed weight. For a stride-1 convolution with centred padding the transposed table is
the forward table with its taps reversed, so no ``index_add`` runs at all.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

# Below this many input channels a convolution sums one (N, C_in) x (C_in, C_out)
# product per kernel tap. From it up, it gathers one (N, K * C_in) matrix for a
# single matmul. Measured forward plus backward of a 3x3 layer (B=8, 224x224 images,
# 40 % density, 1 thread, 2-core x86-64 CPU), per tap / one gather / dense
# channels-last masked: C=64 36.7 / 36.7 / 54.8 ms, C=128 31.2 / 28.6 / 50.7 ms,
# C=256 31.7 / 25.6 / 49.7 ms, C=512 58.3 / 30.2 / 59.0 ms.
GATHER_ALL_MIN_CHANNELS = 128

# A gathered (N, K * C_in) matrix at most this wide is built in one piece at any
# channel count. The 7x7 stem on 3 channels is 147 wide, so it runs one matmul
# instead of 49 matmuls with an inner size of 3.
GATHER_ALL_MAX_WIDTH = 256


def gathers_all(in_channels: int, taps: int) -> bool:
    """Return whether a convolution gathers one ``(N, K * C_in)`` matrix, so it needs no tap-major table."""
    return in_channels >= GATHER_ALL_MIN_CHANNELS or taps == 1 or in_channels * taps <= GATHER_ALL_MAX_WIDTH


def autocast_operands(rows: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``rows`` and ``weight`` in the autocast dtype of their device when autocast is on there.

    Under autocast ``F.conv2d`` casts both operands to the lower precision, so the
    sparse layers do the same before their matrix products and in-place sums,
    which autocast does not cast. The cast of the weight is differentiable, so its
    gradient reaches the float32 parameter.
    """
    device_type = rows.device.type
    # Autocast leaves float64 operations in float64.
    if not torch.is_autocast_enabled(device_type) or rows.dtype == torch.float64:
        return rows, weight
    dtype = torch.get_autocast_dtype(device_type)
    return rows.to(dtype), weight.to(dtype)


def _pad_rows(rows: torch.Tensor) -> torch.Tensor:
    """Append the two zero rows that hidden (``N``) and padding (``N + 1``) taps read."""
    return torch.cat([rows, rows.new_zeros(2, rows.shape[1])])


def _columns(padded: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    return padded.index_select(0, neighbours.reshape(-1)).view(neighbours.shape[0], -1)


def conv_rows(
    rows: torch.Tensor, weight: torch.Tensor, neighbours: torch.Tensor, neighbours_by_tap: Optional[torch.Tensor]
) -> torch.Tensor:
    """Convolve ``(N_in, C_in)`` rows with an ``(out, in, kh, kw)`` weight; return ``(N_out, out)`` rows, untracked."""
    out_channels, in_channels = weight.shape[:2]
    padded = _pad_rows(rows)

    if gathers_all(in_channels, neighbours.shape[1]):
        return _columns(padded, neighbours) @ weight.permute(0, 2, 3, 1).reshape(out_channels, -1).t()

    if neighbours_by_tap is None:
        neighbours_by_tap = neighbours.t().contiguous()
    weight_by_tap = weight.flatten(2)
    out = padded.index_select(0, neighbours_by_tap[0]) @ weight_by_tap[:, :, 0].t()
    for tap in range(1, neighbours_by_tap.shape[0]):
        out.addmm_(padded.index_select(0, neighbours_by_tap[tap]), weight_by_tap[:, :, tap].t())
    return out


def weight_grad(
    rows: torch.Tensor, grad_out: torch.Tensor, neighbours: torch.Tensor, neighbours_by_tap: Optional[torch.Tensor]
) -> torch.Tensor:
    """Return the ``(out, in, kh, kw)`` weight gradient; the columns are rebuilt, tap by tap below 128 channels."""
    in_channels = rows.shape[1]
    out_channels = grad_out.shape[1]
    taps = neighbours.shape[1]
    kernel = int(round(taps**0.5))
    padded = _pad_rows(rows)

    if gathers_all(in_channels, taps):
        grad = grad_out.t() @ _columns(padded, neighbours)
        return grad.view(out_channels, kernel, kernel, in_channels).permute(0, 3, 1, 2)

    if neighbours_by_tap is None:
        neighbours_by_tap = neighbours.t().contiguous()
    grad = grad_out.new_empty(taps, out_channels, in_channels)
    for tap in range(taps):
        torch.mm(grad_out.t(), padded.index_select(0, neighbours_by_tap[tap]), out=grad[tap])
    return grad.permute(1, 2, 0).reshape(out_channels, in_channels, kernel, kernel)


def transposed_neighbours(neighbours: torch.Tensor, num_inputs: int) -> torch.Tensor:
    """Return the ``(N_in, K)`` table of the output row that reads each input row at each tap, else ``N_out``.

    Each tap maps distinct output sites to distinct input sites, so no two
    outputs claim the same (input, tap) entry.
    """
    num_outputs, taps = neighbours.shape
    table = torch.full((num_inputs + 2, taps), num_outputs, dtype=neighbours.dtype, device=neighbours.device)
    tap_index = torch.arange(taps, device=neighbours.device).expand(num_outputs, taps)
    output_index = torch.arange(num_outputs, device=neighbours.device)[:, None].expand(num_outputs, taps)
    table[neighbours, tap_index] = output_index
    return table[:num_inputs]


class GatherConvFunction(torch.autograd.Function):
    """Gather-GEMM convolution whose backward saves the input rows and tables, not the gathered columns."""

    @staticmethod
    def forward(
        ctx,
        rows: torch.Tensor,
        weight: torch.Tensor,
        neighbours: torch.Tensor,
        neighbours_by_tap: Optional[torch.Tensor],
        transposed: Optional[torch.Tensor],
        transposed_by_tap: Optional[torch.Tensor],
    ) -> torch.Tensor:
        ctx.save_for_backward(rows, weight, neighbours, neighbours_by_tap, transposed, transposed_by_tap)
        return conv_rows(rows, weight, neighbours, neighbours_by_tap)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> Tuple[Optional[torch.Tensor], ...]:
        rows, weight, neighbours, neighbours_by_tap, transposed, transposed_by_tap = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_rows = grad_weight = None

        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(rows, grad_out, neighbours, neighbours_by_tap)
        if ctx.needs_input_grad[0]:
            grad_rows = conv_rows(grad_out, weight.transpose(0, 1), transposed, transposed_by_tap)
        return grad_rows, grad_weight, None, None, None, None


def gather_gemm(
    rows: torch.Tensor,
    weight: torch.Tensor,
    neighbours: torch.Tensor,
    neighbours_by_tap: Optional[torch.Tensor],
    transposed: Optional[torch.Tensor] = None,
    transposed_by_tap: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Convolve ``(N_in, C_in)`` rows by gather-GEMM over a neighbour table; return ``(N_out, out)`` rows.

    ``weight`` has timm's ``(out, in, kh, kw)`` layout; ``neighbours`` is the
    ``(N_out, kh * kw)`` table of :meth:`SparseSites.neighbours` and
    ``neighbours_by_tap`` its contiguous transpose, or None to transpose it here
    when the per-tap path runs. Taps on hidden or padding
    sites read one of two appended zero rows. ``transposed`` (from
    :func:`transposed_neighbours`, with its own contiguous transpose) serves the
    input gradient; it is built here when the rows need a gradient and none is given.
    """
    if not (torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)):
        return conv_rows(rows, weight, neighbours, neighbours_by_tap)

    if rows.requires_grad and transposed is None:
        transposed = transposed_neighbours(neighbours, rows.shape[0])
        transposed_by_tap = transposed.t().contiguous()
    if not rows.requires_grad:
        transposed = transposed_by_tap = None
    return GatherConvFunction.apply(rows, weight, neighbours, neighbours_by_tap, transposed, transposed_by_tap)
