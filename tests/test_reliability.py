"""Reliability of the trainer as real processes: kills, signals, broken data, bad input, distributed runs."""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model=resnet18", "--input_size=64", "--decoder_width=32", "--wp_ep=1", "--seed=4"]
CHECKPOINT = "resnet18_still_pretraining.pth"
ENCODER_WEIGHTS = "resnet18_1kpretrained.pth"


def process_env(**extra: str) -> dict:
    # One thread per process: the spconv CPU kernels need it, and it keeps float sums reproducible.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def write_photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
    for i in range(count):
        pixels = getattr(skimage_data, names[i % len(names)])()
        Image.fromarray(pixels).resize((80, 72)).save(folder / f"photo_{i:02d}.png")
    return folder


def main_command(out_dir: Path, data: Path, *options: str) -> list:
    return [sys.executable, str(REPO / "main.py"), "--exp_name=rel", f"--exp_dir={out_dir}", f"--data_path={data}", *TINY, *options]


def run_to_end(command: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=process_env(**env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def load_model_state(out_dir: Path) -> dict:
    return torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=False)["model"]


def assert_loadable(out_dir: Path) -> dict:
    checkpoint = torch.load(out_dir / CHECKPOINT, map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "epoch", "iteration", "rng_states"} <= set(checkpoint)
    torch.load(out_dir / ENCODER_WEIGHTS, map_location="cpu", weights_only=False)
    return checkpoint


def wait_for(condition, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.05)


def partial_files(out_dir: Path) -> list:
    return list(out_dir.glob(".*.partial")) if out_dir.exists() else []


def test_killed_runs_resume_bitwise(tmp_path):
    data = write_photos(tmp_path / "data", 4)
    # 4 images in batches of 2: 2 iterations per epoch, 8 in all, a checkpoint after each. Each kill
    # below comes after at least one new checkpoint, so the SIGTERM lands before the last iteration.
    options = ("--bs=2", "--ep=4", "--save_every_iters=1")
    reference_dir = tmp_path / "reference"
    run_to_end(main_command(reference_dir, data, "--dataloader_workers=0", *options), tmp_path)

    out_dir = tmp_path / "killed"
    command = main_command(out_dir, data, "--dataloader_workers=1", *options)
    checkpoint_path = out_dir / CHECKPOINT

    # Kill inside the second checkpoint write, between writing the temporary file and the rename.
    process = subprocess.Popen(command, cwd=tmp_path, env=process_env(SPARK_SPARSE_TEST_CHECKPOINT_DELAY_S="3"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (out_dir / ENCODER_WEIGHTS).exists() and partial_files(out_dir))
    process.kill()
    process.wait()
    assert partial_files(out_dir)
    assert_loadable(out_dir)

    # Kill at random moments of resumed runs; each leaves a loadable checkpoint.
    rng = random.Random(7)
    for _ in range(2):
        before = checkpoint_path.stat().st_mtime_ns
        process = subprocess.Popen(command, cwd=tmp_path, env=process_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: checkpoint_path.stat().st_mtime_ns != before or process.poll() is not None)
        time.sleep(rng.uniform(0.0, 1.5))
        process.kill()
        process.wait()
        assert_loadable(out_dir)

    # SIGTERM: the run writes a checkpoint at the next iteration boundary and reports where it stopped.
    process = subprocess.Popen(command, cwd=tmp_path, env=process_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = checkpoint_path.stat().st_mtime_ns
    wait_for(lambda: checkpoint_path.stat().st_mtime_ns != before or process.poll() is not None)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    stopped = assert_loadable(out_dir)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert f"stopped by SIGTERM at epoch {stopped['epoch'] + 1} iteration {stopped['iteration']};" in stderr
    assert "Traceback" not in stderr

    result = run_to_end(command, tmp_path)
    assert "continuing that run" in result.stdout + result.stderr

    expected = load_model_state(reference_dir)
    resumed = load_model_state(out_dir)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


def write_broken_dataset(folder: Path) -> int:
    """Write 12 files sorted so that no two unreadable ones are neighbours; return the number of unreadable ones."""
    folder.mkdir(parents=True)
    photo = np.asarray(Image.fromarray(skimage_data.astronaut()).resize((90, 80)))
    Image.fromarray(photo).save(folder / "00_rgb.png")
    (folder / "01_empty.jpg").write_bytes(b"")
    Image.fromarray(photo).convert("L").save(folder / "02_gray.png")
    (folder / "03_text.png").write_text("not an image\n")
    Image.fromarray(photo).convert("LA").save(folder / "04_gray_alpha.png")
    full = (folder / "00_rgb.png").read_bytes()
    (folder / "05_truncated.png").write_bytes(full[: len(full) // 3])
    Image.fromarray(photo).convert("P").save(folder / "06_palette.png")
    Image.fromarray(photo).convert("RGBA").save(folder / "07_rgba.png")
    Image.fromarray(photo).convert("CMYK").save(folder / "08_cmyk.jpg")
    Image.fromarray((np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16) * 257)).save(folder / "09_16bit.png")
    Image.fromarray(photo).resize((12, 9)).save(folder / "10_smaller_than_crop.png")
    Image.fromarray(photo).save(folder / "11_rgb.jpg")
    return 3


def test_broken_images_skipped_and_counted(tmp_path):
    data = tmp_path / "mixed"
    unreadable = write_broken_dataset(data)
    out_dir = tmp_path / "out"

    result = run_to_end(main_command(out_dir, data, "--bs=4", "--ep=1", "--dataloader_workers=0"), tmp_path)
    output = (out_dir / "stdout_backup.txt").read_text()

    assert f"epoch 1: skipped {unreadable} unreadable image files" in " ".join(output.split())
    assert "01_empty.jpg" in output
    assert "Traceback" not in result.stderr
    assert (out_dir / CHECKPOINT).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def epoch_losses(out_dir: Path) -> list:
    lines = [json.loads(line) for line in (out_dir / "pretrain_log.txt").read_text().splitlines()]
    return [line["loss"] for line in lines if "epoch" in line]


@pytest.mark.parametrize("sparse_conv", ["0", "1"])
def test_two_processes_match_one(tmp_path, sparse_conv):
    data = write_photos(tmp_path / "data", 4)
    # One iteration per epoch, so each epoch's loss is one step's loss.
    options = ["--bs=4", "--ep=3", "--sbn=1", f"--sparse_conv={sparse_conv}", "--dataloader_workers=0", f"--data_path={data}", *TINY]
    run_to_end(["bash", str(REPO / "run.sh"), "one", "--ngpu_per_node=1", *options], tmp_path)
    run_to_end(["bash", str(REPO / "run.sh"), "two", "--ngpu_per_node=2", *options], tmp_path)

    single = epoch_losses(tmp_path / "output_one")
    double = epoch_losses(tmp_path / "output_two")
    assert len(single) == 3
    assert len(double) == 3
    for expected, actual in zip(single, double):
        assert actual == pytest.approx(expected, rel=1e-5)


def test_two_nodes_train_to_end(tmp_path):
    data = write_photos(tmp_path / "data", 4)
    port = str(free_port())
    nodes = []
    for node_rank in ("0", "1"):
        command = ["bash", str(REPO / "run.sh"), "nodes", "--num_nodes=2", f"--node_rank={node_rank}",
                   "--master_address=127.0.0.1", f"--master_port={port}", "--ngpu_per_node=1",
                   f"--data_path={data}", f"--exp_dir={tmp_path / ('node' + node_rank)}",
                   "--bs=4", "--ep=2", "--dataloader_workers=0", *TINY]
        nodes.append(subprocess.Popen(command, cwd=tmp_path, env=process_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=600) for node in nodes]

    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert epoch_losses(tmp_path / "node0")[-1] > 0
    assert len(epoch_losses(tmp_path / "node0")) == 2


def write_bad_inputs(folder: Path) -> dict:
    """Write the files the bad-input cases point at; return their paths by name."""
    import timm

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty").mkdir()
    (folder / "a_file").write_text("not a folder\n")
    encoder = timm.create_model("resnet18", num_classes=0).state_dict()
    torch.save({"arch": "resnet18", "module": encoder, "is_pretrain": True}, folder / ENCODER_WEIGHTS)
    whole = (folder / ENCODER_WEIGHTS).read_bytes()
    (folder / "truncated.pth").write_bytes(whole[: len(whole) // 2])
    torch.save(encoder, folder / "state_dict.pth")
    other = {"model": {}, "optimizer": {}, "epoch": 1, "args": {"model": "resnet34"}}
    torch.save(other, folder / "resnet34_still_pretraining.pth")
    return {"dir": folder}


BAD_INPUTS = [
    (["--model=resnet5"], "resnet18, resnet34, resnet50"),
    (["--mask=1.2"], "use a fraction in (0, 1)"),
    (["--mask=0.9"], "leaves no visible patch of the 4 patches"),
    (["--input_size=70"], "use 64 or 96"),
    (["--ngpu_per_node=2", "--bs=5"], "--bs 5 is not divisible by the 2 processes; use a global batch size of 4 or 6"),
    (["--data_path={dir}/missing"], "missing' is not a directory"),
    (["--data_path={dir}/empty"], "no images found under"),
    (["--data_path={dir}/a_file"], "a_file' is not a directory"),
    (["--exp_dir={dir}/a_file/out"], "a_file' is not a directory; set --exp_dir to a writable folder"),
    (["--resume_from={dir}/missing.pth"], "missing.pth' is not a file"),
    (["--resume_from={dir}/truncated.pth"], "the file is truncated or not a checkpoint"),
    (["--resume_from={dir}/" + ENCODER_WEIGHTS], "contains encoder weights only"),
    (["--resume_from={dir}/state_dict.pth"], "is a bare state dict, not a still-pretraining checkpoint"),
    (["--resume_from={dir}/resnet34_still_pretraining.pth"], "contains a resnet34 model, not resnet18; pass --model=resnet34"),
]


@pytest.fixture(scope="module")
def bad_input_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_inputs")
    write_bad_inputs(folder)
    return folder


@pytest.mark.parametrize("options, expected", BAD_INPUTS)
def test_bad_input_one_line(bad_input_dir, options, expected):
    options = [option.format(dir=bad_input_dir) for option in options]
    command = ["bash", str(REPO / "run.sh"), "bad", "--model=resnet18", "--input_size=64", "--bs=4", *options]
    result = subprocess.run(command, cwd=bad_input_dir, env=process_env(), capture_output=True, text=True, timeout=300)
    expected = expected.format(dir=bad_input_dir)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("run.sh: error: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
