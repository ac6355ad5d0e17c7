"""Training metrics on rank 0: ``metrics.jsonl``, TensorBoard events and a loss-curve PNG."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

logger = logging.getLogger("spark_sparse")

# Called on every rank after each optimizer step with the global iteration (0-based) and its values.
IterationHook = Callable[[int, Dict[str, float]], None]

METRICS_FILE = "metrics.jsonl"
RECONSTRUCTIONS_DIR = "reconstructions"
# Rows of the reconstruction grid written during training.
VIS_IMAGES = 4
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard_log"


class MetricsWriter:
    """Append one JSON line per iteration and per epoch, mirror them to TensorBoard, and plot the loss.

    Each line of ``metrics.jsonl`` is an object with ``kind`` (``"iteration"`` or
    ``"epoch"``), ``epoch`` (1-based), ``step`` (global iteration, 0-based, for
    iterations) and the measured values. Epoch lines need ``mean_loss`` and
    ``iterations`` (per epoch) for the loss curve. TensorBoard events go to
    ``tensorboard_log/`` when the ``tensorboard`` package is installed.
    """

    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / METRICS_FILE
        self.curve_path = out_dir / LOSS_CURVE_FILE
        self.path.touch()
        self.tensorboard = open_tensorboard(out_dir / TENSORBOARD_DIR)

    def iteration(self, epoch: int, step: int, values: Dict[str, float]) -> None:
        """Record one iteration's ``values`` (loss, lr, wd, grad_norm, images_per_second)."""
        self._write({"kind": "iteration", "epoch": epoch, "step": step, **values})
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"iteration/{name}", value, step)

    def epoch(self, epoch: int, values: Dict[str, float]) -> None:
        """Record one epoch's ``values``, flush TensorBoard and redraw the loss curve."""
        self._write({"kind": "epoch", "epoch": epoch, **values})
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"epoch/{name}", value, epoch)
            self.tensorboard.flush()
        plot_loss_curve(read_metrics(self.path), self.curve_path)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def open_tensorboard(log_dir: Path) -> Optional[Any]:
    """Return a ``SummaryWriter`` on ``log_dir``, or None (with one log line) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(path: Path) -> List[Dict[str, Any]]:
    """Return the records of a ``metrics.jsonl`` file in order."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def plot_loss_curve(records: List[Dict[str, Any]], path: Path) -> None:
    """Plot the loss of each iteration and each epoch's mean loss (at its last iteration) to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iterations = [record for record in records if record["kind"] == "iteration"]
    epochs = [record for record in records if record["kind"] == "epoch"]

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    if iterations:
        steps = [record["step"] + 1 for record in iterations]
        axes.plot(steps, [record["loss"] for record in iterations], color="tab:blue", alpha=0.4, label="iteration")
    if epochs:
        ends = [record["epoch"] * record["iterations"] for record in epochs]
        means = [record["mean_loss"] for record in epochs]
        axes.plot(ends, means, "o-", color="tab:red", label="epoch mean")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss (MSE on hidden patches)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def measure_grad_norm(params: Sequence[nn.Parameter], clip: float) -> float:
    """Return the global L2 norm of the gradients before clipping, clipping them to ``clip`` when it is positive."""
    if clip > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, clip))
    grads = [param.grad for param in params if param.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


class TrainingMonitor:
    """Rank 0's view of a run: metrics, the loss curve, and a reconstruction grid every ``--vis_every`` epochs.

    The grid shows a fixed set of training images (chosen with ``--seed``,
    centre-cropped, no augmentation) under a fixed mask, so grids of different
    epochs compare directly. Drawing them uses its own generators and eval mode,
    so training draws the same random numbers with or without them. On other
    ranks every method does nothing.
    """

    def __init__(self, args: argparse.Namespace, out_dir: Path, spark: nn.Module, loader: DataLoader, is_main: bool) -> None:
        self.enabled = is_main
        self.out_dir = out_dir
        self.spark = spark
        self.vis_every = args.vis_every
        self.seed = args.seed
        self.epochs = args.ep
        self.iterations = len(loader)
        self.writer = MetricsWriter(out_dir) if is_main else None
        self.vis_images: Optional[torch.Tensor] = None
        if is_main and self.vis_every:
            self.vis_images = fixed_images(loader.dataset.paths, tuple(args.input_size), args.seed)

    def iteration(self, step: int, values: Dict[str, float]) -> None:
        """Record one iteration; usable as the ``on_iteration`` hook of ``train_one_epoch``."""
        if self.writer is not None:
            self.writer.iteration(step // self.iterations + 1, step, values)

    def epoch(self, epochs_done: int, mean_loss: float, seconds: float, images_per_second: float) -> None:
        """Record a finished epoch, redraw the loss curve and, when due, write a reconstruction grid."""
        if self.writer is None:
            return
        self.writer.epoch(
            epochs_done,
            {
                "mean_loss": mean_loss,
                "seconds": seconds,
                "images_per_second": images_per_second,
                "iterations": self.iterations,
            },
        )

        due = self.vis_every and (epochs_done % self.vis_every == 0 or epochs_done == self.epochs)
        if due and self.vis_images is not None:
            from ..visualize import draw_grid

            path = self.out_dir / RECONSTRUCTIONS_DIR / f"epoch_{epochs_done:04d}.png"
            draw_grid(self.spark, self.vis_images, path, self.seed)
            logger.info("reconstructions of epoch %d written to %s", epochs_done, path)


def fixed_images(paths: Sequence[Path], input_size: tuple, seed: int) -> Optional[torch.Tensor]:
    """Load ``VIS_IMAGES`` readable images of ``paths`` chosen with ``seed``; None (with a warning) when none loads."""
    from ..visualize import load_images

    images = []
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))
    for path in (paths[i] for i in order.tolist()):
        try:
            images.append(load_images([path], input_size))
        except (OSError, SyntaxError, ValueError) as error:
            logger.warning("skipped %s for the reconstruction grid: %s", path, error)
            continue
        if len(images) == VIS_IMAGES:
            break
    if not images:
        logger.warning("no readable image for the reconstruction grid; no grid will be written")
        return None
    return torch.cat(images)
