"""Reconstruction grids: per image, the input, the masked input, the reconstruction and the composite.

Run as ``python -m spark_sparse.visualize --ckpt <model>_still_pretraining.pth --out recon.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms
from torchvision.utils import make_grid, save_image

from . import build_spark
from .masking import upsample_mask
from .spark import SparK
from .trainer.args import ArgumentParser
from .trainer.checkpoint import CheckpointError, load_checkpoint, load_weights
from .trainer.data import find_images, load_rgb, write_bundled_photos

PROG = "python -m spark_sparse.visualize"
# Grey shown in place of hidden patches in the masked input, in 0..1 pixel units.
HIDDEN_GREY = 0.5
PANELS = ("input", "masked", "reconstruction", "composite")


def eval_transform(input_size: Tuple[int, int]) -> transforms.Compose:
    """Resize the shorter side, centre-crop to ``input_size`` and normalise with the ImageNet mean and std."""
    return transforms.Compose(
        [
            transforms.Resize(min(input_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
        ]
    )


def load_images(paths: Sequence[Path], input_size: Tuple[int, int]) -> torch.Tensor:
    """Return ``(N, 3, H, W)`` ImageNet-normalised images of ``paths``, centre-cropped to ``input_size``."""
    transform = eval_transform(input_size)
    return torch.stack([transform(load_rgb(Path(path))) for path in paths])


def choose_images(paths: Sequence[Path], count: int, seed: int) -> List[Path]:
    """Pick ``count`` of ``paths`` (all when fewer) in a seeded random order, so a seed fixes the set."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(paths), generator=generator)[:count]
    return [paths[i] for i in sorted(order.tolist())]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation and clamp to 0..1."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)


@torch.no_grad()
def reconstruction_panels(spark: SparK, images: torch.Tensor, active: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Return the four ``(B, 3, H, W)`` panels in 0..1 pixel units for ``images`` under mask ``active``.

    The reconstruction is mapped back with each patch's own mean and standard
    deviation, then the ImageNet statistics, as the loss's targets were made.
    The composite takes visible patches from the input and hidden ones from the
    reconstruction. ``spark`` runs in eval mode and is put back in its former mode.
    """
    was_training = spark.training
    spark.eval()
    try:
        reconstruction, active = spark.reconstruct(images, active)
    finally:
        spark.train(was_training)

    reconstruction = spark.denormalize_reconstruction(images, reconstruction.float())
    visible = upsample_mask(active, images.shape[-2:])
    inputs = to_pixels(images)
    return {
        "input": inputs,
        "masked": torch.where(visible, inputs, torch.full_like(inputs, HIDDEN_GREY)),
        "reconstruction": to_pixels(reconstruction),
        "composite": to_pixels(torch.where(visible, images, reconstruction)),
    }


def save_grid(panels: Dict[str, torch.Tensor], path: Path) -> None:
    """Write a PNG with one row per image and the columns in ``PANELS`` order, 2-pixel white gaps."""
    rows = torch.stack([panels[name] for name in PANELS], dim=1).flatten(0, 1).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(rows, nrow=len(PANELS), padding=2, pad_value=1.0), path)


def draw_grid(spark: SparK, images: torch.Tensor, path: Path, seed: int = 0) -> None:
    """Reconstruct ``images`` under a mask drawn from ``seed`` and write the grid to ``path``."""
    device = next(spark.parameters()).device
    active = spark.mask(images.shape[0], device, generator=torch.Generator().manual_seed(seed))
    save_grid(reconstruction_panels(spark, images.to(device), active), path)


def load_spark(path: str) -> Tuple[SparK, Dict[str, Any]]:
    """Build the SparK model a ``<model>_still_pretraining.pth`` checkpoint describes and load its weights."""
    checkpoint = load_checkpoint(path)
    if "model" not in checkpoint or "args" not in checkpoint:
        raise CheckpointError(
            f"{path!r} has no SparK model and arguments; give the <model>_still_pretraining.pth file of a run"
        )

    args = checkpoint["args"]
    spark = build_spark(
        args["model"],
        args["input_size"],
        args["mask"],
        args["backend"],
        decoder_width=args["decoder_width"],
        densify_norm=args["densify_norm"],
    )
    load_weights(spark, checkpoint["model"], path)
    return spark.eval(), args


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Draw a reconstruction grid (input, masked input, reconstruction, composite) from a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="<model>_still_pretraining.pth written by the trainer")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data_path", default="", help="folder of images, searched recursively")
    source.add_argument("--images", nargs="+", default=[], metavar="FILE", help="image files")
    parser.add_argument("--out", default="recon.png", help="PNG file to write")
    parser.add_argument("--num_images", type=int, default=4, help="number of images (rows) in the grid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice and of the mask")
    return parser


def image_source(args: argparse.Namespace, out_path: Path) -> List[Path]:
    """Return the candidate images: ``--images``, ``--data_path``, else the bundled photographs beside ``--out``."""
    if args.images:
        missing = [path for path in args.images if not Path(path).is_file()]
        if missing:
            raise ValueError(f"image file {missing[0]!r} not found; give existing image files to --images")
        return [Path(path) for path in args.images]
    if args.data_path:
        return find_images(args.data_path)
    folder = write_bundled_photos(out_path.parent)
    return find_images(str(folder))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return 0, or 2 after a one-line error."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:
        return int(exit_request.code or 0)
    if args.num_images < 1:
        sys.stderr.write(f"{PROG}: error: invalid --num_images {args.num_images}; use 1 or more\n")
        return 2

    out_path = Path(args.out)
    try:
        if not Path(args.ckpt).is_file():
            raise CheckpointError(f"checkpoint {args.ckpt!r} not found; give a <model>_still_pretraining.pth file")
        paths = choose_images(image_source(args, out_path), args.num_images, args.seed)
        spark, run_args = load_spark(args.ckpt)
        images = load_images(paths, tuple(run_args["input_size"]))
    except (CheckpointError, ValueError, OSError) as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 2

    draw_grid(spark, images, out_path, args.seed)
    print(f"wrote {out_path} ({len(paths)} images, {run_args['model']} on the {run_args['backend']} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
