"""The output directory's checkpoints: written atomically, read back for resuming or initialisation."""
from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..spark import SparK


class CheckpointError(ValueError):
    """A checkpoint file that does not fit the model or is not one this trainer wrote."""


def still_pretraining_path(out_dir: Path, model: str) -> Path:
    """Path of the full checkpoint that ``--resume_from`` takes."""
    return out_dir / f"{model}_still_pretraining.pth"


def pretrained_path(out_dir: Path, model: str) -> Path:
    """Path of the encoder weights for downstream fine-tuning, in SparK's layout."""
    return out_dir / f"{model}_1kpretrained.pth"


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flush and fsync it, then rename it over ``path``.

    So ``path`` contains either the old file or the new one, never a partial one, even after a crash.
    """
    # open(..., "xb") rather than tempfile.mkstemp, so the file gets the umask's permissions, not 0600.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temporary, "xb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise

    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_epoch(
    out_dir: Path,
    args: argparse.Namespace,
    spark: SparK,
    optimizer: torch.optim.Optimizer,
    epochs_done: int,
    loss: float,
    rng_states: Optional[List[torch.Tensor]] = None,
) -> None:
    """Write both checkpoints after an epoch.

    ``<model>_still_pretraining.pth`` contains ``model`` (SparK state), ``optimizer``,
    ``epoch`` (the number of completed epochs, where a resumed run starts),
    ``loss`` (the epoch's mean), ``args`` and ``rng_states`` (each rank's CPU
    generator state, so a resumed run draws the masks an uninterrupted run would).
    ``<model>_1kpretrained.pth`` contains ``arch``, ``module`` (the encoder's
    ``state_dict()``, loadable with ``strict=True`` into
    ``timm.create_model(arch, num_classes=0)``) and ``is_pretrain``.
    """
    state = {
        "model": spark.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,
        "loss": loss,
        "args": vars(args).copy(),
        "rng_states": rng_states,
    }
    save_atomically(state, still_pretraining_path(out_dir, args.model))
    weights = {"arch": args.model, "module": spark.encoder.state_dict(), "is_pretrain": True}
    save_atomically(weights, pretrained_path(out_dir, args.model))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint on the CPU; raise :class:`CheckpointError` when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {path!r} ({error}); give a .pth file this trainer wrote") from None


def resume(path: str, model_name: str, spark: SparK, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore model and optimizer state from ``path``; return the checkpoint (``epoch`` is where to start)."""
    checkpoint = load_checkpoint(path)
    if not all(key in checkpoint for key in ("model", "optimizer", "epoch")):
        raise CheckpointError(
            f"{path!r} is not a still-pretraining checkpoint (no model, optimizer and epoch); "
            f"give the <model>_still_pretraining.pth file of a run"
        )
    saved_model = checkpoint.get("args", {}).get("model", model_name)
    if saved_model != model_name:
        raise CheckpointError(f"{path!r} contains a {saved_model} model, not {model_name}; pass --model={saved_model}")

    load_weights(spark, checkpoint["model"], path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"optimizer state in {path!r} does not fit this run ({error}); use the same --opt") from None
    return checkpoint


def initialize_weights(path: str, spark: SparK) -> str:
    """Load only model weights from ``path``: a full SparK state, or encoder weights (``module``); return which."""
    checkpoint = load_checkpoint(path)
    if "model" in checkpoint:
        load_weights(spark, checkpoint["model"], path)
        return "SparK model"
    if "module" in checkpoint:
        load_weights(spark.encoder, checkpoint["module"], path)
        return "encoder"
    raise CheckpointError(f"{path!r} contains neither 'model' nor 'module' weights; give a checkpoint of this trainer")


def load_weights(module: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line :class:`CheckpointError` on a mismatch."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        # The error lists every mismatched key over many lines; keep its start on one line.
        details = " ".join(str(error).split(":", 1)[-1].split())[:300]
        raise CheckpointError(f"weights in {path!r} do not fit this model ({details}); check --model") from None
