"""The linear probe on a tiny labelled folder of photographs: split, accuracies, table and input errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from spark_sparse import build_spark
from spark_sparse.probe import main, run_probe, split_indices
from spark_sparse.trainer.args import parse_args
from spark_sparse.trainer.checkpoint import save_epoch

PER_CLASS = 6


@pytest.fixture(scope="module")
def labelled_dir(tmp_path_factory) -> Path:
    """Two class folders of random crops: a cat photograph and a rocket photograph."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(0)
    for label, name in (("cat", "chelsea"), ("rocket", "rocket")):
        (root / label).mkdir()
        pixels = getattr(skimage_data, name)()
        height, width = pixels.shape[:2]
        for i in range(PER_CLASS):
            top, left = rng.integers(0, height // 3), rng.integers(0, width // 3)
            crop = pixels[top : top + 2 * height // 3, left : left + 2 * width // 3]
            Image.fromarray(crop).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("probe_ckpt")
    args = parse_args(["--exp_name=probe", f"--exp_dir={out_dir}", "--model=resnet18", "--input_size=64", "--decoder_width=64"])
    torch.manual_seed(3)
    spark = build_spark("resnet18", 64, 0.6, "masked", decoder_width=64)
    save_epoch(out_dir, args, spark, torch.optim.SGD(spark.parameters(), lr=0.1), 1, 1.0)
    return out_dir / "resnet18_1kpretrained.pth"


def test_split_stratified_and_disjoint():
    targets = [0] * 6 + [1] * 4 + [2] * 2

    train, val = split_indices(targets, 0.25, seed=0)

    assert sorted(train + val) == list(range(len(targets)))
    assert not set(train) & set(val)
    assert [sum(targets[i] == label for i in val) for label in range(3)] == [2, 1, 1]
    assert split_indices(targets, 0.25, seed=0) == (train, val)


def test_split_rejects_single_image_class():
    with pytest.raises(ValueError, match="class 1 has 1 image"):
        split_indices([0, 0, 1], 0.25, seed=0)


def test_probe_on_labelled_folder(checkpoint, labelled_dir):
    results, sizes = run_probe(str(checkpoint), str(labelled_dir), (64, 64), val_fraction=0.25, seed=0)

    assert sizes == (2, 8, 4)
    assert [result.encoder for result in results] == ["resnet18 pre-trained", "resnet18 random init"]
    for result in results:
        # Eight standardised 512-dimensional points are linearly separable.
        assert result.train_accuracy == 1.0
        assert result.val_accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_probe_prints_table(checkpoint, labelled_dir, capsys):
    status = main(["--ckpt", str(checkpoint), "--data_path", str(labelled_dir), "--input_size=64"])
    out = capsys.readouterr().out

    assert status == 0
    assert "Linear probe: 2 classes, 8 training and 4 validation" in out
    assert "resnet18 pre-trained" in out
    assert "resnet18 random init" in out


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--ckpt", "missing.pth", "--data_path", "{flat}"], "checkpoint 'missing.pth' not found"),
        (["--ckpt", "{checkpoint}", "--data_path", "{flat}"], "give a folder with one sub-folder of images per class"),
        (["--ckpt", "{checkpoint}", "--data_path", "{labelled}", "--val_fraction=1.5"], "invalid --val_fraction 1.5"),
    ],
)
def test_bad_input_one_line(checkpoint, labelled_dir, tmp_path, capsys, arguments, expected):
    Image.new("RGB", (8, 8)).save(tmp_path / "flat.png")
    names = {"checkpoint": checkpoint, "labelled": labelled_dir, "flat": tmp_path}

    status = main([argument.format(**names) for argument in arguments])
    err = capsys.readouterr().err

    assert status == 2
    assert expected in err
    assert err.count("\n") == 1
