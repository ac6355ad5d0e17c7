"""Squeeze-excite, group norm, global pooling, grouped, dilated and same-padded convolutions on both backends.

Models: seresnet50, resnext50_32x4d, resnet50 at output stride 16, ConvNeXt V2
(global response norm) and a user's own ResNet with group norm and three kinds
of squeeze-excite block, built through the encoder classes as the README shows.
"""
import copy
from functools import partial

import pytest
import timm
import torch
import torchvision.ops
from timm.layers import Conv2dSame
from timm.layers.squeeze_excite import EffectiveSEModule, SEModule
from torch import nn

from backend_oracle import (
    build_spark_pair,
    check_no_mask_equals_timm,
    check_one_patch_equals_cropped_timm,
    check_spark_matches_masked,
    mask_case,
    randomize_weights,
    run_one_epoch_demo,
)
from spark_sparse import LightDecoder, SparK, UnsupportedLayerError
from spark_sparse.backends.layers.global_pool import MaskedGlobalPool2d, SparseGlobalPool2d
from spark_sparse.backends.layers import grouped_conv
from spark_sparse.backends.layers.grouped_conv import SparseGroupedConv2d
from spark_sparse.backends.masked import MASKED_CONVERTERS, MaskedEncoder
from spark_sparse.backends.registry import BuildContext
from spark_sparse.backends.site_tables import SparseSites
from spark_sparse.backends.sparse import SPCONV_CONVERTERS, SpconvEncoder
from spark_sparse.masking import ActiveSites, upsample_mask
from spark_sparse.models import CONVNEXT, RESNET
from spark_sparse.trainer.args import parse_args

MODELS = [("seresnet50", 32), ("resnext50_32x4d", 32), ("resnet50", 16)]


@pytest.fixture(scope="module", params=MODELS, ids=[f"{model}-os{stride}" for model, stride in MODELS])
def model_pair(request):
    model, output_stride = request.param
    return (model, output_stride), build_spark_pair(model, output_stride)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", ["masked", "all_visible"])
def test_spark_matches_masked(model_pair, case, threads, photos_64):
    (_, output_stride), pair = model_pair
    grid = (64 // output_stride, 64 // output_stride)

    check_spark_matches_masked(pair, photos_64[:2], mask_case(case, grid), threads)


@pytest.mark.parametrize("backend", ["masked", "spconv"])
@pytest.mark.parametrize("model, output_stride", MODELS)
def test_no_mask_equals_timm_dense(model, output_stride, backend, photos_64):
    check_no_mask_equals_timm(model, backend, photos_64[:2], output_stride)


def test_output_stride_16_shapes_and_decoder(photos_64):
    _, sparse, _ = build_spark_pair("resnet50", 16)

    assert sparse.encoder.downsample_ratio == 16
    assert sparse.encoder.feature_strides == [4, 8, 16, 16]
    # layer4 and layer3 share the stride-16 scale, so both feed the first decoder block.
    assert sparse.decoder_blocks == [0, 0, 1, 2]
    assert len(sparse.decoder.dec) == 4
    features = sparse.encoder(photos_64[:2], mask_case("masked", (4, 4)))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 16), (8, 8), (4, 4), (4, 4)]


def custom_resnet() -> nn.Module:
    """Return a user's own CNN: a one-block-per-stage ResNet with group norm and four squeeze-excite variants."""
    torch.manual_seed(5)
    dense = timm.models.resnet.ResNet(
        block=timm.models.resnet.Bottleneck,
        layers=[1, 1, 1, 1],
        norm_layer=partial(timm.layers.GroupNorm, num_groups=8),
        block_args=dict(attn_layer="se"),
        num_classes=0,
    )
    dense.layer1[0].se = torchvision.ops.SqueezeExcitation(256, 32)
    dense.layer2[0].se = EffectiveSEModule(512)
    dense.layer3[0].se = SEModule(1024, add_maxpool=True)
    randomize_weights(dense, seed=6)
    return dense.eval()


@pytest.fixture(scope="module")
def custom_encoders():
    """Return the custom CNN on both backends with the same weights, and an untouched dense copy."""
    dense = custom_resnet()
    masked = MaskedEncoder("custom_resnet", RESNET, copy.deepcopy(dense), 64).eval()
    sparse = SpconvEncoder("custom_resnet", RESNET, copy.deepcopy(dense), 64).eval()
    return masked, sparse, dense


