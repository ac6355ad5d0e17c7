"""Exported encoder weights: both formats load into timm, strictly and through pretrained_cfg_overlay."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from spark_sparse import build_spark
from spark_sparse.export import encoder_weights, export_weights, main
from spark_sparse.trainer.args import parse_args
from spark_sparse.trainer.checkpoint import save_epoch


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Checkpoints of a resnet18 SparK whose encoder weights differ from any fresh initialisation."""
    out_dir = tmp_path_factory.mktemp("export")
    args = parse_args(["--exp_name=export", f"--exp_dir={out_dir}", "--model=resnet18", "--input_size=64", "--decoder_width=64"])
    torch.manual_seed(1)
    spark = build_spark("resnet18", 64, 0.6, "masked", decoder_width=64)
    with torch.no_grad():
        for param in spark.encoder.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    save_epoch(out_dir, args, spark, torch.optim.SGD(spark.parameters(), lr=0.1), 1, 1.0)
    return out_dir


@pytest.mark.parametrize("name", ["resnet18_1kpretrained.pth", "resnet18_still_pretraining.pth"])
def test_export_loads_strict(run_dir, tmp_path, name):
    expected = torch.load(run_dir / "resnet18_1kpretrained.pth", map_location="cpu")["module"]

    pth_path, safetensors_path = export_weights(str(run_dir / name), tmp_path)

    for state in (torch.load(pth_path, map_location="cpu"), load_file(str(safetensors_path))):
        model = timm.create_model("resnet18", pretrained=False, num_classes=0)
        model.load_state_dict(state, strict=True)
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_pretrained_file(run_dir, tmp_path, suffix):
    export_weights(str(run_dir / "resnet18_1kpretrained.pth"), tmp_path)
    path = str(tmp_path / f"resnet18{suffix}")
    expected = torch.load(run_dir / "resnet18_1kpretrained.pth", map_location="cpu")["module"]

    backbone = timm.create_model("resnet18", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    classifier = timm.create_model("resnet18", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))

    for key, value in expected.items():
        assert torch.equal(backbone.state_dict()[key], value), key
        assert torch.equal(classifier.state_dict()[key], value), key
    assert classifier.fc.weight.shape == (10, 512)


def test_encoder_weights_of_full_checkpoint(run_dir):
    model, state = encoder_weights(str(run_dir / "resnet18_still_pretraining.pth"))

    assert model == "resnet18"
    assert not any(key.startswith(("encoder.", "decoder.")) for key in state)


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["missing.pth"], "checkpoint 'missing.pth' not found"),
        (["{not_checkpoint}"], "cannot read checkpoint"),
        (["{no_weights}"], "contains no encoder weights"),
    ],
)
def test_bad_input_one_line(tmp_path, capsys, arguments, expected):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"epoch": 1}, tmp_path / "other.pth")
    names = {"not_checkpoint": tmp_path / "notes.txt", "no_weights": tmp_path / "other.pth"}

    status = main([*(argument.format(**names) for argument in arguments), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err

    assert status == 2
    assert expected in err
    assert err.count("\n") == 1
