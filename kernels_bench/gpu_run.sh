#!/usr/bin/env bash
# Run the model benchmark on a CUDA GPU: resnet50, batch 256, 224x224, fp16 autocast,
# mask ratios 0.6 and 0.75, with spconv's CUDA kernels, and write the record to $OUT.
#
# Prepare on a machine with a package index, from the repository root:
#   1. pack spconv-cu126 and its helper packages for the GPU machine's Python (3.12)
#      into .gpuwheels/spconv-cu126-py312.tar.xz (an xz-compressed site-packages tree);
#   2. python kernels_bench/export_photos.py .gpuwheels/photos.npz
#      (the GPU machine has no scikit-image);
#   3. send .gpuwheels/ with the working tree (it is git-ignored, so name it explicitly).
# On the GPU machine, from the repository root:
#   OUT=/some/folder bash kernels_bench/gpu_run.sh
# The benchmark is stopped after KERNELS_BENCH_TIMEOUT seconds (default 480).
set -euo pipefail

cd "$(dirname "$0")/.."
bundle=.gpuwheels/spconv-cu126-py312.tar.xz
photos=.gpuwheels/photos.npz
out_dir=${OUT:?set OUT to the folder that receives the record}
limit=${KERNELS_BENCH_TIMEOUT:-480}
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT

for required in "$bundle" "$photos"; do
    if [[ ! -f $required ]]; then
        echo "file not found: $required; build it as the header of kernels_bench/gpu_run.sh describes" >&2
        exit 2
    fi
done

tar -xJf "$bundle" -C "$site"
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out_dir"

# Stop with the import error where spconv-cu126 does not load beside this torch. Without
# spconv the benchmark would fall back to gather-GEMM and not measure spconv's kernels.
"$python" - <<'PY' 2>&1 | tee "$out_dir/environment.txt"
import torch
import spconv
import spconv.pytorch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", torch.cuda.get_device_name(0))
print("spconv", spconv.__version__, "from", spconv.__file__)
PY

timeout "$limit" "$python" kernels_bench/bench_models.py \
    --device cuda --amp \
    --models resnet50 --batch-size 256 --input-size 224 --mask-ratios 0.6 0.75 \
    --repeats 10 --warmup 3 \
    --photos "$photos" --out-dir "$out_dir" \
    --notes "GPU run of kernels_bench/gpu_run.sh: fp16 autocast, spconv-cu126 from a packed bundle" \
    2>&1 | tee "$out_dir/bench_models.log"
