"""Synchronised sparse batch norm under a real 2-process gloo group, ranks holding different row counts."""
from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from spark_sparse.norm import batch_norm_rows

# Active sites per rank: unequal, so per-rank means would differ from the global one.
ROWS_PER_RANK = (5, 11)
CHANNELS = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_inputs():
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(sum(ROWS_PER_RANK), CHANNELS, generator=generator) * 2 + 1
    upstream = torch.randn(sum(ROWS_PER_RANK), CHANNELS, generator=generator)
    return rows, upstream


def make_norm() -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(CHANNELS)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return bn.train()


def sync_worker(rank: int, port: int, results: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rows, upstream = make_inputs()
        start = sum(ROWS_PER_RANK[:rank])
        local = rows[start : start + ROWS_PER_RANK[rank]].clone().requires_grad_(True)
        bn = make_norm()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = batch_norm_rows(bn, local, sync=True)
            (out * upstream[start : start + ROWS_PER_RANK[rank]]).sum().backward()

        # Without DDP, each rank holds its rows' share of the parameter gradients.
        weight_grad = bn.weight.grad.clone()
        dist.all_reduce(weight_grad)
        results[rank] = {
            "out": out.detach(),
            "input_grad": local.grad,
            "weight_grad": weight_grad,
            "running_mean": bn.running_mean.clone(),
            "running_var": bn.running_var.clone(),
            "warnings": [str(warning.message) for warning in caught],
        }
    finally:
        dist.destroy_process_group()


def test_sync_rows_match_single_process():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(sync_worker, args=(free_port(), results), nprocs=2, join=True)

    rows, upstream = make_inputs()
    rows.requires_grad_(True)
    bn = make_norm()
    expected = F.batch_norm(rows, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, bn.eps)
    (expected * upstream).sum().backward()

    out = torch.cat([results[0]["out"], results[1]["out"]])
    input_grad = torch.cat([results[0]["input_grad"], results[1]["input_grad"]])
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(input_grad, rows.grad, rtol=1e-5, atol=1e-6)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank]["weight_grad"], bn.weight.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(results[rank]["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
        assert not [text for text in results[rank]["warnings"] if "deprecated" in text]
