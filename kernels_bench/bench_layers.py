"""Layer benchmark: every distinct conv, batch norm and pool shape of a timm CNN, masked against spconv.

Each shape runs dense over the whole map (NCHW and channels-last), as the masked
backend's layer (both layouts), and as the spconv backend's layer on the rows of
active sites. On the CPU it also runs as spconv's own kernel with one thread. All
variants of a shape share weights, input and mask, and are timed interleaved.

    python kernels_bench/bench_layers.py [--model resnet50] [--batch-size 16] [--mask-ratio 0.6]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# The CPU memory measurement starts torch's profiler; level 6 keeps kineto's start, stop and
# no-GPU lines off the terminal. It must be set before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
if __package__ in (None, ""):
    # Run as a script: import the project from the repository root instead of this folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time
from typing import Dict, List, Optional, Sequence

import torch

from kernels_bench.cli import add_common_arguments, check_shapes, mask_ratio
from kernels_bench.layer_cases import LayerBench, compare_outputs
from kernels_bench.layer_shapes import LayerShape, collect_layer_shapes
from kernels_bench.measure import (
    MEMORY_METHOD_CPU,
    MEMORY_METHOD_CUDA,
    interleave,
    paired_ratios,
    peak_memory_bytes,
    summarize,
)
from kernels_bench.report import (
    format_bytes,
    format_ms,
    format_ratio,
    plot_layer_speedups,
    print_table,
    record_stem,
    write_record,
)
from kernels_bench.workload import load_photos, machine_info, machine_kind, resolve_device, seeded_mask
from spark_sparse.models import SUPPORTED_MODELS, create_dense_model, downsample_ratio_of

MASKED_LAYOUTS = ("masked_nchw", "masked_channels_last")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(SUPPORTED_MODELS), help="timm model (default resnet50)")
    parser.add_argument("--mask-ratio", type=mask_ratio, default=0.6, help="share of hidden patches (default 0.6)")
    parser.add_argument(
        "--no-spconv-native", action="store_true", help="skip spconv's own CPU kernel (one thread, forward only)"
    )
    add_common_arguments(parser, default_repeats=5, default_warmup=1)
    args = parser.parse_args(argv)
    args.downsample_ratio = downsample_ratio_of(create_dense_model(args.model))
    args.input_size = check_shapes(parser, args.input_size, args.downsample_ratio, [args.mask_ratio])
    return args


def bench_shape(
    shape: LayerShape, args: argparse.Namespace, device: torch.device, photos: torch.Tensor, downsample_ratio: int
) -> Dict[str, object]:
    """Measure every variant of one shape: output check, warm-up, peak memory, then interleaved timing."""
    grid = (args.input_size[0] // downsample_ratio, args.input_size[1] // downsample_ratio)
    active = seeded_mask(args.batch_size, grid, args.mask_ratio, args.seed)
    with LayerBench(shape, active, photos, downsample_ratio, device, args.amp, seed=args.seed) as bench:
        variants = bench.variants(include_spconv_native=not args.no_spconv_native)
        differences = compare_outputs(bench, variants)
        for _ in range(args.warmup):
            for variant in variants:
                variant.forward()
                if variant.forward_backward is not None:
                    variant.forward_backward()

        memory = {
            variant.name: peak_memory_bytes(variant.forward_backward or variant.forward, device) for variant in variants
        }
        forward = interleave({variant.name: variant.forward for variant in variants}, args.repeats, device)
        backward_cases = {variant.name: variant.forward_backward for variant in variants if variant.forward_backward}
        forward_backward = interleave(backward_cases, args.repeats, device)
        num_input_sites = bench.num_input_sites

    result: Dict[str, object] = {
        "name": shape.name,
        "kind": shape.kind,
        "in_channels": shape.in_channels,
        "out_channels": shape.out_channels,
        "kernel": shape.kernel,
        "stride": shape.stride,
        "padding": shape.padding,
        "input_size": list(shape.input_size),
        "input_stride": shape.input_stride,
        "paths": shape.paths,
        "active_input_sites": num_input_sites,
        "total_input_sites": args.batch_size * shape.input_size[0] * shape.input_size[1],
        "variants": {},
    }
    for variant in variants:
        result["variants"][variant.name] = {
            "threads": variant.threads,
            "note": variant.note,
            "forward": summarize(forward[variant.name]).to_json(),
            "forward_backward": summarize(forward_backward[variant.name]).to_json() if variant.name in forward_backward else None,
            "peak_memory_bytes": memory[variant.name],
            "memory_of": "forward_backward" if variant.forward_backward else "forward",
            "max_abs_diff_vs_masked_nchw": differences.get(variant.name),
        }
    result.update(_speedups(forward, forward_backward, memory))
    return result


def _speedups(
    forward: Dict[str, List[float]], forward_backward: Dict[str, List[float]], memory: Dict[str, int]
) -> Dict[str, object]:
    """Return the spconv backend's paired speed-ups over the faster masked layout, and the memory ratio."""
    faster_forward = min(MASKED_LAYOUTS, key=lambda name: summarize(forward[name]).median)
    faster_backward = min(MASKED_LAYOUTS, key=lambda name: summarize(forward_backward[name]).median)
    figures: Dict[str, object] = {
        "faster_masked_layout_forward": faster_forward,
        "faster_masked_layout_forward_backward": faster_backward,
        "speedup_forward": paired_ratios(forward[faster_forward], forward["spconv_backend"]).to_json(""),
        "speedup_forward_backward": paired_ratios(
            forward_backward[faster_backward], forward_backward["spconv_backend"]
        ).to_json(""),
        "memory_ratio": memory["spconv_backend"] / max(memory[faster_backward], 1),
    }
    if "spconv_native" in forward:
        # Above 1: spconv's own kernel is slower than the backend's gather-GEMM at the same single thread.
        figures["spconv_native_over_backend_1thread"] = paired_ratios(
            forward["spconv_native"], forward["spconv_backend_1thread"]
        ).to_json("")
    return figures


