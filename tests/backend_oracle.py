"""Checks shared by the model tests beyond ResNet: the backends against each other, timm and cropped images.

The backend-against-backend comparison reuses the ResNet oracle of
``test_spconv_backend`` (one forward and backward, features, loss, gradients).
"""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import timm
import torch
from torch import nn

from spark_sparse import build_encoder, build_spark
from spark_sparse.backends.site_tables import SparseSites
from spark_sparse.masking import draw_mask
from spark_sparse.models import model_family
from test_spconv_backend import assert_features_match, intra_op_threads, run_spark


def randomize_weights(module: nn.Module, seed: int) -> None:
    """Give every norm random scales, shifts and running statistics, every bias and layer scale random values.

    timm starts biases at zero, and each ResNet block's last norm and each
    ConvNeXt layer scale (``gamma``) near zero. Any of them would hide a wrong
    layer, such as a hidden site left at its bias.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.rand(tensor.shape, generator=generator) * (high - low) + low

    with torch.no_grad():
        for name, parameter in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            is_norm = isinstance(owner, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
            if leaf == "gamma" or (is_norm and leaf == "weight"):
                parameter.copy_(uniform(parameter, 0.5, 1.5))
            elif leaf == "bias":
                parameter.copy_(uniform(parameter, -0.5, 0.5) if is_norm else uniform(parameter, -0.1, 0.1))
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.running_mean.copy_(uniform(bn.running_mean, -0.5, 0.5))
                bn.running_var.copy_(uniform(bn.running_var, 0.5, 1.5))


def build_spark_pair(model: str, output_stride: int = 32):
    """Return SparK on the masked and spconv backends at 64x64, and the shared random start state."""
    torch.manual_seed(0)
    masked = build_spark(model, 64, backend="masked", decoder_width=64, output_stride=output_stride)
    sparse = build_spark(model, 64, backend="spconv", decoder_width=64, output_stride=output_stride)
    randomize_weights(masked, seed=1)
    return masked, sparse, copy.deepcopy(masked.state_dict())


def mask_case(case: str, grid: Sequence[int]) -> torch.Tensor:
    """Return the ``(2, 1, h, w)`` mask of a named case: "masked" hides 60 % of the patches, "all_visible" none."""
    if case == "masked":
        return draw_mask(2, tuple(grid), 0.6, generator=torch.Generator().manual_seed(11))
    if case == "all_visible":
        return torch.ones(2, 1, *grid, dtype=torch.bool)
    raise ValueError(f"unknown case {case!r}")


def check_spark_matches_masked(spark_pair, images: torch.Tensor, active: torch.Tensor, threads: int) -> None:
    """Check the spconv backend against the masked one in float64, train mode: features, loss, all gradients.

    Float64 for the same reason as the ResNet oracle: float32 rounding flips
    ReLU gates near zero and batch norms over a few rows (64-pixel images)
    amplify rounding, past the tolerances for both backends alike.
    """
    masked, sparse, state = spark_pair
    original = images.clone()

    with intra_op_threads(threads):
        loss_ref, features_ref, grads_ref = run_spark(masked, state, images, active, "train", torch.float64)
        loss, features, grads = run_spark(sparse, state, images, active, "train", torch.float64)

    assert torch.equal(images, original)
    assert_features_match(features, features_ref, active)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0.0)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == sum(1 for p in sparse.parameters() if p.requires_grad)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-3, atol=1e-5, msg=lambda text: f"{name}: {text}")


def timm_stage_outputs(dense: nn.Module, stages: Sequence[str], images: torch.Tensor) -> List[torch.Tensor]:
    """Return the timm model's own outputs (``forward_intermediates``) of the modules named in ``stages``."""
    indices = [i for i, info in enumerate(dense.feature_info) if info["module"] in stages]
    return dense.forward_intermediates(images, indices=indices, intermediates_only=True)


