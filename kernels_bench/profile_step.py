"""Step profile: where one SparK pre-training step spends its time, per backend, phase and operator.

The step is split into four phases, timed interleaved across the variants:

- ``encoder``: the encoder forward to its four dense stage outputs, and its
  backward from a fixed gradient;
- ``densify``: SparK's densify (norm, mask tokens, projection) of those outputs,
  and its backward from a fixed gradient;
- ``decoder_and_loss``: the dense decoder and the loss from the densified
  features, and their backward;
- ``optimizer``: the LAMB step.

The full step is timed in the same rounds. Only the encoder differs between
the backends, so the record also gives the ceiling of the step's speed-up: the
faster masked step divided by the sum of spconv's other phases.
One step of each variant also runs under ``torch.profiler``, and the record lists
its costliest operators by self time.

    python kernels_bench/profile_step.py [--model resnet50] [--mask-ratio 0.6] [--batch-size 16]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "6")
if __package__ in (None, ""):
    # Run as a script: import the project from the repository root instead of this folder.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from kernels_bench.cli import add_common_arguments, check_shapes, mask_ratio, positive_int
from kernels_bench.measure import interleave, paired_ratios, summarize
from kernels_bench.model_cases import MASKED_VARIANTS, ModelVariant, build_step_variants, counterpart, iteration
from kernels_bench.report import format_ms, format_ratio, print_table, record_stem, write_record
from kernels_bench.workload import autocast, load_photos, machine_info, machine_kind, resolve_device, seeded_mask
from spark_sparse.models import SUPPORTED_MODELS, create_dense_model, downsample_ratio_of

PHASES = ("encoder", "densify", "decoder_and_loss", "optimizer", "step")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50", choices=sorted(SUPPORTED_MODELS), help="timm model (default resnet50)")
    parser.add_argument("--mask-ratio", type=mask_ratio, default=0.6, help="share of hidden patches (default 0.6)")
    parser.add_argument(
        "--decoder-width", type=positive_int, default=768, help="channels of SparK's first decoder block (default 768)"
    )
    parser.add_argument("--top", type=positive_int, default=15, help="operators listed per variant (default 15)")
    add_common_arguments(parser, default_repeats=3, default_warmup=1)
    args = parser.parse_args(argv)
    args.downsample_ratio = downsample_ratio_of(create_dense_model(args.model))
    args.input_size = check_shapes(parser, args.input_size, args.downsample_ratio, [args.mask_ratio])
    return args


def phase_functions(variant: ModelVariant, active: torch.Tensor, amp: bool) -> Dict[str, Callable[[], object]]:
    """Return the four phases of one step on ``variant``, each a function that runs it once."""
    spark, images = variant.module, variant.images
    device = images.device
    active = active.to(device)
    with torch.no_grad(), autocast(device, amp):
        features = spark.encoder(images, active)
        densified = spark.densify(features, active)
    generator = torch.Generator().manual_seed(0)

    def fixed_gradients(tensors: List[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
        # Random gradients in each tensor's own dtype, device and memory layout (empty_like keeps the strides).
        return [
            None if x is None else torch.empty_like(x).copy_(torch.randn(x.shape, generator=generator)) for x in tensors
        ]

    def backward(outputs: List[Optional[torch.Tensor]], gradients: List[Optional[torch.Tensor]]) -> None:
        pairs = [(x, g) for x, g in zip(outputs, gradients) if x is not None]
        torch.autograd.backward([x for x, _ in pairs], [g for _, g in pairs])

    feature_grads = fixed_gradients(features)
    densified_grads = fixed_gradients(densified)

    def encoder() -> object:
        with autocast(device, amp):
            outputs = spark.encoder(images, active)
        backward(outputs, feature_grads)

    def densify() -> object:
        inputs = [x.detach().requires_grad_() for x in features]
        with autocast(device, amp):
            outputs = spark.densify(inputs, active)
        backward(outputs, densified_grads)

    def decoder_and_loss() -> object:
        inputs = [None if x is None else x.detach().requires_grad_() for x in densified]
        with autocast(device, amp):
            loss = spark.loss(images, spark.decoder(inputs).float(), active)
        loss.backward()

    def optimizer() -> object:
        variant.optimizer.step()

    return {"encoder": encoder, "densify": densify, "decoder_and_loss": decoder_and_loss, "optimizer": optimizer}


def top_operators(fn: Callable[[], object], count: int, device: torch.device) -> List[Dict[str, object]]:
    """Run ``fn`` once under ``torch.profiler``; return its ``count`` costliest operators by self time.

    Self time is CPU time on the CPU and kernel time on a CUDA device.
    NOTE: the CUDA branch has not run on a GPU.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def self_us(event) -> float:
        return event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total

    events = prof.key_averages()
    total_us = sum(self_us(event) for event in events)
    ranked = sorted(events, key=self_us, reverse=True)[:count]
    return [
        {
            "operator": event.key,
            "self_ms": round(self_us(event) / 1000.0, 2),
            "share": round(self_us(event) / max(total_us, 1), 4),
            "calls": event.count,
        }
        for event in ranked
    ]