def print_summary(record: Dict[str, object]) -> None:
    rows = []
    for layer in record["layers"]:
        variants = layer["variants"]

        def median(name: str, key: str = "forward") -> Optional[float]:
            figures = variants.get(name, {}).get(key)
            return figures["median_ms"] if figures else None

        faster = layer["faster_masked_layout_forward"]
        native = layer.get("spconv_native_over_backend_1thread")
        rows.append(
            [
                layer["name"],
                format_ms(median("dense_channels_last")),
                format_ms(median(faster)),
                format_ms(median("spconv_backend")),
                format_ms(median("spconv_native")),
                format_ratio(layer["speedup_forward"]["median"]),
                format_ratio(layer["speedup_forward_backward"]["median"]),
                format_bytes(variants["spconv_backend"]["peak_memory_bytes"]),
                format_ratio(layer["memory_ratio"]),
                format_ratio(native["median"] if native else None),
            ]
        )
    settings = record["settings"]
    print_table(
        f"{settings['model']} layers, batch {settings['batch_size']}, input {settings['input_size']}, "
        f"mask ratio {settings['mask_ratio']} (forward ms; speed-ups are spconv over the faster masked layout)",
        [
            "layer",
            "dense CL",
            "masked",
            "spconv",
            "native 1t",
            "speed-up fwd",
            "speed-up f+b",
            "spconv mem",
            "mem ratio",
            "native/1t",
        ],
        rows,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()

    torch.manual_seed(args.seed)
    downsample_ratio = args.downsample_ratio
    shapes = collect_layer_shapes(args.model, args.input_size)
    photos = load_photos(args.batch_size, args.input_size, args.photos)
    layers = []
    for index, shape in enumerate(shapes):
        print(f"[{index + 1}/{len(shapes)}] {shape.name}", flush=True)
        layers.append(bench_shape(shape, args, device, photos, downsample_ratio))

    record: Dict[str, object] = {
        "benchmark": "layers",
        "machine": machine_info(device, args.amp),
        "memory_method": MEMORY_METHOD_CUDA if device.type == "cuda" else MEMORY_METHOD_CPU,
        "settings": {
            "model": args.model,
            "batch_size": args.batch_size,
            "input_size": list(args.input_size),
            "mask_ratio": args.mask_ratio,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "notes": args.notes,
        "layers": layers,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print_summary(record)
    stem = record_stem("layers", machine_kind(device))
    path = write_record(record, args.out_dir, stem)
    print(f"record: {path}")
    if not args.no_plot:
        try:
            print(f"plot: {plot_layer_speedups(record, args.out_dir / f'{stem}.png')}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib); the record is complete")
    return record


if __name__ == "__main__":
    main()
