"""Timing and peak-memory measurement shared by the layer and model benchmarks.

Cases run interleaved: every round times each case once, in an order that
rotates from round to round. A slow spell of a shared machine then falls on all
cases alike, and a ratio of two cases comes from timings measured side by side.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

MEMORY_METHOD_CPU = (
    "torch.profiler with profile_memory=True over one iteration: the CPU allocator's allocation and free "
    "events summed in time order; the peak bytes allocated during the iteration and not yet freed "
    "(blocks that existed before the iteration are not counted, even where the iteration frees them)"
)
MEMORY_METHOD_CUDA = (
    "torch.cuda.max_memory_allocated during one iteration, less torch.cuda.memory_allocated before it"
)


@dataclass(frozen=True)
class Stats:
    """Summary of repeated samples: timings in milliseconds, or unitless ratios."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    samples: List[float]

    def to_json(self, suffix: str = "_ms") -> Dict[str, object]:
        """Return the summary as a dict whose keys end in ``suffix``, the unit (``""`` for ratios)."""
        return {
            f"median{suffix}": round(self.median, 4),
            f"q1{suffix}": round(self.q1, 4),
            f"q3{suffix}": round(self.q3, 4),
            f"min{suffix}": round(self.minimum, 4),
            f"max{suffix}": round(self.maximum, 4),
            f"samples{suffix}": [round(value, 4) for value in self.samples],
        }


def quartiles(values: Sequence[float]) -> tuple:
    """Return ``(q1, median, q3)``; one value gives that value three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def summarize(samples_ms: Sequence[float]) -> Stats:
    """Return the median, quartiles and range of ``samples_ms``."""
    q1, median, q3 = quartiles(samples_ms)
    return Stats(median, q1, q3, min(samples_ms), max(samples_ms), list(samples_ms))


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Run ``fn`` once and return its wall time in milliseconds; on CUDA, between two events after a sync."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    start_s = time.perf_counter()
    fn()
    return (time.perf_counter() - start_s) * 1000.0


def interleave(cases: Mapping[str, Callable[[], object]], rounds: int, device: torch.device) -> Dict[str, List[float]]:
    """Time every case once per round, rotating the order each round; return each case's samples in ms."""
    names = list(cases)
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_call(cases[name], device))
    return samples


def paired_ratios(numerator_ms: Sequence[float], denominator_ms: Sequence[float]) -> Stats:
    """Summarise per-round ratios ``numerator / denominator`` of two interleaved cases (unitless, not ms)."""
    return summarize([a / b for a, b in zip(numerator_ms, denominator_ms)])


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Run ``fn`` once and return its peak memory in bytes, as :data:`MEMORY_METHOD_CPU` or ``_CUDA`` describe.

    On the CPU this walks the profiler's allocator events, because PyTorch keeps
    no peak counter for CPU memory. Tensors saved for backward are counted,
    since the events come from the allocator itself.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _peak_from_allocations(_cpu_allocations(prof))


def _cpu_allocations(prof: profile) -> List[tuple]:
    """Return ``(time_ns, bytes)`` of every CPU allocation (positive) and free (negative) in ``prof``."""
    # NOTE: experimental_event_tree is the API torch.profiler's own memory timeline
    # reads (torch 2.14); it may change in a later torch release.
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if str(node.tag).endswith("Allocation") and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
    events.sort()
    return events


def _peak_from_allocations(events: Sequence[tuple]) -> int:
    live = 0
    peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak
