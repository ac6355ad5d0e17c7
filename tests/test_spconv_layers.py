"""The spconv backend's site tables and layers, each against its dense or masked counterpart."""
import collections

import pytest
import torch
import torch.nn.functional as F

from backend_oracle import ACTIVE, to_dense, to_rows
from spark_sparse import build_encoder
from spark_sparse.backends import spconv_engine
from spark_sparse.backends.gather_conv import GATHER_ALL_MIN_CHANNELS
from spark_sparse.backends.masked import MaskedAvgPool2d, MaskedBatchNorm2d, MaskedMaxPool2d
from spark_sparse.backends.site_tables import SparseSites
from spark_sparse.backends.sparse import SparseAvgPool2d, SparseBatchNorm2d, SparseConv2d, SparseMaxPool2d, gather_gemm
from spark_sparse.masking import draw_mask, upsample_mask


def test_scale_rows_follow_active_sites():
    sites = SparseSites(32)

    with sites.bind(ACTIVE):
        scale = sites.scale(8)
        mask = upsample_mask(ACTIVE, (8, 12))

    assert scale.size == (8, 12)
    assert torch.equal(scale.rows, mask.flatten().nonzero().squeeze(1))
    assert scale.num_sites == 5 * 16
    assert scale.batch_index.tolist() == [0] * 32 + [1] * 48
    hidden = ~mask.flatten()
    assert (scale.index_grid[hidden] == scale.num_sites).all()
    assert torch.equal(scale.index_grid[scale.rows], torch.arange(scale.num_sites))


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (7, 2, 3)])
def test_neighbours_match_brute_force(kernel, stride, padding):
    sites = SparseSites(32)
    in_stride = 8

    with sites.bind(ACTIVE):
        table = sites.neighbours(in_stride, kernel, stride, padding)
        source = sites.scale(in_stride)
        target = sites.scale(in_stride * stride)

    height, width = source.size
    out_height, out_width = target.size
    row_of = {int(flat): row for row, flat in enumerate(source.rows)}
    assert table.shape == (target.num_sites, kernel * kernel)
    for out_row, flat in enumerate(target.rows.tolist()):
        b, rest = divmod(flat, out_height * out_width)
        y, x = divmod(rest, out_width)
        for tap in range(kernel * kernel):
            in_y = y * stride - padding + tap // kernel
            in_x = x * stride - padding + tap % kernel
            if not (0 <= in_y < height and 0 <= in_x < width):
                expected = source.num_sites + 1
            else:
                expected = row_of.get((b * height + in_y) * width + in_x, source.num_sites)
            assert table[out_row, tap].item() == expected, (out_row, tap)


def test_tables_built_once_per_call(photos_64):
    encoder = build_encoder("resnet50", 64, backend="spconv")
    builds = collections.Counter()
    original = SparseSites._build_neighbours

    def counting(self, *key):
        builds[key] += 1
        return original(self, *key)

    active = draw_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    SparseSites._build_neighbours = counting
    try:
        encoder(photos_64[:2], active)[-1].sum().backward()
    finally:
        SparseSites._build_neighbours = original

    # The stem (7x7/2 at stride 1), max pool (3x3/2 at 2), a 3x3/1 table at strides
    # 4 to 32, and a 3x3/2 and 1x1/2 table at strides 4 to 16.
    assert len(builds) == 12
    assert set(builds.values()) == {1}


def test_layer_outside_bind_rejected():
    sites = SparseSites(32)

    with pytest.raises(RuntimeError, match="no mask is bound"):
        sites.scale(4)


@pytest.mark.parametrize("in_channels", [16, GATHER_ALL_MIN_CHANNELS])
@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_conv_matches_masked_dense(in_channels, kernel, stride, padding):
    torch.manual_seed(0)
    sites = SparseSites(32)
    conv = SparseConv2d(in_channels, 24, kernel, stride=stride, padding=padding, bias=True)
    conv.sites, conv.in_stride = sites, 8

    with sites.bind(ACTIVE):
        rows = torch.randn(sites.scale(8).num_sites, in_channels, requires_grad=True)
        out = conv(rows)
        dense_in = to_dense(rows, sites, 8)
        dense_out = F.conv2d(dense_in, conv.weight, conv.bias, stride=stride, padding=padding)
        reference = to_rows(dense_out, sites, 8 * stride)

    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (rows, conv.weight, conv.bias), grad)
    theirs = torch.autograd.grad(reference, (rows, conv.weight, conv.bias), grad)
    for name, mine, expected in zip(("input", "weight", "bias"), ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4, msg=name)


def test_gather_gemm_matches_dense_for_both_paths():
    torch.manual_seed(0)
    sites = SparseSites(32)

    with sites.bind(ACTIVE):
        table = sites.neighbours(16, 3, 1, 1)
        by_tap = table.t().contiguous()
        for channels in (GATHER_ALL_MIN_CHANNELS - 1, GATHER_ALL_MIN_CHANNELS):
            rows = torch.randn(sites.scale(16).num_sites, channels)
            weight = torch.randn(5, channels, 3, 3)
            reference = to_rows(F.conv2d(to_dense(rows, sites, 16), weight, padding=1), sites, 16)
            torch.testing.assert_close(gather_gemm(rows, weight, table, by_tap), reference, rtol=1e-4, atol=1e-4)


