"""The trainer's entry point: arguments, processes, data, model, optimizer, then the epochs."""
from __future__ import annotations

import argparse
import contextlib
import random
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import build_spark
from ..spark import SparK
from .args import format_args, parse_args
from .checkpoint import CheckpointError, initialize_weights, resume, save_epoch, still_pretraining_path
from .data import BUNDLED_PHOTOS_DIR, build_loader, find_images, write_bundled_photos
from .distributed import World, barrier, init_world, world_size_from_env
from .engine import EpochStats, NonFiniteLossError, train_one_epoch
from .log import PretrainLog, logger, rank_logging
from .metrics import TrainingMonitor
from .optim import build_optimizer
from .schedule import Schedule, build_schedule

PROG = "main.py"
REPO_DIR = Path(__file__).resolve().parents[2]
# How many unreadable image paths each rank names in the log; the rest are only counted.
LOGGED_SKIPPED_PATHS = 5


class StopRequest:
    """The signal that asked this process to stop (SIGTERM or SIGINT), set by a signal handler.

    Training checks it at the next iteration boundary, writes a checkpoint and stops.
    """

    def __init__(self) -> None:
        self.signal_number = 0

    def handle(self, signal_number: int, frame: Any) -> None:
        self.signal_number = signal_number

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Route SIGTERM and SIGINT to :meth:`handle` for the block (only the main thread may do this)."""
        previous = {number: signal.signal(number, self.handle) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint."""

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(message)
        self.signal_number = signal_number


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run pre-training as one process of the world torchrun set up (or alone); return the exit status.

    0: finished. 1: stopped on a non-finite loss. 2: invalid arguments, data or
    checkpoint, reported in one line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv, world_size_from_env(), prog=PROG)
    except SystemExit as exit_request:
        return int(exit_request.code or 0)

    stop_request = StopRequest()
    with stop_request.installed(), init_world() as world:
        torch.manual_seed(args.seed + world.rank)
        out_dir = Path(args.exp_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return report_error(world, f"cannot create output directory {str(out_dir)!r} ({error.strerror}); set --exp_dir to a writable folder", status=2)
        with rank_logging(world.is_main, world.rank, out_dir) as console:
            try:
                train(args, shlex.join([PROG, *argv]), world, out_dir, console, stop_request)
            except NonFiniteLossError as error:
                return report_error(world, str(error), status=1)
            except (CheckpointError, ValueError) as error:
                return report_error(world, str(error), status=2)
            except StoppedBySignal as stop:
                if world.is_main:
                    sys.stderr.write(f"{PROG}: {stop}\n")
                    sys.stderr.flush()
                return 128 + stop.signal_number
    return 0


def report_error(world: World, message: str, status: int) -> int:
    """Write ``message`` as one line on rank 0's stderr (every rank meets the same error); return ``status``."""
    if world.is_main:
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.stderr.flush()
    return status


def image_paths(args: argparse.Namespace, world: World, out_dir: Path) -> List[Path]:
    """Find the training images; without ``--data_path``, rank 0 first writes the bundled photographs."""
    if args.data_path:
        return find_images(args.data_path)
    if world.is_main:
        write_bundled_photos(out_dir)
    barrier(world)
    return find_images(str(out_dir / BUNDLED_PHOTOS_DIR))


def build_model(args: argparse.Namespace, world: World) -> SparK:
    """Build the SparK model on this process's device, optionally initialised from ``--init_weight``."""
    spark = build_spark(
        args.model,
        args.input_size,
        args.mask,
        args.backend,
        drop_path_rate=args.dp,
        sync_bn=args.sbn and world.distributed,
        decoder_width=args.decoder_width,
        densify_norm=args.densify_norm,
        output_stride=args.output_stride,
    )
    if args.init_weight:
        loaded = initialize_weights(args.init_weight, spark)
        logger.info("initialised the %s from %s", loaded, args.init_weight)
    return spark.to(world.device)


def gather_rng_states(world: World) -> List[Dict[str, Any]]:
    """Return every rank's torch, numpy and Python generator states, in rank order."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if not world.distributed:
        return [state]
    states: List[Optional[Dict[str, Any]]] = [None] * world.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(checkpoint: dict, world: World) -> None:
    """Continue this rank's generators where the checkpointed run left them, when the world size matches."""
    states = checkpoint.get("rng_states")
    if not states or len(states) != world.world_size:
        logger.warning("the checkpoint has no generator state for %d processes; drop path restarts from --seed", world.world_size)
        return

    state = states[world.rank]
    if isinstance(state, torch.Tensor):
        # Checkpoints of earlier versions stored the torch state alone.
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def find_resume_path(args: argparse.Namespace, out_dir: Path) -> str:
    """Return ``--resume_from``, else the output directory's still-pretraining checkpoint, else ''."""
    if args.resume_from:
        return args.resume_from
    existing = still_pretraining_path(out_dir, args.model)
    if existing.is_file():
        logger.info("found %s; continuing that run (pass --resume_from to choose another checkpoint)", existing)
        return str(existing)
    return ""


def train(
    args: argparse.Namespace,
    command: str,
    world: World,
    out_dir: Path,
    console: Optional[Console],
    stop_request: Optional[StopRequest] = None,
) -> None:
    """Pre-train for ``args.ep`` epochs, writing checkpoints and logs to ``out_dir`` after each on rank 0."""
    logger.info("arguments:\n%s", "\n".join(format_args(args)))
    logger.info("process %d of %d on %s", world.rank, world.world_size, world.device)

    paths = image_paths(args, world, out_dir)
    loader = build_loader(
        paths,
        args.input_size,
        args.bs,
        world.rank,
        world.world_size,
        args.dataloader_workers,
        args.seed,
        pin_memory=world.device.type == "cuda",
    )
    logger.info(
        "%d images from %s; %d iterations per epoch of %d images (%d per process)",
        len(paths),
        args.data_path or "the bundled photographs",
        len(loader),
        args.bs,
        args.bs // world.world_size,
    )

    spark = build_model(args, world)
    model = spark
    if world.distributed:
        device_ids = [world.local_rank] if world.device.type == "cuda" else None
        model = DistributedDataParallel(spark, device_ids=device_ids, forward_sync_buffers=False)
    optimizer = build_optimizer(args, spark)
    logger.info(
        "%s on the %s backend: %.1f M parameters (encoder %.1f M); %s, peak lr %.3g",
        args.model,
        args.backend,
        sum(p.numel() for p in spark.parameters()) / 1e6,
        sum(p.numel() for p in spark.encoder.parameters()) / 1e6,
        args.opt,
        args.lr,
    )

    start_epoch, start_iteration, loss_sum = 0, 0, 0.0
    resume_path = find_resume_path(args, out_dir)
    if resume_path:
        checkpoint = resume(resume_path, args.model, spark, optimizer)
        start_epoch = int(checkpoint["epoch"])
        start_iteration = int(checkpoint.get("iteration", 0))
        loss_sum = float(checkpoint.get("loss_sum", 0.0))
        if start_iteration >= len(loader):
            logger.warning("the checkpoint's iteration %d is past this run's %d per epoch; starting the next epoch", start_iteration, len(loader))
            start_epoch, start_iteration, loss_sum = start_epoch + 1, 0, 0.0
        restore_rng_state(checkpoint, world)
        logger.info(
            "resumed from %s at epoch %d iteration %d (last epoch's loss %.4f)",
            resume_path,
            start_epoch + 1,
            start_iteration,
            checkpoint.get("loss", float("nan")),
        )
    if start_epoch >= args.ep:
        logger.info("the checkpoint already completed %d of %d epochs; nothing to do", start_epoch, args.ep)
        return

    pretrain_log = PretrainLog(out_dir)
    if world.is_main:
        pretrain_log.start(args.exp_name, command, args.model, REPO_DIR, append=bool(resume_path))
    schedule = build_schedule(args, len(loader))
    run_epochs(
        args,
        world,
        out_dir,
        console,
        model,
        spark,
        loader,
        optimizer,
        schedule,
        pretrain_log,
        start_epoch,
        start_iteration,
        loss_sum,
        stop_request or StopRequest(),
    )


def run_epochs(
    args: argparse.Namespace,
    world: World,
    out_dir: Path,
    console: Optional[Console],
    model: torch.nn.Module,
    spark: SparK,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    pretrain_log: PretrainLog,
    start_epoch: int,
    start_iteration: int,
    loss_sum: float,
    stop_request: StopRequest,
) -> None:
    """Train epochs ``start_epoch .. args.ep - 1``; after each, rank 0 writes checkpoints and a log line.

    Rank 0 also writes the still-pretraining checkpoint every ``--save_every_iters``
    iterations and, on SIGTERM or SIGINT, at the next iteration boundary before
    raising :class:`StoppedBySignal`.
    """
    started = time.perf_counter()
    monitor = TrainingMonitor(args, out_dir, spark, loader, world.is_main)
    iterations = len(loader)
    logged_paths = 0
    last_loss = float("nan")

    def save(epochs_done: int, iteration: int, loss_sum_so_far: float, epoch_loss: float) -> None:
        rng_states = gather_rng_states(world)
        if world.is_main:
            save_epoch(
                out_dir,
                args,
                spark,
                optimizer,
                epochs_done,
                epoch_loss,
                rng_states,
                iteration=iteration,
                loss_sum=loss_sum_so_far,
                global_iteration=epochs_done * iterations + iteration,
            )
        barrier(world)

    def stop_signal() -> int:
        # Every rank must stop at the same iteration, so the ranks agree on the largest signal number.
        flag = torch.tensor([stop_request.signal_number], dtype=torch.int64, device=world.device)
        if world.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    for epoch in range(start_epoch, args.ep):
        loader.batch_sampler.set_epoch(epoch, start_iteration)

        def after_step(iterations_done: int, loss_sum_so_far: float, epoch: int = epoch) -> bool:
            if iterations_done == iterations:
                return False
            if stop_signal():
                save(epoch, iterations_done, loss_sum_so_far, last_loss)
                return True
            if args.save_every_iters and iterations_done % args.save_every_iters == 0:
                save(epoch, iterations_done, loss_sum_so_far, last_loss)
            return False

        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            schedule,
            epoch,
            args.ep,
            args.clip,
            world,
            console,
            seed=args.seed,
            start_iteration=start_iteration,
            loss_sum=loss_sum,
            after_step=after_step,
            on_iteration=monitor.iteration,
        )
        logged_paths = report_skipped(stats, world, epoch, logged_paths)
        if stats.stopped:
            signal_number = stop_request.signal_number or stop_signal()
            raise StoppedBySignal(signal_number, stopped_message(signal_number, epoch, stats.iterations_done, out_dir, args))

        epochs_done = epoch + 1
        last_loss = stats.mean_loss
        seconds_per_epoch = (time.perf_counter() - started) / (epochs_done - start_epoch)
        remaining_s = (args.ep - epochs_done) * seconds_per_epoch
        save(epochs_done, 0, 0.0, stats.mean_loss)
        if world.is_main:
            pretrain_log.epoch(epochs_done, args.ep, stats.mean_loss, remaining_s)
            monitor.epoch(epochs_done, stats.mean_loss, stats.seconds, stats.images_per_second)
        logger.info(
            "epoch %d/%d: mean loss %.4f, last %.4f, %.1f img/s, %.1f s; %.0f s left",
            epochs_done,
            args.ep,
            stats.mean_loss,
            stats.last_loss,
            stats.images_per_second,
            stats.seconds,
            remaining_s,
        )
        start_iteration, loss_sum = 0, 0.0
        signal_number = stop_signal()
        if signal_number and epochs_done < args.ep:
            raise StoppedBySignal(signal_number, stopped_message(signal_number, epochs_done, 0, out_dir, args))
    logger.info("pre-training finished; encoder weights in %s", out_dir.resolve())


def report_skipped(stats: EpochStats, world: World, epoch: int, logged_paths: int) -> int:
    """Log this epoch's count of unreadable images over all ranks, and the first few paths; return paths logged."""
    for path in stats.skipped[: max(0, LOGGED_SKIPPED_PATHS - logged_paths)]:
        logger.warning("skipped unreadable image %s; a readable one replaced it", path)
    count = torch.tensor([len(stats.skipped)], dtype=torch.int64, device=world.device)
    if world.distributed:
        dist.all_reduce(count)
    if count.item():
        logger.warning("epoch %d: skipped %d unreadable image files", epoch + 1, int(count.item()))
    return logged_paths + len(stats.skipped)


def stopped_message(signal_number: int, epoch: int, iteration: int, out_dir: Path, args: argparse.Namespace) -> str:
    """Describe where a run stopped on a signal (0-based ``epoch``, iterations done in it) and how to continue it."""
    return (
        f"stopped by {signal.Signals(signal_number).name} at epoch {epoch + 1} iteration {iteration}; "
        f"checkpoint written to {still_pretraining_path(out_dir, args.model)}; rerun the same command to continue"
    )
