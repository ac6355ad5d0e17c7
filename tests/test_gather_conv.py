"""The gather-GEMM convolution's autograd function against dense convolution, on both of its paths."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backend_oracle import ACTIVE, to_dense, to_rows
from spark_sparse.backends.gather_conv import GATHER_ALL_MIN_CHANNELS, gather_gemm, transposed_neighbours
from spark_sparse.backends.layers import grouped_conv
from spark_sparse.backends.registry import BuildContext
from spark_sparse.backends.site_tables import SparseSites
from spark_sparse.backends.sparse import SPCONV_CONVERTERS, SparseConv2d
from spark_sparse.masking import upsample_mask


# 127 input channels take the per-tap path and 128 the one-gather path. 16 channels take one
# gather with 1x1 and 3x3 kernels (at most 144 columns) and the per-tap path with 5x5 (400).
@pytest.mark.parametrize("in_channels", [16, GATHER_ALL_MIN_CHANNELS - 1, GATHER_ALL_MIN_CHANNELS])
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 2, 2), (1, 2, 0, 1), (5, 1, 2, 1)]
)
def test_conv_gradients_match_dense(in_channels, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    sites = SparseSites(32)
    conv = SparseConv2d(in_channels, 24, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    conv.sites, conv.in_stride = sites, 8

    with sites.bind(ACTIVE):
        rows = torch.randn(sites.scale(8).num_sites, in_channels, requires_grad=True)
        out = conv(rows)
        dense_out = F.conv2d(to_dense(rows, sites, 8), conv.weight, stride=stride, padding=padding, dilation=dilation)
        reference = to_rows(dense_out, sites, 8 * stride)

    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (rows, conv.weight), grad)
    theirs = torch.autograd.grad(reference, (rows, conv.weight), grad)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=1e-4, msg="input gradient")
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-4, msg="weight gradient")


def test_stem_gathers_dense_input():
    torch.manual_seed(0)
    sites = SparseSites(32)
    conv = SparseConv2d(3, 8, 7, stride=2, padding=3, bias=False)
    conv.sites, conv.in_stride = sites, 1
    image = torch.randn(2, 3, 64, 96) * upsample_mask(ACTIVE, (64, 96))

    with sites.bind(ACTIVE):
        out = conv(image)
        reference = to_rows(F.conv2d(image, conv.weight, stride=2, padding=3), sites, 2)
        with pytest.raises(ValueError, match="does not match"):
            conv(image[:, :, :32])

    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, conv.weight, grad)[0]
    theirs = torch.autograd.grad(reference, conv.weight, grad)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gather_gemm_builds_transposed_table():
    torch.manual_seed(0)
    sites = SparseSites(32)

    with sites.bind(ACTIVE):
        table = sites.neighbours(8, 3, 2, 1)
        rows = torch.randn(sites.scale(8).num_sites, 16, requires_grad=True)
        weight = torch.randn(5, 16, 3, 3)
        out = gather_gemm(rows, weight, table, table.t().contiguous())
        reference = to_rows(F.conv2d(to_dense(rows, sites, 8), weight, stride=2, padding=1), sites, 16)

    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, rows, grad)[0], torch.autograd.grad(reference, rows, grad)[0], rtol=1e-4, atol=1e-4
    )


def test_transposed_table_inverts_forward_table():
    sites = SparseSites(32)

    with sites.bind(ACTIVE):
        table = sites.neighbours(8, 3, 2, 1)
        num_inputs = sites.scale(8).num_sites
        transposed = transposed_neighbours(table, num_inputs)

    assert transposed.shape == (num_inputs, 9)
    for output, tap in (table < num_inputs).nonzero().tolist():
        assert transposed[table[output, tap], tap] == output
    claimed = int((transposed < table.shape[0]).sum())
    assert claimed == int((table < num_inputs).sum())


# The depthwise case (16 groups of 16 channels) runs through the dense map when the minimum
# density is 0, and as a sum over the taps when it is 2.
@pytest.mark.parametrize("dense_min_density", [0.0, 2.0], ids=["dense_map", "tap_sum"])
@pytest.mark.parametrize("in_channels, groups", [(16, 1), (GATHER_ALL_MIN_CHANNELS, 1), (16, 16), (16, 4)])
def test_conv_autocast_matches_dense(in_channels, groups, dense_min_density, monkeypatch):
    """Under bfloat16 autocast a sparse layer casts as ``F.conv2d`` does, and the float32 weight gets its gradient."""
    monkeypatch.setattr(grouped_conv, "DEPTHWISE_DENSE_MIN_DENSITY", dense_min_density)
    torch.manual_seed(0)
    sites = SparseSites(32)
    dense = nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=groups)
    conv = SPCONV_CONVERTERS.convert(dense, BuildContext(sites=sites, input_strides={"layer": 8}, path="layer"))

    with sites.bind(ACTIVE), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = torch.randn(sites.scale(8).num_sites, in_channels, requires_grad=True)
        out = conv(rows)
        dense_out = F.conv2d(to_dense(rows, sites, 8), conv.weight, conv.bias, padding=1, groups=groups)
        reference = to_rows(dense_out, sites, 8)

    assert out.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (rows, conv.weight), grad)
    theirs = torch.autograd.grad(reference, (rows, conv.weight), grad)
    assert ours[1].dtype == torch.float32
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-2, atol=5e-2, msg="input gradient")
    torch.testing.assert_close(ours[1], theirs[1], rtol=2e-2, atol=5e-2, msg="weight gradient")
