"""ConvNeXt on both backends: against each other, against timm, its weights, and the trainer's demo."""
import re

import pytest
import timm
import torch

from backend_oracle import (
    build_spark_pair,
    check_no_mask_equals_timm,
    check_one_patch_equals_cropped_timm,
    check_spark_matches_masked,
    mask_case,
    randomize_weights,
    run_one_epoch_demo,
)
from spark_sparse import build_encoder, build_spark
from spark_sparse.backends.layers.convnext import MaskedLayerNorm2d, SparseConvNeXtBlock
from spark_sparse.masking import draw_mask, upsample_mask


@pytest.fixture(scope="module")
def convnext_pair():
    return build_spark_pair("convnext_tiny")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["masked", "all_visible"])
def test_spark_matches_masked(convnext_pair, case, threads, photos_64):
    check_spark_matches_masked(convnext_pair, photos_64[:2], mask_case(case, (2, 2)), threads)


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_no_mask_equals_timm_dense(backend, photos_64):
    check_no_mask_equals_timm("convnext_tiny", backend, photos_64[:2])


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_one_patch_equals_cropped_timm(backend, photos_64):
    encoder = build_encoder("convnext_tiny", 64, backend=backend)
    randomize_weights(encoder, seed=3)
    encoder.eval()
    dense = timm.create_model("convnext_tiny", num_classes=0)
    dense.load_state_dict(encoder.state_dict(), strict=True)
    dense.eval()

    check_one_patch_equals_cropped_timm(encoder, dense, photos_64[:2])


def test_blocks_and_densify_norms_converted():
    masked = build_spark("convnext_tiny", 64, backend="masked", decoder_width=64)
    sparse = build_spark("convnext_tiny", 64, backend="spconv", decoder_width=64)

    blocks = [m for m in sparse.encoder.modules() if isinstance(m, SparseConvNeXtBlock)]
    assert len(blocks) == 3 + 3 + 9 + 3
    for model in (masked, sparse):
        assert all(isinstance(norm, MaskedLayerNorm2d) for norm in model.densify_norms)
        assert not any(p.requires_grad for p in model.encoder.head.parameters())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hidden_sites_zero_after_every_layer(mode, photos_64):
    encoder = build_encoder("convnext_tiny", 64)
    randomize_weights(encoder, seed=4)
    encoder.train(mode == "train")
    active = draw_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    outputs = []

    def record(path, output):
        if torch.is_tensor(output) and output.dim() == 4:
            outputs.append((path, output.detach().clone()))

    handles = [
        module.register_forward_hook(lambda _module, _inputs, output, path=path: record(path, output))
        for path, module in encoder.named_modules()
        if module is not encoder
    ]
    with torch.no_grad():
        encoder(photos_64[:2], active)
    for handle in handles:
        handle.remove()

    assert len(outputs) > 100
    for path, output in outputs:
        # Inside a block, the norm and the MLP see timm's permuted (B, H, W, C) map.
        if re.search(r"blocks\.\d+\.(norm|mlp)", path):
            mask = upsample_mask(active, output.shape[1:3]).permute(0, 2, 3, 1)
        else:
            mask = upsample_mask(active, output.shape[-2:])
        hidden = ~mask.expand_as(output)
        assert output[hidden].abs().max().item() == 0.0, path
        assert output[~hidden].abs().max().item() > 0.0, path


@pytest.mark.parametrize("model", ["convnext_small", "convnext_base", "convnext_large"])
def test_large_convnext_weights_load_into_timm(model):
    # Keys and shapes are what matter here, so every model lives on the meta device: no memory, no initialisation.
    with torch.device("meta"):
        sparse = build_encoder(model, 64, backend="spconv")
        masked = build_encoder(model, 64, backend="masked")
        reference = timm.create_model(model, num_classes=0)
    state = sparse.state_dict()

    assert list(state) == list(masked.state_dict())
    reference.load_state_dict(state, strict=True, assign=True)
    assert sparse.downsample_ratio == 32
    assert sparse.feature_channels == [info["num_chs"] for info in reference.feature_info]


@pytest.mark.parametrize("model", ["convnext_small", "convnext_base", "convnext_large"])
def test_larger_convnext_matches_masked_and_timm(model, photos_64):
    """The larger ConvNeXts share tiny's blocks at other depths and widths: one masked case, and timm without a mask."""
    check_spark_matches_masked(build_spark_pair(model), photos_64[:2], mask_case("masked", (2, 2)), threads=2)
    check_no_mask_equals_timm(model, "spconv", photos_64[:2])


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_output_stride_16_one_patch_equals_cropped_timm(backend, photos_64):
    encoder = build_encoder("convnext_tiny", 64, backend=backend, output_stride=16)
    randomize_weights(encoder, seed=5)
    encoder.eval()
    dense = timm.create_model("convnext_tiny", num_classes=0, output_stride=16)
    dense.load_state_dict(encoder.state_dict(), strict=True)
    dense.eval()

    assert encoder.feature_strides == [4, 8, 16, 16]
    check_one_patch_equals_cropped_timm(encoder, dense, photos_64[:2])


def test_demo_runs_on_spconv(tmp_path):
    weights = run_one_epoch_demo(tmp_path, "convnext", "convnext_tiny", "--sparse_conv=1")
    timm.create_model("convnext_tiny", num_classes=0).load_state_dict(weights, strict=True)
