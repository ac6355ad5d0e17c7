"""The sparse convolution engine: the one module of the package that imports spconv.

The spconv backend runs convolutions through :func:`conv` when the features are
on a GPU and spconv is installed. Everywhere else it uses its own gather-GEMM in
PyTorch. To try another engine with spconv's API (spconv-triton is imported as
``spconv_triton.pytorch``), change :func:`_spconv` alone.

The rule books passed to spconv are built from the backend's own neighbour
tables, so spconv never hashes coordinates and never creates output sites of
its own: a strided convolution outputs exactly the next scale's active sites.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _spconv() -> Optional[ModuleType]:
    """Import ``spconv.pytorch`` on first use; return None where it is not installed."""
    try:
        import spconv.pytorch as spconv
    except ImportError:
        return None
    return spconv


def is_available() -> bool:
    """Return whether the spconv package imports."""
    return _spconv() is not None


def runs_on(features: torch.Tensor) -> bool:
    """Return whether :func:`conv` should compute on ``features``: a CUDA tensor and spconv installed.

    spconv 2.3.8's CPU kernels give wrong values with more than one intra-op
    thread and its CPU backward calls ``torch.cuda.current_stream()``, so the CPU
    path never uses them. On one thread its ``SubMConv2d`` forward measured 16 / 8 /
    6 / 5 ms against 33 / 14 / 11 / 14 ms for the gather-GEMM at C = 64 / 128 / 256 / 512
    (B=8, 224x224 images, 40 % density, a loaded 2-core x86-64 CPU).
    """
    return features.is_cuda and is_available()


@dataclass(frozen=True)
class RuleBook:
    """spconv's index pairs of one convolution geometry.

    ``pairs`` is an int32 ``(2, K, max_pairs)`` tensor. ``pairs[0, k, :counts[k]]``
    are the input rows and ``pairs[1, k, :counts[k]]`` the output rows that
    kernel tap ``k`` (``(ky, kx)`` order) connects. Unused slots contain -1.
    """

    pairs: torch.Tensor
    counts: torch.Tensor
    num_outputs: int


def rule_book_from_neighbours(neighbours: torch.Tensor, num_inputs: int) -> RuleBook:
    """Turn an ``(N_out, K)`` neighbour table (entries ``>= num_inputs`` mean no input) into a rule book."""
    num_outputs, taps = neighbours.shape
    valid = (neighbours < num_inputs).t()
    counts = valid.sum(dim=1)
    max_pairs = max(int(counts.max()) if taps else 0, 1)

    # nonzero() walks (tap, output) in row-major order, so each tap's pairs keep the output order.
    tap, output = valid.nonzero(as_tuple=True)
    slot = valid.long().cumsum(dim=1)[tap, output] - 1
    pairs = torch.full((2, taps, max_pairs), -1, dtype=torch.int32, device=neighbours.device)
    pairs[0, tap, slot] = neighbours[output, tap].to(torch.int32)
    pairs[1, tap, slot] = output.to(torch.int32)
    return RuleBook(pairs=pairs, counts=counts.to(torch.int32), num_outputs=num_outputs)


def conv(features: torch.Tensor, weight: torch.Tensor, rule_book: RuleBook) -> torch.Tensor:
    """Convolve ``(N_in, C_in)`` rows with a timm-layout ``(out, in, kh, kw)`` weight; return ``(N_out, out)`` rows.

    spconv wants its weight as ``(out, kh, kw, in)``; the permutation happens
    here, so the module keeps timm's parameter shape and autograd maps the
    gradient back to it. The rule book runs as a regular (not submanifold)
    sparse convolution, because spconv 2.3.8's submanifold kernels on the CPU
    read a rule book stored half and use each pair twice.

    NOTE: the CUDA path has not been run on a GPU; the same call was checked on
    the CPU (one thread, with spconv's stream lookup replaced) against the
    gather-GEMM path.
    """
    spconv = _spconv()
    if spconv is None:
        raise RuntimeError("spconv is not installed; install spconv (CPU) or spconv-cu126 (CUDA 12.6)")

    weight_krsc = weight.permute(0, 2, 3, 1).contiguous()
    return spconv.functional.SparseConvFunction.apply(
        features.contiguous(),
        weight_krsc,
        rule_book.pairs,
        rule_book.counts,
        rule_book.num_outputs,
        spconv.ConvAlgo.Native,
    )
