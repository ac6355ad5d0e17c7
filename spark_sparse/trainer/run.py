"""The trainer's entry point: arguments, processes, data, model, optimizer, then the epochs."""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from .. import build_spark
from ..spark import SparK
from .args import format_args, parse_args
from .checkpoint import CheckpointError, initialize_weights, resume, save_epoch
from .data import BUNDLED_PHOTOS_DIR, build_loader, find_images, write_bundled_photos
from .distributed import World, barrier, init_world, world_size_from_env
from .engine import NonFiniteLossError, train_one_epoch
from .log import PretrainLog, logger, rank_logging
from .optim import build_optimizer
from .schedule import Schedule, build_schedule

PROG = "main.py"
REPO_DIR = Path(__file__).resolve().parents[2]


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

    with init_world() as world:
        torch.manual_seed(args.seed + world.rank)
        out_dir = Path(args.exp_dir)
        with rank_logging(world.is_main, world.rank, out_dir) as console:
            try:
                train(args, shlex.join([PROG, *argv]), world, out_dir, console)
            except NonFiniteLossError as error:
                return report_error(world, str(error), status=1)
            except (CheckpointError, ValueError) as error:
                return report_error(world, str(error), status=2)
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
    )
    if args.init_weight:
        loaded = initialize_weights(args.init_weight, spark)
        logger.info("initialised the %s from %s", loaded, args.init_weight)
    return spark.to(world.device)


def gather_rng_states(world: World) -> List[torch.Tensor]:
    """Return every rank's CPU generator state, in rank order (masks and augmentation draw from it)."""
    state = torch.get_rng_state()
    if not world.distributed:
        return [state]
    states: List[Optional[torch.Tensor]] = [None] * world.world_size
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(checkpoint: dict, world: World) -> None:
    """Continue this rank's CPU generator where the checkpointed run left it, when the world size matches."""
    states = checkpoint.get("rng_states")
    if states and len(states) == world.world_size:
        torch.set_rng_state(states[world.rank])
    else:
        logger.warning("the checkpoint has no generator state for %d processes; masks restart from --seed", world.world_size)


def train(args: argparse.Namespace, command: str, world: World, out_dir: Path, console: Optional[Console]) -> None:
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

    start_epoch = 0
    if args.resume_from:
        checkpoint = resume(args.resume_from, args.model, spark, optimizer)
        start_epoch = int(checkpoint["epoch"])
        restore_rng_state(checkpoint, world)
        logger.info("resumed from %s after epoch %d (loss %.4f)", args.resume_from, start_epoch, checkpoint.get("loss", float("nan")))
    if start_epoch >= args.ep:
        logger.info("the checkpoint already completed %d of %d epochs; nothing to do", start_epoch, args.ep)
        return

    pretrain_log = PretrainLog(out_dir)
    if world.is_main:
        pretrain_log.start(args.exp_name, command, args.model, REPO_DIR, append=bool(args.resume_from))
    schedule = build_schedule(args, len(loader))
    run_epochs(args, world, out_dir, console, model, spark, loader, optimizer, schedule, pretrain_log, start_epoch)


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
) -> None:
    """Train epochs ``start_epoch .. args.ep - 1``; after each, rank 0 writes checkpoints and a log line."""
    started = time.perf_counter()
    for epoch in range(start_epoch, args.ep):
        loader.batch_sampler.set_epoch(epoch)
        stats = train_one_epoch(model, loader, optimizer, schedule, epoch, args.ep, args.clip, world, console)
        rng_states = gather_rng_states(world)

        epochs_done = epoch + 1
        seconds_per_epoch = (time.perf_counter() - started) / (epochs_done - start_epoch)
        remaining_s = (args.ep - epochs_done) * seconds_per_epoch
        if world.is_main:
            save_epoch(out_dir, args, spark, optimizer, epochs_done, stats.mean_loss, rng_states)
            pretrain_log.epoch(epochs_done, args.ep, stats.mean_loss, remaining_s)
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
        barrier(world)
    logger.info("pre-training finished; encoder weights in %s", out_dir.resolve())
