"""Training metrics: metrics.jsonl contents, the loss curve, reconstruction grids during training, options."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from spark_sparse.trainer import main
from spark_sparse.trainer.args import parse_args
from spark_sparse.trainer.data import write_bundled_photos
from spark_sparse.trainer.metrics import read_metrics
from spark_sparse.trainer.schedule import build_schedule

# Four photographs in one batch of 4: one iteration per epoch.
TINY = ["--model=resnet18", "--input_size=64", "--decoder_width=64", "--dataloader_workers=0", "--bs=4"]
PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.png")
EPOCHS = 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Output directory of a two-epoch run on four photographs with a grid after every epoch."""
    root = tmp_path_factory.mktemp("metrics")
    photos = write_bundled_photos(root / "all")
    data = root / "data"
    data.mkdir()
    for name in PHOTOS:
        shutil.copy(photos / name, data / name)

    out_dir = root / "out"
    arguments = ["--exp_name=metrics", f"--exp_dir={out_dir}", f"--data_path={data}", f"--ep={EPOCHS}", "--wp_ep=1", "--vis_every=1", *TINY]
    assert main(arguments) == 0
    return out_dir


def test_metrics_lines_parse(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iterations = [record for record in records if record["kind"] == "iteration"]
    epochs = [record for record in records if record["kind"] == "epoch"]

    assert len(records) == 2 * EPOCHS
    assert [record["step"] for record in iterations] == [0, 1]
    assert [record["epoch"] for record in iterations] == [1, 2]
    assert [record["epoch"] for record in epochs] == [1, 2]
    for record in iterations:
        for key in ("loss", "lr", "wd", "grad_norm", "images_per_second"):
            assert math.isfinite(record[key]), (key, record)
        assert record["grad_norm"] > 0
        assert record["images_per_second"] > 0
    for record in epochs:
        assert record["iterations"] == 1
        assert record["seconds"] > 0


def test_metrics_match_schedule_and_loss(run_dir):
    args = parse_args(["--exp_name=metrics", f"--ep={EPOCHS}", "--wp_ep=1", *TINY])
    schedule = build_schedule(args, 1)
    records = read_metrics(run_dir / "metrics.jsonl")
    iterations = [record for record in records if record["kind"] == "iteration"]
    epochs = [record for record in records if record["kind"] == "epoch"]
    log_epochs = [json.loads(line) for line in (run_dir / "pretrain_log.txt").read_text().splitlines()[1:]]

    for record in iterations:
        assert record["lr"] == pytest.approx(schedule.lr_at(record["step"]))
        assert record["wd"] == pytest.approx(schedule.wd_at(record["step"]))
    # One iteration per epoch, so each epoch's mean loss is its iteration's loss.
    assert [record["mean_loss"] for record in epochs] == pytest.approx([record["loss"] for record in iterations])
    assert [record["mean_loss"] for record in epochs] == pytest.approx([line["loss"] for line in log_epochs])


def test_loss_curve_written(run_dir):
    with Image.open(run_dir / "loss_curve.png") as image:
        assert image.format == "PNG"
        assert image.size == (600, 400)


def test_grids_written_each_epoch(run_dir):
    grids = sorted(path.name for path in (run_dir / "reconstructions").iterdir())

    assert grids == [f"epoch_{epoch:04d}.png" for epoch in range(1, EPOCHS + 1)]
    with Image.open(run_dir / "reconstructions" / grids[0]) as image:
        assert image.size == (4 * 66 + 2, len(PHOTOS) * 66 + 2)


def test_tensorboard_missing_logged(run_dir):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in (run_dir / "stdout_backup.txt").read_text()
    else:
        assert any((run_dir / "tensorboard_log").iterdir())


def test_vis_every_negative_rejected(tmp_path, capsys):
    status = main(["--exp_name=bad", f"--exp_dir={tmp_path / 'out'}", "--ep=1", "--vis_every=-1", *TINY])
    err = capsys.readouterr().err

    assert status == 2
    assert "invalid --vis_every -1" in err
    assert err.count("\n") == 1
