"""Command-line options both benchmark scripts share, and their checks."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Tuple

from spark_sparse.masking import num_visible_patches
from spark_sparse.models import parse_input_size

from .report import RESULTS_DIR


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}; give a whole number such as 3") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive; give 1 or more")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}; give a whole number such as 1") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def mask_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mask ratio {text!r}; give a number such as 0.6") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"mask ratio {value} is outside (0, 1); give a number such as 0.6")
    return value


def add_common_arguments(
    parser: argparse.ArgumentParser, default_repeats: int, default_warmup: int, default_batch_size: int = 16
) -> None:
    """Add the options for device, precision, shapes, repeats and output."""
    parser.add_argument("--device", default="auto", help="auto (CUDA where there is one), cpu or cuda")
    parser.add_argument(
        "--amp", action="store_true", help="run the masked and spconv cases under fp16 autocast (CUDA only)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_batch_size,
        help=f"images per batch (default {default_batch_size})",
    )
    parser.add_argument(
        "--input-size", default="224", help="image size in pixels: one side, or H,W (default 224)"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=default_repeats,
        help=f"timed rounds; each round times every case once (default {default_repeats})",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=default_warmup,
        help=f"untimed iterations of each case before its memory run and timing (default {default_warmup})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and masks (default 0)")
    parser.add_argument(
        "--out-dir", type=Path, default=RESULTS_DIR, help=f"folder for the JSON record and PNG plot (default {RESULTS_DIR})"
    )
    parser.add_argument(
        "--photos", type=Path, default=None, help="photos from export_photos.py, for a machine without scikit-image"
    )
    parser.add_argument("--notes", default="", help="free text stored in the record, such as how busy the machine was")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON record only")


def check_shapes(
    parser: argparse.ArgumentParser, input_size: str, downsample_ratio: int, ratios: List[float]
) -> Tuple[int, int]:
    """Return the ``(H, W)`` input size; exit with a one-line message on an invalid size or mask ratio."""
    try:
        size = parse_input_size(input_size, downsample_ratio)
        grid = (size[0] // downsample_ratio, size[1] // downsample_ratio)
        for ratio in ratios:
            num_visible_patches(grid, ratio)
    except ValueError as error:
        parser.error(str(error))
    return size