def test_max_pool_hidden_and_padding_taps():
    torch.manual_seed(0)
    sites = SparseSites(32)
    pool = SparseMaxPool2d(3, 2, 1)
    pool.sites, pool.in_stride = sites, 8
    reference_pool = MaskedMaxPool2d(3, 2, 1)
    reference_pool.sites = sites

    with sites.bind(ACTIVE):
        # All values negative, so a hidden neighbour (zero) and padding (-inf) both matter.
        rows = (-torch.rand(sites.scale(8).num_sites, 4) - 0.1).requires_grad_()
        out = pool(rows)
        reference = to_rows(reference_pool(to_dense(rows, sites, 8)), sites, 16)

    assert (out == 0).any()
    assert (out < 0).any()
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, rows, grad)[0], torch.autograd.grad(reference, rows, grad)[0], rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "kernel, stride, padding, ceil_mode, count_include_pad",
    [(2, 2, 0, True, False), (3, 2, 1, False, False), (3, 2, 1, False, True)],
)
def test_avg_pool_matches_masked(kernel, stride, padding, ceil_mode, count_include_pad):
    torch.manual_seed(0)
    sites = SparseSites(32)
    pool = SparseAvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)
    pool.sites, pool.in_stride = sites, 8
    reference_pool = MaskedAvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)
    reference_pool.sites = sites

    with sites.bind(ACTIVE):
        rows = torch.randn(sites.scale(8).num_sites, 4)
        out = pool(rows)
        reference = to_rows(reference_pool(to_dense(rows, sites, 8)), sites, 16)

    torch.testing.assert_close(out, reference, rtol=1e-6, atol=1e-6)


def test_avg_pool_partial_window_rejected():
    sites = SparseSites(32)
    pool = SparseAvgPool2d(3, 2, 0, ceil_mode=True)
    pool.sites, pool.in_stride = sites, 8

    with sites.bind(ACTIVE), pytest.raises(ValueError, match="partial window"):
        pool(torch.randn(sites.scale(8).num_sites, 4))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_uses_active_rows_only(training):
    torch.manual_seed(0)
    sites = SparseSites(32)
    sparse_bn = SparseBatchNorm2d(6)
    masked_bn = MaskedBatchNorm2d(6)
    masked_bn.sites = sites
    with torch.no_grad():
        for bn in (sparse_bn, masked_bn):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 6))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 6))
            bn.running_mean.fill_(0.3)
            bn.running_var.fill_(2.0)
            bn.train(training)

    with sites.bind(ACTIVE):
        rows = torch.randn(sites.scale(4).num_sites, 6) * 3 + 2
        out = sparse_bn(rows)
        reference = to_rows(masked_bn(to_dense(rows, sites, 4)), sites, 4)

    # Five visible patches of 8x8 sites at stride 4: the statistics count 320 rows, not 2 * 16 * 24.
    assert rows.shape[0] == 5 * 64
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    if training:
        expected_mean = 0.9 * 0.3 + 0.1 * rows.mean(0)
        expected_var = 0.9 * 2.0 + 0.1 * rows.var(0, unbiased=True)
        normalised = (out - sparse_bn.bias) / sparse_bn.weight
        torch.testing.assert_close(normalised.mean(0), torch.zeros(6), rtol=0, atol=1e-5)
        torch.testing.assert_close(normalised.var(0, unbiased=False), torch.ones(6), rtol=1e-3, atol=1e-3)
    else:
        expected_mean = torch.full((6,), 0.3)
        expected_var = torch.full((6,), 2.0)
    torch.testing.assert_close(sparse_bn.running_mean, expected_mean)
    torch.testing.assert_close(sparse_bn.running_var, expected_var)
    torch.testing.assert_close(masked_bn.running_mean, expected_mean)
    assert sparse_bn.num_batches_tracked.item() == int(training)


def test_batch_norm_rejects_dense_map():
    with pytest.raises(ValueError, match=r"\(N, C\) matrix"):
        SparseBatchNorm2d(4)(torch.randn(2, 4, 3, 3))


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_engine_rule_book_matches_gather_gemm(kernel, stride, padding, monkeypatch):
    """Run spconv's regular sparse convolution on the CPU with the backend's rule book.

    spconv 2.3.8's CPU kernels are correct only on one intra-op thread. Its CPU
    backward calls ``torch.cuda.current_stream()``, which fails without a driver,
    so the stream lookup is replaced by stream 0 here.
    """
    spconv_ops = pytest.importorskip("spconv.pytorch.ops")
    monkeypatch.setattr(spconv_ops, "get_current_stream", lambda: 0)
    torch.manual_seed(0)
    sites = SparseSites(32)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sites.bind(ACTIVE):
            rows = torch.randn(sites.scale(8).num_sites, 16, requires_grad=True)
            weight = torch.randn(24, 16, kernel, kernel, requires_grad=True)
            table = sites.neighbours(8, kernel, stride, padding)
            rule_book = spconv_engine.rule_book_from_neighbours(table, rows.shape[0])
            out = spconv_engine.conv(rows, weight, rule_book)
            reference = gather_gemm(rows, weight, table, table.t().contiguous())
            grad = torch.randn_like(reference)
            ours = torch.autograd.grad(out, (rows, weight), grad)
            theirs = torch.autograd.grad(reference, (rows, weight), grad)
    finally:
        torch.set_num_threads(previous_threads)

    assert rule_book.pairs.dtype == torch.int32
    assert rule_book.counts.tolist() == (table < rows.shape[0]).sum(0).tolist()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    for mine, expected in zip(ours, theirs):
        torch.testing.assert_close(mine, expected, rtol=1e-4, atol=1e-4)


def test_engine_not_used_on_cpu():
    assert not spconv_engine.runs_on(torch.zeros(1))
