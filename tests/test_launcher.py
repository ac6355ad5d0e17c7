"""run.sh, .ci/run and the spconv flavour choice, run as real processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model=resnet18", "--input_size=64", "--decoder_width=64", "--dataloader_workers=0"]


def launcher_env(**extra: str) -> dict:
    """The environment with this interpreter's directory first on PATH, so .ci/env.sh takes its fast path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run_script(*args: str, cwd: Path, env: dict = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *args], cwd=cwd, env=env or launcher_env(), capture_output=True, text=True, timeout=timeout
    )


def test_two_process_gloo_run(tmp_path):
    result = run_script(
        str(REPO / "run.sh"), "pair", "--ngpu_per_node=2", "--bs=4", "--ep=2", "--wp_ep=1", *TINY, cwd=tmp_path
    )
    out_dir = tmp_path / "output_pair"

    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 2 on cpu" in result.stdout
    assert "4 images (2 per process)" in (out_dir / "stdout_backup.txt").read_text()
    lines = [json.loads(line) for line in (out_dir / "pretrain_log.txt").read_text().splitlines()]
    assert lines[0]["name"] == "pair"
    assert lines[0]["command"].startswith("main.py --exp_name=pair --bs=4")
    assert [line.get("epoch") for line in lines] == [None, 1, 2]
    assert (out_dir / "resnet18_still_pretraining.pth").is_file()
    assert (out_dir / "resnet18_1kpretrained.pth").is_file()
    assert (out_dir / "stderr_backup.txt").is_file()


def test_batch_not_divisible_one_line(tmp_path):
    result = run_script(str(REPO / "run.sh"), "odd", "--ngpu_per_node=2", "--bs=5", "--ep=1", *TINY, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr == (
        "run.sh: error: --bs 5 is not divisible by the 2 processes; use a global batch size of 4 or 6\n"
    )
    assert not (tmp_path / "output_odd").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        ([], "run.sh: error: missing the experiment name; usage: bash run.sh <exp_name>"),
        (["--model=resnet18"], "the first argument must be the experiment name, got '--model=resnet18'"),
        (["x", "--ngpu_per_node=0"], "invalid --ngpu_per_node '0'; use a whole number of at least 1"),
        (["x", "--num_nodes=2"], "--num_nodes 2 needs --master_address"),
        (["x", "--num_nodes=2", "--node_rank=2", "--master_address=10.0.0.1"], "--node_rank 2 is not below"),
        (["x", "--exp_name=y"], "give the experiment name as the first argument"),
        (["x", "--model=resnet7"], "run.sh: error: argument --model: unknown model 'resnet7'; choose one of: resnet18"),
        (["x", "--input_size=100,64"], "run.sh: error: invalid --input_size: input size 100 is not a positive multiple"),
    ],
)
def test_launcher_rejects_bad_input(args, expected, tmp_path):
    result = run_script(str(REPO / "run.sh"), *args, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert expected in result.stderr
    assert list(tmp_path.iterdir()) == []


def fake_nvidia_smi(folder: Path, cuda_version: str) -> Path:
    """Write an nvidia-smi that prints the header line a driver reporting ``cuda_version`` prints."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        f"echo '| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: {cuda_version}     |'\n"
    )
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize(
    "cuda_version, python_minor, expected",
    [
        (None, 11, "spconv"),
        ("12.0", 11, "spconv-cu120"),
        ("12.2", 12, "spconv-cu121"),
        ("12.4", 11, "spconv-cu124"),
        ("12.6", 13, "spconv-cu126"),
        ("13.0", 12, "spconv-cu126"),
    ],
)
def test_spconv_flavour_by_cuda(cuda_version, python_minor, expected, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if cuda_version:
        fake_nvidia_smi(bin_dir, cuda_version)
    python = bin_dir / "python-under-test"
    python.write_text(f"#!/bin/sh\necho {python_minor}\n")
    python.chmod(0o755)
    env = launcher_env(PATH=f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    env.pop("SPARK_SPCONV", None)

    result = run_script(str(REPO / ".ci" / "spconv-flavour.sh"), str(python), cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{expected}\n"


def test_spconv_flavour_explicit_and_unsupported(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path / "bin", "12.0")
    path = f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"

    explicit = run_script(
        str(REPO / ".ci" / "spconv-flavour.sh"), sys.executable, cwd=tmp_path, env=launcher_env(PATH=path, SPARK_SPCONV="spconv-cu126")
    )
    old_cuda = fake_nvidia_smi(tmp_path / "old", "11.8")
    unsupported = run_script(
        str(REPO / ".ci" / "spconv-flavour.sh"), sys.executable, cwd=tmp_path, env=launcher_env(PATH=f"{old_cuda}{os.pathsep}/usr/bin")
    )

    assert explicit.stdout == "spconv-cu126\n"
    assert unsupported.returncode == 1
    assert unsupported.stdout == ""
    assert "no spconv flavour is chosen for CUDA 11.8; set SPARK_SPCONV" in unsupported.stderr


def test_ci_run_fails_without_tests(tmp_path):
    shutil.copytree(REPO / ".ci", tmp_path / ".ci")
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    (tmp_path / "tests").mkdir()

    result = run_script(str(tmp_path / ".ci" / "run"), cwd=tmp_path)

    assert result.returncode == 1
    assert "pytest collected no tests" in result.stderr
