import threading

import pytest
import timm
import torch
from torch import nn

from spark_sparse import build_encoder
from spark_sparse.backends.masked import MaskedBatchNorm2d
from spark_sparse.masking import ActiveSites, draw_mask, upsample_mask


def dense_stage_outputs(model: str, state_dict: dict, images: torch.Tensor) -> list:
    dense = timm.create_model(model, num_classes=0)
    dense.load_state_dict(state_dict, strict=True)
    dense.eval()
    with torch.no_grad():
        return dense.forward_intermediates(images, indices=[1, 2, 3, 4], intermediates_only=True)


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_no_mask_equals_timm_dense(model, photos_64):
    encoder = build_encoder(model, 64).eval()

    with torch.no_grad():
        features = encoder(photos_64)
    reference = dense_stage_outputs(model, encoder.state_dict(), photos_64)

    assert [f.shape[1] for f in features] == encoder.feature_channels
    for ours, theirs in zip(features, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200"])
def test_state_dict_loads_strictly_into_timm(model):
    encoder = build_encoder(model, 224)

    dense = timm.create_model(model, num_classes=0)
    dense.load_state_dict(encoder.state_dict(), strict=True)

    assert encoder.downsample_ratio == 32
    assert len(encoder.feature_channels) == 4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hidden_sites_zero_after_every_layer(mode, photos_64):
    encoder = build_encoder("resnet50", 64)
    encoder.train(mode == "train")
    # timm starts each block's last norm at zero scale; unit scales make every active output non-zero.
    for module in encoder.modules():
        if isinstance(module, MaskedBatchNorm2d):
            nn.init.ones_(module.weight)
    active = draw_mask(photos_64.shape[0], (2, 2), 0.5, generator=torch.Generator().manual_seed(0))
    outputs = []

    def record(module, inputs, output):
        if torch.is_tensor(output) and output.dim() == 4:
            outputs.append((module, output.detach().clone()))

    handles = [module.register_forward_hook(record) for module in encoder.modules() if module is not encoder]
    with torch.no_grad():
        encoder(photos_64, active)
    for handle in handles:
        handle.remove()

    assert len(outputs) > 100
    for module, output in outputs:
        hidden = ~upsample_mask(active, output.shape[-2:]).expand_as(output)
        assert output[hidden].abs().max().item() == 0.0, type(module).__name__
        assert output[~hidden].abs().max().item() > 0.0, type(module).__name__


def test_features_on_active_sites_match_visible_input_only(photos_64):
    encoder = build_encoder("resnet18", 64).eval()
    active = torch.tensor([True, False, False, True]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    images = photos_64[:2]
    changed = images.clone()
    changed[:, :, :32, 32:] = torch.randn(2, 3, 32, 32)

    with torch.no_grad():
        before = encoder(images, active)
        after = encoder(changed, active)

    for first, second in zip(before, after):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_sparse_batch_norm_equals_batchnorm1d_on_active_rows():
    torch.manual_seed(0)
    sites = ActiveSites()
    sparse_bn = MaskedBatchNorm2d(8)
    sparse_bn.sites = sites
    reference = nn.BatchNorm1d(8)
    with torch.no_grad():
        for bn in (sparse_bn, reference):
            bn.weight.copy_(torch.linspace(0.5, 2.0, 8))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    active = torch.tensor([[True, False], [False, False], [True, True], [False, True]]).view(2, 1, 2, 2)
    x = torch.randn(2, 8, 6, 6) * 3 + 1
    x = x * upsample_mask(active, (6, 6))

    with sites.bind(active):
        out = sparse_bn(x)
    rows = x.permute(0, 2, 3, 1)[upsample_mask(active, (6, 6))[:, 0]]
    expected = reference(rows)

    torch.testing.assert_close(out.permute(0, 2, 3, 1)[upsample_mask(active, (6, 6))[:, 0]], expected)
    torch.testing.assert_close(sparse_bn.running_mean, reference.running_mean)
    torch.testing.assert_close(sparse_bn.running_var, reference.running_var)
    assert out[~upsample_mask(active, (6, 6)).expand_as(out)].abs().max().item() == 0.0
    assert rows.shape[0] == 4 * 9


def test_encoder_leaves_input_unchanged(photos_64):
    encoder = build_encoder("resnet18", 64)
    images = photos_64.clone()
    active = draw_mask(images.shape[0], (2, 2), 0.5, generator=torch.Generator().manual_seed(1))

    encoder(images, active)

    assert torch.equal(images, photos_64)


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_two_encoders_interleaved_keep_their_masks(backend, photos_64):
    first = build_encoder("resnet18", 64, backend=backend).eval()
    second = build_encoder("resnet18", 64, backend=backend).eval()
    images = photos_64[:2]
    mask_a = torch.tensor([True, False, False, False]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    mask_b = torch.tensor([False, True, True, True]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    with torch.no_grad():
        expected = first(images, mask_a)

    # Run the second encoder in the middle of the first one's forward pass.
    def run_second(*_):
        second(images, mask_b)

    handle = first.layer2.register_forward_hook(run_second)
    with torch.no_grad():
        interleaved = first(images, mask_a)
    handle.remove()

    for ours, reference in zip(interleaved, expected):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


def test_non_square_input(photos_96):
    encoder = build_encoder("resnet50", (64, 96))
    images = photos_96[:2, :, :64, :]
    active = draw_mask(2, encoder.grid_size, 0.5, generator=torch.Generator().manual_seed(2))

    features = encoder(images, active)

    assert encoder.grid_size == (2, 3)
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_input_size_not_multiple_names_nearest():
    with pytest.raises(ValueError, match="use 224 or 256"):
        build_encoder("resnet18", 230)


def test_mask_shape_mismatch_rejected(photos_64):
    encoder = build_encoder("resnet18", 64)

    with pytest.raises(ValueError, match="does not match"):
        encoder(photos_64, torch.ones(1, 1, 2, 2, dtype=torch.bool))


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50"):
        build_encoder("vgg16", 224)


def test_unknown_backend_rejected():
    with pytest.raises(ValueError, match="masked"):
        build_encoder("resnet18", 64, backend="dense")


def test_two_encoders_in_threads_keep_their_masks(photos_64):
    encoders = [build_encoder("resnet18", 64).eval() for _ in range(2)]
    images = photos_64[:2]
    masks = [
        torch.tensor([True, False, False, False]).view(1, 1, 2, 2).repeat(2, 1, 1, 1),
        torch.tensor([False, True, True, True]).view(1, 1, 2, 2).repeat(2, 1, 1, 1),
    ]
    with torch.no_grad():
        expected = [encoder(images, mask)[-1] for encoder, mask in zip(encoders, masks)]
    results = [[], []]

    def run(index: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                results[index].append(encoders[index](images, masks[index])[-1])

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for index in range(2):
        assert len(results[index]) == 5
        for output in results[index]:
            torch.testing.assert_close(output, expected[index], rtol=0, atol=0)
