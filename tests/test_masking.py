import pytest
import torch

from spark_sparse.masking import ActiveSites, draw_mask, num_visible_patches, upsample_mask


def test_draw_mask_keeps_fixed_count():
    active = draw_mask(5, (7, 7), 0.6, generator=torch.Generator().manual_seed(0))

    assert active.shape == (5, 1, 7, 7)
    assert active.dtype == torch.bool
    assert active.view(5, -1).sum(1).tolist() == [round(49 * 0.4)] * 5


def test_draw_mask_seeded_generator_repeats():
    first = draw_mask(3, (4, 6), 0.75, generator=torch.Generator().manual_seed(7))
    second = draw_mask(3, (4, 6), 0.75, generator=torch.Generator().manual_seed(7))
    third = draw_mask(3, (4, 6), 0.75, generator=torch.Generator().manual_seed(8))

    assert torch.equal(first, second)
    assert not torch.equal(first, third)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match="outside"):
        num_visible_patches((7, 7), ratio)


def test_mask_ratio_leaving_no_patch():
    with pytest.raises(ValueError, match="no visible patch"):
        num_visible_patches((2, 2), 0.9)


def test_upsample_mask_repeats_each_cell():
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)

    fine = upsample_mask(active, (4, 6))

    assert fine.shape == (1, 1, 4, 6)
    expected = torch.tensor(
        [
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1],
            [0, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(fine[0, 0], expected)


def test_upsample_mask_rejects_fractional_scale():
    with pytest.raises(ValueError, match="multiple"):
        upsample_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), (5, 4))


def test_active_sites_scoped_and_restored():
    sites = ActiveSites()
    outer = torch.tensor([True, False, True, True]).view(1, 1, 2, 2)
    inner = torch.ones(1, 1, 2, 2, dtype=torch.bool)

    assert sites.mask_at((4, 4)) is None
    with sites.bind(outer):
        assert sites.rows_at((2, 2)).tolist() == [0, 2, 3]
        with sites.bind(inner):
            assert sites.rows_at((2, 2)).tolist() == [0, 1, 2, 3]
        assert sites.rows_at((4, 4)).numel() == 12
    assert sites.active is None


def test_active_sites_rejects_non_bool_mask():
    sites = ActiveSites()

    with pytest.raises(ValueError, match="bool"):
        with sites.bind(torch.ones(1, 1, 2, 2)):
            pass
