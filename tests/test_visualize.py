"""The reconstruction grid: its layout, the composite and masked panels, both backends, and input errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spark_sparse import build_spark
from spark_sparse.masking import upsample_mask
from spark_sparse.trainer.args import parse_args
from spark_sparse.trainer.checkpoint import save_epoch
from spark_sparse.trainer.data import write_bundled_photos
from spark_sparse.visualize import HIDDEN_GREY, PANELS, load_spark, main, reconstruction_panels, to_pixels

SIZE = 64
PATCH = 32
GAP = 2


def write_checkpoint(out_dir: Path, sparse_conv: str) -> Path:
    """Write the still-pretraining checkpoint of an untrained resnet18 SparK, as the trainer does."""
    args = parse_args(
        ["--exp_name=vis", f"--exp_dir={out_dir}", "--model=resnet18", f"--input_size={SIZE}", "--decoder_width=64", f"--sparse_conv={sparse_conv}"]
    )
    torch.manual_seed(0)
    spark = build_spark("resnet18", SIZE, 0.6, args.backend, decoder_width=64)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_epoch(out_dir, args, spark, torch.optim.SGD(spark.parameters(), lr=0.1), 1, 1.0)
    return out_dir / "resnet18_still_pretraining.pth"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vis")
    return {backend: write_checkpoint(root / backend, flag) for backend, flag in (("masked", "0"), ("spconv", "1"))}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    return write_bundled_photos(tmp_path_factory.mktemp("photos"))


def read_cells(path: Path, rows: int) -> np.ndarray:
    """Cut a grid PNG into ``(rows, len(PANELS), SIZE, SIZE, 3)`` uint8 cells."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    cells = np.empty((rows, len(PANELS), SIZE, SIZE, 3), dtype=np.uint8)
    for row in range(rows):
        for column in range(len(PANELS)):
            top = GAP + row * (SIZE + GAP)
            left = GAP + column * (SIZE + GAP)
            cells[row, column] = pixels[top : top + SIZE, left : left + SIZE]
    return cells


def visible_pixels(spark, seed: int, rows: int) -> np.ndarray:
    """The ``(rows, SIZE, SIZE)`` visible-pixel mask that ``draw_grid`` draws with ``seed``."""
    active = spark.mask(rows, generator=torch.Generator().manual_seed(seed))
    return upsample_mask(active, (SIZE, SIZE))[:, 0].numpy()


def test_grid_size(checkpoints, photo_dir, tmp_path):
    out = tmp_path / "grid.png"

    status = main(["--ckpt", str(checkpoints["masked"]), "--data_path", str(photo_dir), "--num_images=3", "--out", str(out)])

    assert status == 0
    width, height = Image.open(out).size
    assert width == len(PANELS) * (SIZE + GAP) + GAP
    assert height == 3 * (SIZE + GAP) + GAP


@pytest.mark.parametrize("backend", ["masked", "spconv"])
def test_grid_composite_equals_input_on_visible(checkpoints, photo_dir, tmp_path, backend):
    out = tmp_path / "grid.png"
    status = main(["--ckpt", str(checkpoints[backend]), "--data_path", str(photo_dir), "--num_images=4", "--seed=3", "--out", str(out)])
    assert status == 0

    spark, _ = load_spark(str(checkpoints[backend]))
    visible = visible_pixels(spark, 3, 4)
    cells = read_cells(out, 4)
    inputs, masked, reconstructions, composites = (cells[:, PANELS.index(name)] for name in PANELS)

    assert visible.any()
    assert not visible.all()
    assert np.array_equal(composites[visible], inputs[visible])
    assert np.array_equal(composites[~visible], reconstructions[~visible])
    assert np.array_equal(masked[visible], inputs[visible])
    assert np.all(masked[~visible] == round(HIDDEN_GREY * 255))
    # An untrained decoder does not reproduce the hidden pixels.
    assert not np.array_equal(reconstructions[~visible], inputs[~visible])


def test_panels_use_patch_statistics(checkpoints, photos_64):
    spark, _ = load_spark(str(checkpoints["masked"]))
    active = spark.mask(photos_64.shape[0], generator=torch.Generator().manual_seed(0))

    panels = reconstruction_panels(spark, photos_64, active)
    with torch.no_grad():
        raw, _ = spark.reconstruct(photos_64, active)
    targets, _, _ = spark.normalized_targets(photos_64)
    perfect = spark.unpatchify(targets, (SIZE, SIZE))

    assert spark.training is False
    assert torch.allclose(panels["reconstruction"], to_pixels(spark.denormalize_reconstruction(photos_64, raw)))
    # A reconstruction equal to the per-patch normalised targets must come back as the input itself.
    assert torch.allclose(to_pixels(spark.denormalize_reconstruction(photos_64, perfect)), panels["input"], atol=1e-5)


def test_seed_fixes_grid(checkpoints, photo_dir, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for path, seed in zip(paths, (1, 1, 2)):
        assert main(["--ckpt", str(checkpoints["masked"]), "--data_path", str(photo_dir), "--num_images=2", f"--seed={seed}", "--out", str(path)]) == 0

    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_images_option(checkpoints, photo_dir, tmp_path):
    images = [str(photo_dir / "astronaut.png"), str(photo_dir / "coffee.png")]
    out = tmp_path / "grid.png"

    assert main(["--ckpt", str(checkpoints["spconv"]), "--images", *images, "--num_images=8", "--out", str(out)]) == 0
    assert Image.open(out).size[1] == 2 * (SIZE + GAP) + GAP


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--ckpt", "missing.pth"], "checkpoint 'missing.pth' not found"),
        (["--ckpt", "{masked}", "--data_path", "{empty}"], "no images found under"),
        (["--ckpt", "{masked}", "--images", "missing.png"], "image file 'missing.png' not found"),
        (["--ckpt", "{pretrained}"], "has no SparK model and arguments"),
        (["--ckpt", "{masked}", "--num_images=0"], "invalid --num_images 0"),
    ],
)
def test_bad_input_one_line(checkpoints, tmp_path, capsys, arguments, expected):
    (tmp_path / "empty").mkdir()
    names = {
        "masked": checkpoints["masked"],
        "pretrained": checkpoints["masked"].with_name("resnet18_1kpretrained.pth"),
        "empty": tmp_path / "empty",
    }
    arguments = [argument.format(**names) for argument in arguments]

    status = main([*arguments, "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err

    assert status == 2
    assert expected in err
    assert err.count("\n") == 1
    assert "Traceback" not in err
