"""Batch normalisation over an ``(N, C)`` matrix of active sites, optionally synchronised across ranks.

Both backends normalise the rows of active sites only. ``torch.nn.SyncBatchNorm``
rejects CPU tensors (torch 2.14), and ranks hold different numbers of active
sites, so the synchronised form here all-reduces per-rank sums and counts with
``torch.distributed._functional_collectives.all_reduce``, which runs under gloo and
NCCL alike. Its registered backward all-reduces the gradient with the same sum, so
the gradient of a summed all-reduce is the all-reduced gradient. torch 2.14 names it
as the replacement of the deprecated ``torch.distributed.nn.functional.all_reduce``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Return the sum of ``tensor`` over the default process group, differentiably."""
    return functional_collectives.all_reduce(tensor, "sum", dist.group.WORLD)


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Return the running-average factor ``torch.nn.BatchNorm`` would use for this step."""
    if bn.momentum is not None:
        return bn.momentum
    return 1.0 / float(bn.num_batches_tracked)


def batch_norm_rows(bn: nn.modules.batchnorm._BatchNorm, rows: torch.Tensor, sync: bool) -> torch.Tensor:
    """Apply ``bn``'s parameters and statistics to the ``(N, C)`` matrix ``rows``.

    With ``sync`` set, in training mode and with more than one rank, the batch
    statistics are taken over the rows of every rank; otherwise this is
    ``BatchNorm1d`` on ``rows``.
    """
    use_batch_stats = bn.training or not bn.track_running_stats
    if not (sync and use_batch_stats and _distributed_world()):
        return F.batch_norm(
            rows,
            bn.running_mean if not bn.training or bn.track_running_stats else None,
            bn.running_var if not bn.training or bn.track_running_stats else None,
            bn.weight,
            bn.bias,
            use_batch_stats,
            _batch_norm_momentum(bn),
            bn.eps,
        )

    # Two all-reduces (sum and count, then the centred sum of squares) are more
    # accurate than E[x^2] - E[x]^2 in one.
    count = torch.tensor([float(rows.shape[0])], dtype=rows.dtype, device=rows.device)
    totals = _all_reduce_sum(torch.cat([rows.sum(0), count]))
    total_count = totals[-1]
    mean = totals[:-1] / total_count
    centred = rows - mean
    var = _all_reduce_sum(centred.square().sum(0)) / total_count

    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = _momentum_factor(bn)
            unbiased = var * (total_count / (total_count - 1).clamp(min=1))
            bn.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)

    out = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight + bn.bias
    return out


def _batch_norm_momentum(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count this step and return the factor, as ``torch.nn.BatchNorm.forward`` does."""
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        return _momentum_factor(bn)
    return 0.0 if bn.momentum is None else bn.momentum


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm of a dense ``(B, C, H, W)`` map whose statistics span every rank; same state as ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        out = batch_norm_rows(self, rows, sync=True)
        return out.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
