"""Converters for layer families beyond the ResNet's, each module covering both backends side by side.

Importing this package registers its converters in ``MASKED_CONVERTERS`` and
``SPCONV_CONVERTERS``; ``spark_sparse.backends`` imports it.
"""
from . import conv2d_same, convnext, global_pool, group_norm, grouped_conv, squeeze_excite  # noqa: F401
