"""One registry of layer converters per backend: dense layer type to the backend's layer.

A backend's encoder is built by walking the dense timm model and replacing every
module through its registry. Each module type is registered in one of three ways:

- a converter function, which returns the backend's version of the layer and
  keeps the parameter names and shapes of the dense one;
- a container whose own ``forward`` only composes its children with element-wise
  operations (a residual block), so its children are converted in place;
- an element-wise layer that is correct on the backend's features as it is.

A module type with no entry (nor one for a base class) raises
:class:`UnsupportedLayerError` naming the layer and its path, so an unsupported
model fails at build time and never computes wrong numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Type

from torch import nn

from ..masking import ActiveSites


class UnsupportedLayerError(TypeError):
    """A layer of the dense model has no converter in the chosen backend."""


@dataclass
class BuildContext:
    """Build options passed to every converter: the encoder's mask scope, batch-norm sync and input strides."""

    sites: ActiveSites
    sync_bn: bool = False
    # Input stride (image pixels per site) of every module, by its path in the model.
    input_strides: Dict[str, int] = field(default_factory=dict)
    path: str = ""


Converter = Callable[[nn.Module, BuildContext], nn.Module]

_CONVERT = "convert"
_CONTAINER = "container"
_ELEMENTWISE = "elementwise"


class ConverterRegistry:
    """Converters of one backend, looked up by the module's type and then its base classes."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._entries: Dict[type, tuple] = {}

    def register(self, *types: Type[nn.Module]) -> Callable[[Converter], Converter]:
        """Register the decorated function as the converter of ``types``."""

        def decorate(converter: Converter) -> Converter:
            for module_type in types:
                self._entries[module_type] = (_CONVERT, converter)
            return converter

        return decorate

    def register_container(self, *types: Type[nn.Module]) -> None:
        """Mark ``types`` as containers whose forward only composes children element-wise."""
        for module_type in types:
            self._entries[module_type] = (_CONTAINER, None)

    def register_elementwise(self, *types: Type[nn.Module]) -> None:
        """Mark ``types`` as element-wise layers kept unchanged."""
        for module_type in types:
            self._entries[module_type] = (_ELEMENTWISE, None)

    def _lookup(self, module: nn.Module) -> Optional[tuple]:
        for module_type in type(module).__mro__:
            if module_type in self._entries:
                return self._entries[module_type]
        return None

    def convert(self, module: nn.Module, context: BuildContext) -> nn.Module:
        """Return ``module`` with every layer replaced by this backend's version."""
        entry = self._lookup(module)
        if entry is None:
            where = context.path or "<root>"
            raise UnsupportedLayerError(
                f"layer {type(module).__module__}.{type(module).__qualname__} at '{where}' has no "
                f"converter in the {self.backend} backend; register one with "
                f"{self.backend.upper()}_CONVERTERS.register({type(module).__qualname__}) "
                f"or use a model without this layer"
            )

        kind, converter = entry
        if kind == _ELEMENTWISE:
            return module
        if kind == _CONVERT:
            return converter(module, context)
        return self.convert_children(module, context)

    def convert_children(self, module: nn.Module, context: BuildContext) -> nn.Module:
        """Convert every child of ``module`` in place and return ``module``.

        A converter whose block needs its own ``forward`` calls this first, then
        wraps the converted children.
        """
        parent_path = context.path
        for name, child in list(module.named_children()):
            context.path = f"{parent_path}.{name}" if parent_path else name
            setattr(module, name, self.convert(child, context))
        context.path = parent_path
        return module
