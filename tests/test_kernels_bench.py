"""The benchmarks run once on tiny shapes and write valid records; their measuring helpers are right.

These are smoke runs (resnet18, 64x64 input, batch 2, one timed round), not
measurements: they show each script works end to end as a real process.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels_bench.layer_cases import LayerBench, compare_outputs
from kernels_bench.layer_shapes import collect_layer_shapes
from kernels_bench.measure import interleave, peak_memory_bytes
from kernels_bench.workload import seeded_mask

REPO = Path(__file__).resolve().parent.parent
TINY = ["--input-size", "64", "--batch-size", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python kernels_bench/<script>`` from the repository root, as a user would."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, f"kernels_bench/{script}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def only_file(folder: Path, pattern: str) -> Path:
    files = sorted(folder.glob(pattern))
    assert len(files) == 1, f"expected one {pattern} in {folder}, found {files}"
    return files[0]


def assert_positive_ratio(figures: dict, label: str) -> None:
    for key in ("median", "q1", "q3", "min", "max"):
        value = figures[key]
        assert isinstance(value, float), f"{label} {key} is {value!r}"
        assert math.isfinite(value), f"{label} {key} is {value}"
        assert value > 0, f"{label} {key} is {value}"


def assert_machine(record: dict) -> None:
    machine = record["machine"]
    assert machine["device"] == "cpu"
    assert machine["cpu_model"]
    assert machine["torch_threads"] >= 1
    assert machine["torch"] == torch.__version__
    assert machine["spconv"].startswith("spconv")
    assert machine["timm"]
    assert machine["dtype"] == "float32"
    assert "profile_memory=True" in record["memory_method"]


def test_model_bench_writes_record(tmp_path):
    result = run_script(
        "bench_models.py",
        "--models", "resnet18",
        "--mask-ratios", "0.5",
        "--decoder-width", "64",
        "--notes", "smoke run",
        "--out-dir", str(tmp_path),
        *TINY,
    )
    assert result.returncode == 0, result.stderr
    assert "speed-up of spconv over the faster masked layout" in result.stdout
    assert only_file(tmp_path, "models-cpu-*.png").stat().st_size > 0

    record = json.loads(only_file(tmp_path, "models-cpu-*.json").read_text())
    assert_machine(record)
    assert record["notes"] == "smoke run"
    assert record["settings"]["batch_size"] == 2
    assert record["settings"]["input_size"] == [64, 64]
    benchmarks = [entry["benchmark"] for entry in record["results"]]
    assert benchmarks == ["encoder_forward", "encoder_forward_backward", "pretrain_step"]

    for entry in record["results"]:
        label = f"{entry['model']} {entry['benchmark']}"
        assert entry["mask_ratio"] == 0.5
        assert entry["visible_patches"] == 2
        assert entry["faster_masked_layout"] in ("masked_nchw", "masked_channels_last")
        assert entry["compared_spconv_variant"] in entry["variants"]
        assert_positive_ratio(entry["speedup"], label)
        assert entry["memory_ratio"] > 0, label
        for name, variant in entry["variants"].items():
            assert variant["time"]["median_ms"] > 0, f"{label} {name}"
            assert len(variant["time"]["samples_ms"]) == 1, f"{label} {name}"
            assert variant["peak_memory_bytes"] > 0, f"{label} {name}"

    step = record["results"][-1]
    assert set(step["variants"]) == {"masked_nchw", "masked_channels_last", "spconv_nchw", "spconv_channels_last"}
    assert step["compared_spconv_variant"] == "spconv" + step["faster_masked_layout"][len("masked"):]


def test_step_profile_writes_record(tmp_path):
    result = run_script(
        "profile_step.py", "--model", "resnet18", "--decoder-width", "64", "--top", "4", "--out-dir", str(tmp_path), *TINY
    )
    assert result.returncode == 0, result.stderr
    assert "ceiling with a free encoder" in result.stdout

    record = json.loads(only_file(tmp_path, "profile-step-cpu-*.json").read_text())
    assert record["machine"]["device"] == "cpu"
    outcome = record["result"]
    assert set(outcome["phases"]) == {"masked_nchw", "masked_channels_last", "spconv_nchw", "spconv_channels_last"}
    assert outcome["compared_spconv_variant"] == "spconv" + outcome["faster_masked_layout"][len("masked"):]
    for name, phases in outcome["phases"].items():
        assert list(phases) == ["encoder", "densify", "decoder_and_loss", "optimizer", "step"], name
        for phase, figures in phases.items():
            assert figures["median_ms"] > 0, f"{name} {phase}"
    for key in ("step_speedup", "encoder_speedup", "step_speedup_ceiling"):
        assert_positive_ratio(outcome[key], key)
    for name, operators in outcome["top_operators"].items():
        assert len(operators) == 4, name
        assert all(op["self_ms"] > 0 and 0 < op["share"] <= 1 for op in operators), name
        shares = [op["share"] for op in operators]
        assert shares == sorted(shares, reverse=True), name


def test_layer_bench_writes_record(tmp_path):
    result = run_script("bench_layers.py", "--model", "resnet18", "--mask-ratio", "0.5", "--out-dir", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    assert only_file(tmp_path, "layers-cpu-*.png").stat().st_size > 0

    record = json.loads(only_file(tmp_path, "layers-cpu-*.json").read_text())
    assert_machine(record)
    layers = record["layers"]
    assert {layer["kind"] for layer in layers} == {"conv", "batch_norm", "max_pool"}
    for layer in layers:
        variants = layer["variants"]
        assert_positive_ratio(layer["speedup_forward"], layer["name"])
        assert_positive_ratio(layer["speedup_forward_backward"], layer["name"])
        assert layer["memory_ratio"] > 0, layer["name"]
        assert layer["active_input_sites"] == layer["total_input_sites"] // 2, layer["name"]
        # Same weights, input and mask: the sparse variants must agree with the masked layer.
        for name in ("masked_channels_last", "spconv_backend", "spconv_backend_1thread", "spconv_native"):
            if name in variants:
                assert variants[name]["max_abs_diff_vs_masked_nchw"] < 1e-4, f"{layer['name']} {name}"
        if layer["kind"] == "batch_norm":
            assert "spconv_native" not in variants
        else:
            assert variants["spconv_native"]["threads"] == 1
            assert variants["spconv_native"]["forward_backward"] is None
            assert_positive_ratio(layer["spconv_native_over_backend_1thread"], layer["name"])


def test_invalid_input_size_one_line_error():
    result = run_script("bench_models.py", "--input-size", "100", "--device", "cpu")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "input size 100" in result.stderr
    assert "96 or 128" in result.stderr


def test_layer_shapes_cover_resnet50():
    shapes = collect_layer_shapes("resnet50", (224, 224))
    names = [shape.name for shape in shapes]
    assert names[0] == "conv7x7/2 3->64 @224x224"
    assert "max_pool3x3/2 64 @112x112" in names
    # timm's ResNet-50 strides in the 3x3 convolution and in a 1x1 shortcut convolution.
    for size, channels in ((56, 128), (28, 256), (14, 512)):
        assert f"conv3x3/2 {channels}->{channels} @{size}x{size}" in names
    assert "conv1x1/2 1024->2048 @14x14" in names
    assert len(names) == len(set(names))

    # Every conv, norm and pool module of the stem and stages has exactly one shape.
    paths = [path for shape in shapes for path in shape.paths]
    assert len(paths) == len(set(paths))
    assert len(paths) == 53 + 53 + 1


def test_layer_bench_runs_1x1_conv(photos_64):
    # spconv runs a 1x1 stride-1 convolution as torch.mm without a rule book; resnet18 has none, resnet50 many.
    shape = next(shape for shape in collect_layer_shapes("resnet50", (64, 64)) if shape.name.startswith("conv1x1/1"))
    active = seeded_mask(2, (2, 2), 0.5, seed=0)
    with LayerBench(shape, active, photos_64, 32, torch.device("cpu"), amp=False) as bench:
        variants = bench.variants(include_spconv_native=True)
        differences = compare_outputs(bench, variants)

    assert {"spconv_backend", "spconv_backend_1thread", "spconv_native"} <= set(differences)
    for name in ("masked_channels_last", "spconv_backend", "spconv_backend_1thread"):
        assert differences[name] < 1e-4, name
    # spconv 2.3.8 views its (out, 1, 1, in) weight as (in, out) on this path, so its values differ.
    assert differences["spconv_native"] > 1e-2
    native = next(variant for variant in variants if variant.name == "spconv_native")
    assert "misreads its weight layout" in native.note


def test_peak_memory_counts_live_tensors():
    mib = 2**20

    def allocate() -> None:
        first = torch.ones(mib // 4)
        second = torch.ones(2 * mib // 4)
        del first, second
        third = torch.ones(mib // 4)
        del third

    peak = peak_memory_bytes(allocate, torch.device("cpu"))
    assert 3 * mib <= peak < 3 * mib + 64 * 1024


def test_interleave_rotates_order():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = interleave(cases, rounds=3, device=torch.device("cpu"))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(times) == 3 for times in samples.values())
