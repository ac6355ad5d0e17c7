"""The spconv backend against the masked backend (same weights, images and mask) and against dense timm."""
import contextlib
import copy

import pytest
import timm
import torch
from torch import nn

from spark_sparse import UnsupportedLayerError, build_encoder, build_spark
from spark_sparse.backends.sparse import SpconvEncoder
from spark_sparse.masking import draw_mask, upsample_mask
from spark_sparse.models import RESNET

MODELS = ["resnet18", "resnet50"]


@contextlib.contextmanager
def intra_op_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def randomize_batch_norms(module: nn.Module, seed: int) -> None:
    """Give every batch norm random scales, shifts and running statistics.

    timm starts the last norm of each block at zero scale, which would hide a
    wrong residual branch. Random running statistics make eval mode non-trivial.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                bn.weight.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)
                bn.bias.copy_(torch.rand(bn.num_features, generator=generator) - 0.5)
                bn.running_mean.copy_(torch.rand(bn.num_features, generator=generator) - 0.5)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) + 0.5)


def unit_batch_norms(module: nn.Module) -> None:
    """Set every batch norm's scale to one, so that no residual branch starts at zero."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(bn.weight)


def one_patch_each(grid, cells) -> torch.Tensor:
    """Return a mask with exactly one visible patch per image, at the given flat cell indices."""
    active = torch.zeros(len(cells), grid[0] * grid[1], dtype=torch.bool)
    active[torch.arange(len(cells)), torch.tensor(cells)] = True
    return active.view(len(cells), 1, *grid)


def make_case(case: str, photos_64: torch.Tensor, photos_96: torch.Tensor):
    """Return the ``(images, active)`` pair of a named case."""
    generator = torch.Generator().manual_seed(11)
    if case.startswith("ratio_"):
        return photos_96[:3], draw_mask(3, (3, 3), float(case[len("ratio_"):]), generator=generator)
    if case == "one_visible_patch":
        # A corner, the centre and an edge cell of the 3x3 grid.
        return photos_96[:3], one_patch_each((3, 3), [0, 4, 7])
    if case == "all_visible":
        return photos_64[:2], torch.ones(2, 1, 2, 2, dtype=torch.bool)
    if case == "batch_1":
        return photos_96[3:4], draw_mask(1, (3, 3), 0.6, generator=generator)
    if case == "non_square_64x96":
        return photos_96[:2, :, :64, :], draw_mask(2, (2, 3), 0.6, generator=generator)
    raise ValueError(f"unknown case {case!r}")


CASES = ["ratio_0.25", "ratio_0.6", "ratio_0.9", "one_visible_patch", "all_visible", "batch_1", "non_square_64x96"]

@pytest.fixture(scope="module", params=MODELS)
def spark_pair(request):
    """Return SparK on the masked and on the spconv backend, and the shared start state.

    The start state has random batch norm scales, shifts and running statistics.
    """
    torch.manual_seed(0)
    masked = build_spark(request.param, 64, backend="masked", decoder_width=64)
    sparse = build_spark(request.param, 64, backend="spconv", decoder_width=64)
    randomize_batch_norms(masked, seed=1)
    return masked, sparse, copy.deepcopy(masked.state_dict())


def run_spark(model, state, images, active, mode, dtype):
    """Run one forward and backward from ``state``; return the loss, encoder features and gradients.

    The backward objective adds a fixed random projection of the encoder
    features to the SparK loss, so encoder gradients are checked even where no
    patch is hidden (the loss is then zero).
    """
    model.to(dtype)
    model.load_state_dict(state, strict=True)
    model.train(mode == "train")
    model.zero_grad(set_to_none=True)
    captured = []
    handle = model.encoder.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        loss = model(images.to(dtype), active)
    finally:
        handle.remove()

    features = captured[0]
    generator = torch.Generator().manual_seed(3)
    probe = sum((f * torch.randn(f.shape, generator=generator).to(dtype)).mean() for f in features)
    (loss + probe).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), [f.detach() for f in features], grads


def assert_features_match(features, features_ref, active):
    """Check stage outputs: exactly zero at hidden sites, within 1e-4 of the reference's max elsewhere."""
    for ours, reference in zip(features, features_ref):
        assert ours.shape == reference.shape
        assert ours.dtype == reference.dtype
        hidden = ~upsample_mask(active, ours.shape[-2:]).expand_as(ours)
        if hidden.any():
            assert ours[hidden].abs().max().item() == 0.0
        scale = reference.abs().max().item()
        assert scale > 0.0
        assert (ours - reference).abs().max().item() <= 1e-4 * scale


