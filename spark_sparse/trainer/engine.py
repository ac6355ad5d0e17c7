"""One pre-training epoch: schedule, forward, backward, finite-loss check, clipping, step, progress."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader

from .distributed import World, all_reduce_mean
from .metrics import IterationHook, measure_grad_norm
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
    """Measurements of one epoch: mean and last loss over all ranks, duration in seconds, throughput.

    ``iterations_done`` is below ``iterations`` when ``after_step`` stopped the epoch
    early. ``loss_sum`` sums the per-iteration losses of the whole epoch so far.
    ``skipped`` lists the unreadable image files this rank met in the epoch.
    """

    mean_loss: float
    last_loss: float
    seconds: float
    images_per_second: float
    iterations: int
    iterations_done: int
    loss_sum: float
    skipped: List[str]

    @property
    def stopped(self) -> bool:
        """True when the epoch ended before its last iteration."""
        return self.iterations_done < self.iterations


# Called after each optimizer step with (iterations done in the epoch, loss sum so far);
# returns True to end the epoch there.
AfterStep = Callable[[int, float], bool]


def mask_seed(seed: int, epoch: int, iteration: int) -> int:
    """Return the seed of the masks of one iteration's global batch."""
    return int(np.random.SeedSequence([seed, epoch, iteration, 1]).generate_state(1)[0])


def draw_local_mask(spark: nn.Module, seed: int, epoch: int, iteration: int, global_batch: int, world: World) -> torch.Tensor:
    """Draw the masks of the whole global batch and return this rank's rows of them.

    So rank ``r`` of ``W`` uses the masks one process would use for the same rows,
    whatever the world size, and a resumed run draws the masks it would have drawn.
    """
    generator = torch.Generator().manual_seed(mask_seed(seed, epoch, iteration))
    active = spark.mask(global_batch, generator=generator)
    local_batch = global_batch // world.world_size
    start = world.rank * local_batch
    return active[start : start + local_batch].to(world.device)


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
    seed: int = 0,
    start_iteration: int = 0,
    loss_sum: float = 0.0,
    after_step: Optional[AfterStep] = None,
    on_iteration: Optional[IterationHook] = None,
) -> EpochStats:
    """Train ``model`` (the SparK module, DDP-wrapped when distributed) for epoch ``epoch`` (0-based).

    Each iteration sets lr and weight decay from ``schedule``, computes the loss on
    a freshly drawn mask, averages it over ranks, and raises
    :class:`NonFiniteLossError` before the optimizer step when it is not finite,
    so every rank stops together and the weights keep their last finite values.
    ``on_iteration`` receives each step's loss, lr, wd, gradient norm and images per second.
    Masks come from :func:`draw_local_mask` with ``seed``. A resumed epoch starts at
    ``start_iteration`` with the ``loss_sum`` of the iterations before it; the
    loader's sampler must skip the same batches.
    """
    model.train()
    spark = getattr(model, "module", model)
    iterations = len(loader)
    params = [param for param in model.parameters() if param.requires_grad]
    global_batch = loader.batch_sampler.global_batch
    last_loss = float("nan")
    skipped: List[str] = []
    iterations_done = iterations
    start = time.perf_counter()
    iteration_end = start

    with epoch_progress(console, epoch + 1, epochs, iterations) as advance:
        for iteration, (images, skipped_here) in enumerate(loader, start=start_iteration):
            lr, wd = schedule.apply(optimizer, epoch * iterations + iteration)
            images = images.to(world.device, non_blocking=True)
            skipped.extend(skipped_here)

            active = draw_local_mask(spark, seed, epoch, iteration, global_batch, world)
            loss = model(images, active)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()

            last_loss = all_reduce_mean(loss.detach(), world).item()
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(epoch + 1, iteration + 1, lr, last_loss)
            grad_norm = measure_grad_norm(params, clip)
            optimizer.step()

            loss_sum += last_loss
            elapsed = time.perf_counter() - start
            advance(loss=last_loss, lr=lr, speed=global_batch * (iteration + 1 - start_iteration) / elapsed)
            if on_iteration is not None:
                now = time.perf_counter()
                values = {"loss": last_loss, "lr": lr, "wd": wd, "grad_norm": grad_norm}
                on_iteration(epoch * iterations + iteration, {**values, "images_per_second": global_batch / (now - iteration_end)})
                iteration_end = now
            if after_step is not None and after_step(iteration + 1, loss_sum):
                iterations_done = iteration + 1
                break

    seconds = time.perf_counter() - start
    return EpochStats(
        mean_loss=loss_sum / max(1, iterations_done),
        last_loss=last_loss,
        seconds=seconds,
        images_per_second=global_batch * (iterations_done - start_iteration) / max(seconds, 1e-9),
        iterations=iterations,
        iterations_done=iterations_done,
        loss_sum=loss_sum,
        skipped=skipped,
    )
