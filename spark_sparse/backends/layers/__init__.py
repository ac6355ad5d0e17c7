"""Converters for layer families beyond the ResNet's, each module covering both backends side by side.

Importing this package registers its converters in ``MASKED_CONVERTERS`` and
``SPCONV_CONVERTERS``; ``spark_sparse.backends`` imports it.
"""
from . import grouped_conv  # noqa: F401
