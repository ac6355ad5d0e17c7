"""Linear probe: a linear classifier on frozen encoder features, pre-trained against randomly initialised.

Run as ``python -m spark_sparse.probe --ckpt output_exp/resnet50_1kpretrained.pth --data_path DIR``,
where ``DIR`` contains one folder of images per class.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torchvision.datasets import ImageFolder

from .export import encoder_weights
from .models import parse_input_size
from .trainer.args import ArgumentParser
from .trainer.checkpoint import CheckpointError, load_weights
from .trainer.data import load_rgb
from .visualize import eval_transform

PROG = "python -m spark_sparse.probe"


@dataclass
class ProbeResult:
    """Accuracy of one encoder's linear probe, as fractions in 0..1."""

    encoder: str
    train_accuracy: float
    val_accuracy: float


def split_indices(targets: Sequence[int], val_fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Split sample indices per class with ``seed``: about ``val_fraction`` of each class, at least one, to val.

    Raises ``ValueError`` when a class has fewer than two images, because it
    could then not appear in both parts.
    """
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for label in sorted(set(targets)):
        members = [i for i, target in enumerate(targets) if target == label]
        if len(members) < 2:
            raise ValueError(f"class {label} has {len(members)} image; give each class folder at least 2 images")
        order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
        val_count = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val.extend(order[:val_count])
        train.extend(order[val_count:])
    return sorted(train), sorted(val)


@torch.no_grad()
def extract_features(encoder: nn.Module, dataset: ImageFolder, indices: Sequence[int], batch_size: int) -> torch.Tensor:
    """Return ``(N, C)`` global-average-pooled last-stage features of the images at ``indices``, in eval mode."""
    encoder.eval()
    features = []
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i][0] for i in indices[start : start + batch_size]])
        features.append(encoder(images))
    return torch.cat(features)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float, seed: int) -> nn.Linear:
    """Fit multinomial logistic regression with L-BFGS on the whole training set.

    Written with torch because scikit-learn is not a dependency of this project;
    ``features`` are expected standardised.
    """
    torch.manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(classifier.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(classifier(features), labels) + weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier


def accuracy(classifier: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(features).argmax(dim=1) == labels).float().mean().item()


def probe_encoder(
    name: str,
    encoder: nn.Module,
    dataset: ImageFolder,
    split: Tuple[List[int], List[int]],
    weight_decay: float,
    seed: int,
    batch_size: int = 32,
) -> ProbeResult:
    """Extract frozen features of both parts of ``split``, fit the linear classifier on train, score both."""
    train, val = split
    targets = torch.tensor(dataset.targets)
    train_features = extract_features(encoder, dataset, train, batch_size)
    val_features = extract_features(encoder, dataset, val, batch_size)

    # Standardise with the training part's statistics, so one weight decay suits both encoders.
    mean = train_features.mean(dim=0)
    std = train_features.std(dim=0) + 1e-6
    train_features = (train_features - mean) / std
    val_features = (val_features - mean) / std

    classifier = fit_linear(train_features, targets[train], len(dataset.classes), weight_decay, seed)
    return ProbeResult(
        encoder=name,
        train_accuracy=accuracy(classifier, train_features, targets[train]),
        val_accuracy=accuracy(classifier, val_features, targets[val]),
    )


def build_encoders(checkpoint: str, seed: int) -> Dict[str, nn.Module]:
    """Return the pre-trained encoder of ``checkpoint`` and a randomly initialised one of the same model."""
    model, state = encoder_weights(checkpoint)
    pretrained = timm.create_model(model, pretrained=False, num_classes=0)
    load_weights(pretrained, state, checkpoint)
    torch.manual_seed(seed)
    random_init = timm.create_model(model, pretrained=False, num_classes=0)
    return {f"{model} pre-trained": pretrained, f"{model} random init": random_init}


def run_probe(
    checkpoint: str,
    data_path: str,
    input_size: Tuple[int, int] = (224, 224),
    val_fraction: float = 0.25,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> Tuple[List[ProbeResult], Tuple[int, int, int]]:
    """Probe both encoders on the class folders of ``data_path``; return results and (classes, train, val) sizes."""
    try:
        dataset = ImageFolder(data_path, transform=eval_transform(input_size), loader=load_rgb)
    except FileNotFoundError as error:
        raise ValueError(f"{error}; give a folder with one sub-folder of images per class") from None
    if len(dataset.classes) < 2:
        raise ValueError(f"{data_path!r} has {len(dataset.classes)} class folder; a probe needs at least 2")

    split = split_indices(dataset.targets, val_fraction, seed)
    results = [
        probe_encoder(name, encoder, dataset, split, weight_decay, seed)
        for name, encoder in build_encoders(checkpoint, seed).items()
    ]
    return results, (len(dataset.classes), len(split[0]), len(split[1]))


def print_table(results: List[ProbeResult], sizes: Tuple[int, int, int], console: Console) -> None:
    classes, train, val = sizes
    table = Table(title=f"Linear probe: {classes} classes, {train} training and {val} validation images")
    table.add_column("encoder")
    table.add_column("train accuracy", justify="right")
    table.add_column("val accuracy", justify="right")
    for result in results:
        table.add_row(result.encoder, f"{100 * result.train_accuracy:.1f} %", f"{100 * result.val_accuracy:.1f} %")
    console.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return 0, or 2 after a one-line error."""
    parser = ArgumentParser(
        prog=PROG,
        description="Linear probe on frozen encoder features: the checkpoint's encoder against a random one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--ckpt", required=True, help="<model>_1kpretrained.pth or <model>_still_pretraining.pth")
    parser.add_argument("--data_path", required=True, help="folder with one sub-folder of images per class")
    parser.add_argument("--input_size", default="224", metavar="SIDE|H,W", help="image size in pixels")
    parser.add_argument("--val_fraction", type=float, default=0.25, help="fraction of each class held out, in (0, 1)")
    parser.add_argument("--weight_decay", type=float, default=1e-3, help="L2 penalty on the classifier's weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the random encoder and the classifier")
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_request:
        return int(exit_request.code or 0)

    try:
        if not Path(args.ckpt).is_file():
            raise CheckpointError(f"checkpoint {args.ckpt!r} not found; give a <model>_1kpretrained.pth file")
        if not 0.0 < args.val_fraction < 1.0:
            raise ValueError(f"invalid --val_fraction {args.val_fraction}; use a fraction in (0, 1) such as 0.25")
        input_size = parse_input_size(args.input_size, 1)
        results, sizes = run_probe(args.ckpt, args.data_path, input_size, args.val_fraction, args.weight_decay, args.seed)
    except (CheckpointError, ValueError, OSError) as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 2

    print_table(results, sizes, Console())
    return 0


if __name__ == "__main__":
    sys.exit(main())
