"""Model benchmark: encoder forward, encoder forward plus backward and one SparK pre-training step.

For each model and mask ratio the masked backend runs in NCHW and channels-last
and the spconv backend on the same weights, photos and mask, timed interleaved.
The speed-up is spconv's against the faster masked layout, as a median of
per-round ratios.

    python kernels_bench/bench_models.py [--models resnet18 resnet50] [--batch-size 4] [--input-size 224]
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
import gc
import time
from typing import Dict, List, Optional, Sequence

import torch

from kernels_bench.cli import add_common_arguments, check_shapes, mask_ratio, positive_int
from kernels_bench.measure import (
    MEMORY_METHOD_CPU,
    MEMORY_METHOD_CUDA,
    interleave,
    paired_ratios,
    peak_memory_bytes,
    summarize,
)
from kernels_bench.model_cases import (
    BENCHMARKS,
    MASKED_VARIANTS,
    ModelVariant,
    build_encoder_variants,
    build_step_variants,
    counterpart,
    iteration,
)
from kernels_bench.report import (
    format_bytes,
    format_ms,
    format_ratio,
    plot_model_speedups,
    print_table,
    record_stem,
    write_record,
)
from kernels_bench.workload import load_photos, machine_info, machine_kind, resolve_device, seeded_mask
from spark_sparse.models import SUPPORTED_MODELS, create_dense_model, downsample_ratio_of

DEFAULT_MODELS = ("resnet18", "resnet50")
DEFAULT_MASK_RATIOS = (0.4, 0.6, 0.75, 0.9)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=sorted(SUPPORTED_MODELS), help="timm models"
    )
    parser.add_argument(
        "--mask-ratios", nargs="+", type=mask_ratio, default=list(DEFAULT_MASK_RATIOS), help="shares of hidden patches"
    )
    parser.add_argument(
        "--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS, help="which benchmarks to run"
    )
    parser.add_argument(
        "--decoder-width", type=positive_int, default=768, help="channels of SparK's first decoder block (default 768)"
    )
    # Batch 4 by default keeps the whole default run (both models, every benchmark and mask
    # ratio) under 10 minutes on a 2-core CPU; pass --batch-size 16 for larger workloads.
    add_common_arguments(parser, default_repeats=3, default_warmup=1, default_batch_size=4)
    args = parser.parse_args(argv)
    ratios = {model: downsample_ratio_of(create_dense_model(model)) for model in args.models}
    sizes = {check_shapes(parser, args.input_size, ratio, args.mask_ratios) for ratio in ratios.values()}
    args.input_size = sizes.pop()
    args.downsample_ratios = ratios
    return args


def bench_ratio(
    benchmark: str, variants: List[ModelVariant], args: argparse.Namespace, grid: tuple, ratio: float, warm: bool
) -> Dict[str, object]:
    """Measure every variant at one mask ratio: warm-up, one memory-profiled iteration, then interleaved rounds."""
    device = variants[0].images.device
    active = seeded_mask(args.batch_size, grid, ratio, args.seed)
    functions = {variant.name: iteration(benchmark, variant, active, ratio, args.seed, args.amp) for variant in variants}
    if warm:
        for _ in range(args.warmup):
            for function in functions.values():
                function()

    memory = {name: peak_memory_bytes(function, device) for name, function in functions.items()}
    samples = interleave(functions, args.repeats, device)

    faster = min(MASKED_VARIANTS, key=lambda name: summarize(samples[name]).median)
    sparse = counterpart(benchmark, faster)
    return {
        "benchmark": benchmark,
        "mask_ratio": ratio,
        "visible_patches": int(active[0].sum()),
        "variants": {
            name: {"time": summarize(samples[name]).to_json(), "peak_memory_bytes": memory[name]} for name in functions
        },
        "faster_masked_layout": faster,
        "compared_spconv_variant": sparse,
        "speedup": paired_ratios(samples[faster], samples[sparse]).to_json(""),
        "memory_ratio": memory[sparse] / max(memory[faster], 1),
    }


def bench_model(model: str, args: argparse.Namespace, device: torch.device, photos: torch.Tensor) -> List[Dict[str, object]]:
    """Run the chosen benchmarks of one model at every mask ratio."""
    downsample_ratio = args.downsample_ratios[model]
    grid = (args.input_size[0] // downsample_ratio, args.input_size[1] // downsample_ratio)
    results = []
    encoder_variants: Optional[List[ModelVariant]] = None
    for benchmark in args.benchmarks:
        if benchmark == "pretrain_step":
            encoder_variants = None
            gc.collect()
            variants = build_step_variants(
                model, args.input_size, photos, device, args.seed, args.amp, args.decoder_width
            )
        else:
            if encoder_variants is None:
                encoder_variants = build_encoder_variants(model, args.input_size, photos, device, args.seed)
            variants = encoder_variants

        for index, ratio in enumerate(args.mask_ratios):
            started = time.perf_counter()
            result = bench_ratio(benchmark, variants, args, grid, ratio, warm=index == 0)
            result["model"] = model
            results.append(result)
            print(
                f"{model} {benchmark} mask {ratio}: speed-up {result['speedup']['median']:.2f}x "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        del variants
        gc.collect()
    return results


def print_summary(record: Dict[str, object]) -> None:
    rows = []
    for result in record["results"]:
        variants = result["variants"]
        sparse = result["compared_spconv_variant"]
        faster = result["faster_masked_layout"]
        speedup = result["speedup"]
        rows.append(
            [
                f"{result['model']} {result['benchmark']}",
                f"{result['mask_ratio']:.2f}",
                format_ms(variants["masked_nchw"]["time"]["median_ms"]),
                format_ms(variants["masked_channels_last"]["time"]["median_ms"]),
                format_ms(variants[sparse]["time"]["median_ms"]),
                f"{format_ratio(speedup['median'])} [{speedup['q1']:.2f}-{speedup['q3']:.2f}]",
                format_bytes(variants[faster]["peak_memory_bytes"]),
                format_bytes(variants[sparse]["peak_memory_bytes"]),
                format_ratio(result["memory_ratio"]),
            ]
        )
    settings = record["settings"]
    print_table(
        f"batch {settings['batch_size']}, input {settings['input_size']}, {record['machine']['dtype']}: "
        f"median ms; speed-up of spconv over the faster masked layout [IQR]; peak memory",
        ["model and benchmark", "mask", "masked NCHW", "masked CL", "spconv", "speed-up", "masked mem", "spconv mem", "mem ratio"],
        rows,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()

    photos = load_photos(args.batch_size, args.input_size, args.photos)
    results = []
    for model in args.models:
        results.extend(bench_model(model, args, device, photos))

    record: Dict[str, object] = {
        "benchmark": "models",
        "machine": machine_info(device, args.amp),
        "memory_method": MEMORY_METHOD_CUDA if device.type == "cuda" else MEMORY_METHOD_CPU,
        "settings": {
            "models": args.models,
            "benchmarks": args.benchmarks,
            "mask_ratios": args.mask_ratios,
            "batch_size": args.batch_size,
            "input_size": list(args.input_size),
            "decoder_width": args.decoder_width,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "notes": args.notes,
        "results": results,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print_summary(record)
    stem = record_stem("models", machine_kind(device))
    path = write_record(record, args.out_dir, stem)
    print(f"record: {path}")
    if not args.no_plot:
        try:
            print(f"plot: {plot_model_speedups(record, args.out_dir / f'{stem}.png')}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install matplotlib); the record is complete")
    return record


if __name__ == "__main__":
    main()
