"""Export pre-trained encoder weights as a plain timm state dict, in ``.pth`` and ``.safetensors`` form.

Run as ``python -m spark_sparse.export output_exp/resnet50_1kpretrained.pth --out weights/``.
The files load with ``timm.create_model(model, pretrained=True,
pretrained_cfg_overlay=dict(file=path))``; the classifier is absent, so a model
with ``num_classes=0`` loads every key, and one with a new head initialises only the head.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file

from .models import model_family
from .trainer.args import ArgumentParser
from .trainer.checkpoint import CheckpointError, load_checkpoint

PROG = "python -m spark_sparse.export"
ENCODER_PREFIX = "encoder."


def encoder_weights(path: str) -> Tuple[str, Dict[str, torch.Tensor]]:
    """Return the model name and encoder state dict of a trainer checkpoint.

    Takes ``<model>_1kpretrained.pth`` (``arch`` and ``module``) or
    ``<model>_still_pretraining.pth`` (the ``encoder.`` entries of ``model``, and
    ``args``). Raises :class:`CheckpointError` for any other file.
    """
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path!r} is not a checkpoint of this trainer; give a <model>_1kpretrained.pth file")
    if "module" in checkpoint and "arch" in checkpoint:
        return checkpoint["arch"], dict(checkpoint["module"])
    if "model" in checkpoint and "model" in checkpoint.get("args", {}):
        state = {
            key[len(ENCODER_PREFIX) :]: value
            for key, value in checkpoint["model"].items()
            if key.startswith(ENCODER_PREFIX)
        }
        return checkpoint["args"]["model"], state
    raise CheckpointError(
        f"{path!r} contains no encoder weights; give the <model>_1kpretrained.pth or "
        f"<model>_still_pretraining.pth file of a run"
    )


def export_weights(path: str, out_dir: Path) -> Tuple[Path, Path]:
    """Write ``<model>.pth`` and ``<model>.safetensors`` with the encoder weights of ``path``; return both paths."""
    model, state = encoder_weights(path)
    model_family(model)

    # safetensors rejects non-contiguous and shared-memory tensors, so each gets its own contiguous copy.
    state = {key: value.detach().contiguous().clone() for key, value in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    pth_path = out_dir / f"{model}.pth"
    safetensors_path = out_dir / f"{model}.safetensors"
    torch.save(state, pth_path)
    save_file(state, str(safetensors_path), metadata={"format": "pt", "arch": model})
    return pth_path, safetensors_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return 0, or 2 after a one-line error."""
    parser = ArgumentParser(
        prog=PROG,
        description="Export encoder weights as a timm state dict (.pth and .safetensors) for fine-tuning.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="<model>_1kpretrained.pth or <model>_still_pretraining.pth of a run")
    parser.add_argument("--out", default="exported", help="output folder")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:
        return int(exit_request.code or 0)

    if not Path(args.checkpoint).is_file():
        sys.stderr.write(f"{PROG}: error: checkpoint {args.checkpoint!r} not found; give a <model>_1kpretrained.pth file\n")
        return 2
    try:
        written = export_weights(args.checkpoint, Path(args.out))
    except (CheckpointError, ValueError, OSError) as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 2

    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
