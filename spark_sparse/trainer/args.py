"""The trainer's command line: SparK's hyper-parameter names and defaults, in ``--key=value`` form.

Invalid values stop the program with one line on stderr that names the value
and the fix, and exit status 2 (argparse's convention), never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, NoReturn, Optional, Sequence

from ..models import OUTPUT_STRIDES, SUPPORTED_MODELS, model_family, parse_input_size

OPTIMIZERS = ("lamb", "adamw", "sgd")
DENSIFY_NORMS = ("", "bn", "ln", "identity")

# beta2 of LAMB and AdamW when --ada=0, as SparK chooses it per family.
DEFAULT_ADA = {"resnet": 0.95}
FALLBACK_ADA = 0.999


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.reject(f"{message} (run with --help to list the options)")

    def reject(self, message: str) -> NoReturn:
        """Exit with status 2 after writing ``message`` as one line on stderr."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_bool(text: str) -> bool:
    """Parse a 0/1 flag."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; use 0 or 1")
    return text == "1"


def parse_model(text: str) -> str:
    """Accept a name from the model registry."""
    try:
        model_family(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def parse_size(text: str) -> tuple:
    """Parse ``224`` or ``H,W`` into a pair; multiples of the model's stride are checked at build time."""
    try:
        return parse_input_size(text, 1)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(prog: str = "main.py") -> ArgumentParser:
    """Build the parser of every trainer option, with SparK's defaults."""
    parser = ArgumentParser(
        prog=prog,
        description="SparK sparse masked image modeling pre-training of a timm CNN.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument

    # Experiment and files.
    add("--exp_name", required=True, help="experiment name; the output directory defaults to output_<exp_name>")
    add("--exp_dir", default="", help="output directory for checkpoints and logs; empty: output_<exp_name>")
    add(
        "--data_path",
        default="",
        help="an ImageNet root (with train/), a folder of class folders, or any folder of images "
        "(searched recursively); empty: the photographs bundled in scikit-image",
    )
    add("--init_weight", default="", help="checkpoint whose model weights initialise the run (no optimizer state)")
    add("--resume_from", default="", help="<model>_still_pretraining.pth to continue from: weights, optimizer, epoch")
    add("--seed", type=int, default=0, help="random seed of the data order, augmentation and masks (rank r seeds drop path with seed + r)")
    add(
        "--save_every_iters",
        type=int,
        default=0,
        help="also write the still-pretraining checkpoint every this many iterations inside an epoch; 0: only after each epoch",
    )

    # Model.
    add("--model", type=parse_model, default="resnet50", help=f"timm model: {', '.join(SUPPORTED_MODELS)}")
    add("--input_size", type=parse_size, default="224", metavar="SIDE|H,W", help="image size in pixels")
    add("--mask", type=float, default=0.6, help="fraction of patches hidden from the encoder, in (0, 1)")
    add("--sbn", type=parse_bool, default="1", metavar="0|1", help="1: synchronise batch norm statistics across processes")
    add("--dp", type=float, default=0.0, help="drop path rate of the encoder, in [0, 1)")
    add("--densify_norm", default="", choices=DENSIFY_NORMS, help="norm before mask tokens; empty: the family's")
    add("--decoder_width", type=int, default=768, help="channels of the decoder's first block; halves per block")
    add("--sparse_conv", type=parse_bool, default="0", metavar="0|1", help="1: spconv submanifold convolution; 0: masked dense")
    add(
        "--output_stride",
        type=int,
        default=32,
        choices=OUTPUT_STRIDES,
        help="encoder stride in pixels, also the mask patch size; below 32 the last stages are dilated",
    )

    # Data.
    add("--bs", type=int, default=4096, help="global batch size in images, summed over all processes")
    add("--dataloader_workers", type=int, default=8, help="data loading worker processes per training process")
    add(
        "--vis_every",
        type=int,
        default=10,
        help="write a reconstruction grid of fixed images to reconstructions/ every this many epochs and after the last; 0: never",
    )

    # Optimisation.
    add("--base_lr", type=float, default=2e-4, help="learning rate per 256 images; peak lr = base_lr * bs / 256")
    add("--lr", type=float, default=None, help="peak learning rate; overrides base_lr * bs / 256")
    add("--wd", type=float, default=0.04, help="weight decay at the first iteration")
    add("--wde", type=float, default=0.2, help="weight decay at the last iteration (cosine from wd); 0: same as wd")
    add("--ep", type=int, default=1600, help="number of epochs")
    add("--wp_ep", type=int, default=40, help="warm-up epochs: lr rises linearly from 0.005 * peak to the peak")
    add("--clip", type=float, default=5.0, help="maximum global L2 norm of the gradients; 0 disables clipping")
    add("--opt", type=str.lower, default="lamb", choices=OPTIMIZERS, help="optimizer")
    add("--ada", type=float, default=0.0, help="beta2 of LAMB and AdamW; 0: the family's (0.95 for ResNets)")
    return parser


def check_values(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """Reject values argparse's types cannot check alone; exit 2 with one line."""
    if not args.exp_name or any(sep in args.exp_name for sep in ("/", os.sep)) or args.exp_name in (".", ".."):
        parser.reject(f"invalid --exp_name {args.exp_name!r}; use a plain name such as demo, or set --exp_dir")
    if not 0.0 < args.mask < 1.0:
        parser.reject(f"invalid --mask {args.mask}; use a fraction in (0, 1) such as 0.6")
    if not 0.0 <= args.dp < 1.0:
        parser.reject(f"invalid --dp {args.dp}; use a drop path rate in [0, 1) such as 0.1")
    if args.bs < 1:
        parser.reject(f"invalid --bs {args.bs}; use a positive global batch size such as 4096")
    if args.dataloader_workers < 0:
        parser.reject(f"invalid --dataloader_workers {args.dataloader_workers}; use 0 (load in the main process) or more")
    if args.vis_every < 0:
        parser.reject(f"invalid --vis_every {args.vis_every}; use 0 (no grids) or a positive number of epochs")
    if args.save_every_iters < 0:
        parser.reject(f"invalid --save_every_iters {args.save_every_iters}; use 0 (after each epoch only) or a positive count")
    if args.ep < 1:
        parser.reject(f"invalid --ep {args.ep}; use a positive number of epochs")
    if args.wp_ep < 0:
        parser.reject(f"invalid --wp_ep {args.wp_ep}; use 0 or more warm-up epochs")
    if args.decoder_width < 32 or args.decoder_width % 32:
        parser.reject(f"invalid --decoder_width {args.decoder_width}; use a multiple of 32 such as 768")
    for name in ("base_lr", "wd", "wde", "clip", "ada"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            parser.reject(f"invalid --{name} {value}; use a finite value of 0 or more")
    if args.lr is not None and (not math.isfinite(args.lr) or args.lr <= 0):
        parser.reject(f"invalid --lr {args.lr}; use a positive learning rate, or omit it for base_lr * bs / 256")
    if args.ada >= 1:
        parser.reject(f"invalid --ada {args.ada}; use a beta2 in (0, 1) such as 0.95, or 0 for the family's")
    if args.data_path and not os.path.isdir(args.data_path):
        parser.reject(f"--data_path {args.data_path!r} is not a directory; give an image folder or omit it")
    for name in ("resume_from", "init_weight"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.reject(f"--{name} {path!r} is not a file; give a checkpoint written by this trainer")
    check_output_dir(parser, args.exp_dir or f"output_{args.exp_name}")


def check_output_dir(parser: ArgumentParser, exp_dir: str) -> None:
    """Reject an output directory that is not a directory or cannot be created or written (without creating it)."""
    existing = os.path.abspath(exp_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        parser.reject(f"output directory {exp_dir!r} cannot be created because {existing!r} is not a directory; set --exp_dir to a writable folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.reject(f"output directory {exp_dir!r} is not writable ({existing!r} denies writing); set --exp_dir to a writable folder")


def check_world_size(parser: ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """Reject a global batch that does not split evenly over ``world_size`` processes."""
    if args.bs % world_size:
        lower = args.bs // world_size * world_size
        options = " or ".join(str(n) for n in (lower, lower + world_size) if n > 0)
        parser.reject(
            f"--bs {args.bs} is not divisible by the {world_size} processes; use a global batch size of {options}"
        )


def fill_derived(args: argparse.Namespace) -> argparse.Namespace:
    """Set the values SparK derives from others: exp_dir, peak lr, beta2 and the final weight decay."""
    args.exp_dir = args.exp_dir or f"output_{args.exp_name}"
    if args.lr is None:
        args.lr = args.base_lr * args.bs / 256
    if args.ada == 0:
        args.ada = DEFAULT_ADA.get(model_family(args.model).name, FALLBACK_ADA)
    args.wde = args.wde or args.wd
    args.backend = "spconv" if args.sparse_conv else "masked"
    return args


def parse_args(argv: Optional[Sequence[str]] = None, world_size: int = 1, prog: str = "main.py") -> argparse.Namespace:
    """Parse and check the trainer's options for ``world_size`` processes; exit 2 with one line on bad input."""
    parser = build_parser(prog)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    check_values(parser, args)
    check_world_size(parser, args, world_size)
    return fill_derived(args)


def format_args(args: argparse.Namespace) -> List[str]:
    """Return ``key=value`` lines of every option, sorted by key, for the log."""
    return [f"{key}={value!r}" for key, value in sorted(vars(args).items())]
