"""main.py resumes a checkpoint across backends: masked to spconv and spconv back to masked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from spark_sparse.trainer.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model=resnet18", "--input_size=64", "--decoder_width=64", "--dataloader_workers=0", "--bs=2", "--wp_ep=1"]


def run_main(out_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run main.py on one intra-op thread, which is enough to check checkpoints and keeps the run short."""
    command = [sys.executable, str(REPO / "main.py"), "--exp_name=cross", f"--exp_dir={out_dir}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=out_dir.parent, env=env, capture_output=True, text=True, timeout=600)


def test_resume_across_backends(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    checkpoint = out_dir / "resnet18_still_pretraining.pth"

    first = run_main(out_dir, "--ep=1", "--sparse_conv=0")
    assert first.returncode == 0, first.stderr
    masked_state = load_checkpoint(str(checkpoint))

    second = run_main(out_dir, "--ep=2", "--sparse_conv=1", f"--resume_from={checkpoint}")
    assert second.returncode == 0, second.stderr
    spconv_state = load_checkpoint(str(checkpoint))

    third = run_main(out_dir, "--ep=3", "--sparse_conv=0", f"--resume_from={checkpoint}")
    assert third.returncode == 0, third.stderr
    final_state = load_checkpoint(str(checkpoint))

    assert [state["epoch"] for state in (masked_state, spconv_state, final_state)] == [1, 2, 3]
    assert list(spconv_state["model"]) == list(masked_state["model"])
    for before, after in ((masked_state, spconv_state), (spconv_state, final_state)):
        weight = "encoder.layer1.0.conv1.weight"
        assert after["model"][weight].shape == before["model"][weight].shape
        assert not torch.equal(after["model"][weight], before["model"][weight])
        assert int(after["optimizer"]["param_groups"][0]["step"]) > int(before["optimizer"]["param_groups"][0]["step"])
    lines = [json.loads(line) for line in (out_dir / "pretrain_log.txt").read_text().splitlines()]
    epochs = [line for line in lines if "epoch" in line]
    assert [line["epoch"] for line in epochs] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in epochs)
    assert "on the spconv backend" in second.stdout + second.stderr
    assert "on the masked backend" in third.stdout + third.stderr
