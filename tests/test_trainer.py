"""The trainer end to end on the bundled photographs: output files, resuming, errors, schedule and groups."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from spark_sparse import build_spark
from spark_sparse.trainer import main
from spark_sparse.trainer.args import parse_args
from spark_sparse.trainer.checkpoint import load_checkpoint, resume
from spark_sparse.trainer.distributed import World
from spark_sparse.trainer.optim import build_optimizer, param_groups
from spark_sparse.trainer.run import restore_rng_state
from spark_sparse.trainer.schedule import Schedule, build_schedule

REPO = Path(__file__).resolve().parents[1]
# 18 bundled photographs in batches of 4: 5 iterations per epoch.
TINY = ["--model=resnet18", "--input_size=64", "--decoder_width=64", "--dataloader_workers=0", "--bs=4"]
ITERATIONS_PER_EPOCH = 5
OUTPUT_FILES = {
    "resnet18_still_pretraining.pth",
    "resnet18_1kpretrained.pth",
    "pretrain_log.txt",
    "stdout_backup.txt",
    "stderr_backup.txt",
    "metrics.jsonl",
    "loss_curve.png",
}


def log_lines(out_dir: Path) -> list:
    return [json.loads(line) for line in (out_dir / "pretrain_log.txt").read_text().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_main_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "main.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def one_epoch_dir(tmp_path_factory) -> Path:
    """Output directory of a finished one-epoch run."""
    out_dir = tmp_path_factory.mktemp("one_epoch") / "out"
    status = main(["--exp_name=one", f"--exp_dir={out_dir}", "--ep=1", "--wp_ep=1", "--seed=5", *TINY])
    assert status == 0
    return out_dir


def test_demo_writes_outputs(tmp_path):
    result = run_main_process("--exp_name=demo", "--ep=2", "--wp_ep=1", *TINY, cwd=tmp_path)
    out_dir = tmp_path / "output_demo"

    assert result.returncode == 0, result.stderr
    assert {path.name for path in out_dir.iterdir() if path.is_file()} == OUTPUT_FILES
    assert sorted(path.name for path in out_dir.iterdir() if path.is_dir()) == ["bundled_photos", "reconstructions"]

    header, *epochs = log_lines(out_dir)
    assert header["name"] == "demo"
    assert header["model"] == "resnet18"
    assert header["command"].startswith("main.py --exp_name=demo --ep=2")
    assert len(header["git_commit_id"]) == 40
    assert header["git_commit_message"]
    assert [line["epoch"] for line in epochs] == [1, 2]
    assert all(math.isfinite(line["loss"]) for line in epochs)
    assert epochs[-1]["remaining"] == "0:00:00"
    assert all("finish" in line for line in epochs)

    stdout_copy = (out_dir / "stdout_backup.txt").read_text()
    assert "epoch 2/2: mean loss" in stdout_copy
    assert "18 images from the bundled photographs" in stdout_copy


def test_checkpoint_contents(one_epoch_dir):
    state = load_checkpoint(str(one_epoch_dir / "resnet18_still_pretraining.pth"))
    weights = load_checkpoint(str(one_epoch_dir / "resnet18_1kpretrained.pth"))

    assert state["epoch"] == 1
    assert math.isfinite(state["loss"])
    assert state["args"]["model"] == "resnet18"
    assert state["args"]["bs"] == 4
    assert len(state["rng_states"]) == 1
    assert set(state["optimizer"]["state"]) == set(range(len(state["optimizer"]["state"])))
    assert weights["arch"] == "resnet18"
    assert weights["is_pretrain"] is True

    dense = timm.create_model("resnet18", pretrained=False, num_classes=0)
    dense.load_state_dict(weights["module"], strict=True)
    for key, value in weights["module"].items():
        assert torch.equal(value, state["model"][f"encoder.{key}"])


def test_encoder_weights_changed_by_training(one_epoch_dir):
    torch.manual_seed(5)
    untrained = build_spark("resnet18", 64, decoder_width=64).encoder.state_dict()
    trained = load_checkpoint(str(one_epoch_dir / "resnet18_1kpretrained.pth"))["module"]

    changed = [key for key in trained if trained[key].is_floating_point() and not torch.equal(trained[key], untrained[key])]

    assert "conv1.weight" in changed
    assert "layer4.1.conv2.weight" in changed


def test_resume_restores_model_and_optimizer(one_epoch_dir):
    path = one_epoch_dir / "resnet18_still_pretraining.pth"
    saved = load_checkpoint(str(path))
    args = parse_args(["--exp_name=r", *TINY])
    spark = build_spark("resnet18", 64, decoder_width=64)
    optimizer = build_optimizer(args, spark)

    checkpoint = resume(str(path), "resnet18", spark, optimizer)

    assert checkpoint["epoch"] == 1
    for key, value in spark.state_dict().items():
        assert torch.equal(value, saved["model"][key]), key
    restored = optimizer.state_dict()
    assert restored["state"].keys() == saved["optimizer"]["state"].keys()
    for index, param_state in saved["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(restored["state"][index][name], param_state[name]), (index, name)
    assert int(restored["param_groups"][0]["step"]) == ITERATIONS_PER_EPOCH


def test_resume_continues_next_epoch(one_epoch_dir, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(one_epoch_dir, out_dir)
    before = load_checkpoint(str(out_dir / "resnet18_still_pretraining.pth"))

    status = main(
        [
            "--exp_name=one",
            f"--exp_dir={out_dir}",
            "--ep=2",
            "--wp_ep=1",
            "--seed=5",
            f"--resume_from={out_dir / 'resnet18_still_pretraining.pth'}",
            *TINY,
        ]
    )
    after = load_checkpoint(str(out_dir / "resnet18_still_pretraining.pth"))

    assert status == 0
    assert after["epoch"] == 2
    lines = log_lines(out_dir)
    assert [line.get("epoch") for line in lines] == [None, 1, None, 2]
    assert "--resume_from=" in lines[2]["command"]
    # LAMB's step count goes on from the saved state instead of starting again.
    assert int(after["optimizer"]["param_groups"][0]["step"]) == 2 * ITERATIONS_PER_EPOCH
    first_moment = after["optimizer"]["state"][0]["exp_avg"]
    assert not torch.equal(first_moment, before["optimizer"]["state"][0]["exp_avg"])


def test_resume_of_finished_run_trains_nothing(one_epoch_dir, tmp_path):
    out_dir = tmp_path / "out"
    shutil.copytree(one_epoch_dir, out_dir)
    checkpoint = out_dir / "resnet18_still_pretraining.pth"
    digest = sha256(checkpoint)

    status = main(["--exp_name=one", f"--exp_dir={out_dir}", "--ep=1", f"--resume_from={checkpoint}", *TINY])

    assert status == 0
    assert sha256(checkpoint) == digest
    assert len(log_lines(out_dir)) == 2


def test_resume_restores_generator_state():
    torch.manual_seed(11)
    torch.rand(3)
    saved = torch.get_rng_state()
    expected = torch.rand(4)
    torch.manual_seed(0)

    restore_rng_state({"rng_states": [saved]}, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))

    assert torch.equal(torch.rand(4), expected)


def test_non_finite_loss_stops_and_keeps_checkpoint(one_epoch_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    shutil.copytree(one_epoch_dir, out_dir)
    checkpoints = [out_dir / "resnet18_still_pretraining.pth", out_dir / "resnet18_1kpretrained.pth"]
    digests = [sha256(path) for path in checkpoints]

    # A learning rate of 1e30 scales the weights so far that the next loss overflows float32.
    status = main(
        [
            "--exp_name=one",
            f"--exp_dir={out_dir}",
            "--ep=2",
            "--wp_ep=0",
            "--base_lr=1e30",
            f"--resume_from={checkpoints[0]}",
            *TINY,
        ]
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]

    assert status == 1
    assert len(errors) == 1
    assert "at epoch 2 iteration 2" in errors[0]
    lr = Schedule(peak_lr=1e30 * 4 / 256, wd=0.04, wd_end=0.2, warmup_iters=0, total_iters=10).lr_at(6)
    assert f"learning rate {lr:.3g}" in errors[0]
    assert "Traceback" not in (out_dir / "stderr_backup.txt").read_text()
    assert errors[0] in (out_dir / "stderr_backup.txt").read_text()
    assert [sha256(path) for path in checkpoints] == digests
    assert [line.get("epoch") for line in log_lines(out_dir)] == [None, 1, None]


@pytest.mark.parametrize(
    "bad_option, expected",
    [
        ("--model=resnet5", "resnet18, resnet34, resnet50, resnet101, resnet152, resnet200"),
        ("--sbn=yes", "use 0 or 1"),
        ("--mask=1.2", "use a fraction in (0, 1)"),
        ("--opt=adam", "invalid choice: 'adam'"),
        ("--input_size=64,a", "give one integer or H,W"),
        ("--bogus=1", "unrecognized arguments: --bogus=1"),
        ("--lr=-1", "use a positive learning rate"),
        ("--data_path=/no/such/folder", "'/no/such/folder' is not a directory"),
    ],
)
def test_invalid_option_one_line(bad_option, expected, tmp_path, capsys):
    status = main(["--exp_name=bad", f"--exp_dir={tmp_path / 'out'}", "--ep=1", *TINY, bad_option])
    error = capsys.readouterr().err

    assert status == 2
    assert error.count("\n") == 1
    assert error.startswith("main.py: error: ")
    assert expected in error
    assert not (tmp_path / "out").exists()


def test_input_size_not_multiple(tmp_path, capsys):
    status = main(["--exp_name=bad", f"--exp_dir={tmp_path}", "--ep=1", *TINY, "--input_size=70"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line]

    assert status == 2
    assert errors == ["main.py: error: input size 70 is not a positive multiple of the downsample ratio 32; use 64 or 96"]


def test_batch_not_divisible_by_world(capsys):
    with pytest.raises(SystemExit) as exit_request:
        parse_args(["--exp_name=x", "--bs=10"], world_size=4)
    error = capsys.readouterr().err

    assert exit_request.value.code == 2
    assert error == "main.py: error: --bs 10 is not divisible by the 4 processes; use a global batch size of 8 or 12\n"


def test_main_process_rejects_model(tmp_path):
    result = run_main_process("--exp_name=bad", "--model=vit_base", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "unknown model 'vit_base'; choose one of: resnet18" in result.stderr


def test_derived_values():
    args = parse_args(["--exp_name=x", "--bs=2048", "--wde=0"])

    assert args.exp_dir == "output_x"
    assert args.lr == pytest.approx(2e-4 * 2048 / 256)
    assert args.wde == args.wd == 0.04
    assert args.ada == 0.95
    assert args.input_size == (224, 224)
    assert args.backend == "masked"
    assert parse_args(["--exp_name=x", "--sparse_conv=1", "--input_size=160,224"]).backend == "spconv"
    assert parse_args(["--exp_name=x", "--input_size=160,224"]).input_size == (160, 224)
    assert parse_args(["--exp_name=x", "--lr=0.5"]).lr == 0.5


def test_schedule_key_points():
    schedule = Schedule(peak_lr=2.0, wd=0.04, wd_end=0.2, warmup_iters=40, total_iters=1600)

    assert schedule.lr_at(0) == pytest.approx(0.005 * 2.0)
    assert schedule.lr_at(20) == pytest.approx(2.0 * (0.005 + 0.995 * 0.5))
    assert schedule.lr_at(40) == pytest.approx(2.0)
    assert schedule.lr_at(1599) == pytest.approx(0.001 * 2.0)
    midpoint = 40 + (1599 - 40) / 2
    assert schedule.lr_at(int(midpoint)) == pytest.approx(2.0 * (0.001 + 0.999 * 0.5), rel=1e-2)
    assert schedule.wd_at(0) == pytest.approx(0.04)
    assert schedule.wd_at(1599) == pytest.approx(0.2)
    assert schedule.wd_at(1599 // 2) == pytest.approx(0.12, rel=1e-2)
    lrs = [schedule.lr_at(i) for i in range(1600)]
    assert all(a < b for a, b in zip(lrs[:40], lrs[1:41]))
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))


def test_schedule_from_args():
    args = parse_args(["--exp_name=x", "--bs=512", "--ep=10", "--wp_ep=2"])

    schedule = build_schedule(args, iters_per_epoch=7)

    assert schedule.peak_lr == pytest.approx(4e-4)
    assert schedule.warmup_iters == 14
    assert schedule.total_iters == 70
    assert schedule.lr_at(69) == pytest.approx(4e-7)


def test_schedule_without_warmup_or_decay():
    schedule = Schedule(peak_lr=1.0, wd=0.1, wd_end=0.3, warmup_iters=0, total_iters=1)

    assert schedule.lr_at(0) == pytest.approx(1.0)
    assert schedule.wd_at(0) == pytest.approx(0.1)


def test_schedule_sets_groups():
    spark = build_spark("resnet18", 64, decoder_width=64)
    args = parse_args(["--exp_name=x", "--bs=256"])
    optimizer = build_optimizer(args, spark)
    schedule = Schedule(peak_lr=1e-3, wd=0.04, wd_end=0.2, warmup_iters=0, total_iters=10)

    lr, wd = schedule.apply(optimizer, 9)

    decay_group, no_decay_group = optimizer.param_groups
    assert lr == pytest.approx(1e-6)
    assert wd == pytest.approx(0.2)
    assert decay_group["lr"] == no_decay_group["lr"] == pytest.approx(1e-6)
    assert decay_group["weight_decay"] == pytest.approx(0.2)
    assert no_decay_group["weight_decay"] == 0.0
    assert type(optimizer).__name__ == "Lamb"
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def test_no_weight_decay_on_bias_norm_tokens():
    spark = build_spark("resnet18", 64, decoder_width=64)
    names = {id(param): name for name, param in spark.named_parameters()}

    decay, no_decay = param_groups(spark)
    decay_names = {names[id(param)] for param in decay["params"]}
    no_decay_names = {names[id(param)] for param in no_decay["params"]}

    assert len(decay_names) + len(no_decay_names) == len(names)
    assert "encoder.conv1.weight" in decay_names
    assert "decoder.proj.weight" in decay_names
    assert "encoder.bn1.weight" in no_decay_names
    assert "encoder.bn1.bias" in no_decay_names
    assert "decoder.proj.bias" in no_decay_names
    assert {f"mask_tokens.{i}" for i in range(4)} <= no_decay_names
    assert not any(name.endswith(".bias") for name in decay_names)


def test_unreadable_data_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.jpg").write_text("not a JPEG")

    status = main(["--exp_name=crash", f"--exp_dir={tmp_path / 'out'}", f"--data_path={data}", "--ep=1", *TINY])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]

    assert status == 2
    assert errors == ["main.py: error: none of the 1 image files could be read; check the --data_path folder"]


def test_crash_traceback_copied(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(data / "black.png")
    out_dir = tmp_path / "out"

    # An error the trainer does not expect (a fault in the image decoder) must leave its traceback in the copy.
    def failing_decoder(path):
        raise MemoryError(f"decoder fault on {path}")

    monkeypatch.setattr("spark_sparse.trainer.data.load_rgb", failing_decoder)
    with pytest.raises(MemoryError, match="decoder fault"):
        main(["--exp_name=crash", f"--exp_dir={out_dir}", f"--data_path={data}", "--ep=1", *TINY])

    copy = (out_dir / "stderr_backup.txt").read_text()
    assert "Traceback (most recent call last):" in copy
    assert "MemoryError: decoder fault on" in copy
