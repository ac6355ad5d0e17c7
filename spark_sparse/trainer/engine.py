"""One pre-training epoch: schedule, forward, backward, finite-loss check, clipping, step, progress."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from .distributed import World, all_reduce_mean
from .schedule import Schedule


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; no optimizer step was taken with it."""

    def __init__(self, epoch: int, iteration: int, lr: float, loss: float) -> None:
        super().__init__(
            f"loss is {loss} at epoch {epoch} iteration {iteration} (learning rate {lr:.3g}); training stopped "
            f"and the last checkpoint is left as it was; resume from it with a lower --base_lr or --clip"
        )
        self.epoch = epoch
        self.iteration = iteration
        self.lr = lr
        self.loss = loss


@dataclass
class EpochStats:
    """Measurements of one epoch: mean and last loss over all ranks, duration in seconds, throughput."""

    mean_loss: float
    last_loss: float
    seconds: float
    images_per_second: float


@contextlib.contextmanager
def epoch_progress(console: Optional[Console], epoch: int, epochs: int, iterations: int) -> Iterator:
    """Yield an ``update(**fields)`` callable driving a rich progress bar on rank 0 (a no-op elsewhere)."""
    if console is None:
        yield lambda **fields: None
        return

    progress = Progress(
        TextColumn(f"epoch {epoch}/{epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[speed]:.1f} img/s"),
        TimeRemainingColumn(),
        console=console,
        redirect_stdout=False,
        redirect_stderr=False,
    )
    with progress:
        task = progress.add_task("train", total=iterations, loss=float("nan"), lr=0.0, speed=0.0)
        yield lambda **fields: progress.update(task, advance=1, **fields)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    epoch: int,
    epochs: int,
    clip: float,
    world: World,
    console: Optional[Console] = None,
) -> EpochStats:
    """Train ``model`` (the SparK module, DDP-wrapped when distributed) for epoch ``epoch`` (0-based).

    Each iteration sets lr and weight decay from ``schedule``, computes the loss on
    a freshly drawn mask, averages it over ranks, and raises
    :class:`NonFiniteLossError` before the optimizer step when it is not finite,
    so every rank stops together and the weights keep their last finite values.
    """
    model.train()
    iterations = len(loader)
    params = [param for param in model.parameters() if param.requires_grad]
    global_batch = loader.batch_sampler.global_batch
    loss_sum, last_loss = 0.0, float("nan")
    start = time.perf_counter()

    with epoch_progress(console, epoch + 1, epochs, iterations) as advance:
        for iteration, images in enumerate(loader):
            lr, _ = schedule.apply(optimizer, epoch * iterations + iteration)
            images = images.to(world.device, non_blocking=True)

            loss = model(images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

            last_loss = all_reduce_mean(loss.detach(), world).item()
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(epoch + 1, iteration + 1, lr, last_loss)
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()

            loss_sum += last_loss
            elapsed = time.perf_counter() - start
            advance(loss=last_loss, lr=lr, speed=global_batch * (iteration + 1) / elapsed)

    seconds = time.perf_counter() - start
    return EpochStats(
        mean_loss=loss_sum / iterations,
        last_loss=last_loss,
        seconds=seconds,
        images_per_second=global_batch * iterations / seconds,
    )
