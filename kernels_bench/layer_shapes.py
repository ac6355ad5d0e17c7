"""The distinct convolution, batch norm and pooling shapes of a timm CNN, found by tracing one forward."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch import nn

from spark_sparse.models import Size2d, create_dense_model, model_family

TRACED_TYPES = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass
class LayerShape:
    """One distinct layer geometry and every module path of the model that has it.

    ``input_stride`` is the image pixels per site of the layer's input map.
    ``module`` is the first module found with this shape; its weights are the
    ones the benchmark runs.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    input_size: Size2d
    input_stride: int
    module: nn.Module = field(repr=False)
    paths: List[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """A short label such as ``conv3x3/2 128->128 @56x56``."""
        height, width = self.input_size
        if self.kind == "conv":
            geometry = f"conv{self.kernel}x{self.kernel}/{self.stride} {self.in_channels}->{self.out_channels}"
            if self.module.groups > 1:
                geometry += f" groups={self.module.groups}"
        elif self.kind == "batch_norm":
            geometry = f"bn {self.in_channels}"
        else:
            geometry = f"{self.kind}{self.kernel}x{self.kernel}/{self.stride} {self.in_channels}"
        return f"{geometry} @{height}x{width}"

    @property
    def output_stride(self) -> int:
        return self.input_stride * self.stride


def _pair_side(value) -> int:
    return int(value[0] if isinstance(value, tuple) else value)


def _describe(module: nn.Module, in_channels: int) -> Tuple[str, int, int, int, int]:
    """Return ``(kind, out_channels, kernel, stride, padding)`` of a traced module."""
    if isinstance(module, nn.Conv2d):
        return "conv", module.out_channels, _pair_side(module.kernel_size), _pair_side(module.stride), _pair_side(module.padding)
    if isinstance(module, nn.BatchNorm2d):
        return "batch_norm", in_channels, 1, 1, 0
    kind = "max_pool" if isinstance(module, nn.MaxPool2d) else "avg_pool"
    return kind, in_channels, _pair_side(module.kernel_size), _pair_side(module.stride), _pair_side(module.padding)


def collect_layer_shapes(model: str, input_size: Size2d) -> List[LayerShape]:
    """Trace ``model`` on one zero image of ``input_size``; return its distinct layer shapes in forward order.

    Only the family's stem and stages are traced, the part of the model the encoder keeps.
    """
    family = model_family(model)
    dense = create_dense_model(model).eval()
    shapes: Dict[tuple, LayerShape] = {}
    handles = []

    def record(module: nn.Module, inputs: tuple, path: str) -> None:
        _, channels, height, width = inputs[0].shape
        kind, out_channels, kernel, stride, padding = _describe(module, channels)
        key = (kind, channels, out_channels, kernel, stride, padding, height, width, getattr(module, "groups", 1))
        if key not in shapes:
            input_stride = input_size[0] // height
            shapes[key] = LayerShape(
                kind, channels, out_channels, kernel, stride, padding, (height, width), input_stride, module
            )
        shapes[key].paths.append(path)

    for root in family.module_names:
        for path, module in dense.get_submodule(root).named_modules(prefix=root):
            if isinstance(module, TRACED_TYPES):
                handles.append(module.register_forward_pre_hook(lambda m, inputs, path=path: record(m, inputs, path)))
    try:
        with torch.no_grad():
            family.forward_features(dense, torch.zeros(1, 3, *input_size))
    finally:
        for handle in handles:
            handle.remove()
    return list(shapes.values())