@pytest.mark.parametrize("backend", [0, 1], ids=["masked", "spconv"])
def test_custom_cnn_one_patch_equals_cropped_dense(custom_encoders, backend, photos_64):
    encoder, dense = custom_encoders[backend], custom_encoders[2]

    check_one_patch_equals_cropped_timm(encoder, dense, photos_64[:2])


def test_custom_cnn_dense_statistics_would_differ(custom_encoders, photos_64):
    """The cropped reference is sensitive: a dense model over the zero-filled image gives other values."""
    masked, _, dense = custom_encoders
    active = torch.tensor([True, False, False, False]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    images = photos_64[:2] * upsample_mask(active, (64, 64))

    with torch.no_grad():
        ours = masked(images, active)[0][:, :, :8, :8]
        naive = dense.forward_intermediates(images, indices=[1], intermediates_only=True)[0][:, :, :8, :8]

    assert (ours - naive).abs().max().item() > 1e-2 * ours.abs().max().item()


@pytest.mark.parametrize("backend", [0, 1], ids=["masked", "spconv"])
def test_hidden_input_leaves_active_outputs_unchanged(custom_encoders, backend, photos_64):
    # The encoders zero hidden patches of the image first, so this guards that path. The cropped-patch
    # test above checks that group norm and squeeze-excite statistics span active sites only.
    encoder = custom_encoders[backend]
    active = torch.tensor([[True, False], [False, True], [False, True], [True, True]]).view(2, 1, 2, 2)
    images = photos_64[:2]
    changed = images + torch.randn(images.shape, generator=torch.Generator().manual_seed(7)) * ~upsample_mask(
        active, (64, 64)
    )

    with torch.no_grad():
        before = encoder(images, active)
        after = encoder(changed, active)

    for first, second in zip(before, after):
        assert torch.equal(first, second)


def test_custom_cnn_spconv_matches_masked(custom_encoders, photos_64):
    masked, sparse, _ = custom_encoders
    pair = []
    for encoder in (masked, sparse):
        torch.manual_seed(8)
        pair.append(SparK(copy.deepcopy(encoder).train(), LightDecoder(32, width=64), densify_norm="bn"))
    state = copy.deepcopy(pair[0].state_dict())

    check_spark_matches_masked((pair[0], pair[1], state), photos_64[:2], mask_case("masked", (2, 2)), threads=2)


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_convnext_v2_one_patch_equals_cropped_timm(backend, photos_64):
    dense = timm.create_model("convnextv2_atto", num_classes=0)
    randomize_weights(dense, seed=9)
    dense.eval()
    encoder_type = MaskedEncoder if backend == "masked" else SpconvEncoder
    encoder = encoder_type("convnextv2_atto", CONVNEXT, copy.deepcopy(dense), 64).eval()

    check_one_patch_equals_cropped_timm(encoder, dense, photos_64[:2])


def test_convnext_v2_spconv_matches_masked(photos_64):
    dense = timm.create_model("convnextv2_atto", num_classes=0)
    randomize_weights(dense, seed=10)
    pair = []
    for encoder_type in (MaskedEncoder, SpconvEncoder):
        torch.manual_seed(11)
        encoder = encoder_type("convnextv2_atto", CONVNEXT, copy.deepcopy(dense), 64)
        pair.append(SparK(encoder, LightDecoder(32, width=64), densify_norm="ln"))
    state = copy.deepcopy(pair[0].state_dict())

    check_spark_matches_masked((pair[0], pair[1], state), photos_64[:2], mask_case("masked", (2, 2)), threads=1)


# (in_channels, out_channels, groups, kernel, stride, padding, dilation): depthwise 7x7, depthwise with a
# channel multiplier, strided depthwise, grouped 3x3, dilated grouped and dilated depthwise.
GROUPED_CASES = [
    (8, 8, 8, 7, 1, 3, 1),
    (6, 12, 6, 3, 1, 1, 1),
    (8, 8, 8, 3, 2, 1, 1),
    (8, 16, 4, 3, 1, 1, 1),
    (8, 8, 2, 3, 1, 2, 2),
    (8, 8, 8, 7, 1, 6, 2),
]


def layer_pair(dense_layer: nn.Module, in_stride: int):
    """Convert one layer to both backends with one bound (2, 1, 2, 3) mask; return them and the sites."""
    masked_sites, sparse_sites = ActiveSites(), SparseSites(32)
    masked = MASKED_CONVERTERS.convert(copy.deepcopy(dense_layer), BuildContext(sites=masked_sites, path="layer"))
    # Every child of these layers runs at the layer's input scale.
    strides = {name: in_stride for name, _ in dense_layer.named_modules(prefix="layer")}
    context = BuildContext(sites=sparse_sites, input_strides=strides, path="layer")
    sparse = SPCONV_CONVERTERS.convert(copy.deepcopy(dense_layer), context)
    return masked, masked_sites, sparse, sparse_sites


ACTIVE = torch.tensor([[[[True, False, False], [False, True, False]]], [[[True, True, True], [False, False, True]]]])


def run_layer_pair(dense_layer: nn.Module, in_stride: int, out_stride: int, channels: int):
    """Run a layer on both backends in float64; return masked and spconv outputs as rows, and input gradients."""
    masked, masked_sites, sparse, sparse_sites = layer_pair(dense_layer.double(), in_stride)
    size = (64 // in_stride, 96 // in_stride)
    x = torch.randn(2, channels, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    x = x * upsample_mask(ACTIVE, size)

    with masked_sites.bind(ACTIVE):
        dense_in = x.clone().requires_grad_()
        dense_out = masked(dense_in)
    with sparse_sites.bind(ACTIVE):
        in_index, out_index = sparse_sites.scale(in_stride).rows, sparse_sites.scale(out_stride).rows
        in_rows = dense_in.detach().permute(0, 2, 3, 1).reshape(-1, channels)[in_index].requires_grad_()
        rows = sparse(in_rows)

    dense_rows = dense_out.permute(0, 2, 3, 1).reshape(-1, dense_out.shape[1])[out_index]
    hidden = ~upsample_mask(ACTIVE, dense_out.shape[-2:]).expand_as(dense_out)
    assert dense_out[hidden].abs().max().item() == 0.0
    probe = torch.randn(rows.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    (dense_rows * probe).sum().backward()
    (rows * probe).sum().backward()
    dense_grad = dense_in.grad.permute(0, 2, 3, 1).reshape(-1, channels)[in_index]
    return dense_rows, rows, dense_grad, in_rows.grad, masked, sparse


# A minimum density of 0 sends every centred stride-1 depthwise layer through the dense map, 2 none.
# At input stride 16 the 4x6 map is no larger than a 7x7 window, so the dense map runs in NCHW.
@pytest.mark.parametrize("dense_min_density", [0.0, 2.0], ids=["dense_map", "tap_sum"])
@pytest.mark.parametrize("in_stride", [4, 16])
@pytest.mark.parametrize("in_channels, out_channels, groups, kernel, stride, padding, dilation", GROUPED_CASES)
def test_grouped_conv_matches_masked(
    in_channels, out_channels, groups, kernel, stride, padding, dilation, in_stride, dense_min_density, monkeypatch
):
    monkeypatch.setattr(grouped_conv, "DEPTHWISE_DENSE_MIN_DENSITY", dense_min_density)
    dense_map_calls = []
    through_dense_map = SparseGroupedConv2d._depthwise_through_dense_map

    def counted(layer, x, weight):
        dense_map_calls.append(layer)
        return through_dense_map(layer, x, weight)

    monkeypatch.setattr(SparseGroupedConv2d, "_depthwise_through_dense_map", counted)
    torch.manual_seed(14)
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias=True)

    dense_rows, rows, dense_grad, grad, masked, sparse = run_layer_pair(conv, in_stride, in_stride * stride, in_channels)

    assert isinstance(sparse, SparseGroupedConv2d)
    centred_depthwise = groups == in_channels == out_channels and stride == 1 and 2 * padding == dilation * (kernel - 1)
    assert len(dense_map_calls) == (1 if centred_depthwise and dense_min_density == 0.0 else 0)
    torch.testing.assert_close(rows, dense_rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse.weight.grad, masked.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse.bias.grad, masked.bias.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_same_padded_conv_matches_masked(kernel):
    torch.manual_seed(15)
    conv = Conv2dSame(6, 5, kernel, bias=True)

    dense_rows, rows, dense_grad, grad, masked, sparse = run_layer_pair(conv, 8, 8, 6)

    torch.testing.assert_close(rows, dense_rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sparse.weight.grad, masked.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "layer",
    [
        nn.GroupNorm(4, 8),
        SEModule(8, rd_channels=4),
        EffectiveSEModule(8),
        timm.layers.GlobalResponseNormMlp(8, 16, use_conv=True),
    ],
    ids=["group_norm", "se", "effective_se", "grn_mlp"],
)
def test_per_image_statistics_match_masked(layer):
    randomize_weights(layer, seed=16)

    dense_rows, rows, dense_grad, grad, _, _ = run_layer_pair(layer, 8, 8, 8)

    torch.testing.assert_close(rows, dense_rows, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_global_pool_spans_active_sites(mode):
    masked_sites, sparse_sites = ActiveSites(), SparseSites(32)
    masked_pool, sparse_pool = MaskedGlobalPool2d(mode, flatten=True), SparseGlobalPool2d(mode, flatten=True)
    masked_pool.sites, sparse_pool.sites, sparse_pool.in_stride = masked_sites, sparse_sites, 8
    mask = upsample_mask(ACTIVE, (8, 12))
    x = (torch.randn(2, 5, 8, 12, generator=torch.Generator().manual_seed(17)) - 3.0) * mask

    with masked_sites.bind(ACTIVE):
        pooled = masked_pool(x)
    with sparse_sites.bind(ACTIVE):
        pooled_rows = sparse_pool(x.permute(0, 2, 3, 1).reshape(-1, 5)[sparse_sites.scale(8).rows])

    for image in range(2):
        active_values = x[image][:, mask[image, 0]]
        expected = active_values.mean(1) if mode == "avg" else active_values.amax(1)
        torch.testing.assert_close(pooled[image], expected)
        torch.testing.assert_close(pooled_rows[image], expected)


def test_select_adaptive_pool_converted():
    pool = timm.layers.SelectAdaptivePool2d(pool_type="avg", flatten=True)
    masked, _, sparse, _ = layer_pair(pool, 32)

    assert isinstance(masked, MaskedGlobalPool2d)
    assert isinstance(sparse, SparseGlobalPool2d)
    for layer in (masked, sparse):
        assert layer.flatten
        assert layer.mode == "avg"


@pytest.mark.parametrize(
    "layer, message",
    [
        (nn.AdaptiveAvgPool2d(2), r"'layer'.*output_size=2"),
        (nn.LayerNorm([8, 4, 4]), r"'layer'.*several sites"),
        (timm.layers.norm.LayerNormExp2d(8), r"LayerNormExp2d at 'layer'"),
        (Conv2dSame(8, 8, 3, stride=2), r"'layer'.*stride=\(2, 2\)"),
    ],
    ids=["adaptive_pool_2x2", "layer_norm_over_sites", "unknown_layer_norm", "strided_same_conv"],
)
def test_unsupported_layer_rejected_with_path(layer, message):
    with pytest.raises(UnsupportedLayerError, match=message):
        layer_pair(layer, 8)


def test_unknown_layer_in_own_cnn_names_path():
    dense = custom_resnet()
    dense.layer3[0].act2 = nn.PReLU()

    for encoder_type in (MaskedEncoder, SpconvEncoder):
        with pytest.raises(UnsupportedLayerError, match=r"PReLU.*'layer3\.0\.act2'"):
            encoder_type("custom_resnet", RESNET, copy.deepcopy(dense), 64)


def test_output_stride_option():
    assert parse_args(["--exp_name=x", "--output_stride=16"]).output_stride == 16
    assert parse_args(["--exp_name=x"]).output_stride == 32
    with pytest.raises(SystemExit):
        parse_args(["--exp_name=x", "--output_stride=12"])


def test_demo_runs_at_output_stride_16(tmp_path):
    weights = run_one_epoch_demo(tmp_path, "os16", "resnet50", "--output_stride=16")
    timm.create_model("resnet50", num_classes=0, output_stride=16).load_state_dict(weights, strict=True)
