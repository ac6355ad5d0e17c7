"""The model benchmarks' iterations: encoder forward, encoder forward plus backward, one pre-training step.

Every variant of a model starts from the same weights: the masked encoder (or
SparK model) is built once from the seed, the channels-last and spconv variants
load its state dict.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import timm.optim
import torch
from torch import nn

from spark_sparse import build_encoder, build_spark

from .workload import autocast, seeded_mask

BENCHMARKS = ("encoder_forward", "encoder_forward_backward", "pretrain_step")
ENCODER_VARIANTS = ("masked_nchw", "masked_channels_last", "spconv")
# The spconv encoder works on rows of active sites, but SparK's dense decoder does not,
# so the pre-training step runs spconv with the decoder in each layout too.
STEP_VARIANTS = ("masked_nchw", "masked_channels_last", "spconv_nchw", "spconv_channels_last")
MASKED_VARIANTS = ("masked_nchw", "masked_channels_last")

# SparK's base learning rate for LAMB, scaled by batch size / 256 at run time.
BASE_LR = 2e-4
WEIGHT_DECAY = 0.04


def counterpart(benchmark: str, masked_name: str) -> str:
    """Return the spconv variant compared with a masked one: the same layout where the step has both."""
    if benchmark == "pretrain_step":
        return "spconv" + masked_name[len("masked"):]
    return "spconv"


@dataclass
class ModelVariant:
    """One backend and memory layout of a model, with its input images in that layout."""

    name: str
    module: nn.Module
    images: torch.Tensor
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[torch.amp.GradScaler] = None


def _layout(name: str) -> torch.memory_format:
    return torch.channels_last if name.endswith("channels_last") else torch.contiguous_format


def _place(name: str, module: nn.Module, images: torch.Tensor, device: torch.device) -> Tuple[nn.Module, torch.Tensor]:
    layout = _layout(name)
    return module.to(device, memory_format=layout).train(), images.to(device).contiguous(memory_format=layout)


def build_encoder_variants(
    model: str, input_size: Tuple[int, int], images: torch.Tensor, device: torch.device, seed: int
) -> List[ModelVariant]:
    """Build the masked encoder in NCHW and channels-last and the spconv encoder, all with one set of weights."""
    torch.manual_seed(seed)
    masked = build_encoder(model, input_size, backend="masked")
    sparse = build_encoder(model, input_size, backend="spconv")
    sparse.load_state_dict(masked.state_dict(), strict=True)
    modules = {"masked_nchw": masked, "masked_channels_last": copy.deepcopy(masked), "spconv": sparse}
    return [ModelVariant(name, *_place(name, modules[name], images, device)) for name in ENCODER_VARIANTS]


def build_step_variants(
    model: str,
    input_size: Tuple[int, int],
    images: torch.Tensor,
    device: torch.device,
    seed: int,
    amp: bool,
    decoder_width: int = 768,
) -> List[ModelVariant]:
    """Build SparK on both backends and layouts with one set of weights, each with its own LAMB optimizer."""
    torch.manual_seed(seed)
    masked = build_spark(model, input_size, backend="masked", decoder_width=decoder_width)
    sparse = build_spark(model, input_size, backend="spconv", decoder_width=decoder_width)
    sparse.load_state_dict(masked.state_dict(), strict=True)
    modules = {
        "masked_nchw": masked,
        "masked_channels_last": copy.deepcopy(masked),
        "spconv_nchw": sparse,
        "spconv_channels_last": copy.deepcopy(sparse),
    }

    variants = []
    lr = BASE_LR * images.shape[0] / 256
    for name in STEP_VARIANTS:
        module, placed = _place(name, modules[name], images, device)
        optimizer = timm.optim.Lamb(module.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
        scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
        variants.append(ModelVariant(name, module, placed, optimizer, scaler))
    return variants


def iteration(
    benchmark: str, variant: ModelVariant, active: torch.Tensor, mask_ratio: float, seed: int, amp: bool
) -> Callable[[], object]:
    """Return a function that runs one iteration of ``benchmark`` on ``variant``."""
    device = variant.images.device
    active = active.to(device)

    def encoder_forward() -> object:
        with torch.no_grad(), autocast(device, amp):
            return variant.module(variant.images, active)

    def encoder_forward_backward() -> object:
        variant.module.zero_grad(set_to_none=True)
        with autocast(device, amp):
            features = variant.module(variant.images, active)
            loss = torch.stack([feature.float().mean() for feature in features]).sum()
        loss.backward()
        return loss

    def pretrain_step() -> object:
        variant.optimizer.zero_grad(set_to_none=True)
        spark = variant.module
        step_mask = seeded_mask(variant.images.shape[0], spark.grid_size, mask_ratio, seed).to(device)
        with autocast(device, amp):
            loss = spark(variant.images, step_mask)
        variant.scaler.scale(loss).backward()
        variant.scaler.step(variant.optimizer)
        variant.scaler.update()
        return loss

    functions: Dict[str, Callable[[], object]] = {
        "encoder_forward": encoder_forward,
        "encoder_forward_backward": encoder_forward_backward,
        "pretrain_step": pretrain_step,
    }
    return functions[benchmark]