def check_no_mask_equals_timm(model: str, backend: str, images: torch.Tensor, output_stride: int = 32) -> None:
    """Check that an eval-mode encoder called without a mask gives timm's stage outputs (float32)."""
    torch.manual_seed(0)
    encoder = build_encoder(model, 64, backend=backend, output_stride=output_stride)
    randomize_weights(encoder, seed=2)
    encoder.eval()
    dense = timm.create_model(model, num_classes=0, output_stride=output_stride)
    dense.load_state_dict(encoder.state_dict(), strict=True)
    dense.eval()

    with torch.no_grad():
        features = encoder(images)
        reference = timm_stage_outputs(dense, model_family(model).stages, images)

    assert [f.shape[1] for f in features] == encoder.feature_channels
    assert len(features) == len(reference) == 4
    for ours, theirs in zip(features, reference):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def check_one_patch_equals_cropped_timm(encoder: nn.Module, dense: nn.Module, images: torch.Tensor) -> None:
    """Check an encoder against timm on cropped images, with one visible patch per image.

    Hidden sites read as zeros, like the zero padding of the crop, and every
    statistic (batch norm, group norm, squeeze-excite means) spans the visible
    patch alone, like the crop's. So on its patch each stage output must equal
    the dense model's output for the cropped patch. Both models are in eval mode.
    """
    ratio = encoder.downsample_ratio
    grid = (images.shape[-2] // ratio, images.shape[-1] // ratio)
    cells = [(0, 0), (grid[0] - 1, grid[1] - 1)][: images.shape[0]]
    active = torch.zeros(images.shape[0], 1, *grid, dtype=torch.bool)
    crops = []
    for i, (y, x) in enumerate(cells):
        active[i, 0, y, x] = True
        crops.append(images[i, :, y * ratio : (y + 1) * ratio, x * ratio : (x + 1) * ratio])

    with torch.no_grad():
        features = encoder(images, active)
        reference = timm_stage_outputs(dense, encoder.family.stages, torch.stack(crops))

    for ours, theirs, stride in zip(features, reference, encoder.feature_strides):
        side = ratio // stride
        for i, (y, x) in enumerate(cells):
            patch = ours[i, :, y * side : (y + 1) * side, x * side : (x + 1) * side]
            assert patch.shape == theirs[i].shape
            assert (patch - theirs[i]).abs().max().item() <= 1e-4 * theirs[i].abs().max().item()


REPO = Path(__file__).resolve().parents[1]


def run_one_epoch_demo(tmp_path: Path, exp_name: str, model: str, *options: str) -> dict:
    """Pre-train ``model`` for one epoch at 64x64 through ``main.py``; check the log and return the saved weights."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "main.py"),
            f"--exp_name={exp_name}",
            f"--model={model}",
            *options,
            "--input_size=64",
            "--decoder_width=64",
            "--dataloader_workers=0",
            "--bs=6",
            "--ep=1",
            "--wp_ep=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    out_dir = tmp_path / f"output_{exp_name}"
    header, *epochs = [json.loads(line) for line in (out_dir / "pretrain_log.txt").read_text().splitlines()]
    assert header["model"] == model
    assert [line["epoch"] for line in epochs] == [1]
    assert math.isfinite(epochs[0]["loss"])
    return torch.load(out_dir / f"{model}_1kpretrained.pth", map_location="cpu")["module"]


# A (2, 1, 2, 3) mask at stride 32: image 0 shows a corner and the centre-bottom cell,
# image 1 the top row.
ACTIVE = torch.tensor([[[[True, False, False], [False, True, False]]], [[[True, True, True], [False, False, False]]]])


def to_rows(dense: torch.Tensor, sites: SparseSites, stride: int) -> torch.Tensor:
    """Gather the active sites of a ``(B, C, H, W)`` map at ``stride`` into ``(N, C)`` rows."""
    return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, sites.scale(stride).rows)


def to_dense(rows: torch.Tensor, sites: SparseSites, stride: int) -> torch.Tensor:
    """Scatter ``(N, C)`` rows at ``stride`` into a zero-filled ``(B, C, H, W)`` map."""
    scale = sites.scale(stride)
    batch = sites.active.shape[0]
    height, width = scale.size
    flat = rows.new_zeros(batch * height * width, rows.shape[1]).index_copy(0, scale.rows, rows)
    return flat.view(batch, height, width, -1).permute(0, 3, 1, 2)