# The gradient comparison runs in float64. In float32, rounding differences
# between the backends flip the ReLU gate of pre-activations that lie within
# rounding of zero, and a flipped gate changes a gradient element by its whole
# upstream value. Measured for resnet50, eval mode, mask ratio 0.6, 2 threads: one
# gate of layer3.0.act2 flips and the masked backend's conv1.weight gradient moves
# 8e-5 off its float64 value, while spconv's stays within 2e-8. In train mode the
# deep batch norms also normalise over 1 to 21 rows at these image sizes, which
# amplifies float32 rounding past the tolerances for both backends alike.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES)
def test_spark_matches_masked(spark_pair, case, mode, threads, photos_64, photos_96):
    masked, sparse, state = spark_pair
    images, active = make_case(case, photos_64, photos_96)
    original = images.clone()

    with intra_op_threads(threads):
        loss_ref, features_ref, grads_ref = run_spark(masked, state, images, active, mode, torch.float64)
        loss, features, grads = run_spark(sparse, state, images, active, mode, torch.float64)

    assert torch.equal(images, original)
    assert_features_match(features, features_ref, active)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0.0)
    assert grads.keys() == grads_ref.keys()
    assert len(grads) == len(list(sparse.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-3, atol=1e-5, msg=lambda text: f"{name}: {text}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_float32_eval_matches_masked(spark_pair, case, threads, photos_64, photos_96):
    masked, sparse, state = spark_pair
    images, active = make_case(case, photos_64, photos_96)
    unit_state = {key: value.clone() for key, value in state.items()}
    for key, value in unit_state.items():
        if key.endswith("running_mean"):
            value.zero_()
        elif key.endswith("running_var"):
            value.fill_(1.0)

    with intra_op_threads(threads), torch.no_grad():
        loss_ref, features_ref = run_forward(masked, unit_state, images, active)
        loss, features = run_forward(sparse, unit_state, images, active)

    assert_features_match(features, features_ref, active)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0.0)


def run_forward(model, state, images, active):
    """Run one float32 eval-mode forward from ``state``; return the loss and the encoder features."""
    model.float()
    model.load_state_dict(state, strict=True)
    model.eval()
    captured = []
    handle = model.encoder.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        loss = model(images, active)
    finally:
        handle.remove()
    return loss, captured[0]


@pytest.fixture(scope="module")
def encoder_pair_18():
    """Return resnet18 encoders on the masked and on the spconv backend with the same weights."""
    torch.manual_seed(0)
    masked = build_encoder("resnet18", 64, backend="masked")
    unit_batch_norms(masked)
    sparse = build_encoder("resnet18", 64, backend="spconv")
    sparse.load_state_dict(masked.state_dict(), strict=True)
    return masked, sparse, copy.deepcopy(masked.state_dict())


# Float32 train mode is checked on the cases whose batch norms see enough rows;
# the others are compared in float64 above.
@pytest.mark.parametrize("case", ["ratio_0.25", "ratio_0.6", "all_visible", "non_square_64x96"])
def test_float32_train_features_match_masked(encoder_pair_18, case, photos_64, photos_96):
    masked, sparse, state = encoder_pair_18
    masked.load_state_dict(state, strict=True)
    sparse.load_state_dict(state, strict=True)
    images, active = make_case(case, photos_64, photos_96)

    with torch.no_grad():
        features_ref = masked.train()(images, active)
        features = sparse.train()(images, active)

    assert_features_match(features, features_ref, active)
    for key, value in sparse.state_dict().items():
        torch.testing.assert_close(value, masked.state_dict()[key], rtol=1e-5, atol=1e-6, msg=key)


def test_drop_path_drops_same_images(photos_96):
    torch.manual_seed(0)
    masked = build_spark("resnet18", 64, backend="masked", decoder_width=64, drop_path_rate=0.5)
    randomize_batch_norms(masked, seed=2)
    sparse = build_spark("resnet18", 64, backend="spconv", decoder_width=64, drop_path_rate=0.5)
    sparse.load_state_dict(masked.state_dict(), strict=True)
    images = photos_96[:3]
    active = draw_mask(3, (3, 3), 0.6, generator=torch.Generator().manual_seed(4))
    losses = []

    for model in (masked, sparse):
        model.train()
        torch.manual_seed(123)
        losses.append(model(images, active).item())
    torch.manual_seed(124)
    other_draw = masked(images, active).item()

    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert other_draw != pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("model", MODELS)
def test_no_mask_equals_timm_dense(model, photos_64, photos_96):
    encoder = build_encoder(model, 64, backend="spconv")
    unit_batch_norms(encoder)
    encoder.eval()
    dense = timm.create_model(model, num_classes=0)
    dense.load_state_dict(encoder.state_dict(), strict=True)
    dense.eval()

    for images in (photos_64[:2], photos_96[:2, :, :64, :]):
        with torch.no_grad():
            features = encoder(images)
            reference = dense.forward_intermediates(images, indices=[1, 2, 3, 4], intermediates_only=True)
        assert [f.shape[1] for f in features] == encoder.feature_channels
        for ours, theirs in zip(features, reference):
            assert ours.shape == theirs.shape
            assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


@pytest.mark.parametrize("model", MODELS)
def test_state_dict_matches_masked(model):
    masked = build_encoder(model, 64, backend="masked")
    sparse = build_encoder(model, 64, backend="spconv")
    masked_state = masked.state_dict()
    sparse_state = sparse.state_dict()

    assert list(sparse_state) == list(masked_state)
    for key, value in sparse_state.items():
        assert value.shape == masked_state[key].shape, key
    sparse.load_state_dict(masked_state, strict=True)
    masked.load_state_dict(sparse_state, strict=True)
    for key, value in sparse.state_dict().items():
        assert torch.equal(value, masked_state[key]), key
    timm.create_model(model, num_classes=0).load_state_dict(sparse_state, strict=True)


def test_reflect_padded_conv_rejected_at_build():
    dense = timm.create_model("resnet18", num_classes=0)
    dense.layer2[0].conv2.padding_mode = "reflect"

    with pytest.raises(UnsupportedLayerError, match=r"'layer2\.0\.conv2'.*padding_mode='reflect'"):
        SpconvEncoder("resnet18", RESNET, dense, 64)


def test_unsupported_layer_names_path():
    dense = timm.create_model("resnet18", num_classes=0)
    dense.layer2[1].act1 = nn.PReLU()

    with pytest.raises(UnsupportedLayerError, match=r"PReLU.*'layer2\.1\.act1'"):
        SpconvEncoder("resnet18", RESNET, dense, 64)


def test_mask_shape_mismatch_rejected(photos_64):
    encoder = build_encoder("resnet18", 64, backend="spconv")

    with pytest.raises(ValueError, match="does not match"):
        encoder(photos_64, torch.ones(1, 1, 2, 2, dtype=torch.bool))
