"""Per-iteration learning rate and weight decay, as in SparK.

Hand-written because timm's schedulers anneal only the learning rate, while
SparK anneals the weight decay on the same per-iteration clock.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass(frozen=True)
class Schedule:
    """Learning rate and weight decay as functions of the global iteration ``0 .. total_iters - 1``.

    The learning rate rises linearly from ``0.005 * peak_lr`` at iteration 0 to
    ``peak_lr`` at ``warmup_iters``, then follows a cosine down to ``0.001 * peak_lr``
    at the last iteration. The weight decay follows a cosine from ``wd`` at
    iteration 0 to ``wd_end`` at the last iteration.
    """

    peak_lr: float
    wd: float
    wd_end: float
    warmup_iters: int
    total_iters: int

    def lr_at(self, iteration: int) -> float:
        """Return the learning rate of global iteration ``iteration``."""
        if iteration < self.warmup_iters:
            return self.peak_lr * (0.005 + 0.995 * iteration / self.warmup_iters)
        decay_iters = max(1, self.total_iters - 1 - self.warmup_iters)
        progress = min(1.0, (iteration - self.warmup_iters) / decay_iters)
        return self.peak_lr * (0.001 + 0.999 * (0.5 + 0.5 * math.cos(math.pi * progress)))

    def wd_at(self, iteration: int) -> float:
        """Return the weight decay of global iteration ``iteration``."""
        progress = min(1.0, iteration / max(1, self.total_iters - 1))
        return self.wd_end + (self.wd - self.wd_end) * (0.5 + 0.5 * math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, iteration: int) -> Tuple[float, float]:
        """Set every group's lr and weight decay for ``iteration`` (scaled by the group); return (lr, wd)."""
        lr, wd = self.lr_at(iteration), self.wd_at(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd * group.get("weight_decay_scale", 1.0)
        return lr, wd


def build_schedule(args, iters_per_epoch: int) -> Schedule:
    """Build the schedule of a run of ``args.ep`` epochs with ``iters_per_epoch`` iterations each."""
    return Schedule(
        peak_lr=args.lr,
        wd=args.wd,
        wd_end=args.wde,
        warmup_iters=args.wp_ep * iters_per_epoch,
        total_iters=args.ep * iters_per_epoch,
    )
