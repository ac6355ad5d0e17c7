"""The ways one layer shape can run: dense, masked, the spconv backend's layer, and spconv's own kernel.

Every variant of a shape gets the same weights (copies of one timm module), the
same input values and the same mask. Masks and neighbour tables are built once
per shape, before timing, because an encoder builds them once per forward call
and shares them among all layers of a scale.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from spark_sparse.backends.masked import MASKED_CONVERTERS
from spark_sparse.backends.registry import BuildContext
from spark_sparse.backends.site_tables import SparseSites
from spark_sparse.backends.sparse import SPCONV_CONVERTERS
from spark_sparse.masking import ActiveSites, upsample_mask

from .layer_shapes import LayerShape
from .workload import autocast, intra_op_threads

SPCONV_NATIVE_KEY = "kernels_bench"


@dataclass
class LayerVariant:
    """One way to run a layer shape.

    ``forward`` and ``forward_backward`` each run one iteration and return its
    output. ``forward_backward`` is None where the variant cannot run backward,
    with the reason in ``note``. ``output_rows`` maps the forward output to
    ``(N_out, C)`` rows at the next scale's active sites, to compare variants.
    """

    name: str
    forward: Callable[[], torch.Tensor]
    forward_backward: Optional[Callable[[], torch.Tensor]]
    output_rows: Callable[[torch.Tensor], torch.Tensor]
    threads: int
    note: str = ""


def _clear_grads(module: nn.Module, tensor: torch.Tensor) -> None:
    module.zero_grad(set_to_none=True)
    tensor.grad = None


def _layer_input(shape: LayerShape, batch_size: int, photos: torch.Tensor, seed: int) -> torch.Tensor:
    """Return the layer's dense ``(B, C, H, W)`` input: the photos for the stem, seeded values elsewhere."""
    if shape.input_stride == 1 and shape.in_channels == photos.shape[1]:
        return photos[:batch_size].clone()
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(batch_size, shape.in_channels, *shape.input_size, generator=generator)
    # Pools in a ResNet follow a ReLU; non-negative inputs keep max pooling over hidden zeros exact.
    return values.relu() if shape.kind.endswith("pool") else values


