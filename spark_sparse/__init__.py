"""Sparse masked image modeling (SparK) pre-training of CNNs on masked or genuine sparse convolution."""
from __future__ import annotations

from typing import Sequence, Union

from .backends import BACKENDS, build_encoder
from .backends.registry import UnsupportedLayerError
from .decoder import LightDecoder
from .masking import draw_mask, upsample_mask
from .models import SUPPORTED_MODELS, model_family
from .spark import SparK

__version__ = "0.1.0"


def build_spark(
    model: str,
    input_size: Union[int, Sequence[int], str] = 224,
    mask_ratio: float = 0.6,
    backend: str = "masked",
    *,
    drop_path_rate: float = 0.0,
    sync_bn: bool = False,
    decoder_width: int = 768,
    densify_norm: str = "",
    output_stride: int = 32,
) -> SparK:
    """Build the full SparK model for timm model ``model``; calling it returns the scalar loss.

    ``densify_norm`` defaults to the family's choice ("bn" for ResNets, "ln" for
    ConvNeXts). ``output_stride`` 16 or 8 dilates the encoder's last stages and
    shrinks the mask patches to match.
    """
    encoder = build_encoder(
        model, input_size, backend, drop_path_rate=drop_path_rate, sync_bn=sync_bn, output_stride=output_stride
    )
    decoder = LightDecoder(encoder.downsample_ratio, width=decoder_width, sync_bn=sync_bn)
    norm = densify_norm or model_family(model).densify_norm
    return SparK(encoder, decoder, mask_ratio=mask_ratio, densify_norm=norm, sync_bn=sync_bn)


__all__ = [
    "BACKENDS",
    "LightDecoder",
    "SUPPORTED_MODELS",
    "SparK",
    "UnsupportedLayerError",
    "__version__",
    "build_encoder",
    "build_spark",
    "draw_mask",
    "upsample_mask",
]
