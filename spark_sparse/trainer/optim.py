"""The optimizer: SparK's parameter groups and its LAMB, AdamW or SGD settings."""
from __future__ import annotations

import argparse
from typing import Dict, List

import timm.optim
import torch
from torch import nn

# Parameters whose name contains one of these never get weight decay (besides biases and 1-D norms).
NO_WEIGHT_DECAY_KEYS = ("mask_token", "cls_token", "pos_embed", "gamma")


def param_groups(model: nn.Module) -> List[Dict]:
    """Split trainable parameters into a decayed group and one without decay (biases, norms, mask tokens).

    The schedule multiplies its weight decay by each group's ``weight_decay_scale``.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.dim() == 1 or name.endswith(".bias") or any(key in name for key in NO_WEIGHT_DECAY_KEYS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay_scale": 1.0, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay_scale": 0.0, "lr_scale": 1.0},
    ]


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    """Build ``args.opt`` over the groups of ``model``; the schedule sets lr and weight decay every iteration.

    LAMB is timm's with ``betas=(0.9, args.ada)`` as in SparK. Its built-in global
    norm clipping is off (``max_grad_norm=None``) because the engine clips the
    gradients with ``--clip`` before every optimizer's step, which is the same
    operation and also yields the norm for the progress bar.
    """
    groups = param_groups(model)
    if args.opt == "lamb":
        return timm.optim.Lamb(groups, lr=args.lr, betas=(0.9, args.ada), weight_decay=0.0, max_grad_norm=None)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.ada), weight_decay=0.0)
    if args.opt == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=0.0)
    raise ValueError(f"unknown optimizer {args.opt!r}; choose lamb, adamw or sgd")
