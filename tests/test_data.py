"""Data layouts, image modes, bundled photographs and the batch sampler of the trainer."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spark_sparse.trainer.data import (
    BUNDLED_PHOTOS,
    ImageFiles,
    RepeatingBatchSampler,
    build_loader,
    build_transform,
    find_images,
    load_rgb,
    write_bundled_photos,
)


def write_image(path: Path, mode: str = "RGB", size=(40, 30)) -> Path:
    """Write a random image of ``mode``; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    image_format = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[path.suffix.lower()]
    image.save(path, format=image_format)
    return path


def test_imagenet_root_uses_train_only(tmp_path):
    train = [write_image(tmp_path / "train" / cls / f"{i}.JPEG") for cls in ("n01", "n02") for i in range(3)]
    write_image(tmp_path / "val" / "n01" / "v.JPEG")

    found = find_images(str(tmp_path))

    assert found == sorted(train)


def test_class_folders_found(tmp_path):
    images = [write_image(tmp_path / cls / f"{i}.png") for cls in ("cat", "dog", "fish") for i in range(2)]

    found = find_images(str(tmp_path))

    assert found == sorted(images)


def test_flat_folder_recursive_mixed_case(tmp_path):
    images = [
        write_image(tmp_path / "a.JPG"),
        write_image(tmp_path / "b.Png"),
        write_image(tmp_path / "deep" / "er" / "c.jpeg"),
        write_image(tmp_path / "deep" / "d.BmP"),
        write_image(tmp_path / "e.webp"),
    ]
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "deep" / "labels.csv").write_text("a,1")

    found = find_images(str(tmp_path))

    assert found == sorted(images)


def test_empty_folder_error_names_path(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")

    with pytest.raises(ValueError) as error:
        find_images(str(tmp_path))

    message = str(error.value)
    assert str(tmp_path) in message
    assert "\n" not in message
    assert ".jpg" in message


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_image_modes_load_as_rgb(tmp_path, mode):
    extension = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"image_{mode}{extension}", mode=mode)
    assert Image.open(path).mode == mode

    image = load_rgb(path)
    tensor, skipped = ImageFiles([path], build_transform((64, 96)))[(0, 7)]

    assert image.mode == "RGB"
    assert image.size == (40, 30)
    assert tensor.shape == (3, 64, 96)
    assert tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    assert skipped == []


def test_palette_transparency_keeps_colours(tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette_image.info["transparency"] = 0
    palette_image.save(tmp_path / "p.png", transparency=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = np.asarray(load_rgb(tmp_path / "p.png"))

    assert (pixels == [200, 30, 10]).all()


def test_sixteen_bit_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    assert Image.open(tmp_path / "ramp16.png").mode == "I;16"

    pixels = np.asarray(load_rgb(tmp_path / "ramp16.png")).astype(int)

    assert pixels.shape == (30, 40, 3)
    assert pixels[0, 0, 0] == 0
    assert pixels[-1, -1, 0] == 255
    assert abs(pixels[15, 20, 0] - round(ramp[15, 20] / 257)) <= 1
    assert len(np.unique(pixels[..., 0])) > 200


def test_bundled_photos_written_once(tmp_path):
    folder = write_bundled_photos(tmp_path)
    first_times = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    write_bundled_photos(tmp_path)

    assert sorted(first_times) == sorted(f"{name}.png" for name in BUNDLED_PHOTOS)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == first_times
    assert Image.open(folder / "logo.png").mode == "RGBA"
    assert Image.open(folder / "camera.png").mode == "L"
    assert find_images(str(folder)) == sorted(folder.iterdir())


def test_sampler_repeats_small_dataset():
    sampler = RepeatingBatchSampler(dataset_size=5, global_batch=12, rank=0, world_size=1, seed=3)

    batches = [[index for index, _ in batch] for batch in sampler]

    assert len(sampler) == 1
    assert len(batches) == 1
    assert len(batches[0]) == 12
    assert set(batches[0]) == set(range(5))


def test_sampler_covers_every_image_per_epoch():
    sampler = RepeatingBatchSampler(dataset_size=10, global_batch=4, rank=0, world_size=1, seed=0)

    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        indices = [index for batch in batches for index, _ in batch]

        assert len(batches) == 3
        assert all(len(batch) == 4 for batch in batches)
        assert set(indices) == set(range(10))


def test_sampler_ranks_split_global_batch():
    per_rank = []
    for rank in range(3):
        sampler = RepeatingBatchSampler(dataset_size=20, global_batch=6, rank=rank, world_size=3, seed=7)
        sampler.set_epoch(2)
        per_rank.append(list(sampler))

    single = RepeatingBatchSampler(dataset_size=20, global_batch=6, rank=0, world_size=1, seed=7)
    single.set_epoch(2)
    for iteration, global_batch in enumerate(single):
        shares = [per_rank[rank][iteration] for rank in range(3)]
        assert all(len(share) == 2 for share in shares)
        assert sum(shares, []) == global_batch


def test_sampler_epochs_shuffle_differently():
    sampler = RepeatingBatchSampler(dataset_size=50, global_batch=10, rank=0, world_size=1, seed=0)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    again = list(sampler)

    assert first != second
    assert first == again


def test_loader_yields_local_batches(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", size=(50 + i, 40)) for i in range(3)]

    loader = build_loader(paths, (64, 32), global_batch=8, rank=1, world_size=2, workers=0, seed=0)
    batches = list(loader)

    assert len(batches) == 1
    assert batches[0][0].shape == (4, 3, 64, 32)
    assert batches[0][1] == []
