"""The model registry: which timm CNNs can be pre-trained and how to take their multi-scale features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple, Union

import timm
import torch
from torch import nn

Size2d = Tuple[int, int]


@dataclass(frozen=True)
class ModelFamily:
    """How to run a family of timm models as a hierarchical encoder.

    ``stem`` names the modules run in order before the first stage; ``stages``
    names the modules whose outputs are the multi-scale features, from the largest
    scale to the smallest. A name may be dotted (``stages.0``): the encoder then
    converts and keeps the whole top-level child (``stages``). ``kept`` names
    top-level children that hold weights but take no part in the forward pass
    (ConvNeXt's head norm); the encoder stores them unchanged and frozen, so its
    state dict loads strictly into ``timm.create_model(model, num_classes=0)``.
    ``densify_norm`` is the normalisation SparK applies to the encoder's features
    before filling in mask tokens ("bn" or "ln").
    """

    name: str
    stem: Tuple[str, ...]
    stages: Tuple[str, ...]
    densify_norm: str
    kept: Tuple[str, ...] = ()

    @property
    def module_names(self) -> Tuple[str, ...]:
        return self.stem + self.stages

    @property
    def top_level_names(self) -> Tuple[str, ...]:
        """The top-level children the encoder converts, in first-use order."""
        roots = (name.split(".")[0] for name in self.module_names)
        return tuple(dict.fromkeys(roots))

    def forward_features(self, modules: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
        """Run ``x`` through the stem and stages of ``modules``; return each stage's output."""
        for name in self.stem:
            x = modules.get_submodule(name)(x)
        features = []
        for name in self.stages:
            x = modules.get_submodule(name)(x)
            features.append(x)
        return features


RESNET = ModelFamily(
    name="resnet",
    stem=("conv1", "bn1", "act1", "maxpool"),
    stages=("layer1", "layer2", "layer3", "layer4"),
    densify_norm="bn",
)

CONVNEXT = ModelFamily(
    name="convnext",
    stem=("stem",),
    stages=("stages.0", "stages.1", "stages.2", "stages.3"),
    densify_norm="ln",
    kept=("head",),
)

SUPPORTED_MODELS: Dict[str, ModelFamily] = {
    "resnet18": RESNET,
    "resnet34": RESNET,
    "resnet50": RESNET,
    "resnet101": RESNET,
    "resnet152": RESNET,
    "resnet200": RESNET,
    "seresnet50": RESNET,
    "resnext50_32x4d": RESNET,
    "convnext_tiny": CONVNEXT,
    "convnext_small": CONVNEXT,
    "convnext_base": CONVNEXT,
    "convnext_large": CONVNEXT,
}

# timm's ResNets and ConvNeXts accept these; below 32, the last stages keep their
# resolution through dilated convolutions.
OUTPUT_STRIDES = (8, 16, 32)


def model_family(model: str) -> ModelFamily:
    """Return the family of a supported model name, or raise ``ValueError`` listing the valid names."""
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of: {', '.join(SUPPORTED_MODELS)}")
    return SUPPORTED_MODELS[model]


def create_dense_model(model: str, drop_path_rate: float = 0.0, output_stride: int = 32) -> nn.Module:
    """Create the randomly initialised timm model with no classifier (``num_classes=0``).

    ``output_stride`` below 32 dilates the last stages instead of striding them.
    """
    model_family(model)
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"invalid output stride {output_stride}; use one of {', '.join(map(str, OUTPUT_STRIDES))}")
    return timm.create_model(
        model, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, output_stride=output_stride
    )


def downsample_ratio_of(dense: nn.Module) -> int:
    """Return the stride of the last stage, which is also the mask patch size."""
    return int(dense.feature_info[-1]["reduction"])


def feature_channels_of(dense: nn.Module, family: ModelFamily) -> List[int]:
    """Return the channel count of each stage's output, largest scale first."""
    channels = {info["module"]: info["num_chs"] for info in dense.feature_info}
    return [int(channels[name]) for name in family.stages]


def feature_strides_of(dense: nn.Module, family: ModelFamily) -> List[int]:
    """Return the stride (image pixels per site) of each stage's output, largest scale first.

    Consecutive stages share a stride where the model dilates instead of striding.
    """
    reductions = {info["module"]: info["reduction"] for info in dense.feature_info}
    return [int(reductions[name]) for name in family.stages]


def parse_input_size(input_size: Union[int, Sequence[int], str], downsample_ratio: int) -> Size2d:
    """Turn ``224``, ``(160, 224)`` or ``"160,224"`` into ``(H, W)``, each a multiple of ``downsample_ratio``."""
    if isinstance(input_size, str):
        try:
            parts = [int(part) for part in input_size.replace("x", ",").split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"invalid input size {input_size!r}; give one integer or H,W such as 160,224") from None
    elif isinstance(input_size, int):
        parts = [input_size]
    else:
        parts = [int(part) for part in input_size]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ValueError(f"invalid input size {input_size!r}; give one integer or H,W such as 160,224")

    for side in parts:
        if side <= 0 or side % downsample_ratio:
            lower = side // downsample_ratio * downsample_ratio
            nearest = [size for size in (lower, lower + downsample_ratio) if size > 0]
            raise ValueError(
                f"input size {side} is not a positive multiple of the downsample ratio "
                f"{downsample_ratio}; use {' or '.join(str(n) for n in nearest)}"
            )
    return parts[0], parts[1]
