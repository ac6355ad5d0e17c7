"""Per-call site lists and neighbour tables for the spconv backend, built from the mask in closed form.

Features between layers are ``(N, C)`` matrices whose rows are the active sites of
one scale in row-major ``(b, y, x)`` order. The active set at stride ``s`` is the
coarsest mask repeated ``ratio / s`` times along each axis, so every table here
comes from the mask by dense tensor operations, with no hashing of coordinates.
Each is built once per scale and kernel geometry per forward call and shared by
every layer of that geometry in forward and backward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Iterator, Optional, TypeVar

import torch

from ..masking import ActiveSites, Size2d

T = TypeVar("T")


@dataclass(frozen=True)
class Scale:
    """The active sites of one feature map of ``size`` ``(H, W)``.

    ``rows`` contains the flat ``(b * H + y) * W + x`` index of each active site in
    row-major order. ``index_grid`` maps every flat index to its row, or to
    ``num_sites`` at a hidden site. ``batch_index`` is the image of each row.
    """

    size: Size2d
    rows: torch.Tensor
    index_grid: torch.Tensor
    batch_index: torch.Tensor

    @property
    def num_sites(self) -> int:
        return self.rows.shape[0]


def conv_output_size(size: Size2d, kernel: int, stride: int, padding: int, dilation: int = 1) -> Size2d:
    """Return the output ``(H, W)`` of a convolution or pooling window without ceil mode."""
    span = dilation * (kernel - 1) + 1
    return tuple((side + 2 * padding - span) // stride + 1 for side in size)  # type: ignore[return-value]


class SparseSites(ActiveSites):
    """:class:`ActiveSites` that also caches, per call, each scale's sites and each neighbour table.

    Layers address a scale by its stride (image pixels per site). With a bound
    ``(B, 1, *grid)`` mask, the feature map at stride ``s`` has
    ``grid * downsample_ratio / s`` sites per axis. The spconv encoder always binds a mask (an
    all-true one when every site is active), so :meth:`scale` always has rows.
    """

    def __init__(self, downsample_ratio: int) -> None:
        super().__init__()
        self.downsample_ratio = downsample_ratio
        self._tables: Dict[Hashable, object] = {}

    @contextlib.contextmanager
    def bind(self, active: Optional[torch.Tensor]) -> Iterator[None]:
        previous = self._tables
        self._tables = {}
        try:
            with super().bind(active):
                yield
        finally:
            self._tables = previous

    def cached(self, key: Hashable, build: Callable[[], T]) -> T:
        """Return the table stored under ``key`` for the bound mask, building it on first use."""
        if self.active is None:
            raise RuntimeError("no mask is bound; call the layer inside SparseSites.bind(active)")
        if key not in self._tables:
            self._tables[key] = build()
        return self._tables[key]  # type: ignore[return-value]

    def size_at(self, stride: int) -> Size2d:
        """Return the feature map size ``(H, W)`` at ``stride`` for the bound mask."""
        if self.active is None:
            raise RuntimeError("no mask is bound; call the layer inside SparseSites.bind(active)")
        if self.downsample_ratio % stride:
            raise ValueError(f"stride {stride} does not divide the downsample ratio {self.downsample_ratio}")
        repeat = self.downsample_ratio // stride
        return self.active.shape[-2] * repeat, self.active.shape[-1] * repeat

    def scale(self, stride: int) -> Scale:
        """Return the active sites of the feature map at ``stride``."""
        return self.cached(("scale", stride), lambda: self._build_scale(stride))

    def scatter(self, rows: torch.Tensor, stride: int) -> torch.Tensor:
        """Return the ``(N, C)`` rows at ``stride`` as a ``(B, C, H, W)`` map, zero at hidden sites.

        The map's memory is channels-last, the rows' own layout, so a map in
        which every site is active is a view of the rows.
        """
        scale = self.scale(stride)
        batch = self.active.shape[0]
        height, width = scale.size
        channels = rows.shape[1]
        if scale.num_sites == batch * height * width:
            dense = rows
        else:
            dense = rows.new_zeros(batch * height * width, channels).index_copy(0, scale.rows, rows)
        return dense.view(batch, height, width, channels).permute(0, 3, 1, 2)

    def gather(self, dense: torch.Tensor, stride: int) -> torch.Tensor:
        """Return the ``(N, C)`` rows of the active sites at ``stride`` of a ``(B, C, H, W)`` map."""
        scale = self.scale(stride)
        if tuple(dense.shape[-2:]) != scale.size:
            raise ValueError(
                f"map of size {tuple(dense.shape[-2:])} does not match the {scale.size} map "
                f"at stride {stride} of the bound mask"
            )
        return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, scale.rows)

    def neighbours(self, in_stride: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> torch.Tensor:
        """Return the ``(N_out, kernel * kernel)`` neighbour table of a ``kernel x kernel`` window.

        Row ``i`` lists, in ``(ky, kx)`` order, the input row under each tap of
        the window at the ``i``-th active site of the output scale (stride
        ``in_stride * stride``). A tap on a hidden input site contains ``N_in`` and
        a tap in the padding contains ``N_in + 1``, so callers append one row for
        each: two zero rows for a convolution, a zero and a ``-inf`` row for max
        pooling. The output sites are exactly the next scale's active sites.
        Taps lie ``dilation`` sites apart.
        """
        key = ("neighbours", in_stride, kernel, stride, padding, dilation)
        return self.cached(key, lambda: self._build_neighbours(in_stride, kernel, stride, padding, dilation))

    def _build_scale(self, stride: int) -> Scale:
        size = self.size_at(stride)
        rows = self.rows_at(size)
        num_sites = rows.shape[0]
        index_grid = torch.full((self.active.shape[0] * size[0] * size[1],), num_sites, dtype=torch.long, device=rows.device)
        index_grid[rows] = torch.arange(num_sites, device=rows.device)
        batch_index = torch.div(rows, size[0] * size[1], rounding_mode="floor")
        return Scale(size=size, rows=rows, index_grid=index_grid, batch_index=batch_index)

    def _build_neighbours(self, in_stride: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> torch.Tensor:
        source = self.scale(in_stride)
        height, width = source.size
        out_size = conv_output_size(source.size, kernel, stride, padding, dilation)
        target = self.scale(in_stride * stride)
        if out_size != target.size:
            raise ValueError(
                f"a {kernel}x{kernel} window with stride {stride}, padding {padding} and dilation {dilation} maps "
                f"{height}x{width} to {out_size[0]}x{out_size[1]}, not to the next scale's "
                f"{target.size[0]}x{target.size[1]}"
            )

        # Output coordinates (b, y, x) of every output row, then the input coordinate under every tap.
        out_height, out_width = target.size
        batch = target.batch_index
        within = target.rows - batch * (out_height * out_width)
        out_y = torch.div(within, out_width, rounding_mode="floor")
        out_x = within - out_y * out_width
        taps = torch.arange(kernel, device=batch.device) * dilation
        in_y = (out_y * stride - padding)[:, None, None] + taps[None, :, None]
        in_x = (out_x * stride - padding)[:, None, None] + taps[None, None, :]

        inside = (in_y >= 0) & (in_y < height) & (in_x >= 0) & (in_x < width)
        flat = (batch[:, None, None] * height + in_y.clamp(0, height - 1)) * width + in_x.clamp(0, width - 1)
        table = source.index_grid[flat]
        table = torch.where(inside, table, torch.full_like(table, source.num_sites + 1))
        return table.reshape(target.num_sites, kernel * kernel)
