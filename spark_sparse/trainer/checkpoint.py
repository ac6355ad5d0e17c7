"""The output directory's checkpoints: written atomically, read back for resuming or initialisation."""
from __future__ import annotations

import argparse
import os
import pickle
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..spark import SparK


class CheckpointError(ValueError):
    """A checkpoint file that does not fit the model or is not one this trainer wrote."""


# Seconds to sleep between writing a checkpoint's temporary file and renaming it. Only tests set
# it, so that they can kill a run in the middle of a write.
WRITE_DELAY_ENV = "SPARK_SPARSE_TEST_CHECKPOINT_DELAY_S"


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
        delay_s = float(os.environ.get(WRITE_DELAY_ENV, "0"))
        if delay_s > 0:
            time.sleep(delay_s)
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
    rng_states: Optional[List[Dict[str, Any]]] = None,
    iteration: int = 0,
    loss_sum: float = 0.0,
    global_iteration: Optional[int] = None,
) -> None:
    """Write both checkpoints, after an epoch or in the middle of one.

    ``<model>_still_pretraining.pth`` contains ``model`` (SparK state), ``optimizer``,
    ``epoch`` (the number of completed epochs), ``iteration`` (iterations completed
    in epoch ``epoch``, 0 at an epoch's end), ``loss_sum`` (their summed loss),
    ``global_iteration`` (the schedule's clock), ``loss`` (the last epoch's mean),
    ``args`` and ``rng_states`` (each rank's torch, numpy and Python generator
    states, for drop path). A resumed run starts at iteration ``iteration`` of
    epoch ``epoch``.
    ``<model>_1kpretrained.pth`` contains ``arch``, ``module`` (the encoder's
    ``state_dict()``, loadable with ``strict=True`` into
    ``timm.create_model(arch, num_classes=0)``) and ``is_pretrain``.
    """
    state = {
        "model": spark.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,
        "iteration": iteration,
        "loss_sum": loss_sum,
        "global_iteration": global_iteration,
        "loss": loss,
        "args": vars(args).copy(),
        "rng_states": rng_states,
    }
    save_atomically(state, still_pretraining_path(out_dir, args.model))
    weights = {"arch": args.model, "module": spark.encoder.state_dict(), "is_pretrain": True}
    save_atomically(weights, pretrained_path(out_dir, args.model))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read a checkpoint on the CPU; raise :class:`CheckpointError` when it cannot be read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} not found; give the path of a .pth file this trainer wrote")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        reason = " ".join(str(error).split())[:200]
        raise CheckpointError(
            f"cannot read checkpoint {path!r} ({reason}); the file is truncated or not a checkpoint, "
            f"so give a .pth file this trainer wrote"
        ) from None


def check_still_pretraining(checkpoint: Any, path: str, model_name: str) -> None:
    """Raise :class:`CheckpointError` unless ``checkpoint`` is a still-pretraining checkpoint of ``model_name``."""
    if isinstance(checkpoint, dict) and "module" in checkpoint and "model" not in checkpoint:
        raise CheckpointError(
            f"{path!r} contains encoder weights only (a <model>_1kpretrained.pth file), so it cannot resume a run; "
            f"pass it as --init_weight={path} to start from those weights"
        )
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in ("model", "optimizer", "epoch")):
        kind = "a bare state dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise CheckpointError(
            f"{path!r} is {kind}, not a still-pretraining checkpoint (model, optimizer and epoch); "
            f"give the <model>_still_pretraining.pth file of a run, or pass weights as --init_weight"
        )
    saved_model = checkpoint.get("args", {}).get("model", model_name)
    if saved_model != model_name:
        raise CheckpointError(f"{path!r} contains a {saved_model} model, not {model_name}; pass --model={saved_model}")


def resume(path: str, model_name: str, spark: SparK, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """Restore model and optimizer state from ``path``; return the checkpoint (``epoch`` is where to start)."""
    checkpoint = load_checkpoint(path)
    check_still_pretraining(checkpoint, path, model_name)

    load_weights(spark, checkpoint["model"], path)
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"optimizer state in {path!r} does not fit this run ({error}); use the same --opt") from None
    return checkpoint


def initialize_weights(path: str, spark: SparK) -> str:
    """Load only model weights from ``path``: a full SparK state, or encoder weights (``module``); return which."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path!r} contains a {type(checkpoint).__name__}, not weights; give a checkpoint of this trainer")
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