class LayerBench:
    """Build the variants of one layer shape for one mask on one device.

    Use as a context manager: the mask stays bound to the masked and spconv
    layers' site scopes while it is open.
    """

    def __init__(
        self,
        shape: LayerShape,
        active: torch.Tensor,
        photos: torch.Tensor,
        downsample_ratio: int,
        device: torch.device,
        amp: bool,
        seed: int = 0,
    ) -> None:
        self.shape = shape
        self.device = device
        self.amp = amp
        self.active = active.to(device)
        self.downsample_ratio = downsample_ratio
        self.mask_in = upsample_mask(self.active, shape.input_size)

        # Hidden sites of the input are zero, as the previous masked layer leaves them.
        dense = _layer_input(shape, active.shape[0], photos, seed).to(device)
        self.dense_input = dense * self.mask_in.to(dense.dtype)
        self.masked_sites = ActiveSites()
        self.sparse_sites = SparseSites(downsample_ratio)
        self._bindings = contextlib.ExitStack()

    def __enter__(self) -> "LayerBench":
        self._bindings.enter_context(self.masked_sites.bind(self.active))
        self._bindings.enter_context(self.sparse_sites.bind(self.active))
        scale_in = self.sparse_sites.scale(self.shape.input_stride)
        self.input_rows = self.sparse_sites.rows_at(self.shape.input_size)
        self.rows_input = self._dense_to_rows(self.dense_input, self.input_rows)
        self.num_input_sites = scale_in.num_sites
        return self

    def __exit__(self, *exc_info) -> None:
        self._bindings.close()

    @staticmethod
    def _dense_to_rows(dense: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return dense.permute(0, 2, 3, 1).reshape(-1, dense.shape[1]).index_select(0, rows).contiguous()

    def output_size(self) -> tuple:
        height, width = self.shape.input_size
        kernel, stride, padding = self.shape.kernel, self.shape.stride, self.shape.padding
        return (height + 2 * padding - kernel) // stride + 1, (width + 2 * padding - kernel) // stride + 1

    def dense_output_rows(self, out: torch.Tensor) -> torch.Tensor:
        """Gather a dense output's active sites into ``(N_out, C)`` rows in the backend's order."""
        rows = self.sparse_sites.rows_at(tuple(out.shape[-2:]))
        return self._dense_to_rows(out.float(), rows)

    def variants(self, include_spconv_native: bool) -> List[LayerVariant]:
        """Return every variant this shape supports on this device."""
        threads = torch.get_num_threads()
        variants = [
            self._module_variant("dense_nchw", self.shape.module, self.dense_input, False, self.amp, threads),
            self._module_variant("dense_channels_last", self.shape.module, self.dense_input, True, self.amp, threads),
        ]
        if self.device.type == "cuda" and not self.amp:
            variants += [
                self._module_variant("dense_nchw_fp16", self.shape.module, self.dense_input, False, True, threads),
                self._module_variant(
                    "dense_channels_last_fp16", self.shape.module, self.dense_input, True, True, threads
                ),
            ]

        masked = MASKED_CONVERTERS.convert(copy.deepcopy(self.shape.module), BuildContext(sites=self.masked_sites))
        variants += [
            self._module_variant("masked_nchw", masked, self.dense_input, False, self.amp, threads),
            self._module_variant("masked_channels_last", masked, self.dense_input, True, self.amp, threads),
            self._spconv_backend_variant("spconv_backend", threads),
        ]
        # spconv has no grouped convolution (ConvNeXt's depthwise layers), so those run without its kernel.
        grouped = getattr(self.shape.module, "groups", 1) != 1
        if include_spconv_native and self.device.type == "cpu" and self.shape.kind in ("conv", "max_pool") and not grouped:
            # The backend's kernel at spconv's one thread shows what the kernel choice alone costs.
            variants.append(self._spconv_backend_variant("spconv_backend_1thread", 1))
            variants.append(self._spconv_native_variant())
        return variants

    def _module_variant(
        self, name: str, module: nn.Module, dense: torch.Tensor, channels_last: bool, amp: bool, threads: int
    ) -> LayerVariant:
        """Run a module (dense timm layer or masked layer) on the whole ``(B, C, H, W)`` map."""
        layout = torch.channels_last if channels_last else torch.contiguous_format
        # The memo keeps the masked layer's site scope shared, so the bound mask still reaches the copy.
        layer = copy.deepcopy(module, memo={id(self.masked_sites): self.masked_sites})
        layer = layer.to(self.device, memory_format=layout).train()
        inputs = dense.contiguous(memory_format=layout).requires_grad_(self.shape.input_stride > 1)
        grad_out = torch.ones_like(self._run(layer, inputs, amp, grad=False))

        def forward() -> torch.Tensor:
            return self._run(layer, inputs, amp, grad=False)

        def forward_backward() -> torch.Tensor:
            _clear_grads(layer, inputs)
            out = self._run(layer, inputs, amp, grad=True)
            out.backward(grad_out.to(out.dtype))
            return out

        return LayerVariant(name, forward, forward_backward, self.dense_output_rows, threads)

    def _spconv_backend_variant(self, name: str, threads: int) -> LayerVariant:
        """Run the spconv backend's converted layer with ``threads`` intra-op threads on the active rows.

        The stem takes the dense masked image and gathers its rows itself, as in the encoder.
        """
        path = self.shape.paths[0]
        context = BuildContext(sites=self.sparse_sites, input_strides={path: self.shape.input_stride}, path=path)
        layer = SPCONV_CONVERTERS.convert(copy.deepcopy(self.shape.module), context).to(self.device).train()
        is_stem = self.shape.input_stride == 1
        inputs = (self.dense_input if is_stem else self.rows_input).clone().requires_grad_(not is_stem)
        grad_out = torch.ones_like(self._run(layer, inputs, self.amp, grad=False))

        def forward() -> torch.Tensor:
            with intra_op_threads(threads):
                return self._run(layer, inputs, self.amp, grad=False)

        def forward_backward() -> torch.Tensor:
            _clear_grads(layer, inputs)
            with intra_op_threads(threads):
                out = self._run(layer, inputs, self.amp, grad=True)
                out.backward(grad_out.to(out.dtype))
            return out

        return LayerVariant(name, forward, forward_backward, lambda out: out.float(), threads)

    def _run(self, layer: nn.Module, inputs: torch.Tensor, amp: bool, grad: bool) -> torch.Tensor:
        with torch.set_grad_enabled(grad), autocast(self.device, amp):
            return layer(inputs)

    def _spconv_native_variant(self) -> LayerVariant:
        """Run spconv's own CPU kernel with one thread on its own rule book, built once before timing.

        Stride-1 convolutions are ``SubMConv2d`` and strided ones ``SparseConv2d``.
        The latter outputs every site its window touches, which is more than the
        next scale's active sites. Max pooling is ``SparseMaxPool2d``. Backward is not
        timed, because spconv 2.3.8's CPU backward calls
        ``torch.cuda.current_stream()`` and fails on a machine with no NVIDIA driver.
        """
        import spconv.pytorch as spconv
        from spconv.pytorch import functional as spconv_functional

        shape = self.shape
        batch_size = self.active.shape[0]
        flat = self.input_rows
        height, width = shape.input_size
        indices = torch.stack(
            [flat // (height * width), flat % (height * width) // width, flat % width], dim=1
        ).to(torch.int32)
        features = self.rows_input.clone()
        sparse_input = spconv.SparseConvTensor(features, indices, [height, width], batch_size)
        common = dict(indice_key=SPCONV_NATIVE_KEY, algo=spconv.ConvAlgo.Native)

        if shape.kind == "max_pool":
            layer = spconv.SparseMaxPool2d(shape.kernel, shape.stride, shape.padding, **common)
        elif shape.stride == 1:
            layer = spconv.SubMConv2d(
                shape.in_channels, shape.out_channels, shape.kernel, 1, shape.padding, bias=False, **common
            )
        else:
            layer = spconv.SparseConv2d(
                shape.in_channels, shape.out_channels, shape.kernel, shape.stride, shape.padding, bias=False, **common
            )
        if shape.kind == "conv":
            with torch.no_grad():
                layer.weight.copy_(shape.module.weight.permute(0, 2, 3, 1))

        with intra_op_threads(1), torch.no_grad():
            first = layer(sparse_input)
        num_outputs = first.indices.shape[0]
        out_indices = first.indices.long()
        algo = spconv.ConvAlgo.Native
        # spconv runs a 1x1 stride-1 convolution as one torch.mm on the features, with no rule book.
        # NOTE: spconv 2.3.8 views its (out, 1, 1, in) weight as (in, out) there, so the values are
        # wrong; max_abs_diff_vs_masked_nchw shows it, and the time is still that of its torch.mm.
        is_matmul = getattr(layer, "conv1x1", False)
        rule_book = None if is_matmul else first.indice_dict[SPCONV_NATIVE_KEY]

        def kernel() -> torch.Tensor:
            if is_matmul:
                return layer(sparse_input).features
            pairs, counts = rule_book.indice_pairs, rule_book.indice_pair_num
            if shape.kind == "max_pool":
                return spconv_functional.indice_maxpool(features, pairs, counts, num_outputs)
            if shape.stride == 1:
                return spconv_functional.indice_subm_conv(features, layer.weight, pairs, counts, num_outputs, algo)
            return spconv_functional.indice_conv(features, layer.weight, pairs, counts, num_outputs, algo)

        def forward() -> torch.Tensor:
            with intra_op_threads(1), torch.no_grad():
                return kernel()

        return LayerVariant(
            "spconv_native",
            forward,
            None,
            lambda out: self._native_rows_on_active_sites(out, out_indices),
            threads=1,
            note=f"forward only (CPU backward needs a CUDA driver); {num_outputs} output sites"
            + ("; spconv's 1x1 torch.mm path misreads its weight layout" if is_matmul else ""),
        )

    def _native_rows_on_active_sites(self, out: torch.Tensor, out_indices: torch.Tensor) -> torch.Tensor:
        """Keep the rows of spconv's output that lie on the next scale's active sites, in the backend's order."""
        out_height, out_width = self.output_size()
        flat = (out_indices[:, 0] * out_height + out_indices[:, 1]) * out_width + out_indices[:, 2]
        order = torch.full((self.active.shape[0] * out_height * out_width,), -1, dtype=torch.long)
        order[flat] = torch.arange(flat.shape[0])
        selected = order[self.sparse_sites.rows_at((out_height, out_width))]
        if bool((selected < 0).any()):
            raise RuntimeError(f"spconv's output for {self.shape.name} misses active sites of the next scale")
        return out.float().index_select(0, selected)


def compare_outputs(bench: LayerBench, variants: List[LayerVariant]) -> Dict[str, float]:
    """Return each sparse variant's max abs difference from ``masked_nchw`` on the next scale's active sites.

    Dense variants are left out: their batch norm takes statistics over hidden sites too.
    """
    outputs = {}
    for variant in variants:
        if variant.name.startswith("dense"):
            continue
        with torch.no_grad():
            outputs[variant.name] = variant.output_rows(variant.forward()).cpu()
    reference = outputs["masked_nchw"]
    return {name: float((rows - reference).abs().max()) if rows.numel() else 0.0 for name, rows in outputs.items()}
