"""Check the trainer's options for a world of N processes before ``run.sh`` starts them.

Usage: ``python -m spark_sparse.trainer.validate --world_size=N [trainer options]``.
Exits 0 when the options are valid, else 2 with the trainer's one-line error, so
the launcher can stop before torchrun starts processes (whose failures torchrun
reports with its own traceback).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ..masking import num_visible_patches
from ..models import create_dense_model, downsample_ratio_of, parse_input_size
from .args import parse_args
from .checkpoint import CheckpointError, check_still_pretraining, load_checkpoint
from .data import find_images


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Return 0 when the trainer options in ``argv`` are valid for ``--world_size`` processes, else 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    world_size = 1
    options = []
    for arg in argv:
        if arg.startswith("--world_size="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                sys.stderr.write(f"run.sh: error: invalid world size {value!r}; use a positive integer\n")
                return 2
            world_size = int(value)
        else:
            options.append(arg)

    try:
        args = parse_args(options, world_size, prog="run.sh")
    except SystemExit as exit_request:
        return int(exit_request.code or 0)

    # The image size must be a multiple of the stride, which is read from the timm model itself.
    ratio = downsample_ratio_of(create_dense_model(args.model, output_stride=args.output_stride))
    try:
        height, width = parse_input_size(args.input_size, ratio)
    except ValueError as error:
        sys.stderr.write(f"run.sh: error: invalid --input_size: {error}\n")
        return 2

    # The same checks the workers make, here so that they end in one line before torchrun starts.
    try:
        num_visible_patches((height // ratio, width // ratio), args.mask)
        if args.data_path:
            # NOTE: this walks the whole folder once more before the workers do; on ImageNet (1.28 M
            # files) that adds the time of one directory walk to the start.
            find_images(args.data_path)
        if args.resume_from:
            check_still_pretraining(load_checkpoint(args.resume_from), args.resume_from, args.model)
    except (CheckpointError, ValueError) as error:
        sys.stderr.write(f"run.sh: error: {error}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
