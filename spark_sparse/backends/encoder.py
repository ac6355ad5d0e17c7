"""The encoder interface both backends share: a converted timm CNN that returns multi-scale features."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..masking import ActiveSites, upsample_mask
from ..models import ModelFamily, Size2d, downsample_ratio_of, feature_channels_of, feature_strides_of, parse_input_size
from .registry import BuildContext, ConverterRegistry


def trace_input_strides(dense: nn.Module, family: ModelFamily, input_size: Size2d) -> Dict[str, int]:
    """Return the input stride (image pixels per site) of every module under the family's children.

    One dense forward of a zero image records each module's 4-D input shape.
    """
    shapes: Dict[str, torch.Size] = {}
    handles = []
    for root in family.module_names:
        for name, module in dense.get_submodule(root).named_modules(prefix=root):

            def record(_module: nn.Module, inputs: tuple, name: str = name) -> None:
                if inputs and torch.is_tensor(inputs[0]) and inputs[0].dim() == 4:
                    shapes.setdefault(name, inputs[0].shape)

            handles.append(module.register_forward_pre_hook(record))

    was_training = dense.training
    try:
        dense.eval()
        with torch.no_grad():
            family.forward_features(dense, torch.zeros(1, 3, *input_size))
    finally:
        dense.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: _stride_of_shape(shape, input_size) for name, shape in shapes.items()}


def _stride_of_shape(shape: torch.Size, input_size: Size2d) -> int:
    """Return the stride of a ``(B, C, H, W)`` map, else of a ``(B, H, W, C)`` one (ConvNeXt's MLP input)."""
    for height, width in ((shape[2], shape[3]), (shape[1], shape[2])):
        stride = input_size[0] // height
        if (height * stride, width * stride) == tuple(input_size):
            return stride
    return input_size[0] // shape[2]


class SparseEncoder(nn.Module):
    """A timm CNN converted by one backend; its ``state_dict`` keeps timm's keys and shapes.

    The family's stem and stage modules are this module's direct children, so
    ``state_dict()`` loads with ``strict=True`` into ``timm.create_model(model, num_classes=0)``.
    Calling it returns dense ``(B, C_i, H_i, W_i)`` features from the largest scale
    to the smallest, exactly zero at hidden sites. ``feature_strides`` lists each
    one's stride in image pixels.
    """

    backend: str = ""

    def __init__(
        self,
        model_name: str,
        family: ModelFamily,
        dense: nn.Module,
        input_size: Union[int, Sequence[int], str],
        registry: ConverterRegistry,
        sync_bn: bool = False,
        needs_strides: bool = False,
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.family = family
        self.downsample_ratio = downsample_ratio_of(dense)
        self.feature_channels: List[int] = feature_channels_of(dense, family)
        self.feature_strides: List[int] = feature_strides_of(dense, family)
        self.input_size: Size2d = parse_input_size(input_size, self.downsample_ratio)
        self.sites = self.create_sites()
        _check_unused_children(dense, family)

        strides = trace_input_strides(dense, family, self.input_size) if needs_strides else {}
        context = BuildContext(sites=self.sites, sync_bn=sync_bn, input_strides=strides)
        for name in family.top_level_names:
            context.path = name
            self.add_module(name, registry.convert(getattr(dense, name), context))
        for name in family.kept:
            self.add_module(name, getattr(dense, name).requires_grad_(False))

    def create_sites(self) -> ActiveSites:
        """Create the mask scope shared by the converted layers; a backend may return a subclass."""
        return ActiveSites()

    @property
    def grid_size(self) -> Size2d:
        """The mask grid ``(h, w)`` for images of ``input_size``."""
        return self.input_size[0] // self.downsample_ratio, self.input_size[1] // self.downsample_ratio

    def check_inputs(self, images: torch.Tensor, active: Optional[torch.Tensor]) -> Tuple[int, int]:
        """Validate the images and mask shapes; return the mask grid of these images."""
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        ratio = self.downsample_ratio
        if height % ratio or width % ratio:
            raise ValueError(f"image size {height}x{width} is not a multiple of the downsample ratio {ratio}")
        grid = (height // ratio, width // ratio)
        if active is not None and tuple(active.shape) != (images.shape[0], 1, *grid):
            raise ValueError(
                f"mask shape {tuple(active.shape)} does not match images {tuple(images.shape)}; "
                f"expected {(images.shape[0], 1, *grid)}"
            )
        return grid

    @staticmethod
    def mask_images(images: torch.Tensor, active: Optional[torch.Tensor]) -> torch.Tensor:
        """Return a copy of ``images`` with hidden patches set to zero (the input is never modified)."""
        if active is None:
            return images
        return images * upsample_mask(active, images.shape[-2:]).to(images.dtype)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        raise NotImplementedError


def _check_unused_children(dense: nn.Module, family: ModelFamily) -> None:
    """Make sure the children the encoder drops (pooling, classifier) hold no state."""
    for name, child in dense.named_children():
        if name in family.top_level_names or name in family.kept:
            continue
        if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
            raise ValueError(
                f"child {name!r} of the {family.name} model has weights but is not part of the encoder; "
                f"create the model with num_classes=0"
            )
