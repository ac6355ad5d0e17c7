"""The mask: which patches the encoder sees, at the coarsest scale and at every finer one.

This module is the single place that defines the mask's semantics:

- A mask is a boolean ``(B, 1, h, w)`` tensor at the coarsest feature map, one cell
  per ``downsample_ratio x downsample_ratio`` patch of the image. ``True`` marks a
  visible (active) patch.
- At a scale with stride ``s`` the active set is that mask repeated ``ratio / s``
  times along each axis (``repeat_interleave``), so every finer active set is the
  union of whole patches.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional, Tuple

import torch

Size2d = Tuple[int, int]


def num_visible_patches(grid_size: Size2d, mask_ratio: float) -> int:
    """Return how many of the ``h * w`` patches stay visible at ``mask_ratio``."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask ratio {mask_ratio} is outside (0, 1); use a value such as 0.6")
    total = grid_size[0] * grid_size[1]
    keep = round(total * (1.0 - mask_ratio))
    if keep < 1:
        raise ValueError(
            f"mask ratio {mask_ratio} leaves no visible patch of the {total} patches; "
            f"use a ratio of at most {1.0 - 0.5 / total:.4f}"
        )
    return keep


def draw_mask(
    batch_size: int,
    grid_size: Size2d,
    mask_ratio: float,
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Draw a random ``(B, 1, h, w)`` mask with the same number of visible patches per image.

    The draw runs on the CPU (from ``generator`` when given, else the global RNG),
    so a seed gives the same masks on every device.
    """
    h, w = grid_size
    keep = num_visible_patches(grid_size, mask_ratio)
    order = torch.rand(batch_size, h * w, generator=generator).argsort(dim=1)
    active = torch.zeros(batch_size, h * w, dtype=torch.bool)
    active.scatter_(1, order[:, :keep], True)
    return active.view(batch_size, 1, h, w).to(device)


def upsample_mask(active: torch.Tensor, size: Size2d) -> torch.Tensor:
    """Repeat a ``(B, 1, h, w)`` mask to ``(B, 1, H, W)``; ``H`` and ``W`` must be multiples of ``h`` and ``w``."""
    h, w = active.shape[-2:]
    height, width = size
    if height % h or width % w:
        raise ValueError(f"feature map {height}x{width} is not a whole multiple of the mask grid {h}x{w}")
    if (height, width) == (h, w):
        return active
    return active.repeat_interleave(height // h, dim=2).repeat_interleave(width // w, dim=3)


class ActiveSites:
    """The mask of the current forward pass, shared by the layers of one encoder.

    An encoder owns one instance and binds the mask to it for the duration of a
    call (``with sites.bind(active): ...``); its converted layers read the mask at
    their own resolution through :meth:`mask_at`. Results are cached per resolution
    for the length of the call. Two encoders hold two instances, so they can run
    at the same time.

    NOTE: one encoder must not be called from two threads at once, because both
    calls would share this instance.
    """

    def __init__(self) -> None:
        self._active: Optional[torch.Tensor] = None
        self._masks: Dict[Size2d, torch.Tensor] = {}
        self._rows: Dict[Size2d, torch.Tensor] = {}

    @contextlib.contextmanager
    def bind(self, active: Optional[torch.Tensor]) -> Iterator[None]:
        """Make ``active`` (``(B, 1, h, w)`` bool, or None for all sites) the mask inside the block."""
        if active is not None and (active.dtype != torch.bool or active.dim() != 4 or active.shape[1] != 1):
            raise ValueError(f"mask must be a (B, 1, h, w) bool tensor, got {tuple(active.shape)} {active.dtype}")
        previous = (self._active, self._masks, self._rows)
        self._active, self._masks, self._rows = active, {}, {}
        try:
            yield
        finally:
            self._active, self._masks, self._rows = previous

    @property
    def active(self) -> Optional[torch.Tensor]:
        """The bound ``(B, 1, h, w)`` mask, or None when every site is active."""
        return self._active

    def mask_at(self, size: Size2d) -> Optional[torch.Tensor]:
        """Return the ``(B, 1, H, W)`` bool mask at a feature map of ``size``, or None when all sites are active."""
        if self._active is None:
            return None
        size = (int(size[0]), int(size[1]))
        if size not in self._masks:
            self._masks[size] = upsample_mask(self._active, size)
        return self._masks[size]

    def rows_at(self, size: Size2d) -> Optional[torch.Tensor]:
        """Return the indices of the active sites in ``(B, H, W)`` row-major order, or None when all are active."""
        mask = self.mask_at(size)
        if mask is None:
            return None
        size = (int(size[0]), int(size[1]))
        if size not in self._rows:
            self._rows[size] = mask.flatten().nonzero().squeeze(1)
        return self._rows[size]
