import pytest
import torch

from spark_sparse import build_spark
from spark_sparse.masking import draw_mask, upsample_mask


@pytest.fixture(scope="module")
def spark18():
    torch.manual_seed(0)
    return build_spark("resnet18", 64, mask_ratio=0.5, decoder_width=64)


def test_patchify_round_trip(spark18, photos_96):
    images = photos_96[:2, :, :64, :]

    patches = spark18.patchify(images)

    assert patches.shape == (2, 2 * 3, 32 * 32 * 3)
    torch.testing.assert_close(spark18.unpatchify(patches, (64, 96)), images, rtol=0, atol=0)
    torch.testing.assert_close(patches[0, 1].view(32, 32, 3), images[0, :, :32, 32:64].permute(1, 2, 0))


def test_loss_ignores_visible_patches(spark18, photos_64):
    active = torch.tensor([True, False, False, True]).view(1, 1, 2, 2).repeat(3, 1, 1, 1)
    images = photos_64[:3]
    reconstruction = torch.randn(3, 3, 64, 64)
    visible = upsample_mask(active, (64, 64)).expand_as(reconstruction)

    loss = spark18.loss(images, reconstruction, active)
    changed_visible = torch.where(visible, torch.randn_like(reconstruction) * 10, reconstruction)
    changed_hidden = torch.where(visible, reconstruction, torch.randn_like(reconstruction))

    assert spark18.loss(images, changed_visible, active).item() == loss.item()
    assert spark18.loss(images, changed_hidden, active).item() != loss.item()


def test_loss_is_mse_on_normalised_hidden_patches(spark18, photos_64):
    active = torch.tensor([False, True, True, True]).view(1, 1, 2, 2)
    image = photos_64[:1]
    reconstruction = torch.zeros(1, 3, 64, 64)

    loss = spark18.loss(image, reconstruction, active)

    patch = image[0, :, :32, :32].permute(1, 2, 0).reshape(-1)
    target = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    torch.testing.assert_close(loss, target.square().mean())


def test_forward_returns_finite_scalar_and_gradients(spark18, photos_64):
    spark18.train()
    spark18.zero_grad()

    loss = spark18(photos_64[:2])
    loss.backward()

    assert loss.dim() == 0
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in spark18.mask_tokens)
    assert spark18.encoder.conv1.weight.grad.abs().sum() > 0


def test_mask_tokens_fill_hidden_sites(spark18, photos_64):
    spark18.eval()
    active = torch.tensor([True, False, False, False]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    captured = []
    handle = spark18.densify_projs[0].register_forward_pre_hook(lambda _module, inputs: captured.append(inputs[0]))

    with torch.no_grad():
        spark18(photos_64[:2], active)
    handle.remove()

    smallest = captured[0]
    token = spark18.mask_tokens[0].view(-1)
    torch.testing.assert_close(smallest[0, :, 0, 1], token)
    torch.testing.assert_close(smallest[1, :, 1, 1], token)
    assert not torch.allclose(smallest[0, :, 0, 0], token)


def test_non_square_spark_runs(photos_96):
    spark = build_spark("resnet50", (64, 96), mask_ratio=0.6, decoder_width=64)

    loss = spark(photos_96[:2, :, :64, :])

    assert spark.grid_size == (2, 3)
    assert torch.isfinite(loss)


def test_mask_ratio_leaving_no_patch_rejected():
    with pytest.raises(ValueError, match="no visible patch"):
        build_spark("resnet18", 64, mask_ratio=0.9)


def test_training_fits_bundled_photos(photos_64):
    """Forty steps on four photos with one fixed mask drive the loss to under half its start."""
    torch.manual_seed(0)
    spark = build_spark("resnet18", 64, mask_ratio=0.6, decoder_width=512)
    images = photos_64[:4]
    active = draw_mask(4, spark.grid_size, 0.6, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(spark.parameters(), lr=3e-3, weight_decay=0.0, betas=(0.9, 0.95))

    losses = []
    for _ in range(40):
        loss = spark(images, active)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    start = sum(losses[:2]) / 2
    end = sum(losses[-2:]) / 2
    assert end < 0.5 * start, losses