def profile_step(args: argparse.Namespace, device: torch.device) -> Dict[str, object]:
    """Time every phase and the full step of each variant interleaved; profile one step of each."""
    photos = load_photos(args.batch_size, args.input_size, args.photos)
    grid = (args.input_size[0] // args.downsample_ratio, args.input_size[1] // args.downsample_ratio)
    active = seeded_mask(args.batch_size, grid, args.mask_ratio, args.seed)
    variants = build_step_variants(args.model, args.input_size, photos, device, args.seed, args.amp, args.decoder_width)

    cases: Dict[str, Callable[[], object]] = {}
    for variant in variants:
        step = iteration("pretrain_step", variant, active, args.mask_ratio, args.seed, args.amp)
        # One step first, so that the optimizer phase finds gradients and LAMB's state.
        for _ in range(max(args.warmup, 1)):
            step()
        phases = phase_functions(variant, active, args.amp)
        for _ in range(args.warmup):
            for function in phases.values():
                function()
        for phase, function in phases.items():
            cases[f"{variant.name}/{phase}"] = function
        cases[f"{variant.name}/step"] = step

    operators = {}
    for variant in variants:
        operators[variant.name] = top_operators(cases[f"{variant.name}/step"], args.top, device)
    samples = interleave(cases, args.repeats, device)

    times = {
        variant.name: {phase: summarize(samples[f"{variant.name}/{phase}"]) for phase in PHASES} for variant in variants
    }
    faster = min(MASKED_VARIANTS, key=lambda name: times[name]["step"].median)
    # The decoder's speed depends on its layout, so spconv is compared in the faster masked layout.
    sparse = counterpart("pretrain_step", faster)
    shared_phases = ("densify", "decoder_and_loss", "optimizer")
    sparse_rest = [sum(parts) for parts in zip(*(samples[f"{sparse}/{phase}"] for phase in shared_phases))]
    return {
        "phases": {name: {phase: stats.to_json() for phase, stats in phases.items()} for name, phases in times.items()},
        "faster_masked_layout": faster,
        "compared_spconv_variant": sparse,
        "step_speedup": paired_ratios(samples[f"{faster}/step"], samples[f"{sparse}/step"]).to_json(""),
        "encoder_speedup": paired_ratios(samples[f"{faster}/encoder"], samples[f"{sparse}/encoder"]).to_json(""),
        # The step's speed-up if spconv's encoder took no time at all.
        "step_speedup_ceiling": paired_ratios(samples[f"{faster}/step"], sparse_rest).to_json(""),
        "top_operators": operators,
        "visible_patches": int(active[0].sum()),
    }


def print_summary(record: Dict[str, object]) -> None:
    result = record["result"]
    rows = []
    for name, phases in result["phases"].items():
        rows.append([name] + [format_ms(phases[phase]["median_ms"]) for phase in PHASES])
    settings = record["settings"]
    print_table(
        f"{settings['model']}, batch {settings['batch_size']}, input {settings['input_size']}, mask ratio "
        f"{settings['mask_ratio']}, {record['machine']['dtype']}: median ms",
        ["variant"] + list(PHASES),
        rows,
    )
    for name, operators in result["top_operators"].items():
        print_table(
            f"{name}: costliest operators of one step by self time",
            ["operator", "self ms", "share", "calls"],
            [[op["operator"], format_ms(op["self_ms"]), f"{100 * op['share']:.1f} %", str(op["calls"])] for op in operators],
        )
    print(
        f"step speed-up of {result['compared_spconv_variant']} over {result['faster_masked_layout']}: "
        f"{format_ratio(result['step_speedup']['median'])}; encoder: "
        f"{format_ratio(result['encoder_speedup']['median'])}; ceiling with a free encoder: "
        f"{format_ratio(result['step_speedup_ceiling']['median'])}"
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = resolve_device(args.device)
    started = time.perf_counter()
    result = profile_step(args, device)
    record: Dict[str, object] = {
        "benchmark": "profile_step",
        "machine": machine_info(device, args.amp),
        "settings": {
            "model": args.model,
            "mask_ratio": args.mask_ratio,
            "batch_size": args.batch_size,
            "input_size": list(args.input_size),
            "decoder_width": args.decoder_width,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "seed": args.seed,
        },
        "notes": args.notes,
        "result": result,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print_summary(record)
    path = write_record(record, args.out_dir, record_stem("profile-step", machine_kind(device)))
    print(f"record: {path}")
    return record


if __name__ == "__main__":
    main()
