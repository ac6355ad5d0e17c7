"""Encoder backends: ``masked`` (dense convolution times the mask) and ``spconv`` (submanifold sparse convolution)."""
from __future__ import annotations

from typing import Sequence, Union

from ..models import create_dense_model, model_family
from .encoder import SparseEncoder
from .registry import BuildContext, ConverterRegistry, UnsupportedLayerError

# Registers the converters of ConvNeXt, squeeze-excite, group norm and other layers in both backends.
from . import layers  # noqa: E402,F401  isort: skip

BACKENDS = ("masked", "spconv")


def build_encoder(
    model: str,
    input_size: Union[int, Sequence[int], str] = 224,
    backend: str = "masked",
    *,
    drop_path_rate: float = 0.0,
    sync_bn: bool = False,
    output_stride: int = 32,
) -> SparseEncoder:
    """Build the encoder of timm model ``model`` on ``backend``.

    The result has ``downsample_ratio``, ``feature_channels`` (largest scale first)
    and ``__call__(images, active=None)`` returning dense features from the largest
    scale to the smallest, zero at hidden sites. ``active`` is a ``(B, 1, h, w)``
    bool mask at the coarsest scale (``True`` = visible); None means all visible.
    ``output_stride`` 16 or 8 dilates the last stages, so the downsample ratio and
    the mask patch size become 16 or 8.
    """
    family = model_family(model)
    if backend == "masked":
        from .masked import MaskedEncoder

        encoder_type = MaskedEncoder
    elif backend == "spconv":
        from .sparse import SpconvEncoder

        encoder_type = SpconvEncoder
    else:
        raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    dense = create_dense_model(model, drop_path_rate=drop_path_rate, output_stride=output_stride)
    return encoder_type(model, family, dense, input_size, sync_bn=sync_bn)


__all__ = ["BACKENDS", "BuildContext", "ConverterRegistry", "SparseEncoder", "UnsupportedLayerError", "build_encoder"]
